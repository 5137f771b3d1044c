"""CpuState, Mmu and the results of translations.

Thin, checked wrappers over csrc/walk.c, tlb.c and batch.c: arguments are
validated here, C result codes become exceptions in one place
(`_native.fault_from_c`), and architectural events (MOV CR3/CR4/CR0, INVLPG,
INVPCID) apply the TLB rules of SDM 4.10.4.
"""
import array
from dataclasses import dataclass
from operator import attrgetter as _attrgetter

import numpy as np

from ptemu import bits
from ptemu._native import (ffi, lib, InvalidInput, PageFault, GeneralProtection,
                           check_u64, check_array, fault_from_c, ACCESS_CODES, U64_MAX,
                           WALK_OUT, WALK_FIELDS, WALK_VA_WORD, walk_out_entries, check_layout,
                           WORD64)
from ptemu.memory import PhysicalMemory
from ptemu.tlb import Tlb

__all__ = ["CpuState", "Mmu", "Translation", "BatchResult", "RunResult", "Mapping",
           "TRACE_DTYPE"]

#: One access of an address trace (ptemu_trace_rec in C).
TRACE_DTYPE = np.dtype([("va", "<u8"), ("access", "u1"), ("user", "?")], align=True)
check_layout(TRACE_DTYPE.itemsize == ffi.sizeof("ptemu_trace_rec"), "sizeof(ptemu_trace_rec)")

_MAXPHYADDR_RANGE = (32, 52)
_CR4_KNOWN = 0xffffffff


