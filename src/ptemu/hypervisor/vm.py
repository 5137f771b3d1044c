"""The hypervisor: host frames, virtual machines, and the vCPU's exit handlers.

    Hypervisor(host bytes) ── one PhysicalMemory of host frames, a free list
      └─ VirtualMachine ──── p2m: gfn -> host frame (backed on first touch)
           ├─ phys            guest-physical memory as the guest sees it (DMA)
           ├─ shadow          ShadowMmu: shadow pages, rmap, write protection
           └─ vcpu            VCpu: the guest-visible CPU state, and the real
                              MMU (C walker + TLB) whose CR3 is the shadow root

The guest runs on the real MMU: `vcpu.run(trace)` is one C call over the
shadow tables that stops only at a #PF; Python handles that exit (one method
per event, below) and resumes.  Guest memory is backed lazily: a guest frame
gets a host frame (the lowest free one) when it is first touched -- by a
guest access through the shadow, by the hypervisor's walk of the guest's
tables, or by a `phys` write -- or all at once with create_vm(populate=True).
"""
import heapq
import struct

import numpy as np

from ptemu import bits
from ptemu._native import (ffi, lib, InvalidInput, GeneralProtection,
                           check_u64, check_array, fault_from_c, ACCESS_CODES)
from ptemu.memory import PhysicalMemory
from ptemu.mmu import CpuState, Mmu, RunResult, TRACE_DTYPE
from ptemu.tlb import Tlb
from ptemu.hypervisor.exits import (checked_gpa, EXIT_REASONS, VmStats, ExitRecord, GuestMemoryError,
                                    HostMemoryExhausted, ShadowMmuError)
from ptemu.hypervisor.shadow import ShadowMmu, TE_W, LEAF_COPY, R_WP
from ptemu.hypervisor.paravirt import hypercall as _hypercall

__all__ = ["Hypervisor", "VirtualMachine", "VCpu", "GuestPhys"]

PAGE = 4096
NO_FRAME = lib.PTEMU_NO_FRAME
_translate = lib.ptemu_mmu_translate
_run = lib.ptemu_run
# ptemu_walk_out in one unpack: va, pa, page_size, leaf, level, rights, nentries,
# mem_refs, tlb_hit, first_level, entry_pa[5] (10..14), entry[5] (15..19).
_WALK = struct.Struct("<4Q6I10Q")
assert _WALK.size == ffi.sizeof("ptemu_walk_out")
assert ffi.offsetof("ptemu_walk_out", "entry_pa") == 56
_unpack_walk = _WALK.unpack_from
_PA = struct.Struct("<Q")          # ptemu_walk_out.pa sits at offset 8
# A trace record: access kind at byte 8, user flag at byte 9 (ptemu_trace_rec).
assert TRACE_DTYPE.itemsize == 16 and TRACE_DTYPE.fields["access"][1] == 8
assert TRACE_DTYPE.fields["user"][1] == 9
_IN_USER = lib.PTEMU_IN_USER
_IN_CPL = lib.PTEMU_IN_CPL
_VEC_PF = lib.PTEMU_VEC_PF
_VEC_GP = lib.PTEMU_VEC_GP
_CAUSE_NONE = lib.PTEMU_CAUSE_NONE
_BUS = lib.PTEMU_CAUSE_BUS
_ACC_WRITE = lib.PTEMU_ACC_WRITE
_FLUSH_ALL = lib.PTEMU_FLUSH_ALL
_FLUSH_PCID = lib.PTEMU_FLUSH_PCID
_FL_USER = lib.PTEMU_CAUSE_FL_USER
_FL_CR3 = lib.PTEMU_CAUSE_FL_CR3
_ACC_NAMES = ("read", "write", "fetch")
_U64_MAX = (1 << 64) - 1

# _pf_exit outcomes (also the index of their counter in _OUTCOME_COUNTERS)
RETRY, EMULATE, MMIO, INJECT, SPURIOUS = 0, 1, 2, 3, 4
_OUTCOME_COUNTERS = ("pf_fixed", "pf_emulate", "pf_mmio", "pf_guest", "pf_spurious")


