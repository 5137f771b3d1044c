"""The floor over the C core: ffi/lib, array checks, C results decoded.

The rule (DESIGN.md, "Rules of the Python layer"): every C *result* is decoded
here, once -- a fault into an exception (`fault_from_c`), a walk output into
a named record (`GuestWalk`; the `Translation` layout `WALK_OUT` and its
entries, `walk_out_entries`) -- and
constants come from `lib`, never typed twice.  Modules above this floor may
hold `ffi`/`lib` to *call* C (allocate a struct, pass a buffer), but they
never read a C output by position.

A wrapper that owns a C struct (CpuState, PhysicalMemory, Tlb, Ept) hands it
to another layer as its `c_handle` property (the cffi pointer, alive as long
as the wrapper); its `_c` is its own business.
"""
import struct
from operator import itemgetter as _itemgetter

import numpy as np

try:
    from ptemu._native_c import ffi, lib
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "ptemu's C extension (ptemu._native_c) is not built; install the package "
        "with `pip install .` (nothing is compiled at import time)") from exc

# The header the extension was built from must be the one this code expects.
ABI_VERSION = 11
if lib.ptemu_abi_version() != ABI_VERSION or lib.PTEMU_ABI_VERSION != ABI_VERSION:
    raise ImportError("ptemu._native_c was built from another csrc/ (ABI %d, expected %d); "
                      "reinstall ptemu" % (lib.ptemu_abi_version(), ABI_VERSION))

__all__ = ["ffi", "lib", "PtemuError", "InvalidInput", "ImageError", "MmuFault",
           "PageFault", "GeneralProtection", "EptExit", "EptViolation", "EptMisconfig", "check_u64", "check_array",
           "fault_from_c", "ACCESS_CODES", "GuestWalk", "decode_walk", "walk_pa", "WALK_OUT",
           "WALK_FIELDS", "WALK_VA_WORD", "walk_out_entries", "check_layout", "FAULT_HEAD"]

U64_MAX = (1 << 64) - 1

ACCESS_CODES = {"r": lib.PTEMU_ACC_READ, "w": lib.PTEMU_ACC_WRITE, "x": lib.PTEMU_ACC_FETCH}

_CAUSE_NAMES = {
    lib.PTEMU_CAUSE_NONE: "none",
    lib.PTEMU_CAUSE_NONCANON: "non-canonical",
    lib.PTEMU_CAUSE_NOT_PRESENT: "not-present",
    lib.PTEMU_CAUSE_RSVD: "reserved-bit",
    lib.PTEMU_CAUSE_PROT: "protection",
    lib.PTEMU_CAUSE_BUS: "outside-memory",
    lib.PTEMU_CAUSE_EPT: "ept",
}


class PtemuError(Exception):
    """Base of the errors ptemu raises for bad input or bad state."""


class InvalidInput(PtemuError, ValueError):
    """An argument (number, array, state) that ptemu refuses, with the reason."""


class ImageError(PtemuError, OSError):
    """A memory image that is missing, unreadable or truncated."""


class MmuFault(Exception):
    """An architectural fault raised by a translation (the guest's exception)."""

    vector = None


class PageFault(MmuFault):
    """#PF: `.va`, `.error_code` (SDM 4.7 bits), `.cr2`; `.cause` says why
    ("not-present", "reserved-bit", "protection", "outside-memory") and
    `.level` at which paging level (0 for rights checks)."""

    vector = lib.PTEMU_VEC_PF

    def __init__(self, va, error_code, cause="not-present", level=0, message=None):
        self.va = va
        self.cr2 = va
        self.error_code = error_code
        self.cause = cause
        self.level = level
        super().__init__(message or "#PF at %#x, error code %#x (%s) [%s]" % (
            va, error_code, decode_error_code(error_code), cause))


class GeneralProtection(MmuFault):
    """#GP(0), e.g. a non-canonical address: no walk, CR2 unchanged."""

    vector = lib.PTEMU_VEC_GP

    def __init__(self, va=None, message=None, error_code=0):
        self.va = va
        self.error_code = error_code
        super().__init__(message or ("#GP(0): %#x is not canonical" % va
                                     if va is not None else "#GP(0)"))


