"""The guest kernel's #PF handler and the running of user code.

handle_fault: demand paging of anonymous memory (a read maps the shared zero
page read-only, a write maps a fresh zeroed frame), COW break on a write to
a COW page (copy, or reuse when the frame is no longer shared; a copy is
followed by INVLPG because the frame changed), SIGSEGV (`SegmentationFault`)
for anything else.  run/load/store: user accesses on the vCPU, every true
fault delivered here and the access retried.
"""
from ptemu import bits
from ptemu._native import InvalidInput, PageFault, GeneralProtection, check_u64, check_array
from ptemu.mmu import TRACE_DTYPE
from ptemu.guest.mm import (
    PAGE, P, W, U, A, D, NX, ADDR, _U64, PTE_COW, PTE_PROTNONE, GuestKernelError,
    SegmentationFault, _LEAF_FLAGS)

__all__ = ["FaultHandler"]

_VEC_PF = PageFault.vector
_PF_W, _PF_I, _PF_U, _PF_RSVD = bits.PF_W, bits.PF_I, bits.PF_U, bits.PF_RSVD
#: What the #PF handler did -> its counter.
_KIND_COUNTER = {kind: "pf_" + kind for kind in
                 ("zero_page", "demand_zero", "cow_copy", "cow_reuse", "spurious")}


class FaultHandler:
    """Kernel mixin: the #PF handler and user-mode execution."""

    def handle_fault(self, pid, va, error_code):
        """The kernel's #PF handler for a user-mode fault of pid at va.

        Returns what it did: "zero_page", "demand_zero", "cow_copy",
        "cow_reuse" or "spurious"; raises SegmentationFault otherwise.
        """
        return self._handle_fault(self._proc(pid), va, error_code)

    def _handle_fault(self, proc, va, error_code):
        if self.fault_log is not None:
            self.fault_log.append((proc.pid, va, error_code))
        stats = self.stats
        stats["page_fault"] += 1
        kind = self._fault(proc, va, error_code)
        stats[_KIND_COUNTER[kind]] += 1
        return kind

    def _segv(self, proc, va, ec):
        self.stats["segv"] += 1
        raise SegmentationFault(proc.pid, PageFault(va, ec))

    def _fault(self, proc, va, ec):
        if ec & (_PF_RSVD | _PF_U) != _PF_U:
            if ec & _PF_RSVD:
                raise GuestKernelError("pid %d: reserved bit set in a page-table entry for %#x "
                                       "(error code %#x)" % (proc.pid, va, ec))
            raise GuestKernelError("kernel oops: supervisor #PF at %#x (error code %#x)"
                                   % (va, ec))
        write, fetch = ec & _PF_W, ec & _PF_I
        vma = self._find_vma(proc, va) if va < self.user_top else None
        if vma is None:
            self._segv(proc, va, ec)
        prot = vma.prot
        if (write and "w" not in prot) or (fetch and "x" not in prot) or not prot:
            self._segv(proc, va, ec)
        page = va & ~(PAGE - 1)
        epa = self._pte_addr(proc.cr3, page, create=True)
        if self._npending:
            self._sync()
        e = self._entry(epa >> 3)               # (_read: the tables are in sync)
        if not e & P:
            if e & PTE_PROTNONE:
                self._segv(proc, va, ec)     # the vma says otherwise: cannot happen
            if write or not self.zero_page:
                self._set_pte(epa, self._alloc_frame() | _LEAF_FLAGS[prot])
                return "demand_zero"
            self._set_pte(epa, self.zero_frame | PTE_COW | (_LEAF_FLAGS[prot] & ~W))
            return "zero_page"
        if write and not e & W:
            if not e & PTE_COW:
                self._segv(proc, va, ec)
            frame = e & ADDR
            if frame != self.zero_frame and self._rc[frame >> 12] == 1:
                # wp_page_reuse: no INVLPG; the #PF invalidated the stale
                # read-only translation (SDM 4.10.4.1).
                self._set_pte(epa, (e | W) & ~PTE_COW & _U64)
                return "cow_reuse"
            new = self._alloc_frame()
            if frame != self.zero_frame:
                self._copy_page(new, frame)
                self._put(frame)
            # wp_page_copy: the new entry is dirty, not young (A clear).
            flags = e & ~(ADDR | A | PTE_COW) & _U64
            self._set_pte(epa, new | flags | W | D)
            self._invlpg(page)           # the frame changed: ptep_clear_flush
            return "cow_copy"
        # The entry allows the access: a stale translation faulted.
        if (not write or e & W) and (not fetch or not e & NX) and e & U:
            return "spurious"
        self._segv(proc, va, ec)

    def _enter_user(self, pid):
        self.switch_to(pid)
        self._sync()

    def run(self, pid, trace, start=0):
        """Run trace[start:] (TRACE_DTYPE, user accesses) as pid; every true
        fault goes to the #PF handler and the access is retried.  Returns
        the number of faults handled; SegmentationFault stops the run."""
        proc = self._proc(pid)          # an unknown pid is refused here
        trace = check_array(trace, TRACE_DTYPE, "trace")
        n = len(trace)
        self._enter_user(pid)
        run = self.vcpu.run
        handle = self._handle_fault
        stats = self.stats
        handled = 0
        last, last_ec, repeats = -1, 0, 0
        while start < n:
            r = run(trace, start)
            index = r.index
            stats["user_accesses"] += index - start
            if index >= n:
                break
            start = index
            if r.vector != _VEC_PF:
                stats["segv"] += 1
                raise SegmentationFault(pid, r.fault, start)
            ec = r.error_code
            if start != last or ec != last_ec:
                last, last_ec, repeats = start, ec, 0
            else:
                repeats += 1
                if repeats >= 3:
                    raise GuestKernelError("pid %d: the fault at trace index %d (%#x, error "
                                           "code %#x) does not go away" % (pid, start, r.cr2,
                                                                           ec))
            try:
                handle(proc, r.cr2, ec)
            except SegmentationFault as exc:
                exc.index = start
                exc.fault = r.fault
                raise
            if self._npending:
                self._sync()
            handled += 1
        return handled

    def _user_access(self, pid, va, fn):
        proc = self._proc(pid)
        va = check_u64(va, "virtual address")
        if va & 7:
            raise InvalidInput("load/store need an 8-byte aligned address, not %#x" % va)
        self._enter_user(pid)
        cpu = self.vcpu.cpu
        for _ in range(4):
            cpu.cpl = 3
            try:
                return fn(va)
            except PageFault as f:
                cpu.cpl = 0
                self.handle_fault(proc.pid, f.cr2, f.error_code)
                self._sync()
            except GeneralProtection as g:
                cpu.cpl = 0
                self.stats["segv"] += 1
                raise SegmentationFault(pid, g) from None
            finally:
                cpu.cpl = 0
        raise GuestKernelError("pid %d: the fault at %#x does not go away" % (pid, va))

    def load(self, pid, va):
        """A user-mode 8-byte load by pid (faults handled as for run)."""
        self.stats["user_accesses"] += 1
        return self._user_access(pid, va, self.vcpu.load_u64)

    def store(self, pid, va, value):
        """A user-mode 8-byte store by pid."""
        value = check_u64(value, "value")
        self.stats["user_accesses"] += 1
        vcpu = self.vcpu
        self._user_access(pid, va, lambda v: vcpu.store_u64(v, value))