class CpuState:
    """The architectural state a page walk depends on, held in a C struct.

    Every assignment validates the whole resulting state: legacy 32-bit and
    PAE paging are not modelled (InvalidInput), LA57 needs PAE, CR0.PG needs
    CR0.PE.  EFER.LMA is set by the hardware when CR0.PG, CR4.PAE and
    EFER.LME are all 1, so it need not be given.  Plain assignment changes
    state without any TLB effect; `Mmu.write_cr3` etc. are the instructions.
    """

    __slots__ = ("_c",)

    def __init__(self, cr0=0, cr3=0, cr4=0, efer=0, cpl=0, ac=False, pkru=0, pkrs=0,
                 maxphyaddr=52, eager_accessed=False):
        self._c = ffi.new("ptemu_cpu *")
        self._assign(cr0=cr0, cr3=cr3, cr4=cr4, efer=efer, cpl=cpl, ac=ac, pkru=pkru,
                     pkrs=pkrs, maxphyaddr=maxphyaddr, eager_accessed=eager_accessed)

    @classmethod
    def long_mode(cls, cr3=0, la57=False, **kw):
        """64-bit mode with paging, WP and NX on (4-level, or 5-level with la57)."""
        cr4 = kw.pop("cr4", 0) | bits.CR4_PAE | (bits.CR4_LA57 if la57 else 0)
        return cls(cr0=kw.pop("cr0", bits.CR0_PG | bits.CR0_PE | bits.CR0_WP), cr3=cr3, cr4=cr4,
                   efer=kw.pop("efer", bits.EFER_LME | bits.EFER_LMA | bits.EFER_NXE), **kw)

    @classmethod
    def from_image(cls, image, cpu=0, efer=None, **overrides):
        """The paging state of vCPU `cpu` of a memory image (ptemu.images).

        CR0, CR3 and CR4 come from the vCPU's QEMUCPUState note.  EFER is not
        in QEMU's notes, so unless `efer` is given it is inferred: LME and LMA
        when CR0.PG and CR4.PAE are set (a 64-bit guest: 32-bit PAE paging is
        not modelled anyway), and NXE on -- every x86-64 OS sets it, and with
        NXE=0 bit 63 of an entry would be reserved instead of XD (SDM 4.5.4).
        Any other field (cr0, cr3, cr4, maxphyaddr, cpl, ...) may be
        overridden by keyword.  Raises InvalidInput when the image carries no
        such vCPU or no control registers for it.
        """
        cpus = getattr(image, "cpus", None) or []
        where = getattr(image, "path", None) or "image"
        if not cpus:
            raise InvalidInput("%s carries no vCPU state (no QEMU notes): give CR3 (and CR0, "
                               "CR4, EFER) yourself" % where)
        if isinstance(cpu, bool) or not isinstance(cpu, (int, np.integer)) \
                or not 0 <= cpu < len(cpus):
            raise InvalidInput("%s has %d vCPU%s (0..%d); there is no vCPU %r"
                               % (where, len(cpus), "s" if len(cpus) != 1 else "",
                                  len(cpus) - 1, cpu))
        regs = cpus[cpu]
        if regs.cr3 is None:
            raise InvalidInput("%s: vCPU %d has no QEMU note, so no control registers: give "
                               "CR3 (and CR0, CR4, EFER) yourself" % (where, cpu))
        cr0 = overrides.pop("cr0", regs.cr0)
        cr4 = overrides.pop("cr4", regs.cr4)
        if efer is None:
            efer = bits.EFER_NXE
            if cr0 & bits.CR0_PG and cr4 & bits.CR4_PAE:
                efer |= bits.EFER_LME | bits.EFER_LMA
        return cls(cr0=cr0, cr3=overrides.pop("cr3", regs.cr3), cr4=cr4, efer=efer,
                   **overrides)

    def _assign(self, **changes):
        st = {"cr0": None, "cr3": None, "cr4": None, "efer": None, "cpl": None, "ac": None,
              "pkru": None, "pkrs": None, "maxphyaddr": None, "eager_accessed": None}
        c = self._c
        cur = {"cr0": c.cr0, "cr3": c.cr3, "cr4": c.cr4, "efer": c.efer, "cpl": c.cpl,
               "ac": bool(c.ac), "pkru": c.pkru, "pkrs": c.pkrs,
               "maxphyaddr": c.maxphyaddr or 52,
               "eager_accessed": bool(c.options & lib.PTEMU_OPT_EAGER_A)}
        for k in st:
            st[k] = changes[k] if k in changes else cur[k]
        for k in ("cr0", "cr3", "cr4", "efer"):
            st[k] = check_u64(st[k], k)
        cpl = st["cpl"]
        if not isinstance(cpl, (int, np.integer)) or isinstance(cpl, bool) or not 0 <= cpl <= 3:
            raise InvalidInput("cpl must be 0..3, not %r" % (cpl,))
        for k in ("pkru", "pkrs"):
            v = check_u64(st[k], k)
            if v > 0xffffffff:
                raise InvalidInput("%s is a 32-bit register, %#x does not fit" % (k, v))
        m = st["maxphyaddr"]
        if (not isinstance(m, (int, np.integer)) or isinstance(m, bool)
                or not _MAXPHYADDR_RANGE[0] <= m <= _MAXPHYADDR_RANGE[1]):
            raise InvalidInput("maxphyaddr must be %d..%d, not %r" % (_MAXPHYADDR_RANGE + (m,)))
        cr0, cr3, cr4, efer = st["cr0"], st["cr3"], st["cr4"], st["efer"]
        if cr0 >> 32 or cr4 >> 32:
            raise InvalidInput("CR0 and CR4 bits 63:32 are reserved")
        if cr4 & bits.CR4_LA57 and not cr4 & bits.CR4_PAE:
            raise InvalidInput("CR4.LA57 requires CR4.PAE (5-level paging is a long-mode form)")
        paging = bool(cr0 & bits.CR0_PG)
        if paging and not cr0 & bits.CR0_PE:
            raise InvalidInput("CR0.PG requires CR0.PE")
        long_mode = paging and bool(cr4 & bits.CR4_PAE) and bool(efer & bits.EFER_LME)
        if paging and not long_mode:
            raise InvalidInput("only 4-level and 5-level paging are modelled: CR0.PG needs "
                               "CR4.PAE and EFER.LME (legacy 32-bit and PAE paging are not)")
        if efer & bits.EFER_LMA and not long_mode:
            raise InvalidInput("EFER.LMA is set only in long mode (CR0.PG, CR4.PAE, EFER.LME)")
        if long_mode:
            efer |= bits.EFER_LMA
        if cr4 & bits.CR4_PCIDE and not long_mode:
            raise InvalidInput("CR4.PCIDE requires long mode")
        c.cr0, c.cr3, c.cr4, c.efer = cr0, cr3, cr4, efer
        c.cpl = int(cpl)
        c.ac = 1 if st["ac"] else 0
        c.pkru, c.pkrs = int(st["pkru"]), int(st["pkrs"])
        c.maxphyaddr = int(m)
        c.options = lib.PTEMU_OPT_EAGER_A if st["eager_accessed"] else 0

    def _get(name):  # noqa: N805 - property factory
        def fget(self):
            return getattr(self._c, name)

        def fset(self, value):
            self._assign(**{name: value})
        return property(fget, fset)

    cr0 = _get("cr0")
    cr3 = _get("cr3")
    cr4 = _get("cr4")
    efer = _get("efer")
    cpl = _get("cpl")
    pkru = _get("pkru")
    pkrs = _get("pkrs")
    maxphyaddr = _get("maxphyaddr")
    del _get

    @property
    def c_handle(self):
        """The `ptemu_cpu *` this state lives in, to pass to C entry points
        (it lives as long as this object).  Assignments through it skip the
        checks above: change the state through the attributes."""
        return self._c

    @property
    def ac(self):
        return bool(self._c.ac)

    @ac.setter
    def ac(self, value):
        self._assign(ac=bool(value))

    @property
    def eager_accessed(self):
        return bool(self._c.options & lib.PTEMU_OPT_EAGER_A)

    @eager_accessed.setter
    def eager_accessed(self, value):
        self._assign(eager_accessed=bool(value))

    @property
    def paging(self):
        return bool(self._c.cr0 & bits.CR0_PG)

    @property
    def levels(self):
        """0 (paging off), 4 or 5."""
        if not self.paging:
            return 0
        return 5 if self._c.cr4 & bits.CR4_LA57 else 4

    @property
    def pcid(self):
        return self._c.cr3 & bits.CR3_PCID_MASK if self._c.cr4 & bits.CR4_PCIDE else 0

    def copy(self):
        return CpuState(self.cr0, self.cr3, self.cr4, self.efer, self.cpl, self.ac,
                        self.pkru, self.pkrs, self.maxphyaddr, self.eager_accessed)

    def __repr__(self):
        return ("CpuState(cr0=%#x, cr3=%#x, cr4=%#x, efer=%#x, cpl=%d, ac=%s, pkru=%#x, "
                "pkrs=%#x, maxphyaddr=%d)" % (self.cr0, self.cr3, self.cr4, self.efer, self.cpl,
                                              self.ac, self.pkru, self.pkrs, self.maxphyaddr))