class EptExit(MmuFault):
    """A VM exit caused by the EPT during a guest access (nested paging): the
    guest sees nothing; the hypervisor handles it and resumes.
    `.exit_reason` the basic exit reason (SDM Vol. 3D appendix C: 48 or 49;
    `.reason` is the same), `.gpa` the guest-physical address, `.gla` the
    guest-linear address, `.qualification` (SDM Vol. 3C table 28-7),
    `.level` the EPT level.  `.vector` is PTEMU_VEC_EXIT, not an exception
    vector: a VM exit delivers no exception to the guest."""

    vector = lib.PTEMU_VEC_EXIT
    exit_reason = reason = None

    def __init__(self, gpa, gla, qualification, level, message=None):
        self.gpa = gpa
        self.gla = gla
        self.va = gla
        self.qualification = qualification
        self.error_code = qualification
        self.level = level
        super().__init__(message or "%s for gpa %#x (gla %#x, qualification %#x, EPT level %d)"
                         % (self.kind, gpa, gla, qualification, level))


class EptViolation(EptExit):
    """Exit reason 48: not present in the EPT, or an access the EPT forbids."""
    exit_reason = reason = lib.PTEMU_EXIT_EPT_VIOLATION
    kind = "EPT violation"


class EptMisconfig(EptExit):
    """Exit reason 49: an EPT entry with W but not R, reserved bits, or a
    reserved memory type."""
    exit_reason = reason = lib.PTEMU_EXIT_EPT_MISCONFIG
    kind = "EPT misconfiguration"


_EPT_EXIT_CLASSES = {cls.exit_reason: cls for cls in (EptViolation, EptMisconfig)}


def ept_exit_from_c(ept_c, gla):
    """The EptExit the exit recorded in a ptemu_ept stands for (gla: the
    guest-linear address, 0 outside a guest walk)."""
    try:
        cls = _EPT_EXIT_CLASSES[ept_c.exit_reason]
    except KeyError:
        raise PtemuError("unknown EPT exit reason %d" % ept_c.exit_reason) from None
    return cls(int(ept_c.exit_gpa), gla, int(ept_c.exit_qual), int(ept_c.exit_level))


_PF_NAMES = ((lib.PTEMU_PF_P, "P"), (lib.PTEMU_PF_W, "W"), (lib.PTEMU_PF_U, "U"),
             (lib.PTEMU_PF_RSVD, "RSVD"), (lib.PTEMU_PF_I, "I"), (lib.PTEMU_PF_PK, "PK"),
             (lib.PTEMU_PF_SS, "SS"), (lib.PTEMU_PF_SGX, "SGX"))
_PF_DECODED = {}          # error code -> its names (few distinct codes occur)


def decode_error_code(ec):
    """'P W U RSVD I PK' style names of a #PF error code's bits ('-' if none)."""
    out = _PF_DECODED.get(ec)
    if out is None:
        out = " ".join(n for bit, n in _PF_NAMES if ec & bit) or "-"
        if ec.__class__ is int and 0 <= ec < 1 << 32 and len(_PF_DECODED) < 4096:
            _PF_DECODED[ec] = out
    return out


_VEC_GP, _VEC_EXIT = lib.PTEMU_VEC_GP, lib.PTEMU_VEC_EXIT
_CAUSE_NONCANON, _CAUSE_BUS = lib.PTEMU_CAUSE_NONCANON, lib.PTEMU_CAUSE_BUS


def fault_from_c(f, memory_size=None, ept_c=None):
    """Turn a filled ptemu_fault into the exception it stands for: PageFault,
    GeneralProtection (None for a non-canonical address: the caller knows
    the va), or for an EPT exit (vector PTEMU_VEC_EXIT) the EptExit that
    ept_c, the memory's ptemu_ept, recorded."""
    fcause = f.cause
    cause = _CAUSE_NAMES.get(fcause, "unknown")
    vector = f.vector
    if vector == _VEC_EXIT:
        if ept_c is None:
            raise PtemuError("an EPT exit (reason %d) from memory whose EPT state was not "
                             "given" % f.exit_reason)
        return ept_exit_from_c(ept_c, int(f.cr2))
    if vector == _VEC_GP:
        if fcause == _CAUSE_NONCANON:
            return None  # caller knows the va
        return GeneralProtection(None)
    msg = None
    if fcause == _CAUSE_BUS:
        msg = ("#PF at %#x, error code %#x (%s): the paging-structure entry at level %d "
               "lies outside physical memory%s" % (
                   f.cr2, f.error_code, decode_error_code(f.error_code), f.level,
                   "" if memory_size is None else " (size %#x)" % memory_size))
    return PageFault(int(f.cr2), int(f.error_code), cause, int(f.level), msg)


# The typecode for 64-bit words that Python stores ints into (array.array,
# memoryview.cast): "L" where unsigned long is 64 bits (LP64), whose store
# converts an int with PyLong_AsUnsignedLong's digit loop -- about 200
# instructions less than "Q"'s byte-array path (callgrind, CPython 3.11) --
# with the same range checks (OverflowError, TypeError).  Scalar hot paths
# store a va or a value so on every call.
WORD64 = "L" if struct.calcsize("L") == 8 else "Q"


