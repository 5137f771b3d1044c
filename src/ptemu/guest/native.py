"""NativeMachine: the machine contract with no hypervisor in between.

The reference for "invisible to the guest": the guest's own page tables are
the tables the MMU walks (CR3 is the guest's CR3), guest-physical memory is
one plain PhysicalMemory, and every guest event (MOV CR3, INVLPG, a #PF) is
the architectural event itself, with the TLB rules of SDM 4.10.4.  A VM built
by ptemu.hypervisor must give its guest exactly what this machine gives.

Layout of the contract (docs/machine-contract.md, shared with the hypervisor):

    machine.paging        "native"
    machine.unsync        False (only meaningful for shadow VMs)
    machine.memory_bytes  guest-physical size
    machine.phys          PhysicalMemory (read_u64/write_u64/read/write/size)
    machine.vcpu          NativeVcpu: cpu, write_cr3, write_cr4, invlpg, access,
                          load_u64, store_u64, run, hypercall
    machine.stats         counters (a plain dict)

The paravirtual hypercalls (Xen's mmu_update / mmuext_op shapes) are
accepted and performed directly, so a paravirtual guest kernel runs
unchanged on this machine.
"""
from collections import defaultdict

from ptemu._native import (ffi, lib, InvalidInput, PageFault, GeneralProtection, check_u64,
                           check_array, fault_from_c, walk_pa, ACCESS_CODES, U64_MAX,
                           FAULT_HEAD)
from ptemu.memory import PhysicalMemory
from ptemu.mmu import CpuState, Mmu, RunResult, TRACE_DTYPE, _FaultRunResult
from ptemu.tlb import Tlb
from ptemu._native import WalkHandle, WORD64
from ptemu.hypervisor.exits import NoExitControl, check_stores
from ptemu.hypervisor.paravirt import mmu_update_items

__all__ = ["NativeMachine", "NativeVcpu", "HYPERCALLS"]

#: The paravirtual operations of the machine contract.
HYPERCALLS = ("mmu_update", "new_baseptr", "invlpg", "flush_tlb")

_translate_c = lib.ptemu_mmu_translate
_store_stream = lib.ptemu_store_stream
_mmu_run = lib.ptemu_mmu_run
_IN_CPL = lib.PTEMU_IN_CPL
_ACC_WRITE = ACCESS_CODES["w"]
_VEC_GP = lib.PTEMU_VEC_GP
_NULL = ffi.NULL


