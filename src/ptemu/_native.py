"""The one module that touches cffi: ffi/lib, array checks, C results to exceptions.

Everything above this floor calls C only through the names here.
"""
import numpy as np

try:
    from ptemu._native_c import ffi, lib
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "ptemu's C extension (ptemu._native_c) is not built; install the package "
        "with `pip install .` (nothing is compiled at import time)") from exc

# The header the extension was built from must be the one this code expects.
ABI_VERSION = 7
if lib.ptemu_abi_version() != ABI_VERSION or lib.PTEMU_ABI_VERSION != ABI_VERSION:
    raise ImportError("ptemu._native_c was built from another csrc/ (ABI %d, expected %d); "
                      "reinstall ptemu" % (lib.ptemu_abi_version(), ABI_VERSION))

__all__ = ["ffi", "lib", "PtemuError", "InvalidInput", "ImageError", "MmuFault",
           "PageFault", "GeneralProtection", "EptExit", "EptViolation", "EptMisconfig", "check_u64", "check_array",
           "fault_from_c", "ACCESS_CODES"]

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

    vector = 14

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

    vector = 13

    def __init__(self, va=None, message=None, error_code=0):
        self.va = va
        self.error_code = error_code
        super().__init__(message or ("#GP(0): %#x is not canonical" % va
                                     if va is not None else "#GP(0)"))


class EptExit(MmuFault):
    """A VM exit caused by the EPT during a guest access (nested paging): the
    guest sees nothing; the hypervisor handles it and resumes.
    `.gpa` the guest-physical address, `.gla` the guest-linear address,
    `.qualification` (SDM Vol. 3C table 28-7), `.level` the EPT level."""

    reason = None

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
    vector = 48
    reason = 48
    kind = "EPT violation"


class EptMisconfig(EptExit):
    """Exit reason 49: an EPT entry with W but not R, reserved bits, or a
    reserved memory type."""
    vector = 49
    reason = 49
    kind = "EPT misconfiguration"


def ept_exit_from_c(ept_c, gla):
    cls = EptMisconfig if ept_c.exit_reason == lib.PTEMU_EXIT_EPT_MISCONFIG else EptViolation
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


_EPT_EXITS = (lib.PTEMU_EXIT_EPT_VIOLATION, lib.PTEMU_EXIT_EPT_MISCONFIG)
_VEC_GP, _CAUSE_NONCANON, _CAUSE_BUS = lib.PTEMU_VEC_GP, lib.PTEMU_CAUSE_NONCANON, lib.PTEMU_CAUSE_BUS


def fault_from_c(f, memory_size=None, ept_c=None):
    """Turn a filled ptemu_fault into the exception it stands for."""
    fcause = f.cause
    cause = _CAUSE_NAMES.get(fcause, "unknown")
    vector = f.vector
    if vector in _EPT_EXITS and ept_c is not None:
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