def check_u64(value, name="value"):
    """An int in 0..2**64-1, or InvalidInput."""
    if isinstance(value, (bool,)) or not isinstance(value, (int, np.integer)):
        raise InvalidInput("%s must be an integer, not %s" % (name, type(value).__name__))
    value = int(value)
    if value < 0 or value > U64_MAX:
        raise InvalidInput("%s %#x does not fit in 64 bits" % (name, value) if value >= 0
                           else "%s must not be negative (%d)" % (name, value))
    return value


def check_array(arr, dtype, name, writable=False, length=None):
    """A 1-D, C-contiguous, native-order numpy array of exactly `dtype`."""
    if not isinstance(arr, np.ndarray):
        raise InvalidInput("%s must be a numpy array, not %s" % (name, type(arr).__name__))
    dtype = np.dtype(dtype)
    if arr.dtype != dtype:
        raise InvalidInput("%s must have dtype %s, not %s" % (name, dtype, arr.dtype))
    if not arr.dtype.isnative:
        raise InvalidInput("%s must be in native byte order" % name)
    if arr.ndim != 1:
        raise InvalidInput("%s must be 1-D, not of shape %s" % (name, arr.shape))
    if not arr.flags.c_contiguous:
        raise InvalidInput("%s must be C-contiguous" % name)
    if writable and not arr.flags.writeable:
        raise InvalidInput("%s must be writable" % name)
    if length is not None and len(arr) != length:
        raise InvalidInput("%s must have length %d, not %d" % (name, length, len(arr)))
    return arr


def ptr(arr, ctype):
    """A C pointer into a checked numpy array (no copy)."""
    return ffi.cast(ctype, ffi.from_buffer(arr, require_writable=False))


# -- layout checks that hold under `python -O` (an assert would vanish) --------------
def check_layout(ok, what):
    """Refuse to import against a C build whose struct layout is not the one
    this code decodes (what: which layout)."""
    if not ok:
        raise ImportError("ptemu._native_c layout mismatch: %s; reinstall ptemu" % what)


# -- a fault (ptemu_fault): its head from a copy of its bytes --------------------------
#: (vector, error_code, cr2) of a ptemu_fault, from a copy of its bytes (one
#: struct unpack where three cffi field reads cost ~600 instructions each).
FAULT_HEAD = struct.Struct("<IIQ").unpack_from
check_layout((ffi.offsetof("ptemu_fault", "vector"), ffi.offsetof("ptemu_fault", "error_code"),
              ffi.offsetof("ptemu_fault", "cr2")) == (0, 4, 8), "ptemu_fault")


# -- the walk output (ptemu_walk_out), decoded once -----------------------------------
#: ptemu_walk_out as a whole (its size, for the buffers C fills): va, pa,
#: page_size, leaf, level, rights, nentries, mem_refs, tlb_hit, first_level,
#: entry_pa[5] + entry[5].  Fields are read through WALK_FIELDS below.
WALK_OUT = struct.Struct("<4Q6I80s")
check_layout(WALK_OUT.size == ffi.sizeof("ptemu_walk_out"), "sizeof(ptemu_walk_out)")
check_layout(ffi.offsetof("ptemu_walk_out", "entry_pa") == 56, "ptemu_walk_out.entry_pa")
check_layout(ffi.offsetof("ptemu_walk_out", "pa") == 8, "ptemu_walk_out.pa")

#: Translation (mmu.py) is a whole ptemu_walk_out as bytes, decoded a field at
#: a time when asked: WALK_FIELDS[name](raw) -> (value,), at the C offset of
#: each scalar field; walk_out_entries(raw) the (entry_pa, value) pairs read.
WALK_FIELDS = {
    name: struct.Struct("<%dx%s" % (f.offset, {4: "I", 8: "Q"}[ffi.sizeof(f.type)])).unpack_from
    for name, f in ffi.typeof("ptemu_walk_out").fields if f.type.kind == "primitive"}
#: Where Python writes the address ptemu_mmu_translate_one() reads: the index
#: of ptemu_walk_out.va in the struct seen as uint64 words.
WALK_VA_WORD = ffi.offsetof("ptemu_walk_out", "va") // 8
check_layout(ffi.offsetof("ptemu_walk_out", "va") % 8 == 0, "ptemu_walk_out.va")
_WALK_NENTRIES = WALK_FIELDS["nentries"]
_WALK_EPA = struct.Struct("<%dx5Q" % ffi.offsetof("ptemu_walk_out", "entry_pa")).unpack_from
_WALK_E = struct.Struct("<%dx5Q" % ffi.offsetof("ptemu_walk_out", "entry")).unpack_from