class NativeVcpu(NoExitControl):
    """A CPU running the guest directly: guest accesses go to an Mmu over
    guest-physical memory whose CR3 is the guest's own CR3.

    A true fault is the only kind there is: it reaches the caller as the
    PageFault (or GeneralProtection) the hardware raises.
    """

    def __init__(self, machine, tlb):
        self._machine = machine
        self._stats = machine.stats
        #: The CpuState the guest sees (and the one the MMU uses: no hypervisor).
        self.cpu = CpuState.long_mode()
        self.mmu = Mmu(machine.phys, self.cpu, tlb)
        self.tlb = tlb
        self._phys = machine.phys
        self._memory_size = machine.phys.size
        self._mem_c = machine.phys._c
        self._translate = self.mmu.translate
        self._val = ffi.new("uint64_t *")
        # The vCPU's own walks (scalar loads and stores, store streams): the
        # Mmu's C entry point through a handle (with a walk-context cache).
        self._stream = WalkHandle(self.cpu._c, self._mem_c,
                                  tlb._c if tlb is not None else None)
        self._stream_c, self._fault = self._stream.c, self._stream.fault
        self._fault_bytes = ffi.buffer(self._stream.fault)
        self._checked_trace = None      # the last trace run() checked (kept alive)
        self._trace_c = None
        self._trace_n = 0
        # store_u64's C call: a store stream of one record, written through a
        # memoryview of its two words (va, value).
        self._one = ffi.new("ptemu_store_rec[1]")
        self._one_words = memoryview(ffi.buffer(self._one)).cast(WORD64)

    # -- guest accesses ---------------------------------------------------------
    def access(self, va, access="r"):
        """One access at the current CPL (user iff CPL 3); the guest-physical
        address, or PageFault / GeneralProtection as the hardware raises."""
        try:
            return self._translate(va, access).pa
        except PageFault:
            self._stats["page_fault"] += 1
            raise

    def _data_pa(self, va, access):
        """The physical address of an 8-byte data access at va (Mmu.translate's
        walk, CPL-based user/supervisor, without building a Translation)."""
        try:
            misaligned = va & 7
        except TypeError:
            misaligned = check_u64(va, "virtual address") & 7   # raises the clear error
        if misaligned:
            raise InvalidInput("load_u64/store_u64 need an 8-byte aligned address, not %#x" % va)
        h = self._stream
        try:
            r = _translate_c(h.c, va, ACCESS_CODES[access], _IN_CPL)
        except (TypeError, OverflowError):
            check_u64(va, "virtual address")                     # raises the clear error
            raise
        if r:
            self._data_fault(r, va)
        return walk_pa(h.out)

    def _data_fault(self, r, va):
        """Raise the fault of a data access's walk that returned r."""
        if r == _VEC_GP:
            raise GeneralProtection(va)
        self._stats["page_fault"] += 1
        raise fault_from_c(self._stream.fault, self._memory_size)

    def load_u64(self, va):
        """An 8-byte load at va (8-aligned); the value in guest memory."""
        if not lib.ptemu_mem_load64(self._mem_c, self._data_pa(va, "r"), self._val):
            raise InvalidInput("u64 at %#x maps outside guest memory" % va)
        return int(self._val[0])

    def store_u64(self, va, value):
        """An 8-byte store at va (8-aligned): the store stream of one store
        (translate for a write, then store, in one C call)."""
        words = self._one_words
        try:
            words[0] = va
        except (TypeError, ValueError, OverflowError):
            check_u64(va, "virtual address")    # raises the clear error
            raise
        if va & 7:
            raise InvalidInput("load_u64/store_u64 need an 8-byte aligned address, not %#x" % va)
        try:
            words[1] = value
        except (TypeError, ValueError, OverflowError):
            self._data_pa(va, "w")              # a fault comes first, as on hardware
            check_u64(value, "value")           # raises the clear error
            raise
        f = self._fault
        f.vector = 0
        if _store_stream(self._stream_c, self._one, 1, 0):
            return
        r = f.vector
        if r:                   # the walk faulted (it filled the fault)
            self._data_fault(r, va)
        raise InvalidInput("u64 at %#x maps outside guest memory" % va)

    def store_stream(self, stores):
        """The stores in order, as store_u64 one by one, in one C loop; the first
        that fails raises what store_u64 raises (those before it are done)."""
        stores = check_stores(stores)
        n = len(stores)
        if not n:
            return
        recs = ffi.from_buffer("ptemu_store_rec[]", stores)
        i = 0
        while i < n:
            j = lib.ptemu_store_stream(self._stream.c, recs, n, i)
            if j == n:
                return
            self.store_u64(int(stores["va"][j]), int(stores["value"][j]))   # raises
            i = j + 1

    def run(self, trace, start=0):
        """Run trace[start:] on the MMU; stop at the first (true) fault.

        Mmu.run, minus its scan of the whole trace for bad access codes on
        every call (the C loop stops at one; it becomes InvalidInput here):
        a guest kernel resumes the same trace after every fault it handles.
        """
        if trace is not self._checked_trace:
            # A guest kernel resumes the same trace after every fault it
            # handles: check it (and make its C view) once, not at every resume.
            self._trace_c = ffi.from_buffer("ptemu_trace_rec[]",
                                            check_array(trace, TRACE_DTYPE, "trace"))
            self._checked_trace = trace
            self._trace_n = len(trace)
        n = self._trace_n
        if start.__class__ is not int or start < 0:
            start = check_u64(start, "start")
        if start > n:
            raise InvalidInput("start %d is past the end of the trace (%d)" % (start, n))
        idx = _mmu_run(self._stream_c, self._trace_c, n, start, _NULL)
        st = self._stats
        st["guest_accesses"] += idx - start
        if idx == n:
            return RunResult(n, 0, 0, 0, "none", None)
        f_bytes = self._fault_bytes[:]
        vector, error_code, cr2 = FAULT_HEAD(f_bytes)
        if vector == _VEC_GP:
            if self._fault.cause == lib.PTEMU_CAUSE_NONE:
                raise InvalidInput("trace[%d]: access code %d is not 0 (read), 1 (write) or "
                                   "2 (fetch)" % (idx, int(trace["access"][idx])))
            st["general_protection"] += 1
            return RunResult(idx, GeneralProtection.vector, 0, 0, "non-canonical",
                             GeneralProtection(int(trace["va"][idx])))
        st["page_fault"] += 1
        return _FaultRunResult(idx, vector, error_code, cr2, f_bytes, self._memory_size)

    # -- paravirtual operations, performed directly -----------------------------
    def hypercall(self, op, *args):
        """The paravirtual page-table operations, done as the hardware would:

        mmu_update [(gpa_of_entry, value), ...] -> count: plain stores of
        the entries; new_baseptr cr3: MOV CR3; invlpg va: INVLPG;
        flush_tlb: reload CR3 (drops every non-global translation).
        """
        st = self._stats
        if op == "mmu_update":
            updates = mmu_update_items(args, self._phys.size)
            for gpa, value in updates:      # all checked before any is applied
                self._phys.write_u64(gpa, value)
            st["hypercall"] += 1
            st["hypercall_mmu_update"] += 1
            st["mmu_update_entries"] += len(updates)
            return len(updates)
        if op == "new_baseptr":
            if len(args) != 1:
                raise InvalidInput("new_baseptr takes one CR3 value")
            self.mmu.write_cr3(args[0])
            st["hypercall"] += 1
            st["hypercall_new_baseptr"] += 1
            return 0
        if op == "invlpg":
            if len(args) != 1:
                raise InvalidInput("invlpg takes one virtual address")
            self.mmu.invlpg(args[0])
            st["hypercall"] += 1
            st["hypercall_invlpg"] += 1
            return 0
        if op == "flush_tlb":
            if args:
                raise InvalidInput("flush_tlb takes no arguments")
            # A CR3 reload: every non-global translation of the current PCID.
            self.mmu.write_cr3(self.cpu.cr3 & U64_MAX)
            st["hypercall"] += 1
            st["hypercall_flush_tlb"] += 1
            return 0
        raise InvalidInput("unknown hypercall %r (known: %s)" % (op, ", ".join(HYPERCALLS)))


class NativeMachine:
    """Guest-physical memory and one vCPU with no hypervisor (the reference).

    memory_bytes: guest-physical size (a positive multiple of 4096).
    tlb: True for Tlb.default(), False/None for no TLB, or a Tlb.
    """

    paging = "native"
    unsync = False

    def __init__(self, memory_bytes, tlb=True):
        memory_bytes = check_u64(memory_bytes, "memory_bytes")
        if not memory_bytes or memory_bytes % 4096:
            raise InvalidInput("memory_bytes must be a positive multiple of 4096, not %#x"
                               % memory_bytes)
        if tlb is True:
            tlb = Tlb.default()
        elif tlb is False:
            tlb = None
        elif tlb is not None and not isinstance(tlb, Tlb):
            raise InvalidInput("tlb must be True, False, None or a Tlb")
        self.memory_bytes = memory_bytes
        self.phys = PhysicalMemory(memory_bytes)
        self.stats = defaultdict(int)
        self.vcpu = NativeVcpu(self, tlb)

    def __repr__(self):
        return "NativeMachine(%#x, tlb=%s)" % (self.memory_bytes, self.vcpu.tlb is not None)