class Hypervisor:
    """Host memory (`host_memory_bytes`, a positive multiple of 4096) and the VMs
    living in it.  Host frames go out lowest-first from one free list."""

    def __init__(self, host_memory_bytes):
        size = check_u64(host_memory_bytes, "host_memory_bytes")
        if not size or size % PAGE:
            raise InvalidInput("host_memory_bytes must be a positive multiple of 4096, not %#x"
                               % size)
        self.host = PhysicalMemory(size)
        self._m = memoryview(self.host.array).cast("Q")
        self._free = list(range(size // PAGE))      # a heap: lowest frame first
        self.vms = []
        self._next_id = 1

    @property
    def free_frames(self):
        return len(self._free)

    def alloc_frame(self, owner=None):
        """A zeroed host frame (its address); HostMemoryExhausted when none is left."""
        if not self._free:
            raise HostMemoryExhausted("no free host frame left (host memory %#x bytes)"
                                      % self.host.size)
        f = heapq.heappop(self._free)
        self.host.array[f * PAGE:(f + 1) * PAGE] = 0
        if owner is not None:
            owner._host_frames.add(f)
        return f * PAGE

    def free_frame(self, hpa, owner=None):
        f = hpa // PAGE
        if owner is not None:
            owner._host_frames.discard(f)
        heapq.heappush(self._free, f)

    def create_vm(self, guest_memory_bytes, paging="shadow", unsync=False, prev_roots=3,
                  shadow_limit=None, prefetch=False, populate=False, tlb=None):
        """A new VM with `guest_memory_bytes` of guest-physical memory.

        paging: "shadow" (trap-and-emulate shadow page tables), "paravirt"
        (the same shadows, updated by hypercalls) or "nested" (EPT: see
        ptemu.hypervisor.nested; the shadow options do not apply).
        unsync: leave level-1 guest tables writable until the guest flushes
        (shadow only).  prev_roots: shadow roots cached across CR3 loads
        (KVM: 3).  shadow_limit: most shadow pages (oldest evicted), None for
        as many as host memory holds.  prefetch: map up to 7 neighbouring
        accessed guest PTEs at each hidden fault.  populate: back all guest
        memory at once instead of on first touch.  tlb: the vCPU's real TLB
        (default Tlb.default()).
        """
        if paging == "nested":
            if unsync or shadow_limit is not None or prefetch or prev_roots != 3:
                raise InvalidInput("unsync, prev_roots, shadow_limit and prefetch are shadow "
                                   "paging options; nested paging has no shadow pages")
            from ptemu.hypervisor.nested import create_nested_vm
            return create_nested_vm(self, guest_memory_bytes, tlb=tlb, populate=populate)
        if paging not in ("shadow", "paravirt"):
            raise InvalidInput("paging must be 'shadow', 'paravirt' or 'nested', not %r"
                               % (paging,))
        size = check_u64(guest_memory_bytes, "guest_memory_bytes")
        if not size or size % PAGE:
            raise InvalidInput("guest_memory_bytes must be a positive multiple of 4096, "
                               "not %#x" % size)
        if unsync and paging != "shadow":
            raise InvalidInput("unsync applies to shadow paging only")
        if (not isinstance(prev_roots, int) or isinstance(prev_roots, bool)
                or not 0 <= prev_roots <= 64):
            raise InvalidInput("prev_roots must be an integer 0..64, not %r" % (prev_roots,))
        if shadow_limit is not None and (not isinstance(shadow_limit, int)
                                         or isinstance(shadow_limit, bool) or shadow_limit < 8):
            raise InvalidInput("shadow_limit must be None or an integer >= 8 (a root and "
                               "a full path of shadow pages), not %r" % (shadow_limit,))
        if tlb is not None and not isinstance(tlb, Tlb):
            raise InvalidInput("tlb must be a Tlb or None")
        if populate and size // PAGE > len(self._free):
            raise HostMemoryExhausted("populate: %d guest frames, %d free host frames"
                                      % (size // PAGE, len(self._free)))
        return self._add_vm(VirtualMachine(self, self._next_id, size, paging, bool(unsync),
                                           prev_roots, shadow_limit, bool(prefetch), tlb),
                            populate)

    def _add_vm(self, vm, populate):
        """Register a VM made with the id self._next_id (any paging kind); with
        populate, back every guest frame now."""
        self._next_id += 1
        self.vms.append(vm)
        if populate:
            for gfn in range(vm.memory_bytes // PAGE):
                vm.back(gfn)
        return vm

    def destroy_vm(self, vm):
        """Give every host frame of vm back (its shadow pages and its memory)."""
        if vm not in self.vms:
            raise InvalidInput("%r does not belong to this hypervisor" % (vm,))
        if not hasattr(vm, "shadow"):           # a nested-paging VM frees itself
            vm.destroy()
            self.vms.remove(vm)
            return
        vm.shadow.zap_all()
        for f in sorted(vm._host_frames):
            self.free_frame(f * PAGE)
        vm._host_frames.clear()
        vm.p2m[:] = NO_FRAME
        vm._p2m_list[:] = [NO_FRAME] * len(vm._p2m_list)
        vm._h2g.clear()
        self.vms.remove(vm)
        vm.vcpu._destroyed = True
        vm.vcpu._seen = None            # so that the next vCPU operation notices

    def __repr__(self):
        return "Hypervisor(%#x, %d VMs, %d free frames)" % (self.host.size, len(self.vms),
                                                             len(self._free))


class VirtualMachine:
    """One guest: guest-physical memory backed by host frames, one vCPU.

    The machine contract (machine-contract.md): paging, unsync, memory_bytes,
    phys, vcpu, stats.  Plus: gpa_to_hpa, p2m (numpy: gfn -> host byte
    offset or PhysicalMemory.NO_FRAME), shadow (the ShadowMmu),
    host_frames(), log_exits().
    """

    def __init__(self, hv, vm_id, memory_bytes, paging, unsync, prev_roots, shadow_limit,
                 prefetch, tlb):
        self.hypervisor = hv
        self.id = vm_id
        self.paging = paging
        self.unsync = unsync
        self.memory_bytes = memory_bytes
        n = memory_bytes // PAGE
        self.p2m = np.full(n, NO_FRAME, dtype=np.uint64)
        self._p2m_list = [NO_FRAME] * n
        self._h2g = {}
        self._host_frames = set()
        self._stats = VmStats()
        #: The guest-physical space as the C walker sees it (walks of guest tables).
        self.view = PhysicalMemory.view(hv.host, self.p2m)
        self.shadow = ShadowMmu(self, unsync=unsync, prev_roots=prev_roots,
                                shadow_limit=shadow_limit, prefetch=prefetch)
        self.phys = GuestPhys(self)
        self.vcpu = VCpu(self, tlb if tlb is not None else Tlb.default())

    # -- guest memory ----------------------------------------------------------------
    def back(self, gfn):
        """Back guest frame gfn with a host frame (if not yet); its host address."""
        hpa = self._p2m_list[gfn]
        if hpa != NO_FRAME:
            return hpa
        if not self.hypervisor._free:
            self.shadow._recycle(1, host=True)
        hpa = self.hypervisor.alloc_frame(owner=self)
        self.p2m[gfn] = hpa
        self._p2m_list[gfn] = hpa
        self._h2g[hpa // PAGE] = gfn
        self._stats["frames_backed"] += 1
        if self.vcpu._log is not None:
            self.vcpu._log_event("backing", "guest frame %d (gpa %#x) -> host frame %d "
                                 "(hpa %#x)" % (gfn, gfn * PAGE, hpa // PAGE, hpa))
        return hpa

    def gpa_to_hpa(self, gpa):
        """The host physical address backing gpa, or None while its frame is unbacked."""
        gpa = checked_gpa(gpa, self.memory_bytes)
        hpa = self._p2m_list[gpa // PAGE]
        return None if hpa == NO_FRAME else hpa + (gpa % PAGE)

    def host_frames(self):
        """Host frame numbers this VM owns (its memory and its shadow pages)."""
        return set(self._host_frames)

    def guest_write(self, gpa, value, flood=True, commit=True):
        """Write the 8-byte word at gpa (8-aligned, inside memory) as the hypervisor
        does for an emulated guest store, a DMA write or an mmu_update: the word
        lands in guest memory, then the shadow pages of that frame follow."""
        gfn = gpa >> 12
        hpa = self._p2m_list[gfn]
        if hpa == NO_FRAME:
            hpa = self.back(gfn)
        m = self.hypervisor._m
        i = (hpa + (gpa & 0xFFF)) >> 3
        old = m[i]
        m[i] = value
        sh = self.shadow
        if gfn in sh.gfn_sps:
            sh.pte_written(gfn, gpa & 0xFFF, old, value, 8, flood)
            if commit:
                self.vcpu._commit()

    # -- counters and logs ------------------------------------------------------------
    @property
    def stats(self):
        """The counters (exits.COUNTERS), plus the real MMU's walks: shadow_walks,
        shadow_walk_refs (memory references of walks of the shadow tables)."""
        st = self._stats
        st["exits"] = sum(st["exit_" + r] for r in EXIT_REASONS)
        st["guest_walks"] = sum(st[c] for c in _OUTCOME_COUNTERS)
        t = self.vcpu.tlb._c
        st["shadow_walks"] = int(t.walks)
        st["shadow_walk_refs"] = int(t.walk_refs)
        st["shadow_pages"] = len(self.shadow.hash)
        return st

    def reset_stats(self):
        """Zero the counters, the real TLB's included (e.g. after a warm-up)."""
        self._stats.reset()
        self.vcpu.tlb.reset_stats()

    def log_exits(self, sink):
        """Record every exit (and every host frame handed out): sink is a list
        (ExitRecord / event tuples appended), a callable, or None to stop."""
        if sink is None:
            self.vcpu._log = None
        elif isinstance(sink, list):
            self.vcpu._log = sink.append
        elif callable(sink):
            self.vcpu._log = sink
        else:
            raise InvalidInput("log_exits takes a list, a callable or None")

    def __repr__(self):
        return "<VM %d: %s%s, %#x bytes, %d frames backed>" % (
            self.id, self.paging, " unsync" if self.unsync else "", self.memory_bytes,
            len(self._h2g))


class GuestPhys:
    """Guest-physical memory as the guest sees it with paging off or by DMA.

    Reads of a frame not yet backed give zeros; writes back it.  A write to a
    frame the hypervisor shadows is a page-table write (the shadows follow):
    a whole aligned entry updates them, anything else (a partial or
    straddling write, a bulk copy) unshadows the frame, as KVM does for a
    misaligned write.
    """

    def __init__(self, vm):
        self._vm = vm
        self._m = vm.hypervisor._m
        self._arr = vm.hypervisor.host.array
        self.size = vm.memory_bytes

    def __len__(self):
        return self.size

    def _range(self, pa, n):
        if pa.__class__ is not int or pa < 0:
            pa = check_u64(pa, "physical address")
        if n.__class__ is not int or n < 0:
            n = check_u64(n, "length")
        if pa + n > self.size:
            raise InvalidInput("physical range %#x..%#x is outside memory (size %#x)"
                               % (pa, pa + n, self.size))
        return pa, n

    def read_u64(self, pa):
        if pa.__class__ is int and not pa & 7 and 0 <= pa and pa + 8 <= self.size:
            hpa = self._vm._p2m_list[pa >> 12]
            return 0 if hpa == NO_FRAME else self._m[(hpa + (pa & 0xFFF)) >> 3]
        pa, _ = self._range(pa, 8)
        if pa & 7:
            return int.from_bytes(self.read(pa, 8), "little")
        hpa = self._vm._p2m_list[pa >> 12]
        return 0 if hpa == NO_FRAME else self._m[(hpa + (pa & 0xFFF)) >> 3]

    def write_u64(self, pa, value):
        pa, _ = self._range(pa, 8)
        if value.__class__ is not int or value < 0 or value > _U64_MAX:
            value = check_u64(value, "value")
        if pa & 7:
            self.write(pa, value.to_bytes(8, "little"))
        else:
            self._vm.guest_write(pa, value)

    def read(self, pa, n):
        pa, n = self._range(pa, n)
        if n and (pa & 0xFFF) + n <= PAGE:
            # Within one frame (clear_page / copy_page): one slice, no assembly.
            hpa = self._vm._p2m_list[pa >> 12]
            if hpa == NO_FRAME:
                return bytes(n)
            off = hpa + (pa & 0xFFF)
            return self._arr[off:off + n].tobytes()
        out = bytearray(n)
        p2m = self._vm._p2m_list
        done = 0
        while done < n:
            cur = pa + done
            k = min(n - done, PAGE - (cur & 0xFFF))
            hpa = p2m[cur >> 12]
            if hpa != NO_FRAME:
                off = hpa + (cur & 0xFFF)
                out[done:done + k] = self._arr[off:off + k].tobytes()
            done += k
        return bytes(out)

    def write(self, pa, data):
        data = bytes(data)
        pa, n = self._range(pa, len(data))
        vm = self._vm
        sh = vm.shadow
        done = 0
        while done < n:
            cur = pa + done
            k = min(n - done, PAGE - (cur & 0xFFF))
            gfn = cur >> 12
            off = cur & 0xFFF
            if k == 8 and not off & 7:
                vm.guest_write(cur, int.from_bytes(data[done:done + 8], "little"))
            else:
                hpa = vm.back(gfn)
                word = (hpa + (off & ~7)) >> 3
                old = self._m[word]
                self._arr[hpa + off:hpa + off + k] = np.frombuffer(data, np.uint8, k, done)
                if gfn in sh.gfn_sps:
                    sh.pte_written(gfn, off, old, self._m[word], k)
                    vm.vcpu._commit()
            done += k

    def __repr__(self):
        return "<guest-physical memory of VM %d, %#x bytes>" % (self._vm.id, self.size)


class VCpu:
    """The vCPU of a VM: what the guest sees (`cpu`, the operations of the machine
    contract) and the real MMU it runs on (`mmu`: host memory, the shadow root
    as CR3, the real TLB `tlb`).  One method per event, each with counters."""

    def __init__(self, vm, tlb):
        self.vm = vm
        self.shadow = vm.shadow
        self._stats = vm._stats
        self._m = vm.hypervisor._m
        self._p2m = vm._p2m_list
        self._h2g = vm._h2g
        self._nframes = len(vm._p2m_list)
        self._free = vm.hypervisor._free
        #: The CpuState the guest sees (CR3 = the guest's top table).
        self.cpu = CpuState.long_mode()
        #: The real CPU state: the guest's, except CR3 = the shadow root and CR0.WP=1.
        self.real_cpu = CpuState.long_mode()
        self.tlb = tlb
        self.mmu = Mmu(vm.hypervisor.host, self.real_cpu, tlb)
        #: Walks of the guest's own tables (over the p2m view, no TLB).
        self.guest_mmu = Mmu(vm.view, self.cpu)
        self._rm = self.mmu._m
        self._rbuf = self.mmu._outbuf
        self._rcpu = self.real_cpu._c
        self._hmem = vm.hypervisor.host._c
        self._rtlb = tlb._c
        self._rfault = ffi.new("ptemu_fault *")
        self._gm = self.guest_mmu._m
        self._gbuf = self.guest_mmu._outbuf
        self._gfault = self.guest_mmu._fault
        self._cpu_bytes = ffi.buffer(self.cpu._c)
        self._seen = None
        self._destroyed = False
        self._paging = True
        self._root_stale = True         # no root yet: loaded at the first guest access
        self._log = None
        self._nlogged = 0
        self._gpa = 0
        self._exc = None
        self._checked_trace = None     # the last trace run() checked (kept alive),
        self._trace_raw = None         # its bytes,
        self._trace_c = None           # and its records as C sees them
        self._pf_exit = self._make_pf_exit()

    # -- keeping the real CPU in step with the guest's ------------------------------
    def _sync_cpu(self, load=True):
        """Pick up guest CPU state changed by plain assignment (CPL, PKRU, ...).
        load=False: the caller is about to load CR3 itself (no root for the old one)."""
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
        self._commit()

    def _pcid(self):
        g = self.cpu._c
        return g.cr3 & bits.CR3_PCID_MASK if g.cr4 & bits.CR4_PCIDE else 0

    def _commit(self):
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
            lib.ptemu_tlb_flush(self._rtlb, _FLUSH_ALL, 0, 0, _FL_USER)
            self._stats["tlb_flush"] += 1

    # -- exit logging (the demo) ---------------------------------------------------------
    def _log_exit(self, reason, detail):
        self._nlogged += 1
        self._log(ExitRecord(self._nlogged, reason, detail))

    def _log_event(self, kind, detail):
        self._log((kind, detail))

    # -- the #PF exit: hidden fault, true fault, protected write, MMIO -------------------
    def _make_pf_exit(self):
        """The #PF exit handler, `self._pf_exit(va, access, flags)`.

        Walk the guest's tables (the C walker over the p2m view: same rules and
        error codes as hardware; it sets the guest's A/D bits), then fix the
        shadow.  Returns RETRY (hidden fault: the shadow now has it), SPURIOUS
        (it had it already: a stale real TLB entry), EMULATE (a write the
        hypervisor must do: self._gpa), MMIO (self._gpa is outside the VM) or
        INJECT (true fault: self._exc is what the guest gets).  The caller
        counts the exit (see _count), so that the bulk loop counts in locals.

        The commonest exit -- a 4 KiB guest page whose level-1 shadow page is
        in place (ShadowMmu._pcache), a new or widened leaf -- is handled here
        with the state bound in closure cells; everything else goes to the
        general handler `_pf_handle` with the walk already done.
        """
        vcpu = self
        gm, gbuf, translate, unpack = self._gm, self._gbuf, _translate, _unpack_walk
        sh = self.shadow
        wp, rmap, pcache, m, p2m = sh.wp, sh.rmap, sh._pcache, self._m, self._p2m
        nframes = self._nframes
        handle = self._pf_handle
        prefetch = sh.prefetch
        leaf_copy = LEAF_COPY
        nx = bits.PTE_NX

        def pf_exit(va, acc, flags):
            r = translate(gm, va, acc, flags)
            if r:
                return handle(va, acc, flags, r, None)
            w = unpack(gbuf)
            gfn = w[1] >> 12
            rights = w[5]
            if (w[4] != 1 or gfn >= nframes or vcpu._log is not None or prefetch
                    or (acc == 1 and (not rights & 2 or gfn in wp
                                      or not sh.role_base & R_WP))):
                return handle(va, acc, flags, 0, w)
            path = pcache.get(va >> 21)
            if path is None:
                return handle(va, acc, flags, 0, w)
            sp = path[-1]
            if sp.gfn != w[9 + w[6]] >> 12 or sp.gsnap is not None:
                return handle(va, acc, flags, 0, w)
            hpa = p2m[gfn]
            if hpa == NO_FRAME:
                return handle(va, acc, flags, 0, w)
            leaf = w[3]
            spte = hpa | 0x21 | (rights & 4) | (leaf & leaf_copy)       # P A U
            if rights & 2 and leaf & 0x40 and gfn not in wp:
                spte |= 0x42                                            # W D
            if rights & 1:
                spte |= nx
            for p in path:              # a use of every page on the path
                p.flood = 0
            i = sp.base + ((va >> 12) & 511)
            old = m[i]
            if old:
                if old == spte:
                    return SPURIOUS
                if (old ^ spte) & ~0x62 or old & ~spte:
                    return handle(va, acc, flags, 0, w)     # moved or narrowed
                m[i] = spte                 # only A, D, W added: same rmap, no flush
                return RETRY
            m[i] = spte
            s = rmap.get(gfn)
            if s is None:
                rmap[gfn] = {i << 3}
            else:
                s.add(i << 3)
            return RETRY
        return pf_exit

    def _pf_handle(self, va, acc, flags, r, w):
        """The general #PF exit handler (see _make_pf_exit): r is the guest walk's
        result code, w its unpacked output when r == 0."""
        gm = self._gm
        while r:
            if r == _VEC_PF and self._gfault.cause == _BUS and self._back_walk_table():
                r = _translate(gm, va, acc, flags)
                continue
            if r == _VEC_PF:
                exc = fault_from_c(self._gfault, self.vm.memory_bytes)
            else:
                exc = GeneralProtection(va)
            self._exc = exc
            if self._log is not None:
                self._log_exit("page_fault", "%s at %#x: the guest's own walk fails -> "
                               "true fault, inject #PF error code %#x, CR2 %#x"
                               % (_ACC_NAMES[acc], va, exc.error_code, va))
            return INJECT
        if w is None:
            w = _unpack_walk(self._gbuf)
        gpa = w[1]
        gfn = gpa >> 12
        if gfn >= self._nframes:
            self._gpa = gpa
            if self._log is not None:
                self._log_exit("page_fault", "%s at %#x: guest maps gpa %#x outside its "
                               "memory -> MMIO, nothing mapped" % (_ACC_NAMES[acc], va, gpa))
            return MMIO
        sh = self.shadow
        rights = w[5]
        emulate = False
        why = None
        if acc == _ACC_WRITE:
            if not rights & TE_W or not (sh.role_base & R_WP or flags & _IN_USER or (
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
        if (sh.limit is not None and len(sh.hash) + 5 > sh.limit) or len(self._free) < 7:
            sh.reserve(sh.levels)
        hpa = self._p2m[gfn]
        if hpa == NO_FRAME:
            hpa = self.vm.back(gfn)
        changed = sh.fill(va, gpa, w[4], rights, w, w[6], hpa, not emulate)
        if sh.need_flush or sh.need_reload:
            self._commit()
        if emulate:
            self._gpa = gpa
            if self._log is not None:
                self._log_exit("page_fault", "write at %#x -> gpa %#x: %s (guest frame %d) "
                               "-> emulate the store" % (va, gpa, why, gfn))
            return EMULATE
        if self._log is not None:
            self._log_exit("page_fault", "%s at %#x: hidden fault -> the guest's walk gives "
                           "gpa %#x; the shadow now maps virtual page %d -> host frame %d%s"
                           % (_ACC_NAMES[acc], va, gpa, va >> 12, hpa >> 12,
                              " (guest page table left writable: unsync)"
                              if why == "unsync" else ""))
        return RETRY if changed else SPURIOUS

    def _count(self, code):
        st = self._stats
        st["exit_page_fault"] += 1
        st[_OUTCOME_COUNTERS[code]] += 1

    def _back_walk_table(self):
        """The guest walk ran into a guest frame not backed yet: back it (it reads
        as zeros) so that the walk sees what the guest's memory holds."""
        w = _unpack_walk(self._gbuf)
        n = w[6]
        if n:
            table = w[14 + n] & self.shadow.amask
        else:
            table = self.cpu._c.cr3 & self.shadow.amask
        gfn = table >> 12
        if gfn < self._nframes and self._p2m[gfn] == NO_FRAME:
            self.vm.back(gfn)
            return True
        return False

    def _xlate(self, va, acc, r=None):
        """One guest access through the real MMU, exits handled.  Returns
        (0, hpa), (EMULATE, gpa) or (MMIO, gpa); raises the true fault.
        r: the result of the caller's own first try of the real MMU, if any."""
        tries = 0
        while True:
            if r is None:
                r = _translate(self._rm, va, acc, _IN_CPL)
            if not r:
                return 0, _PA.unpack_from(self._rbuf, 8)[0]
            if r == _VEC_GP:
                raise GeneralProtection(va)
            code = self._pf_exit(va, acc, _IN_CPL)
            self._count(code)
            if code == RETRY or code == SPURIOUS:
                tries += 1
                if tries > 8:
                    raise ShadowMmuError("no progress on %s at %#x" % (_ACC_NAMES[acc], va))
                r = None
                continue
            if code == INJECT:
                raise self._exc
            return code, self._gpa

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
        self._sync_cpu()
        self._stats["guest_accesses"] += 1
        if not self._paging:
            return va
        kind, addr = self._xlate(va, acc)
        if kind:
            if kind == EMULATE:     # a write with no data: only the flood count moves
                self.shadow.pte_written(addr >> 12, addr & 0xFF8, 0, 0)
                self._commit()
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
        self._sync_cpu()
        self._stats["guest_accesses"] += 1
        if not self._paging:
            if va + 8 > self.vm.memory_bytes:
                raise GuestMemoryError(va, va, self.vm.memory_bytes)
            return self.vm.phys.read_u64(va)
        r = _translate(self._rm, va, 0, _IN_CPL)
        if not r:                       # no exit: the real MMU had it
            return self._m[_PA.unpack_from(self._rbuf, 8)[0] >> 3]
        kind, addr = self._xlate(va, 0, r)
        if kind == MMIO:
            raise GuestMemoryError(va, addr, self.vm.memory_bytes)
        return self._m[addr >> 3]

    def store_u64(self, va, value):
        """An 8-byte store at va (8-aligned).  A store into a write-protected guest
        page table exits and is emulated; the shadows follow it."""
        if va.__class__ is not int or va < 0 or va > _U64_MAX or va & 7:
            va = self._aligned(va)
        if value.__class__ is not int or value < 0 or value > _U64_MAX:
            value = check_u64(value, "value")
        self._sync_cpu()
        self._stats["guest_accesses"] += 1
        if not self._paging:
            if va + 8 > self.vm.memory_bytes:
                raise GuestMemoryError(va, va, self.vm.memory_bytes)
            self.vm.guest_write(va, value)
            return
        r = _translate(self._rm, va, _ACC_WRITE, _IN_CPL)
        if not r:                       # no exit: the real MMU had it
            self._m[_PA.unpack_from(self._rbuf, 8)[0] >> 3] = value
            return
        kind, addr = self._xlate(va, _ACC_WRITE, r)
        if kind == 0:
            self._m[addr >> 3] = value
        elif kind == EMULATE:
            self.vm.guest_write(addr, value)
        else:
            raise GuestMemoryError(va, addr, self.vm.memory_bytes)

    def run(self, trace, start=0):
        """Run trace[start:] (TRACE_DTYPE) on the real MMU in C; exits are handled
        here and the run resumes, up to the first true fault (RunResult).

        The vCPU keeps a reference to the last trace it checked, so that a
        resume after each handled fault does not check it again (an access
        code changed since is still refused, by the C loop)."""
        if trace is not self._checked_trace:
            # A guest kernel resumes the same trace after every fault it handles:
            # check it (and scan its access codes) once, not at every resume.
            trace = check_array(trace, TRACE_DTYPE, "trace")
            if len(trace) and int(trace["access"].max()) > 2:
                raise InvalidInput("trace access codes must be 0 (read), 1 (write) or 2 "
                                   "(fetch)")
            self._checked_trace = trace
            # The access kind and user flag of record i are bytes 16*i+8 and 16*i+9.
            self._trace_raw = memoryview(trace.view(np.uint8)) if len(trace) else None
            self._trace_c = ffi.from_buffer("ptemu_trace_rec[]", trace)
        n = len(trace)
        if start.__class__ is not int or start < 0:
            start = check_u64(start, "start")
        if start > n:
            raise InvalidInput("start %d is past the end of the trace (%d)" % (start, n))
        self._sync_cpu()
        st = self._stats
        if not self._paging:
            st["guest_accesses"] += n - start
            return RunResult(n, 0, 0, 0, "none", None)
        raw, tp = self._trace_raw, self._trace_c
        f = self._rfault
        rcpu, hmem, rtlb = self._rcpu, self._hmem, self._rtlb
        pf_exit = self._pf_exit
        run_c, null, vec_pf, in_user = _run, ffi.NULL, _VEC_PF, _IN_USER
        counts = [0, 0, 0, 0, 0]        # by outcome, added to the stats at the end
        i = start
        last = -1
        tries = 0
        try:
            while True:
                idx = run_c(rcpu, hmem, rtlb, tp, n, i, null, f)
                if idx == n:
                    st["guest_accesses"] += n - start
                    return RunResult(n, 0, 0, 0, "none", None)
                if f.vector != vec_pf:
                    st["guest_accesses"] += idx - start
                    if f.cause == _CAUSE_NONE:
                        # A bad access code written into the trace since it was
                        # checked: the C loop refuses it, as on the native machine.
                        raise InvalidInput("trace[%d]: access code %d is not 0 (read), 1 "
                                           "(write) or 2 (fetch)" % (idx, raw[16 * idx + 8]))
                    va = int(trace["va"][idx])
                    return RunResult(int(idx), 13, 0, 0, "non-canonical", GeneralProtection(va))
                va = f.cr2
                if idx == last:
                    tries += 1
                    if tries > 8:
                        raise ShadowMmuError("no progress on trace[%d] at %#x" % (idx, va))
                else:
                    last = idx
                    tries = 0
                o = 16 * idx
                code = pf_exit(va, raw[o + 8], in_user if raw[o + 9] else 0)
                counts[code] += 1
                if code == 0 or code == 4:          # RETRY, SPURIOUS
                    i = idx
                elif code == 3:                     # INJECT
                    st["guest_accesses"] += idx - start
                    exc = self._exc
                    return RunResult(int(idx), 14, exc.error_code, exc.cr2, exc.cause, exc)
                else:
                    # An emulated write or an MMIO access: a trace moves no data,
                    # so the hypervisor's part is done and the guest goes on.
                    if code == EMULATE:
                        self.shadow.pte_written(self._gpa >> 12, self._gpa & 0xFF8, 0, 0)
                        self._commit()
                    i = idx + 1
        finally:
            n_exits = counts[0] + counts[1] + counts[2] + counts[3] + counts[4]
            if n_exits:
                st["exit_page_fault"] += n_exits
                for k, c in enumerate(counts):
                    if c:
                        st[_OUTCOME_COUNTERS[k]] += c

    # -- control registers and invalidations ---------------------------------------------
    def write_cr3(self, value):
        """Guest MOV to CR3 (intercepted): the guest's TLB rules (SDM 4.10.4.1),
        unsync pages synced at a flushing load, the shadow root for the new top
        table found in prev_roots or the hash, else started empty."""
        self._sync_cpu(load=False)
        st = self._stats
        st["exit_cr3_write"] += 1
        self._load_cr3(value, "cr3_write")

    def _load_cr3(self, value, reason):
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
            lib.ptemu_tlb_flush(self._rtlb, _FLUSH_PCID, pcid, 0, _FL_CR3)
        if self._log is not None:
            how = ("same root" if root is old else "cached root (prev_roots)"
                   if self._stats["prev_root_hit"] != hits else "new shadow root")
            self._log_exit(reason, "guest CR3 %#x -> %s at host frame %d (real CR3 %#x); the "
                           "guest's top table, guest frame %d, is write-protected"
                           % (value, how, root.hpa // PAGE, root.hpa, root.gfn))
        if sh.need_flush or sh.need_reload:
            self._commit()

    def write_cr4(self, value):
        """Guest MOV to CR4: the guest's checks (#GP) and TLB rules; a change of
        paging mode starts new roots."""
        self._sync_cpu()
        st = self._stats
        st["exit_cr_write"] += 1
        self.guest_mmu.write_cr4(value)
        if self._paging:
            self.mmu.write_cr4(value)
        self._cpu_changed(self._cpu_bytes[:])

    def write_cr0(self, value):
        """Guest MOV to CR0 (WP changes the roles; PG cannot be cleared in 64-bit mode)."""
        self._sync_cpu()
        st = self._stats
        st["exit_cr_write"] += 1
        self.guest_mmu.write_cr0(value)
        self._cpu_changed(self._cpu_bytes[:])

    def invlpg(self, va):
        """Guest INVLPG (intercepted): resync the entry if its shadow page is
        unsync, and invalidate the real TLB as the guest asked."""
        va = check_u64(va, "virtual address")
        self._sync_cpu()
        st = self._stats
        st["exit_invlpg"] += 1
        self._invlpg(va)
        if self._log is not None:
            self._log_exit("invlpg", "INVLPG %#x" % va)

    def _invlpg(self, va):
        self._stats["invlpg"] += 1
        if self._paging:
            width = 57 if self.cpu._c.cr4 & bits.CR4_LA57 else 48
            top = va >> (width - 1)
            if top == 0 or top == (1 << (65 - width)) - 1:
                self.shadow.invlpg(va)
            self.mmu.invlpg(va)
            self._commit()

    def hypercall(self, op, *args):
        """Paravirtual operations (paravirt VMs only): see ptemu.hypervisor.paravirt."""
        if self.vm.paging != "paravirt":
            raise InvalidInput("hypercall %r: this VM uses %s paging; hypercalls are for "
                               "paravirt VMs" % (op, self.vm.paging))
        self._sync_cpu(load=False)
        return _hypercall(self, op, args)

    def __repr__(self):
        return "<vCPU of VM %d: guest CR3 %#x, real CR3 %#x>" % (self.vm.id, self.cpu.cr3,
                                                                 self.real_cpu.cr3)
