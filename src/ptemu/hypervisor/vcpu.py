"""The vCPU of a shadow-paging VM: the guest's operations and the exit handlers.

The guest runs on the real MMU: `vcpu.run(trace)` is one C call over the
shadow tables that stops only at a #PF; the exit is handled here and the run
resumes.  One method per exit, each with its counters (exits.COUNTERS):

    page_fault_exit   #PF on the shadow tables: hidden fault, true fault
                      (injected), write to a protected guest table (emulated),
                      MMIO
    cr3_write_exit    MOV to CR3: guest TLB rules, unsync pages synced, the
                      shadow root found in prev_roots / the hash or made
    cr_write_exit     MOV to CR0/CR4: the guest's checks; a new paging mode
    invlpg_exit       INVLPG: resync an unsync entry, invalidate the real TLB
    hypercall_exit    paravirtual calls (paravirt.py)

With fast paths on (create_vm(fast_paths=True), the default), the common
#PF exit -- a hidden fault whose shadow path exists -- is finished inside the
C call (csrc/shadow.c) over state the shadow MMU owns, and never reaches
page_fault_exit; every other case does (docs/shadow-mmu.md, "Fast paths").
"""

import numpy as np

from ptemu import bits
from ptemu._native import (ffi, lib, InvalidInput, GeneralProtection, PageFault, check_u64,
                           check_array, fault_from_c, ACCESS_CODES, decode_walk, walk_pa,
                           table_gpa_of_fault, check_layout, WalkHandle, FAULT_HEAD)
from ptemu.memory import PhysicalMemory
from ptemu.mmu import CpuState, Mmu, RunResult, TRACE_DTYPE, _FaultRunResult
from ptemu.hypervisor.exits import (ExitRecord, GuestMemoryError, ShadowMmuError, PF_RETRY,
                                    PF_EMULATE, PF_MMIO, PF_INJECT, PF_SPURIOUS,
                                    PF_OUTCOME_COUNTERS, check_stores)
from ptemu.hypervisor.shadow import ShadowMmu, TE_W, R_WP
from ptemu.hypervisor.paravirt import (hypercall as _hypercall, MMU_UPDATE_HANDLERS,
                                        fast_mmu_update as _fast_mmu_update,
                                        fast_mmu_update1 as _fast_mmu_update1,
                                        invlpg as _pv_invlpg, load_cr3 as _pv_load_cr3)

__all__ = ["VCpu"]

PAGE = 4096
NO_FRAME = PhysicalMemory.NO_FRAME
_translate = lib.ptemu_mmu_translate
_run = lib.ptemu_run
_shadow_translate = lib.ptemu_shadow_translate
_shadow_run = lib.ptemu_shadow_run
_shadow_store = lib.ptemu_shadow_store
_shadow_store_stream = lib.ptemu_shadow_store_stream
_shadow_invlpg = lib.ptemu_shadow_invlpg
_FP_INVLPG = lib.PTEMU_FP_INVLPG
_FP_CR3 = lib.PTEMU_FP_CR3
_shadow_cr3 = lib.ptemu_shadow_cr3
_FP_HIDDEN_FAULT = lib.PTEMU_FP_HIDDEN_FAULT
_FP_PT_WRITE = lib.PTEMU_FP_PT_WRITE
_FP_MMU_UPDATE = lib.PTEMU_FP_MMU_UPDATE      # paravirt.py (csrc/paravirt.c)
_FP_TRUE_FAULT = lib.PTEMU_FP_TRUE_FAULT
# A trace record: access kind at byte 8, user flag at byte 9 (ptemu_trace_rec).
_REC = TRACE_DTYPE.itemsize
_REC_ACCESS = TRACE_DTYPE.fields["access"][1]
_REC_USER = TRACE_DTYPE.fields["user"][1]
check_layout(ffi.offsetof("ptemu_trace_rec", "access") == _REC_ACCESS
             and ffi.offsetof("ptemu_trace_rec", "user") == _REC_USER, "ptemu_trace_rec")
_IN_USER = lib.PTEMU_IN_USER
_IN_CPL = lib.PTEMU_IN_CPL
_VEC_PF = lib.PTEMU_VEC_PF
_VEC_GP = lib.PTEMU_VEC_GP
_CAUSE_NONE = lib.PTEMU_CAUSE_NONE
_CAUSE_BUS = lib.PTEMU_CAUSE_BUS
_ACC_WRITE = lib.PTEMU_ACC_WRITE
_FLUSH_ALL = lib.PTEMU_FLUSH_ALL
_FLUSH_PCID = lib.PTEMU_FLUSH_PCID
_FLUSHED_BY_USER = lib.PTEMU_FLUSHED_BY_USER     # a flush cause (tlb.c), not a fault cause
_FLUSHED_BY_CR3 = lib.PTEMU_FLUSHED_BY_CR3
_ACC_NAMES = ("read", "write", "fetch")
_U64_MAX = (1 << 64) - 1
_PF_INJECT_COUNTER = PF_OUTCOME_COUNTERS[PF_INJECT]
_MAX_TRIES = 8          # exits on one access without progress before we call it a bug