def walk_out_entries(raw):
    """[(entry_pa, value), ...] of the entries a ptemu_walk_out (bytes) read, top first."""
    n = _WALK_NENTRIES(raw)[0]
    return list(zip(_WALK_EPA(raw)[:n], _WALK_E(raw)[:n]))

# The same struct unpacked word by word for the hypervisor's guest walks.
_GUEST_WALK = struct.Struct("<4Q6I10Q")
_unpack_guest_walk = _GUEST_WALK.unpack_from
_PA = struct.Struct("<Q").unpack_from
_EPA0 = 10                      # index of entry_pa[0] in the unpacked words
_E0 = 15                        # index of entry[0]


def _w(i, doc):
    return property(_itemgetter(i), doc=doc)


class GuestWalk(tuple):
    """A successful walk of the guest's own tables, as the hypervisor reads it
    (KVM's `struct guest_walker`): the gpa reached, the leaf entry and its
    level, the rights combined over the walk, and per level (top first) the
    guest-physical address of the entry read and its value after the walk.

    (A tuple underneath: made by one C-level call per #PF exit.)
    """

    __slots__ = ()

    va = _w(0, "the guest-linear address walked")
    gpa = _w(1, "the guest-physical address reached")
    page_size = _w(2, "4096, 2 MiB or 1 GiB")
    leaf = _w(3, "the guest leaf entry (A/D as the walk left them)")
    level = _w(4, "level of the guest leaf: 1 PTE, 2 PDE, 3 PDPTE")
    rights = _w(5, "PTEMU_TE_W | PTEMU_TE_U | PTEMU_TE_NX combined over the walk")
    nentries = _w(6, "number of levels read (the guest's paging levels on a full walk)")

    @property
    def gfn(self):
        return self[1] >> 12

    @property
    def entries(self):
        """The entry values, top first (KVM guest_walker.ptes)."""
        return self[_E0:_E0 + self[6]]

    @property
    def entry_gpas(self):
        """Guest-physical addresses of the entries, top first (pte_gpa)."""
        return self[_EPA0:_EPA0 + self[6]]

    @property
    def table_gpa(self):
        """The guest table holding the leaf entry (0 when no entry was read)."""
        n = self[6]
        return self[_EPA0 + n - 1] & ~0xFFF if n else 0

    def __repr__(self):
        return "GuestWalk(va=%#x, gpa=%#x, level=%d, leaf=%#x, rights=%#x)" % (
            self.va, self.gpa, self.level, self.leaf, self.rights)


_new_walk = tuple.__new__


def decode_walk(buf):
    """The GuestWalk in a ptemu_walk_out buffer (an Mmu's output bytearray)."""
    return _new_walk(GuestWalk, _unpack_guest_walk(buf))


def walk_pa(buf):
    """Only the physical address of a ptemu_walk_out buffer (the scalar hot path)."""
    return _PA(buf, 8)[0]


def table_gpa_of_fault(buf, cr3, amask):
    """The guest table a faulting walk was about to read: the frame named by
    the last entry read (or CR3 when none was).  For backing a guest frame
    the walk ran into (a BUS fault of the walk over the p2m view)."""
    w = _unpack_guest_walk(buf)
    n = w[6]
    return (w[_E0 + n - 1] if n else cr3) & amask


class WalkHandle:
    """A ptemu_mmu handle of its own over C structs owned elsewhere (a CpuState's,
    a memory's, a Tlb's `c_handle`): `c` to pass to ptemu_mmu_translate, `out` the
    walk output buffer (decode_walk / walk_pa), `fault` the fault it fills.
    For layers that run their own translations (the vCPU's guest walks)
    without reaching into an Mmu.  It keeps the walk context (and rights
    table) in a ptemu_ctx_cache, derived again only when the CPU state (any
    byte), the memory or the TLB differs (C compares), as an Mmu does."""

    __slots__ = ("c", "out", "fault", "_keep")

    def __init__(self, cpu_c, mem_c, tlb_c=None):
        self.c = ffi.new("ptemu_mmu *")
        self.c.cpu = cpu_c
        self.c.mem = mem_c
        self.c.tlb = ffi.NULL if tlb_c is None else tlb_c
        self.out = bytearray(WALK_OUT.size)
        out_c = ffi.from_buffer("ptemu_walk_out *", self.out)
        self.c.out = out_c
        self.fault = ffi.addressof(self.c[0], "fault")
        cache = ffi.new("ptemu_ctx_cache *")
        self.c.cache = cache
        self._keep = (cpu_c, mem_c, tlb_c, out_c, cache)