# ptemu_walk_out, kept whole: its layout and decoders are _native's.
_OUT = WALK_OUT
_TE_W, _TE_U, _TE_NX = lib.PTEMU_TE_W, lib.PTEMU_TE_U, lib.PTEMU_TE_NX


def _field(name, doc, conv=None):
    get = WALK_FIELDS[name]
    if conv is None:
        def fget(self):
            return get(self._out)[0]
    else:
        def fget(self):
            return conv(get(self._out)[0])
    return property(fget, doc=doc)


class Translation:
    """A successful translation: va, pa, page_size, level (1 PTE, 2 PDE,
    3 PDPTE; 0 with paging off), writable, user, executable (rights
    combined over all levels), leaf, tlb_hit, mem_refs, entries.

    entries: (entry_pa, value) for every paging-structure entry read from
    memory by this translation, top first, values as they are in memory
    after the walk (A/D set).  Without a TLB that is every level; on a TLB
    hit it is empty and on a paging-structure-cache hit it starts lower
    (`first_level` says where).

    (Underneath: pa, and a copy of the C output struct from which every
    other attribute is decoded when read -- a scalar call is dominated by
    making objects, so it makes as few as it can.  Read-only.)
    """

    __slots__ = ("_pa", "_out")

    pa = property(_attrgetter("_pa"), doc="the physical address")
    va = _field("va", "the virtual address")
    page_size = _field("page_size", "4096, 2 MiB or 1 GiB")
    leaf = _field("leaf", "the leaf entry after the walk (0 on a TLB hit)")
    level = _field("level", "level of the leaf entry")
    rights = _field("rights", "PTEMU_TE_W | PTEMU_TE_U | PTEMU_TE_NX combined over all levels")
    mem_refs = _field("mem_refs", "memory references this translation made")
    first_level = _field("first_level", "level of entries[0]")
    tlb_hit = _field("tlb_hit", "True when a TLB entry answered", bool)
    writable = _field("rights", "writable at every level", lambda r: bool(r & _TE_W))
    user = _field("rights", "user-mode at every level", lambda r: bool(r & _TE_U))
    executable = _field("rights", "no level has XD set", lambda r: not r & _TE_NX)

    @property
    def entries(self):
        return walk_out_entries(self._out)

    def __eq__(self, other):
        if not isinstance(other, Translation):
            return NotImplemented
        return self._pa == other._pa and self._out == other._out

    def __hash__(self):
        return hash((self._pa, self._out))

    def __reduce__(self):
        return (_translation, (self._pa, self._out))

    def __repr__(self):
        return "Translation(va=%#x, pa=%#x, page_size=%#x, level=%d, %s%s%s)" % (
            self.va, self.pa, self.page_size, self.level, "W" if self.writable else "-",
            "U" if self.user else "S", "X" if self.executable else "-")


