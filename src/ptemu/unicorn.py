"""ptemu as the MMU of a Unicorn x86-64 engine (docs/unicorn.md).

`attach(uc, mmu)` puts the engine in virtual-TLB mode and answers each of
its TLB fills with ptemu's translation of that access, in C
(csrc/ucfill.c, registered with uc_hook_add as a C function pointer):
page walks, ptemu's TLB and paging-structure caches, A/D bits, #PF error
codes.  The PhysicalMemory buffer is the engine's physical memory, mapped
with mem_map_ptr at physical 0: one memory, no copy.  Python is entered
only when ptemu refuses an access: emulation stops on the faulting
instruction, `link.fault` holds the PageFault or GeneralProtection, and
`link.resume()` continues once the caller fixed things.

Needs Unicorn 2.1 (`pip install "ptemu[unicorn]"`).
"""
import ctypes

from ptemu import bits
from ptemu._native import ffi, lib, InvalidInput, GeneralProtection, fault_from_c, check_layout
from ptemu.mmu import Mmu

__all__ = ["attach", "load_cpu_state", "UnicornLink", "MISSING"]

MISSING = 'ptemu.unicorn needs Unicorn 2.1 or later: pip install "ptemu[unicorn]"'

try:
    import unicorn as _unicorn
    from unicorn import x86_const as _x86
    from unicorn import unicorn_const as _ucc
    try:
        from unicorn.unicorn_py3.unicorn import uclib as _uclib    # the 2.1 binding
    except ImportError:  # pragma: no cover - other layouts of the binding
        from unicorn.unicorn import _uc as _uclib
except ImportError:  # pragma: no cover - exercised only without the extra
    _unicorn = None

# The attribute of an attached engine that holds its link: a second attach is
# refused, and the link (whose C struct the engine's hooks point at) lives as
# long as the engine -- and goes with it, with no registry to keep either.
_LINK_ATTR = "_ptemu_link"

# The registers a fill reads, by their slot in ptemu_uc_link.regs.
_REGS = {lib.PTEMU_UC_R_CR0: "CR0", lib.PTEMU_UC_R_CR3: "CR3", lib.PTEMU_UC_R_CR4: "CR4",
         lib.PTEMU_UC_R_CS: "CS", lib.PTEMU_UC_R_RFLAGS: "RFLAGS",
         lib.PTEMU_UC_R_EFER: "MSR", lib.PTEMU_UC_R_RIP: "RIP"}
check_layout(sorted(_REGS) == list(range(lib.PTEMU_UC_NREGS)), "ptemu_uc_link.regs slots")
_EVENTS = {lib.PTEMU_UC_EV_CR0: "cr0", lib.PTEMU_UC_EV_CR3: "cr3", lib.PTEMU_UC_EV_CR4: "cr4",
           lib.PTEMU_UC_EV_EFER: "efer", lib.PTEMU_UC_EV_CR3_SAME: "cr3_same",
           lib.PTEMU_UC_EV_INVLPG: "invlpg"}
check_layout(sorted(_EVENTS) == list(range(lib.PTEMU_UC_NEVENTS)), "ptemu_uc_link.events slots")
_GPRS = ("RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI",
         "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15")


def _require():
    if _unicorn is None:
        raise ImportError(MISSING)
    major, minor = (int(x) for x in _unicorn.__version__.split(".")[:2])
    if (major, minor) < (2, 1):
        raise ImportError("%s (found Unicorn %s)" % (MISSING, _unicorn.__version__))


def _fn_address(name):
    return ctypes.cast(getattr(_uclib, name), ctypes.c_void_p).value


def _c_address(cfunc):
    return int(ffi.cast("uintptr_t", cfunc))


# uc_hook_add with a C callback: the callback and user data are raw pointers,
# begin/end bound the hook (uc_hook_add's own prototype in the binding).
def _hook_add(uc, kind, cfunc, user_data, begin, end):
    h = ctypes.c_size_t()
    err = _uclib.uc_hook_add(uc._uch, ctypes.byref(h), kind, ctypes.c_void_p(_c_address(cfunc)),
                             ctypes.c_void_p(user_data), ctypes.c_uint64(begin),
                             ctypes.c_uint64(end))
    if err:
        raise _unicorn.UcError(err)
    return h.value