class VCpu:
    """The vCPU of a VM: what the guest sees (`cpu`, the operations of the machine
    contract) and the real MMU it runs on (`mmu`: host memory, the shadow root
    as CR3, the real TLB `tlb`).  One method per exit, each with counters."""

    def __init__(self, vm, tlb, fast_paths=True):
        self.vm = vm
        self.shadow = vm.shadow
        self.fast_paths = bool(fast_paths)
        self._stats = vm.counters
        self._m = vm.hypervisor.words
        self._p2m = vm.p2m_list
        self._h2g = vm.h2g
        self._nframes = len(vm.p2m_list)
        #: The CpuState the guest sees (CR3 = the guest's top table).
        self.cpu = CpuState.long_mode()
        #: The real CPU state: the guest's, except CR3 = the shadow root and CR0.WP=1.
        self.real_cpu = CpuState.long_mode()
        self.tlb = tlb
        self.mmu = Mmu(vm.hypervisor.host, self.real_cpu, tlb)
        #: Walks of the guest's own tables (over the p2m view, no TLB).
        self.guest_mmu = Mmu(vm.view, self.cpu)
        self._rcpu = self.real_cpu.c_handle
        self._hmem = vm.hypervisor.host.c_handle
        self._rtlb = tlb.c_handle
        real = WalkHandle(self._rcpu, self._hmem, self._rtlb)     # scalar accesses
        self._rm, self._rbuf = real.c, real.out
        guest = WalkHandle(self.cpu.c_handle, vm.view.c_handle)    # the guest's walks
        self._gm, self._gbuf, self._gfault = guest.c, guest.out, guest.fault
        self._handles = (real, guest)
        self._rfault = ffi.new("ptemu_fault *")                   # run()'s exits
        self._rvector = memoryview(ffi.buffer(self._rfault)).cast("I")    # [0]: its vector
        self._cpu_bytes = ffi.buffer(self.cpu.c_handle)
        self._seen = None
        self._destroyed = False
        self._paging = True
        self._root_stale = True         # no root yet: loaded at the first guest access
        self.log = None
        self._nlogged = 0
        self._gpa = 0
        self._exc = None
        self._checked_trace = None     # the last trace run() checked (kept alive),
        self._trace_raw = None         # its bytes (made at its first exit),
        self._trace_c = None           # and its records as C sees them
        self._trace_n = 0              # and its length
        self._memory_bytes = vm.memory_bytes
        # The fast paths (csrc/shadow.c) over the shadow MMU's structures:
        # None when off -- asked for, or a handler they stand in for is overridden.
        self._fast = None
        self._enabled = 0       # ctx.enabled as a Python int (a cffi field read costs ~600 instr.)
        self._paravirt = vm.paging == "paravirt"
        # The mmu_update fast path's counts (absorb_fast_counts) and its items buffer.
        self._pv_batches = self._pv_entries = self._pv_calls = 0
        # True faults fast path 5 returned from run() (absorb_fast_counts).
        self._fast_guest_faults = 0
        self._pv_items = ffi.new("uint64_t[]", 64)
        self._fast_bits = ((_FP_HIDDEN_FAULT | _FP_PT_WRITE | _FP_INVLPG | _FP_CR3
                            | _FP_TRUE_FAULT
                            | (_FP_MMU_UPDATE if vm.paging == "paravirt" else 0))
                           & ~self._handlers_overridden()
                           if self.fast_paths else 0)
        if self._fast_bits:
            ctx = vm.shadow.fast
            ctx.gcpu = self.cpu.c_handle
            ctx.gmem = vm.view.c_handle
            self._fast = ctx
            # Fast path 5's fault, copied into each RunResult (the next run refills it).
            self._gfault_bytes = ffi.buffer(ffi.addressof(ctx, "gfault"))
            self._gfault_valid = memoryview(
                ffi.buffer(ffi.addressof(ctx, "gfault_valid"))).cast("I")
        #: the fast paths' context when fast path 5 (true faults) is among them
        self._fp5 = self._fast if self._fast_bits & _FP_TRUE_FAULT else None
        self._switch_fast_paths()

    #: The Python handlers each fast path stands in for (the class attributes
    #: a subclass may override: then that fast path stays off).
    FAST_PATH_HANDLERS = {
        _FP_HIDDEN_FAULT: (("VCpu", "page_fault_exit"), ("ShadowMmu", "fill"),
                           ("ShadowMmu", "set_spte"), ("ShadowMmu", "_use")),
        _FP_PT_WRITE: (("VCpu", "page_fault_exit"), ("VCpu", "store_u64"),
                       ("ShadowMmu", "fill"), ("ShadowMmu", "set_spte"),
                       ("ShadowMmu", "pte_written"), ("ShadowMmu", "leaf_from_gpte"),
                       ("VirtualMachine", "guest_write")),
        _FP_INVLPG: (("VCpu", "invlpg"), ("VCpu", "invlpg_exit"), ("ShadowMmu", "invlpg")),
        _FP_CR3: (("VCpu", "write_cr3"), ("VCpu", "cr3_write_exit"), ("ShadowMmu", "load_root"),
                  ("ShadowMmu", "sync_all")),
        _FP_MMU_UPDATE: MMU_UPDATE_HANDLERS,
        _FP_TRUE_FAULT: (("VCpu", "page_fault_exit"), ("VCpu", "_inject"),
                         ("VCpu", "_back_walk_table")),
    }

    def _handlers_overridden(self):
        """The fast paths (PTEMU_FP_* bits) whose Python handlers a subclass
        overrides: those stay off."""
        from ptemu.hypervisor.vm import VirtualMachine
        owners = {"VCpu": (self, VCpu), "ShadowMmu": (self.shadow, ShadowMmu),
                  "VirtualMachine": (self.vm, VirtualMachine)}
        off = 0
        for bit, handlers in self.FAST_PATH_HANDLERS.items():
            for owner, name in handlers:
                obj, base = owners[owner]
                if getattr(type(obj), name) is not getattr(base, name):
                    off |= bit
        return off

    def _switch_fast_paths(self):
        """On while nothing needs to see each exit in Python: no exit log (the
        demo), no prefetch (a policy of the Python fill), a live VM."""
        ctx = self._fast
        if ctx is not None:
            on = self.log is None and not self.shadow.prefetch and not self._destroyed
            ctx.enabled = self._enabled = self._fast_bits if on else 0

    def detach(self):
        """The VM was destroyed: every later operation is refused."""
        self._destroyed = True
        self._seen = None               # so that the next vCPU operation notices
        self._switch_fast_paths()

    def absorb_fast_counts(self):
        """Fold what the C fast paths counted into the VM's counters: the same
        counters the Python handler keeps, plus fast_* saying which path ran."""
        ctx = self._fast
        if ctx is None:
            return
        fixed, spurious, emulated = ctx.pf_fixed, ctx.pf_spurious, ctx.pf_emulate
        if fixed or spurious or emulated:
            ctx.pf_fixed = ctx.pf_spurious = ctx.pf_emulate = 0
            st = self._stats
            st["exit_page_fault"] += fixed + spurious + emulated
            st["pf_fixed"] += fixed
            st["pf_spurious"] += spurious
            st["pf_emulate"] += emulated
            st["fast_pf_fixed"] += fixed
            st["fast_pf_spurious"] += spurious
            st["fast_pf_emulate"] += emulated
        batches, calls = self._pv_batches, self._pv_calls
        if batches or calls:
            entries = self._pv_entries
            self._pv_batches = self._pv_entries = self._pv_calls = 0
            st = self._stats
            st["exit_hypercall"] += batches + calls
            st["hypercall"] += batches + calls
            st["hypercall_mmu_update"] += batches
            st["mmu_update_entries"] += entries
            st["fast_mmu_update"] += batches
        if self._fast_guest_faults:
            k, self._fast_guest_faults = self._fast_guest_faults, 0
            st = self._stats
            st["exit_page_fault"] += k
            st[_PF_INJECT_COUNTER] += k
            st["fast_pf_guest"] += k
        if ctx.path_walks:
            self._stats["fast_path_walk"] += ctx.path_walks
            ctx.path_walks = 0
        if ctx.pte_write or ctx.tlb_flush or ctx.sync_entry:
            st = self._stats
            st["mmu_pte_write"] += ctx.pte_write
            st["mmu_pte_updated"] += ctx.pte_updated
            st["tlb_flush"] += ctx.tlb_flush
            st["mmu_sync_entry"] += ctx.sync_entry
            ctx.pte_write = ctx.pte_updated = ctx.tlb_flush = ctx.sync_entry = 0

    def _absorb_rmap_log(self):
        """Take in the rmap entries C added now (the log is full)."""
        self.shadow.take_rmap_log()

    def set_log(self, sink):
        """Log every exit to sink (a callable), or stop with None."""
        self.log = sink
        self._switch_fast_paths()

    # -- keeping the real CPU in step with the guest's ------------------------------
    def sync_cpu(self, load=True):
        """Pick up guest CPU state changed by plain assignment (CPL, PKRU, ...).
        load=False: the caller is about to load CR3 itself (no root for the old one).
        run, load_u64, store_u64, hypercall and invlpg do the same check written out."""
        cur = self._cpu_bytes[:]
        if cur != self._seen or (load and self._root_stale and self._paging):
            self._cpu_changed(cur, load)

    def _cpu_changed(self, cur, load=True):
        if self._destroyed:
            raise InvalidInput("VM %d was destroyed" % self.vm.id)
        g, s = self.cpu._c, self._rcpu
        self._seen = cur
        if not g.cr0 & bits.CR0_PG:
            # Paging off: linear = guest-physical; accesses go straight to the p2m
            # and the real MMU is not used (its state stays as it was).
            self._paging = False
            return
        real_cr3 = s.cr3        # never the guest's: the real CR3 only ever holds a shadow root
        ffi.memmove(s, g, ffi.sizeof("ptemu_cpu"))
        s.cr3 = real_cr3
        # The real CPU keeps CR0.WP=1 so that write protection holds for the
        # guest kernel too; guest WP=0 supervisor writes are emulated.
        s.cr0 = g.cr0 | bits.CR0_WP
        sh = self.shadow
        levels = 5 if g.cr4 & bits.CR4_LA57 else 4
        changed = sh.set_mode(levels, bool(g.efer & bits.EFER_NXE), bool(g.cr0 & bits.CR0_WP),
                              g.maxphyaddr or 52)
        if changed or not self._paging:
            # A new paging mode: new roles, new roots (kvm_mmu_reset_context).
            self._paging = True
            self._stats["root_reload"] += 1
            sh.sync_all()
            sh.need_flush = True
        if not load:
            self._root_stale = True
            return
        self._root_stale = False
        root = sh.load_root((g.cr3 & sh.amask) >> 12)
        s.cr3 = root.hpa | self._pcid()
        self.commit()

    def _pcid(self):
        g = self.cpu._c
        return g.cr3 & bits.CR3_PCID_MASK if g.cr4 & bits.CR4_PCIDE else 0

    def commit(self):
        """Before the guest runs again: a new root if the old one was zapped,
        then one flush of the real TLB if any translation was lowered or removed."""
        sh = self.shadow
        if sh.need_reload:
            sh.need_reload = False
            if self._paging:
                self._stats["root_reload"] += 1
                root = sh.load_root((self.cpu._c.cr3 & sh.amask) >> 12)
                self._rcpu.cr3 = root.hpa | self._pcid()
                sh.need_flush = True
        if sh.need_flush:
            sh.need_flush = False
            lib.ptemu_tlb_flush(self._rtlb, _FLUSH_ALL, 0, 0, _FLUSHED_BY_USER)
            self._stats["tlb_flush"] += 1

    # -- exit logging (the demo) ---------------------------------------------------------
    def log_exit(self, reason, detail):
        self._nlogged += 1
        self.log(ExitRecord(self._nlogged, reason, detail))

    def log_event(self, kind, detail):
        self.log((kind, detail))

    # -- the #PF exit: hidden fault, true fault, protected write, MMIO -------------------
    def page_fault_exit(self, va, acc, flags):
        """The #PF exit handler (KVM paging64_page_fault).

        Walk the guest's tables (the C walker over the p2m view: same rules and
        error codes as hardware; it sets the guest's A/D bits), then fix the
        shadow.  Returns an outcome (exits.PF_*): PF_RETRY (hidden fault: the
        shadow now has it), PF_SPURIOUS (it had it already: a stale real TLB
        entry), PF_EMULATE (a write the hypervisor must do: self._gpa),
        PF_MMIO (self._gpa is outside the VM) or PF_INJECT (true fault:
        self._exc is what the guest gets).  The caller counts the exit
        (_count), so that the bulk loop counts in locals.
        """
        r = _translate(self._gm, va, acc, flags)
        while r:
            if r == _VEC_PF and self._gfault.cause == _CAUSE_BUS and self._back_walk_table():
                r = _translate(self._gm, va, acc, flags)
                continue
            return self._inject(va, acc, r)
        walk = decode_walk(self._gbuf)
        gpa = walk.gpa
        gfn = gpa >> 12
        if gfn >= self._nframes:
            self._gpa = gpa
            if self.log is not None:
                self.log_exit("page_fault", "%s at %#x: guest maps gpa %#x outside its "
                              "memory -> MMIO, nothing mapped" % (_ACC_NAMES[acc], va, gpa))
            return PF_MMIO
        sh = self.shadow
        emulate = False
        why = None
        if acc == _ACC_WRITE:
            if not walk.rights & TE_W or not (sh.role_base & R_WP or flags & _IN_USER or (
                    flags & _IN_CPL and self.cpu._c.cpl == 3)):
                # A supervisor write with the guest's CR0.WP=0, which the guest's
                # walk allowed: the real CPU runs with WP=1, so it refuses a
                # read-only page (SDM 4.6.1) and applies PKRU/PKRS.WD (4.6.2)
                # where the guest's CPU would not.  The hypervisor does the write.
                emulate = True
                why = "supervisor write with CR0.WP=0"
            elif gfn in sh.wp:
                if sh.allow_unsync and sh.try_unsync(gfn):
                    why = "unsync"
                else:
                    emulate = True
                    why = "write-protected page table"
        hpa = self._p2m[gfn]
        if hpa == NO_FRAME:
            hpa = self.vm.back(gfn)
        changed = sh.fill(va, walk, hpa, use=not emulate)
        if sh.need_flush or sh.need_reload:
            self.commit()
        if emulate:
            self._gpa = gpa
            if self.log is not None:
                self.log_exit("page_fault", "write at %#x -> gpa %#x: %s (guest frame %d) "
                              "-> emulate the store" % (va, gpa, why, gfn))
            return PF_EMULATE
        if self.log is not None:
            self.log_exit("page_fault", "%s at %#x: hidden fault -> the guest's walk gives "
                          "gpa %#x; the shadow now maps virtual page %d -> host frame %d%s"
                          % (_ACC_NAMES[acc], va, gpa, va >> 12, hpa >> 12,
                             " (guest page table left writable: unsync)"
                             if why == "unsync" else ""))
        return PF_RETRY if changed else PF_SPURIOUS

    def _inject(self, va, acc, r):
        """The guest's own walk failed: a true fault for the guest (PF_INJECT)."""
        if r == _VEC_PF:
            exc = fault_from_c(self._gfault, self.vm.memory_bytes)
        else:
            exc = GeneralProtection(va)
        self._exc = exc
        if self.log is not None:
            self.log_exit("page_fault", "%s at %#x: the guest's own walk fails -> "
                          "true fault, inject #PF error code %#x, CR2 %#x"
                          % (_ACC_NAMES[acc], va, exc.error_code, va))
        return PF_INJECT

    def _count(self, code):
        st = self._stats
        st["exit_page_fault"] += 1
        st[PF_OUTCOME_COUNTERS[code]] += 1

    def _back_walk_table(self):
        """The guest walk ran into a guest frame not backed yet: back it (it reads
        as zeros) so that the walk sees what the guest's memory holds."""
        gfn = table_gpa_of_fault(self._gbuf, self.cpu._c.cr3, self.shadow.amask) >> 12
        if gfn < self._nframes and self._p2m[gfn] == NO_FRAME:
            self.vm.back(gfn)
            return True
        return False

    def _real_translate(self, va, acc):
        """One access on the real MMU (0: translated, else the vector), with
        the hidden-fault fast path when it is on."""
        ctx = self._fast
        if ctx is None:
            return _translate(self._rm, va, acc, _IN_CPL)
        return _shadow_translate(ctx, self._rm, va, acc, _IN_CPL)

    def _xlate(self, va, acc, r=None):
        """One guest access through the real MMU, exits handled.  Returns
        (0, hpa), (PF_EMULATE, gpa) or (PF_MMIO, gpa); raises the true fault.
        r: the result of the caller's own first try of the real MMU, if any."""
        tries = 0
        while True:
            if r is None:
                r = self._real_translate(va, acc)
            if not r:
                return 0, walk_pa(self._rbuf)
            if r == _VEC_GP:
                raise GeneralProtection(va)
            code = self.page_fault_exit(va, acc, _IN_CPL)
            self._count(code)
            if code == PF_RETRY or code == PF_SPURIOUS:
                tries += 1
                if tries > _MAX_TRIES:
                    raise ShadowMmuError("no progress on %s at %#x" % (_ACC_NAMES[acc], va))
                r = None
                continue
            if code == PF_INJECT:
                raise self._exc
            return code, self._gpa

    def _emulated_write_without_data(self, gpa):
        """An emulated write whose data the caller does not have (access('w'),
        a trace): the hypervisor's part is the flood count of the table."""
        self.shadow.pte_written(gpa >> 12, gpa & 0xFF8, 0, 0)
        self.commit()

    # -- guest accesses (the machine contract) -------------------------------------------
    def access(self, va, access="r"):
        """One access at the current CPL; the guest-physical address it reaches.
        A true fault raises the PageFault the guest gets (the injection)."""
        try:
            acc = ACCESS_CODES[access]
        except (KeyError, TypeError):
            raise InvalidInput("access must be 'r', 'w' or 'x', not %r" % (access,)) from None
        if va.__class__ is not int or va < 0 or va > _U64_MAX:
            va = check_u64(va, "virtual address")
        self.sync_cpu()
        self._stats["guest_accesses"] += 1
        if not self._paging:
            return va
        kind, addr = self._xlate(va, acc)
        if kind:
            if kind == PF_EMULATE:
                self._emulated_write_without_data(addr)
            return addr
        return (self._h2g[addr >> 12] << 12) | (addr & 0xFFF)

    def _aligned(self, va):
        if va.__class__ is not int or va < 0 or va > _U64_MAX:
            va = check_u64(va, "virtual address")
        if va & 7:
            raise InvalidInput("load_u64/store_u64 need an 8-byte aligned address, not %#x" % va)
        return va

    def load_u64(self, va):
        """An 8-byte load at va (8-aligned): the value in guest memory."""
        if va.__class__ is not int or va < 0 or va > _U64_MAX or va & 7:
            va = self._aligned(va)
        cur = self._cpu_bytes[:]                    # sync_cpu(), written out
        if cur != self._seen or (self._root_stale and self._paging):
            self._cpu_changed(cur)
        self._stats["guest_accesses"] += 1
        if not self._paging:
            if va + 8 > self.vm.memory_bytes:
                raise GuestMemoryError(va, va, self.vm.memory_bytes)
            return self.vm.phys.read_u64(va)
        ctx = self._fast                            # _real_translate(va, 0), written out
        r = (_translate(self._rm, va, 0, _IN_CPL) if ctx is None
             else _shadow_translate(ctx, self._rm, va, 0, _IN_CPL))
        if not r:                       # no exit: the real MMU had it
            return self._m[walk_pa(self._rbuf) >> 3]
        kind, addr = self._xlate(va, 0, r)
        if kind == PF_MMIO:
            raise GuestMemoryError(va, addr, self.vm.memory_bytes)
        return self._m[addr >> 3]

    def store_u64(self, va, value):
        """An 8-byte store at va (8-aligned).  A store into a write-protected guest
        page table exits and is emulated; the shadows follow it."""
        if va.__class__ is not int or va < 0 or va > _U64_MAX or va & 7:
            va = self._aligned(va)
        if value.__class__ is not int or value < 0 or value > _U64_MAX:
            value = check_u64(value, "value")
        cur = self._cpu_bytes[:]                    # sync_cpu(), written out
        if cur != self._seen or (self._root_stale and self._paging):
            self._cpu_changed(cur)
        self._stats["guest_accesses"] += 1
        if not self._paging:
            if va + 8 > self.vm.memory_bytes:
                raise GuestMemoryError(va, va, self.vm.memory_bytes)
            self.vm.guest_write(va, value)
            return
        ctx = self._fast
        if ctx is None:
            r = _translate(self._rm, va, _ACC_WRITE, _IN_CPL)
            if not r:                   # no exit: the real MMU had it
                self._m[walk_pa(self._rbuf) >> 3] = value
                return
        else:
            # The store in C: done by the real MMU, after a fast fill, or
            # emulated into a protected level-1 table (fast paths 1 and 2).
            r = _shadow_store(ctx, self._rm, self._rtlb, va, value)
            if not r:
                return
        self._store_exit(va, value, r)

    def _store_exit(self, va, value, r):
        """The rest of a store the real MMU refused with vector r."""
        kind, addr = self._xlate(va, _ACC_WRITE, r)
        if kind == 0:
            self._m[addr >> 3] = value
        elif kind == PF_EMULATE:
            self.vm.guest_write(addr, value)
        else:
            raise GuestMemoryError(va, addr, self.vm.memory_bytes)

    def store_stream(self, stores):
        """The stores of `stores` (STORE_DTYPE, or (va, value) pairs) in order, as
        store_u64 would do them one by one; the first that fails raises what
        store_u64 raises (those before it are done).  With fast paths on the
        stream runs in C and leaves it only at a store whose exit Python must
        handle (that store goes through store_u64, then the stream resumes)."""
        stores = check_stores(stores)
        n = len(stores)
        i = 0
        ctx = self._fast
        if ctx is not None and n:
            recs = ffi.from_buffer("ptemu_store_rec[]", stores)
            st = self._stats
            while i < n:
                self.sync_cpu()
                if not self._paging:
                    break
                j = _shadow_store_stream(ctx, self._rm, self._rtlb, recs, n, i)
                if ctx.rmap_log_len:
                    self._absorb_rmap_log()
                st["guest_accesses"] += j - i
                if j == n:
                    return
                va, value = int(stores["va"][j]), int(stores["value"][j])
                r = ctx.stream_vector
                if not r:                   # unaligned (refused there), or log room
                    if va & 7:
                        self.store_u64(va, value)
                    i = j
                    continue
                # The store's exit, from the real MMU's answer C already had
                # (so that the real TLB sees one translation, as store_u64's).
                st["guest_accesses"] += 1
                self._store_exit(va, value, r)
                i = j + 1
        store = self.store_u64
        for va, value in stores[i:].tolist():
            store(va, value)

    def _check_trace(self, trace):
        if trace is not self._checked_trace:
            # A guest kernel resumes the same trace after every fault it handles:
            # check it once, not at every resume.  Its access codes are not
            # scanned here: the C loop refuses a bad one where it meets it, as on
            # the native machine (a scan of every new trace was 8% of a
            # context-switch workload's time); with paging off run() scans.
            trace = check_array(trace, TRACE_DTYPE, "trace")
            self._checked_trace = trace
            self._trace_raw = None     # (made by _run_exits when an exit needs it)
            self._trace_c = ffi.from_buffer("ptemu_trace_rec[]", trace)
            self._trace_n = len(trace)
        return trace

    def _run_c(self, i, n):
        """The C loop over the trace from i: the index of the first access that
        exits (self._rfault filled), or n."""
        ctx = self._fast
        if ctx is None:
            return _run(self._rcpu, self._hmem, self._rtlb, self._trace_c, n, i, ffi.NULL,
                        self._rfault)
        # (What C added to the rmap is taken in when the rmap is next read.)
        return _shadow_run(ctx, self._rcpu, self._hmem, self._rtlb, self._trace_c, n, i,
                           self._rfault)

    def run(self, trace, start=0):
        """Run trace[start:] (TRACE_DTYPE) on the real MMU in C; exits are handled
        here and the run resumes, up to the first true fault (RunResult).

        The vCPU keeps a reference to the last trace it checked, so that a
        resume after each handled fault does not check it again (an access
        code changed since is still refused, by the C loop).

        The common resumes are written out here: the run completes, or its
        first exit is a true fault fast path 5 found (its PageFault made only
        when asked for, as on the native machine); any other exit goes to
        _run_exits, the loop that handles them."""
        if trace is not self._checked_trace:
            trace = self._check_trace(trace)
        n = self._trace_n
        if start.__class__ is not int or start < 0:
            start = check_u64(start, "start")
        if start > n:
            raise InvalidInput("start %d is past the end of the trace (%d)" % (start, n))
        cur = self._cpu_bytes[:]                    # sync_cpu(), written out
        if cur != self._seen or (self._root_stale and self._paging):
            self._cpu_changed(cur)
        st = self._stats
        if not self._paging:
            # No C loop runs to refuse a bad access code: the rest is scanned.
            bad = np.flatnonzero(trace["access"][start:] > 2)
            if len(bad):
                i = start + int(bad[0])
                st["guest_accesses"] += i - start
                raise InvalidInput("trace[%d]: access code %d is not 0 (read), 1 (write) or "
                                   "2 (fetch)" % (i, int(trace["access"][i])))
            st["guest_accesses"] += n - start
            return RunResult(n, 0, 0, 0, "none", None)
        ctx = self._fast
        f = self._rfault
        if ctx is None:                             # _run_c(start, n), written out
            idx = _run(self._rcpu, self._hmem, self._rtlb, self._trace_c, n, start, ffi.NULL, f)
        else:
            idx = _shadow_run(ctx, self._rcpu, self._hmem, self._rtlb, self._trace_c, n, start,
                              f)
        if idx == n:
            st["guest_accesses"] += n - start
            return RunResult(n, 0, 0, 0, "none", None)
        if self._fp5 is not None and self._gfault_valid[0] and self._rvector[0] == _VEC_PF:
            # Fast path 5 at the first exit, counted as _run_exits counts it (three
            # counters in one int, absorb_fast_counts), the fault read from one
            # copy of its bytes (cffi field reads cost ~600 each).
            self._fast_guest_faults += 1
            st["guest_accesses"] += idx - start
            g = self._gfault_bytes[:]
            _, error_code, cr2 = FAULT_HEAD(g)
            return _FaultRunResult(idx, _VEC_PF, error_code, cr2, g, self._memory_bytes)
        return self._run_exits(trace, start, n, idx)

    def _run_exits(self, trace, start, n, idx):
        """run()'s loop from its first exit, at trace[idx] (self._rfault filled):
        each exit handled, the C loop resumed, up to the end or a true fault."""
        st = self._stats
        raw = self._trace_raw
        if raw is None:
            # The records' bytes, for the access and user fields of an exit
            # (a view of the cffi buffer: no numpy call per new trace).
            raw = self._trace_raw = memoryview(ffi.buffer(self._trace_c))
        f = self._rfault
        run_c = self._run_c
        pf_exit = self.page_fault_exit
        fast = self._fp5
        counts = [0] * len(PF_OUTCOME_COUNTERS)     # by outcome, added to the stats at the end
        last = -1
        tries = 0
        try:
            while True:
                if idx == n:
                    st["guest_accesses"] += n - start
                    return RunResult(n, 0, 0, 0, "none", None)
                if f.vector != _VEC_PF:
                    st["guest_accesses"] += idx - start
                    if f.cause == _CAUSE_NONE:
                        # A bad access code written into the trace since it was
                        # checked: the C loop refuses it, as on the native machine.
                        raise InvalidInput("trace[%d]: access code %d is not 0 (read), 1 "
                                           "(write) or 2 (fetch)"
                                           % (idx, raw[_REC * idx + _REC_ACCESS]))
                    va = int(trace["va"][idx])
                    return RunResult(int(idx), GeneralProtection.vector, 0, 0, "non-canonical",
                                     GeneralProtection(va))
                va = f.cr2
                if idx == last:
                    tries += 1
                    if tries > _MAX_TRIES:
                        raise ShadowMmuError("no progress on trace[%d] at %#x" % (idx, va))
                else:
                    last = idx
                    tries = 0
                if fast is not None and self._gfault_valid[0]:
                    # Fast path 5: C's guest walk faulted (csrc/shadow.c), a true
                    # fault; injected as page_fault_exit's _inject would, from
                    # that walk's fault rather than from a second walk.
                    self._fast_guest_faults += 1        # (as run() counts them)
                    st["guest_accesses"] += idx - start
                    fb = self._gfault_bytes[:]
                    _, error_code, cr2 = FAULT_HEAD(fb)
                    return _FaultRunResult(int(idx), _VEC_PF, error_code, cr2, fb,
                                           self._memory_bytes)
                o = _REC * idx
                code = pf_exit(va, raw[o + _REC_ACCESS], _IN_USER if raw[o + _REC_USER] else 0)
                counts[code] += 1
                if code == PF_RETRY or code == PF_SPURIOUS:
                    i = idx
                elif code == PF_INJECT:
                    st["guest_accesses"] += idx - start
                    exc = self._exc
                    return RunResult(int(idx), PageFault.vector, exc.error_code, exc.cr2,
                                     exc.cause, exc)
                else:
                    # An emulated write or an MMIO access: a trace moves no data,
                    # so the hypervisor's part is done and the guest goes on.
                    if code == PF_EMULATE:
                        self._emulated_write_without_data(self._gpa)
                    i = idx + 1
                idx = run_c(i, n)
        finally:
            n_exits = sum(counts)
            if n_exits:
                st["exit_page_fault"] += n_exits
                for k, c in enumerate(counts):
                    if c:
                        st[PF_OUTCOME_COUNTERS[k]] += c

    # -- control registers and invalidations ---------------------------------------------
    def write_cr3(self, value):
        """Guest MOV to CR3 (intercepted)."""
        self.sync_cpu(load=False)
        self._stats["exit_cr3_write"] += 1
        if not self.fast_cr3(value) and not self._sync_then_fast_cr3(value):
            self.cr3_write_exit(value, "cr3_write")

    def _sync_then_fast_cr3(self, value):
        """A flushing CR3 load while pages are unsync: cr3_write_exit's first step,
        sync_all (policy, Python), then the root switch by fast path 4 when it
        can (it declined only because of the unsync pages).  True when done.
        The #GP check comes first, as in cr3_write_exit (nothing synced then)."""
        sh = self.shadow
        if not sh.unsync_sps or not self._fast_bits & _FP_CR3 or self._fast is None or \
                not self._paging or self._root_stale or value.__class__ is not int or \
                not 0 <= value <= _U64_MAX:
            return False
        g = self.cpu._c
        pcide = g.cr4 & bits.CR4_PCIDE
        rsvd = ((1 << 63) - 1) & ~((1 << (g.maxphyaddr or 52)) - 1)
        if value & (rsvd if pcide else rsvd | bits.CR3_NOFLUSH) or \
                (pcide and value & bits.CR3_NOFLUSH):
            return False                # a #GP, or a load that syncs nothing
        sh.sync_all()
        if not self.fast_cr3(value):
            return False                # a root to make: cr3_write_exit (nothing to sync)
        if sh.need_flush or sh.need_reload:
            self.commit()               # after the load's own flush, as cr3_write_exit
        return True

    def fast_cr3(self, value):
        """Fast path 4 for a CR3 load (MOV CR3, new_baseptr, flush_tlb): True when
        C did it (the current or a cached root), with the counters
        cr3_write_exit keeps."""
        ctx = self._fast
        if ctx is None or not self._paging or self._root_stale or \
                value.__class__ is not int or not 0 <= value <= _U64_MAX:
            return False
        hit = _shadow_cr3(ctx, self.cpu._c, self._rcpu, self._rtlb, value)
        if not hit:
            return False
        st = self._stats
        st["cr3_write"] += 1
        st["fast_cr3_write"] += 1
        if hit == 2:                    # (3: a root of the hash, no counter of its own)
            st["prev_root_hit"] += 1
        self._seen = self._cpu_bytes[:]
        return True

    def cr3_write_exit(self, value, reason="cr3_write"):
        """The CR3 exit (and new_baseptr): the guest's TLB rules (SDM 4.10.4.1),
        unsync pages synced at a flushing load, the shadow root for the new top
        table found in prev_roots or the hash, else started empty."""
        if value.__class__ is not int or value < 0 or value > _U64_MAX:
            value = check_u64(value, "CR3")
        g = self.cpu._c
        pcide = g.cr4 & bits.CR4_PCIDE
        # SDM 4.5.2 / 2.5: bits 62:MAXPHYADDR of CR3 are reserved (#GP), and bit 63
        # too unless CR4.PCIDE=1 (then it asks not to flush, and is not stored).
        rsvd = ((1 << 63) - 1) & ~((1 << (g.maxphyaddr or 52)) - 1)
        if value & (rsvd if pcide else rsvd | bits.CR3_NOFLUSH):
            raise GeneralProtection(message="#GP(0): reserved bits set in CR3 value %#x"
                                    % value)
        noflush = bool(pcide and value & bits.CR3_NOFLUSH)
        g.cr3 = value & ~bits.CR3_NOFLUSH
        self._stats["cr3_write"] += 1
        self._seen = self._cpu_bytes[:]
        if not self._paging:
            return
        self._root_stale = False
        sh = self.shadow
        if not noflush and sh.unsync_sps:
            sh.sync_all()
        old = sh.root
        hits = self._stats["prev_root_hit"]
        root = sh.load_root((g.cr3 & sh.amask) >> 12)
        pcid = g.cr3 & bits.CR3_PCID_MASK if pcide else 0
        self._rcpu.cr3 = root.hpa | pcid
        if not noflush:
            # The guest's MOV CR3 flush (SDM 4.10.4.1), on the real TLB: the
            # non-global entries and paging-structure caches of the PCID.
            lib.ptemu_tlb_flush(self._rtlb, _FLUSH_PCID, pcid, 0, _FLUSHED_BY_CR3)
        if self.log is not None:
            how = ("same root" if root is old else "cached root (prev_roots)"
                   if self._stats["prev_root_hit"] != hits else "new shadow root")
            self.log_exit(reason, "guest CR3 %#x -> %s at host frame %d (real CR3 %#x); the "
                          "guest's top table, guest frame %d, is write-protected"
                          % (value, how, root.hpa // PAGE, root.hpa, root.gfn))
        if sh.need_flush or sh.need_reload:
            self.commit()

    def write_cr4(self, value):
        """Guest MOV to CR4: the guest's checks (#GP) and TLB rules; a change of
        paging mode starts new roots."""
        self.sync_cpu()
        self._stats["exit_cr_write"] += 1
        self.cr_write_exit(4, value)

    def write_cr0(self, value):
        """Guest MOV to CR0 (WP changes the roles; PG cannot be cleared in 64-bit mode)."""
        self.sync_cpu()
        self._stats["exit_cr_write"] += 1
        self.cr_write_exit(0, value)

    def cr_write_exit(self, cr, value):
        """The MOV to CR0/CR4 exit: the guest's own checks and TLB rules, then
        the real CPU follows (a new paging mode gets new roots)."""
        if cr == 4:
            self.guest_mmu.write_cr4(value)
            if self._paging:
                self.mmu.write_cr4(value)
        else:
            self.guest_mmu.write_cr0(value)
        self._cpu_changed(self._cpu_bytes[:])

    def invlpg(self, va):
        """Guest INVLPG (intercepted)."""
        if va.__class__ is not int or va < 0 or va > _U64_MAX:
            va = check_u64(va, "virtual address")
        cur = self._cpu_bytes[:]                    # sync_cpu(), written out
        if cur != self._seen or (self._root_stale and self._paging):
            self._cpu_changed(cur)
        st = self._stats
        st["exit_invlpg"] += 1
        ctx = self._fast                            # fast_invlpg(va), written out
        if ctx is not None and self._paging and \
                _shadow_invlpg(ctx, self._hmem, self._rcpu, self._rtlb, va):
            st["invlpg"] += 1
            st["fast_invlpg"] += 1
            return
        self.invlpg_exit(va)
        if self.log is not None:
            self.log_exit("invlpg", "INVLPG %#x" % va)

    def fast_invlpg(self, va):
        """Fast path 3 for an INVLPG (the hypercall's; VCpu.invlpg, the instruction,
        has it written out): True when C did it, with the counters invlpg_exit
        keeps (the rest are absorbed)."""
        ctx = self._fast
        if ctx is None or not self._paging or \
                not _shadow_invlpg(ctx, self._hmem, self._rcpu, self._rtlb, va):
            return False
        st = self._stats
        st["invlpg"] += 1
        st["fast_invlpg"] += 1
        return True

    def invlpg_exit(self, va):
        """The INVLPG exit (and the invlpg hypercall): resync the entry if its
        shadow page is unsync, and invalidate the real TLB as the guest asked
        (SDM 4.10.4.1; a non-canonical address invalidates nothing)."""
        self._stats["invlpg"] += 1
        if self._paging:
            width = 57 if self.cpu._c.cr4 & bits.CR4_LA57 else 48
            top = va >> (width - 1)
            if top == 0 or top == (1 << (65 - width)) - 1:
                self.shadow.invlpg(va)
            self.mmu.invlpg(va)
            self.commit()

    def hypercall(self, op, *args):
        """Paravirtual operations (paravirt VMs only): see ptemu.hypervisor.paravirt."""
        if not self._paravirt:
            raise InvalidInput("hypercall %r: this VM uses %s paging; hypercalls are for "
                               "paravirt VMs" % (op, self.vm.paging))
        cur = self._cpu_bytes[:]                    # sync_cpu(load=False), written out
        if cur != self._seen:
            self._cpu_changed(cur, False)
        ctx = self._fast
        if not self._enabled & _FP_MMU_UPDATE:
            return self.hypercall_exit(op, args)
        # The mmu_update fast path's bit is on only when hypercall_exit is
        # VCpu's own: the common calls skip the dispatch layers (and count the
        # exit in self._pv_calls, which absorb_fast_counts folds in).
        if len(args) == 1:
            if op == "mmu_update":
                # What C declines goes to the Python path (not tried in C twice).
                n = _fast_mmu_update(self, ctx, args[0])
                if n is not None:
                    return n
                return _hypercall(self, op, args, False)
            if op == "invlpg":
                va = args[0]
                if va.__class__ is int and 0 <= va <= _U64_MAX:
                    self._pv_calls += 1
                    if self._root_stale and self._paging:
                        self._cpu_changed(cur)      # the rest of sync_cpu(): the root
                    return _pv_invlpg(self, va)
            elif op == "new_baseptr":
                self._pv_calls += 1
                return _pv_load_cr3(self, args[0])
        elif op == "flush_tlb" and not args:
            self._pv_calls += 1
            return _pv_load_cr3(self, self.cpu._c.cr3)
        return self.hypercall_exit(op, args)

    def mmu_update1(self, gpa, value):
        """hypercall("mmu_update", [(gpa, value)]): one entry, the same call and
        counters, without building and checking a batch -- a guest kernel's
        #PF handler updates one PTE at a time.  The fast path's C call when it
        is on and takes the entry; anything else goes the hypercall's way."""
        if self._enabled & _FP_MMU_UPDATE and gpa.__class__ is int and \
                value.__class__ is int:
            cur = self._cpu_bytes[:]                # sync_cpu(load=False), written out
            if cur != self._seen:
                self._cpu_changed(cur, False)
            if _fast_mmu_update1(self, self._fast, gpa, value):
                return 1
            # What C declines goes to the Python path (not tried in C twice).
            return _hypercall(self, "mmu_update", ([(gpa, value)],), False)
        return self.hypercall("mmu_update", [(gpa, value)])

    def hypercall_exit(self, op, args):
        """The VMCALL exit: paravirt.hypercall dispatches it."""
        return _hypercall(self, op, args)

    def __repr__(self):
        return "<vCPU of VM %d: guest CR3 %#x, real CR3 %#x>" % (self.vm.id, self.cpu.cr3,
                                                                 self.real_cpu.cr3)