def _translation(pa, out):
    """A Translation of pa and the walk output `out` (a copy is kept)."""
    t = Translation()
    t._pa = pa
    t._out = bytes(out)
    return t


_WALK_PA = WALK_FIELDS["pa"]


@dataclass
class BatchResult:
    """translate_many: pa (uint64, 0 where not translated), vector (uint8: 0
    translated, 13 #GP, 14 #PF), error_code (uint32), exit_reason (uint16: 0,
    or under nested paging an EPT exit's basic exit reason, 48 violation / 49
    misconfiguration, SDM Vol. 3D appendix C).  An EPT exit is no exception
    the guest sees: its vector is PTEMU_VEC_EXIT (255) -- never 0, so `vector
    == 0` means translated -- and error_code holds the exit qualification."""
    pa: np.ndarray
    vector: np.ndarray
    error_code: np.ndarray
    exit_reason: np.ndarray

    @property
    def ok(self):
        """True exactly where the address translated (no fault, no EPT exit)."""
        return self.vector == 0


@dataclass
class RunResult:
    """mmu.run: index of the first faulting access (== len(trace) if none);
    vector, error_code and exit_reason as in BatchResult (an EPT exit:
    vector PTEMU_VEC_EXIT, exit_reason 48/49, fault the EptExit)."""
    index: int
    vector: int
    error_code: int
    cr2: int
    cause: str
    fault: object  # the exception the faulting access stands for, or None
    exit_reason: int = 0

    @property
    def completed(self):
        return self.vector == 0


class _FaultRunResult(RunResult):
    """The RunResult of a run that stopped at a #PF, whose `cause` and `fault`
    (the PageFault fault_from_c makes) are made when first asked for, from a
    copy of the fault struct's bytes (the struct is refilled by the next run):
    a guest kernel resuming after each fault it handles needs only the index,
    error code and CR2.  The same fields and values as the RunResult built
    eagerly (NativeVcpu.run, VCpu.run)."""

    def __init__(self, index, vector, error_code, cr2, f_bytes, memory_size):
        self.index, self.vector, self.error_code, self.cr2 = index, vector, error_code, cr2
        self._f_bytes = f_bytes
        self._memory_size = memory_size
        self._exc = None

    @property
    def fault(self):
        if self._exc is None:
            f = ffi.new("ptemu_fault *")
            ffi.memmove(f, self._f_bytes, len(self._f_bytes))
            self._exc = fault_from_c(f, self._memory_size)
        return self._exc

    @property
    def cause(self):
        return self.fault.cause


class Mapping:
    """A present leaf: va, pa, page_size, flags (the leaf's bits outside the
    address field), plus level and the rights ANDed/ORed over all levels."""

    __slots__ = ("va", "pa", "page_size", "flags", "level", "rights")

    def __init__(self, va, pa, page_size, flags, level, rights):
        self.va, self.pa, self.page_size, self.flags = va, pa, page_size, flags
        self.level, self.rights = level, rights

    def __iter__(self):
        return iter((self.va, self.pa, self.page_size, self.flags))

    def __eq__(self, other):
        return tuple(self) == tuple(other)

    @property
    def writable(self):
        return bool(self.rights & lib.PTEMU_TE_W)

    @property
    def user(self):
        return bool(self.rights & lib.PTEMU_TE_U)

    @property
    def executable(self):
        return not self.rights & lib.PTEMU_TE_NX

    def __repr__(self):
        return "Mapping(va=%#x, pa=%#x, page_size=%#x, flags=%#x)" % tuple(self)


_mmu_translate = lib.ptemu_mmu_translate
_mmu_translate_one = lib.ptemu_mmu_translate_one
_new_translation = Translation
_mmu_translate_many = lib.ptemu_mmu_translate_many
_mmu_run = lib.ptemu_mmu_run
_from_buffer = ffi.from_buffer
_ACC = dict(ACCESS_CODES)
_USER_FLAGS = {None: lib.PTEMU_IN_CPL, True: lib.PTEMU_IN_USER, False: 0}
_NO_AD = lib.PTEMU_IN_NO_AD
_IMPLICIT = lib.PTEMU_IN_IMPLICIT