def attach(uc, mmu, watch_blocks=True):
    """Answer the TLB fills of the x86-64 engine `uc` with `mmu` -> UnicornLink.

    mmu.memory is mapped into the engine at physical address 0 (no copy);
    the engine's CR0, CR3, CR4, EFER, CPL (CS bits 1:0) and RFLAGS.AC are
    read at every fill and become mmu.cpu.  Refused (ptemu.InvalidInput):
    an engine that is not x86-64, memory already mapped where physical
    memory goes, a memory too large for the engine, a second attach.

    watch_blocks: a C block hook that sees the code's INVLPG and its MOV CR3
    of an unchanged value (docs/unicorn.md); without it only changes of
    control-register values reach ptemu's TLB.
    """
    _require()
    return UnicornLink(uc, mmu, watch_blocks)


def load_cpu_state(uc, cpu):
    """Give the engine the paging state of `cpu` (a CpuState): CR3, CR4, EFER,
    then CR0, the order in which long mode is entered (EFER.LMA follows)."""
    _require()
    uc.reg_write(_x86.UC_X86_REG_CR3, cpu.cr3)
    uc.reg_write(_x86.UC_X86_REG_CR4, cpu.cr4)
    uc.reg_write(_x86.UC_X86_REG_MSR, (lib.PTEMU_MSR_EFER, cpu.efer))
    uc.reg_write(_x86.UC_X86_REG_CR0, cpu.cr0)