def _access_code(access):
    try:
        return ACCESS_CODES[access]
    except (KeyError, TypeError):
        raise InvalidInput("access must be 'r', 'w' or 'x', not %r" % (access,)) from None


class Mmu:
    """Translations over `memory` with the live state `cpu`, through `tlb` if given."""

    def __init__(self, memory, cpu, tlb=None):
        if not isinstance(memory, PhysicalMemory):
            raise InvalidInput("memory must be a PhysicalMemory")
        if not memory.size:
            raise InvalidInput("memory is empty")
        if not isinstance(cpu, CpuState):
            raise InvalidInput("cpu must be a CpuState")
        if tlb is not None and not isinstance(tlb, Tlb):
            raise InvalidInput("tlb must be a Tlb or None")
        self.memory = memory
        self.cpu = cpu
        self.tlb = tlb
        self._mem_c = memory._c
        self._tlb_c = tlb._c if tlb is not None else ffi.NULL
        self._m = ffi.new("ptemu_mmu *")
        self._m.cpu = cpu._c
        self._m.mem = memory._c
        self._m.tlb = self._tlb_c
        # An array of words: its tobytes() (each scalar translate's copy of
        # the output) costs a quarter less than a memoryview's; WORD64 makes
        # the va store cheap.
        self._outbuf = array.array(WORD64, bytes(_OUT.size))
        self._out_c = ffi.from_buffer("ptemu_walk_out *", self._outbuf)
        self._m.out = self._out_c
        # The walk context and its rights table, kept until the CPU state
        # (any byte of cpu._c), the memory or the TLB changes: C compares.
        self._cache = ffi.new("ptemu_ctx_cache *")
        self._m.cache = self._cache
        self._fault = ffi.addressof(self._m[0], "fault")
        self._ept_c = memory._c.ept if memory._c.ept != ffi.NULL else None
        # translate()'s common case (user=None, A/D on) calls C with one
        # argument: a handle per access kind, its access and flags set here,
        # sharing the output and the context cache; the address goes into
        # the output's va word first.
        self._one_h = ffi.new("ptemu_mmu[3]")
        self._one = {}
        for name, code in ACCESS_CODES.items():
            h = self._one_h[code]
            h.cpu, h.mem, h.tlb = cpu._c, memory._c, self._tlb_c
            h.out, h.cache = self._out_c, self._cache
            h.access, h.flags = code, lib.PTEMU_IN_CPL
            self._one[name] = ffi.addressof(h)

    # -- translation --------------------------------------------------------
    def _user_flag(self, user):
        if user is None:
            return lib.PTEMU_IN_CPL
        return lib.PTEMU_IN_USER if user else 0

    def _raise(self, r, va, fault=None):
        if r == lib.PTEMU_VEC_GP:
            raise GeneralProtection(va)
        raise fault_from_c(self._fault if fault is None else fault, self.memory.size,
                           self._ept_c)

    def translate(self, va, access="r", user=None, update_ad=True, implicit=False):
        """Translate one access; raises PageFault or GeneralProtection.

        user=None: a user-mode access iff CPL == 3.  implicit=True: an
        implicit supervisor-mode access (e.g. a descriptor-table read), which
        SMAP checks whatever RFLAGS.AC says.  update_ad=False probes: no A/D
        write, and the TLB is neither consulted nor filled.
        """
        if user is None and update_ad and not implicit:
            # The common case: one C call with one argument.  The store into
            # the output's va word converts va as cffi would (OverflowError,
            # TypeError); any refusal takes the general path, which says why.
            # update_ad and implicit are read for their truth, as the general
            # path reads them.
            out = self._outbuf
            try:
                h = self._one[access]
                out[WALK_VA_WORD] = va
            except (KeyError, TypeError, ValueError, OverflowError):
                return self._translate(va, access, user, update_ad, implicit)
            pa = _mmu_translate_one(h)
            if not pa and h.fault.vector:
                self._raise(h.fault.vector, va, ffi.addressof(h[0], "fault"))
            t = _new_translation()
            t._pa = pa
            t._out = out.tobytes()
            return t
        return self._translate(va, access, user, update_ad, implicit)

    def _translate(self, va, access, user, update_ad, implicit):
        # The general case leans on cffi's own conversion of va to uint64_t
        # (OverflowError / TypeError) and on the lookup tables; the except
        # clause re-checks slowly to say exactly what was wrong.
        try:
            flags = _USER_FLAGS[user]
            if not update_ad:
                flags |= _NO_AD
            if implicit:
                flags = (flags & _NO_AD) | _IMPLICIT
            r = _mmu_translate(self._m, va, _ACC[access], flags)
        except (KeyError, TypeError, OverflowError):
            va = check_u64(va, "virtual address")
            _access_code(access)
            raise InvalidInput("user must be None, True or False, not %r" % (user,)) from None
        if r:
            self._raise(r, va)
        return _translation(_WALK_PA(self._outbuf)[0], self._outbuf)

    def walk_entries(self, va, access="r", user=None):
        """A side-effect-free walk: (entries, Translation or the fault).

        For listings: it reports the entries read even when the walk faults.
        """
        try:
            t = self.translate(va, access, user, update_ad=False)
            return t.entries, t
        except PageFault as exc:
            return walk_out_entries(self._outbuf), exc

    def _vas(self, vas):
        if isinstance(vas, np.ndarray):
            return check_array(vas, np.uint64, "vas")
        try:
            seq = [check_u64(v, "virtual address") for v in vas]
        except TypeError:
            raise InvalidInput("vas must be a numpy uint64 array or a sequence of ints") from None
        return np.array(seq, dtype=np.uint64)

    def translate_many(self, vas, access="r", user=None, update_ad=True):
        """Translate every address of `vas` in one C call (GIL released).

        access: 'r'/'w'/'x' for all, or an array of per-element codes, uint8
        0 read / 1 write / 2 fetch (or an 'S1' array of b'r', b'w', b'x').
        """
        vas = self._vas(vas)
        n = len(vas)
        acc_arr = ffi.NULL
        acc_all = 0
        if isinstance(access, str):
            acc_all = _access_code(access)
        else:
            if isinstance(access, np.ndarray) and access.dtype == np.dtype("S1"):
                codes = np.full(access.shape, 255, dtype=np.uint8)
                for ch, code in ((b"r", 0), (b"w", 1), (b"x", 2)):
                    codes[access == ch] = code
                access = codes
            access = check_array(access, np.uint8, "access", length=n)
            if n and int(access.max()) > 2:
                raise InvalidInput("access codes must be 0 (read), 1 (write) or 2 (fetch)")
            acc_arr = ffi.from_buffer("uint8_t[]", access)
        flags = self._user_flag(user) | (0 if update_ad else lib.PTEMU_IN_NO_AD)
        pa = np.empty(n, dtype=np.uint64)
        # Zero-filled (untouched pages until a fault writes one): C writes
        # vector, exit_reason and error_code only for the addresses that fault.
        vector = np.zeros(n, dtype=np.uint8)
        ec = np.zeros(n, dtype=np.uint32)
        reason = np.zeros(n, dtype=np.uint16)
        _mmu_translate_many(self._m, _from_buffer("uint64_t[]", vas), acc_arr, acc_all, flags, n,
                            _from_buffer("uint64_t[]", pa), _from_buffer("uint8_t[]", vector),
                            _from_buffer("uint16_t[]", reason), _from_buffer("uint32_t[]", ec))
        return BatchResult(pa, vector, ec, reason)

    def run(self, trace, start=0, pa=None):
        """Run trace[start:] through TLB and walker until the first fault.

        trace: a 1-D array of TRACE_DTYPE.  pa: optional uint64 array of
        len(trace), filled with the physical address of each access done.
        """
        trace = check_array(trace, TRACE_DTYPE, "trace")
        n = len(trace)
        start = check_u64(start, "start")
        if start > n:
            raise InvalidInput("start %d is past the end of the trace (%d)" % (start, n))
        if n and int(trace["access"].max()) > 2:
            raise InvalidInput("trace access codes must be 0 (read), 1 (write) or 2 (fetch)")
        pa_ptr = ffi.NULL
        if pa is not None:
            check_array(pa, np.uint64, "pa", writable=True, length=n)
            pa_ptr = ffi.from_buffer("uint64_t[]", pa, require_writable=True)
        f = self._fault
        idx = _mmu_run(self._m, _from_buffer("ptemu_trace_rec[]", trace), n, start, pa_ptr)
        if idx == n:
            return RunResult(n, 0, 0, 0, "none", None)
        va = int(trace["va"][idx])
        if f.vector == lib.PTEMU_VEC_GP:
            exc = GeneralProtection(va)
            return RunResult(int(idx), exc.vector, 0, 0, "non-canonical", exc)
        exc = fault_from_c(f, self.memory.size, self._ept_c)
        return RunResult(int(idx), int(f.vector), int(f.error_code), int(f.cr2),
                         getattr(exc, "cause", "ept"), exc, int(f.exit_reason))

    # -- architectural events (SDM 4.10.4.1) ----------------------------------
    def _flush(self, kind, pcid, va, cause):
        if self.tlb is not None:
            lib.ptemu_tlb_flush(self._tlb_c, kind, pcid, va, cause)

    def _cr3_reserved(self, value):
        # bits 62:MAXPHYADDR are reserved (#GP on MOV to CR3); bit 63 is the
        # no-flush hint and only means something with CR4.PCIDE=1.
        m = self.cpu.maxphyaddr
        rsvd = ((1 << 63) - 1) & ~((1 << m) - 1)
        if not self.cpu._c.cr4 & bits.CR4_PCIDE:
            rsvd |= 1 << 63
        return value & rsvd

    def write_cr3(self, value):
        """MOV to CR3: PCIDE=0 flushes non-global entries and PSCs of PCID 0;
        PCIDE=1 those of the new PCID, or nothing when bit 63 is set (bit 63
        is not stored)."""
        value = check_u64(value, "CR3")
        if self._cr3_reserved(value):
            raise GeneralProtection(message="#GP(0): reserved bits set in CR3 value %#x" % value)
        pcide = bool(self.cpu._c.cr4 & bits.CR4_PCIDE)
        noflush = pcide and bool(value & bits.CR3_NOFLUSH)
        value &= ~bits.CR3_NOFLUSH & U64_MAX
        self.cpu._c.cr3 = value
        if not noflush:
            pcid = value & bits.CR3_PCID_MASK if pcide else 0
            self._flush(lib.PTEMU_FLUSH_PCID, pcid, 0, lib.PTEMU_FLUSHED_BY_CR3)

    def write_cr4(self, value):
        """MOV to CR4 with the flushes of SDM 4.10.4.1: changing PGE or
        clearing PCIDE flushes everything; changing PAE or setting SMEP
        flushes the current PCID."""
        value = check_u64(value, "CR4")
        cpu = self.cpu
        old = cpu._c.cr4
        lma = bool(cpu._c.efer & bits.EFER_LMA)
        if value >> 32:
            raise GeneralProtection(message="#GP(0): CR4 bits 63:32 are reserved")
        if lma and (old ^ value) & bits.CR4_LA57:
            raise GeneralProtection(message="#GP(0): CR4.LA57 cannot change in long mode")
        if lma and not value & bits.CR4_PAE:
            raise GeneralProtection(message="#GP(0): CR4.PAE cannot be cleared in long mode")
        if value & bits.CR4_PCIDE and not old & bits.CR4_PCIDE:
            if not lma or cpu._c.cr3 & bits.CR3_PCID_MASK:
                raise GeneralProtection(
                    message="#GP(0): setting CR4.PCIDE needs long mode and CR3[11:0] = 0")
        old_pcid = cpu.pcid
        cpu.cr4 = value
        changed = old ^ value
        if changed & bits.CR4_PGE or (old & bits.CR4_PCIDE and not value & bits.CR4_PCIDE):
            self._flush(lib.PTEMU_FLUSH_ALL, 0, 0, lib.PTEMU_FLUSHED_BY_CR4)
        elif changed & bits.CR4_PAE or (value & bits.CR4_SMEP and not old & bits.CR4_SMEP):
            self._flush(lib.PTEMU_FLUSH_PCID_ALL, old_pcid, 0, lib.PTEMU_FLUSHED_BY_CR4)

    def write_cr0(self, value):
        """MOV to CR0: clearing PG flushes everything (SDM 4.10.4.1)."""
        value = check_u64(value, "CR0")
        cpu = self.cpu
        old = cpu._c.cr0
        if old & bits.CR0_PG and not value & bits.CR0_PG and cpu._c.efer & bits.EFER_LMA:
            raise GeneralProtection(message="#GP(0): CR0.PG cannot be cleared in 64-bit mode")
        # SDM 2.5 and MOV CR0's exceptions: these are #GP(0) on hardware, not
        # merely states ptemu does not model.
        if value >> 32:
            raise GeneralProtection(message="#GP(0): CR0 bits 63:32 are reserved")
        if value & bits.CR0_PG and not value & bits.CR0_PE:
            raise GeneralProtection(message="#GP(0): CR0.PG requires CR0.PE")
        if (value & bits.CR0_PG and not old & bits.CR0_PG and cpu._c.efer & bits.EFER_LME
                and not cpu._c.cr4 & bits.CR4_PAE):
            raise GeneralProtection(message="#GP(0): enabling paging with EFER.LME=1 "
                                    "needs CR4.PAE")
        cpu.cr0 = value
        if old & bits.CR0_PG and not value & bits.CR0_PG:
            self._flush(lib.PTEMU_FLUSH_ALL, 0, 0, lib.PTEMU_FLUSHED_BY_CR0)

    def _canonical(self, va):
        width = 57 if self.cpu._c.cr4 & bits.CR4_LA57 else 48
        top = va >> (width - 1)
        return top == 0 or top == (1 << (65 - width)) - 1

    def invlpg(self, va):
        """INVLPG: the page of va in the current PCID, global entries for it in
        every PCID, and every PSC entry of the current PCID.  A non-canonical
        address is a no-op, as on hardware."""
        va = check_u64(va, "virtual address")
        if self._canonical(va):
            self._flush(lib.PTEMU_FLUSH_INVLPG, self.cpu.pcid, va, lib.PTEMU_FLUSHED_BY_INVLPG)

    def invpcid(self, kind, pcid, va=0):
        """INVPCID type 0 (address, not globals), 1 (one PCID, not globals),
        2 (all, globals too), 3 (all but globals)."""
        if isinstance(kind, bool) or kind not in (0, 1, 2, 3):
            raise GeneralProtection(message="#GP(0): INVPCID type %r is not 0..3" % (kind,))
        pcid = check_u64(pcid, "pcid")
        va = check_u64(va, "virtual address")
        if pcid > 0xfff:
            raise GeneralProtection(message="#GP(0): PCID %#x does not fit in 12 bits" % pcid)
        pcide = bool(self.cpu._c.cr4 & bits.CR4_PCIDE)
        if kind in (0, 1) and not pcide and pcid:
            raise GeneralProtection(message="#GP(0): PCID %#x with CR4.PCIDE=0" % pcid)
        if kind == 0 and not self._canonical(va):
            raise GeneralProtection(va)
        cause = lib.PTEMU_FLUSHED_BY_INVPCID
        if kind == 0:
            self._flush(lib.PTEMU_FLUSH_ADDR, pcid, va, cause)
        elif kind == 1:
            self._flush(lib.PTEMU_FLUSH_PCID, pcid, 0, cause)
        elif kind == 2:
            self._flush(lib.PTEMU_FLUSH_ALL, 0, 0, cause)
        else:
            self._flush(lib.PTEMU_FLUSH_NONGLOBAL, 0, 0, cause)

    # -- enumeration ----------------------------------------------------------
    def mappings(self):
        """Every present leaf, ascending in sign-extended virtual order.

        Like QEMU's monitor, this follows P and PS only: reserved bits are not
        checked (translate() does that); tables outside memory are skipped.
        """
        cpu = self.cpu
        levels = cpu.levels
        if levels == 0:
            return
        m = cpu.maxphyaddr
        addr_mask = ((1 << m) - 1) & ~0xFFF
        nxe = bool(cpu.efer & bits.EFER_NXE)
        width = 9 * levels + 12
        wu = int(lib.PTEMU_TE_W | lib.PTEMU_TE_U)
        table = self.memory.table

        def rec(pa, level, va_base, rights):
            t = table(pa)
            if t is None:
                return
            present = np.flatnonzero(t & 1)
            shift = 12 + 9 * (level - 1)
            for i in present.tolist():
                e = int(t[i])
                r = rights & (e | ~wu)
                if nxe and e >> 63:
                    r |= lib.PTEMU_TE_NX
                va = va_base | (i << shift)
                if level == 1 or (level <= 3 and e & bits.PTE_PS):
                    psz = 1 << shift
                    sva = va - (1 << width) if va >> (width - 1) else va
                    yield Mapping(sva & U64_MAX, e & addr_mask & ~(psz - 1), psz,
                                  e & ~addr_mask & U64_MAX, level, r)
                else:
                    yield from rec(e & addr_mask, level - 1, va, r)

        # Index order is ascending sign-extended order: the lower half
        # (0x0000...) comes before the upper half (0xffff...), as in QEMU.
        yield from rec(cpu.cr3 & addr_mask, levels, 0, wu)