class UnicornLink:
    """The link between one Unicorn engine and one Mmu (see attach)."""

    def __init__(self, uc, mmu, watch_blocks=True):
        if not isinstance(uc, _unicorn.Uc):
            raise InvalidInput("attach needs a unicorn.Uc engine, not %s" % type(uc).__name__)
        if not isinstance(mmu, Mmu):
            raise InvalidInput("attach needs a ptemu.Mmu, not %s" % type(mmu).__name__)
        if getattr(uc, _LINK_ATTR, None) is not None:
            raise InvalidInput("this engine is already attached to a ptemu Mmu")
        if uc.ctl_get_arch() != _ucc.UC_ARCH_X86 or uc.ctl_get_mode() != _ucc.UC_MODE_64:
            raise InvalidInput("ptemu is the MMU of an x86-64 engine (UC_ARCH_X86, UC_MODE_64); "
                               "this one is arch %d mode %d" % (uc.ctl_get_arch(),
                                                               uc.ctl_get_mode()))
        mem = mmu.memory
        if mem.frames is not None or mem.ept is not None:
            raise InvalidInput("the engine's physical memory must be a plain PhysicalMemory "
                               "(not a frame view or guest memory behind an EPT)")
        size = mem.size
        if size % 4096:
            raise InvalidInput("physical memory of %#x bytes is not a whole number of 4 KiB "
                               "pages (Unicorn maps pages)" % size)
        limit = min(1 << mmu.cpu.maxphyaddr, lib.PTEMU_UC_TRAP_PA)
        if size > limit:
            raise InvalidInput("physical memory of %#x bytes is too large for the engine: "
                               "physical addresses end at %#x" % (size, limit))
        trap = lib.PTEMU_UC_TRAP_PA
        for begin, end, _perms in uc.mem_regions():      # end is inclusive
            if begin < size:
                raise InvalidInput(
                    "the engine already has memory at physical %#x-%#x, where ptemu's "
                    "physical memory (0-%#x) must go" % (begin, end, size - 1))
            if begin <= trap + 0xfff and end >= trap:
                raise InvalidInput("the engine has memory at physical %#x-%#x, over ptemu's "
                                   "trap page %#x" % (begin, end, trap))
        self.uc = uc
        self.mmu = mmu
        self._until = None
        self._count = 0
        self._timeout = 0
        self._fault = None

        c = ffi.new("ptemu_uc_link *")
        self._ctx = ffi.new("uint8_t[]", lib.ptemu_uc_ctx_size())
        c.uc = ffi.cast("void *", uc._uch.value)
        c.reg_read_batch = ffi.cast("void *", _fn_address("uc_reg_read_batch"))
        c.ctl = ffi.cast("void *", _fn_address("uc_ctl"))
        c.ctl_tlb_flush = (_ucc.UC_CTL_IO_WRITE << 30) | _ucc.UC_CTL_TLB_FLUSH
        for i, name in _REGS.items():
            c.regs[i] = getattr(_x86, "UC_X86_REG_" + name)
        for i, name in enumerate(_GPRS):
            c.gprs[i] = getattr(_x86, "UC_X86_REG_" + name)
        c.cpu = mmu.cpu._c
        c.mem = mem._c
        c.tlb = mmu._tlb_c
        c.ctx = self._ctx
        self._c = c

        # One memory: the PhysicalMemory buffer itself, at physical 0.
        try:
            uc.mem_map_ptr(0, size, _ucc.UC_PROT_ALL, int(ffi.cast("uintptr_t", mem._c.base)))
        except _unicorn.UcError as exc:
            raise InvalidInput("the engine refused ptemu's physical memory of %#x bytes at "
                               "physical 0 (%s)" % (size, exc)) from None
        self._adopt_engine_state()
        uc.ctl_set_tlb_mode(_ucc.UC_TLB_VIRTUAL)
        user = int(ffi.cast("uintptr_t", c))
        # begin > end: the hook covers every address (uc_hook_add's convention).
        self._hooks = [
            _hook_add(uc, _ucc.UC_HOOK_TLB_FILL, lib.ptemu_uc_tlb_fill, user, 1, 0),
            _hook_add(uc, _ucc.UC_HOOK_MEM_UNMAPPED, lib.ptemu_uc_trap, user,
                      lib.PTEMU_UC_TRAP_PA, lib.PTEMU_UC_TRAP_PA + 0xfff),
        ]
        if watch_blocks:
            self._hooks.append(_hook_add(uc, _ucc.UC_HOOK_BLOCK, lib.ptemu_uc_block, user, 1, 0))
        lib.ptemu_uc_flush(c)
        setattr(uc, _LINK_ATTR, self)

    # -- CPU state -------------------------------------------------------------
    def _regs(self):
        r = self.uc.reg_read
        return (r(_x86.UC_X86_REG_CR0), r(_x86.UC_X86_REG_CR3), r(_x86.UC_X86_REG_CR4),
                r(_x86.UC_X86_REG_MSR, lib.PTEMU_MSR_EFER))

    def _adopt_engine_state(self):
        """The engine's state as the starting point: no TLB event."""
        cr0, cr3, cr4, efer = self._regs()
        c, cpu = self._c, self.mmu.cpu._c
        cpu.cr0, cpu.cr4, cpu.efer = cr0 & 0xffffffff, cr4 & 0xffffffff, efer
        cpu.cr3 = cr3 & ~bits.CR3_NOFLUSH if cr4 & bits.CR4_PCIDE else cr3
        c.seen[0], c.seen[1], c.seen[2], c.seen[3] = cr0 & 0xffffffff, cr3, cr4 & 0xffffffff, efer
        c.ctx_valid = 0

    def sync(self):
        """Read the engine's CPU state now (as each fill does), applying the TLB
        effect of any control-register change the code made."""
        if lib.ptemu_uc_sync(self._c):
            raise InvalidInput("the engine's registers could not be read")

    def _write_cr(self, name, seen_index, instruction, value):
        """MOV to CRn from outside: ptemu's rule (`instruction`, an Mmu method),
        then the engine's register, which the next fill then finds unchanged."""
        self.sync()
        instruction(value)
        stored = getattr(self.mmu.cpu, name)
        self.uc.reg_write(getattr(_x86, "UC_X86_REG_" + name.upper()), stored)
        self._c.seen[seen_index] = stored
        self._c.ctx_valid = 0
        self._uc_flush()

    def write_cr3(self, value):
        """MOV to CR3 from outside: the engine's CR3 and ptemu's TLB (SDM 4.10.4.1)."""
        self._write_cr("cr3", 1, self.mmu.write_cr3, value)

    def write_cr4(self, value):
        """MOV to CR4 from outside, with its TLB effect (SDM 4.10.4.1)."""
        self._write_cr("cr4", 2, self.mmu.write_cr4, value)

    def invlpg(self, va):
        """INVLPG from outside: ptemu's rule (the page in the current PCID, its
        global entries, the PCID's paging-structure caches); Unicorn has no
        per-page flush in its API, so its whole TLB is flushed."""
        self.sync()
        self.mmu.invlpg(va)
        self._uc_flush()

    def flush(self):
        """Drop everything cached: ptemu's TLB (globals too) and Unicorn's."""
        if self.mmu.tlb is not None:
            lib.ptemu_tlb_flush(self.mmu._tlb_c, lib.PTEMU_FLUSH_ALL, 0, 0,
                                lib.PTEMU_FLUSHED_BY_USER)
        self._uc_flush()

    def _uc_flush(self):
        lib.ptemu_uc_flush(self._c)

    # -- running and faults -------------------------------------------------------
    @property
    def fault(self):
        """The PageFault / GeneralProtection that stopped emulation, or None.
        (Also after a plain uc.emu_start, which then raised UcError.)"""
        if self._fault is None and self._c.state == lib.PTEMU_UC_FAULTED:
            self._fault = self._make_fault()
        return self._fault

    def emu_start(self, begin, until, timeout=0, count=0):
        """uc.emu_start through the link: returns the fault that stopped
        emulation (also `link.fault`), or None when it ran to `until`."""
        self._until, self._timeout, self._count = until, timeout, count
        return self._run(begin)

    def resume(self, until=None):
        """Continue from the faulting instruction (RIP) after the caller fixed
        things, towards `until` (default: that of the last link.emu_start)."""
        if until is not None:
            self._until = until
        if self._until is None:
            raise InvalidInput("resume() continues an emu_start(); none was made "
                               "and no until= given")
        return self._run(self.uc.reg_read(_x86.UC_X86_REG_RIP))

    def _run(self, begin):
        self._fault = None
        self._c.state = lib.PTEMU_UC_RUN
        try:
            self.uc.emu_start(begin, self._until, self._timeout, self._count)
        except _unicorn.UcError:
            if self._c.state != lib.PTEMU_UC_FAULTED:
                raise
        if self._c.state == lib.PTEMU_UC_FAULTED:
            self._fault = self._make_fault()
        else:
            self.sync()     # a MOV CR3 / INVLPG that ended the run takes effect now
        return self._fault

    def _make_fault(self):
        c = self._c
        if not c.fault_exact:
            self._probe_address()
        f = ffi.addressof(c, "fault")
        if f.vector == lib.PTEMU_VEC_GP:
            return fault_from_c(f) or GeneralProtection(int(c.fault_va))
        f.cr2 = c.fault_va
        exc = fault_from_c(f, self.mmu.memory.size)
        # The #PF delivery would load CR2 (SDM 4.7): the engine's CR2 says it too.
        self.uc.reg_write(_x86.UC_X86_REG_CR2, exc.cr2)
        return exc

    def _probe_address(self):
        """Unicorn reports only the page of a refused data access: re-run the
        faulting instruction once, with that page sent to the trap page, to see
        the address itself (csrc/ucfill.c).  The probe writes nothing."""
        uc, c = self.uc, self._c
        rip = uc.reg_read(_x86.UC_X86_REG_RIP)
        saved = uc.context_save()
        c.state = lib.PTEMU_UC_PROBE
        lib.ptemu_uc_flush(c)
        try:
            uc.emu_start(rip, 0 if rip else 1, 0, 1)
        except _unicorn.UcError:
            pass
        probed = c.state == lib.PTEMU_UC_PROBED
        uc.context_restore(saved)
        lib.ptemu_uc_flush(c)
        c.state = lib.PTEMU_UC_FAULTED
        if probed:
            c.fault_va = c.fault_page | (c.probe_pa & 0xfff)
        c.fault_exact = 1

    # -- statistics --------------------------------------------------------------------
    @property
    def stats(self):
        """fills (by access), faults, flushes of Unicorn's TLB, control-register
        events seen, and the ptemu TLB's stats (None without a TLB)."""
        c = self._c
        return {
            "fills": int(c.fills),
            "fills_by_access": {"r": int(c.fills_by_access[0]), "w": int(c.fills_by_access[1]),
                                "x": int(c.fills_by_access[2])},
            "faults": int(c.faults),
            "flushes": int(c.uc_flushes),
            "events": {name: int(c.events[i]) for i, name in _EVENTS.items()},
            "blocks_decoded": int(c.blocks_decoded),
            "tlb": self.mmu.tlb.stats if self.mmu.tlb is not None else None,
        }
