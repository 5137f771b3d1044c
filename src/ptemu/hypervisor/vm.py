"""A shadow-paging VM: guest-physical memory backed by host frames, and its phys.

    VirtualMachine ──── p2m: gfn -> host frame (backed on first touch)
      ├─ phys            GuestPhys: guest-physical memory as the guest sees it (DMA)
      ├─ shadow          ShadowMmu (shadow.py): shadow pages, rmap, write protection
      └─ vcpu            VCpu (vcpu.py): the guest-visible CPU and the real MMU
                         (C walker + TLB) whose CR3 is a shadow root

Guest memory is backed lazily: a guest frame gets a host frame (the lowest
free one) when it is first touched -- by a guest access through the shadow,
by the hypervisor's walk of the guest's tables, or by a `phys` write -- or
all at once with create_vm(populate=True).

The machine contract (docs/machine-contract.md, shared with guest.NativeMachine
and nested.NestedVM): paging, unsync, memory_bytes, phys, vcpu, stats.
"""
import numpy as np

from ptemu._native import InvalidInput, check_u64
from ptemu.memory import PhysicalMemory
from ptemu.tlb import Tlb
from ptemu.hypervisor.exits import checked_gpa, EXIT_REASONS, PF_OUTCOME_COUNTERS, VmStats
from ptemu.hypervisor.host import Hypervisor, PAGE  # noqa: F401  (Hypervisor: old import path)
from ptemu.hypervisor.shadow import ShadowMmu
from ptemu.hypervisor.vcpu import VCpu

__all__ = ["Hypervisor", "VirtualMachine", "VCpu", "GuestPhys"]

NO_FRAME = PhysicalMemory.NO_FRAME
_U64_MAX = (1 << 64) - 1


class VirtualMachine:
    """One guest: guest-physical memory backed by host frames, one vCPU.

    The machine contract (module docstring).  Plus: gpa_to_hpa, p2m (numpy:
    gfn -> host byte offset or PhysicalMemory.NO_FRAME), shadow (the
    ShadowMmu), host_frames(), log_exits().

    What its collaborators use (the shadow MMU, the vCPU, hypercalls):
    `p2m_list` (p2m as a list, for fast scalar reads), `h2g` (host frame ->
    gfn), `frames_owned` (host frame numbers charged to this VM),
    `counters` (the VmStats the exit handlers increment; `stats` adds the
    derived totals), `view` (guest-physical memory as the C walker reads it).
    `shadow_class` and `vcpu_class` say which classes a VM builds: a
    subclass of VirtualMachine may name its own (a researcher's policy).
    """

    shadow_class = ShadowMmu
    vcpu_class = VCpu

    def __init__(self, hv, vm_id, memory_bytes, paging, unsync, prev_roots, shadow_limit,
                 prefetch, tlb, fast_paths=True):
        self.hypervisor = hv
        self.id = vm_id
        self.paging = paging
        self.unsync = unsync
        self.memory_bytes = memory_bytes
        n = memory_bytes // PAGE
        self.p2m = np.full(n, NO_FRAME, dtype=np.uint64)
        self.p2m_list = [NO_FRAME] * n
        self.h2g = {}
        #: h2g for C: host frame -> gfn, NO_FRAME where this VM's memory is not
        self.h2g_map = np.full(hv.host.size // PAGE, NO_FRAME, dtype=np.uint64)
        self._p2m_mv, self._h2g_mv = memoryview(self.p2m), memoryview(self.h2g_map)  # (scalars)
        self.frames_owned = set()
        self.counters = VmStats()
        #: The guest-physical space as the C walker sees it (walks of guest tables).
        self.view = PhysicalMemory.view(hv.host, self.p2m)
        self.shadow = self.shadow_class(self, unsync=unsync, prev_roots=prev_roots,
                                        shadow_limit=shadow_limit, prefetch=prefetch)
        self.phys = GuestPhys(self)
        self.vcpu = self.vcpu_class(self, tlb if tlb is not None else Tlb.default(),
                                    fast_paths=fast_paths)

    def destroy(self):
        """Give every host frame back (shadow pages and memory); the vCPU refuses
        every later operation."""
        self.shadow.zap_all()
        hv = self.hypervisor
        for f in sorted(self.frames_owned):
            hv.free_frame(f * PAGE)
        self.frames_owned.clear()
        self.p2m[:] = NO_FRAME
        self.p2m_list[:] = [NO_FRAME] * len(self.p2m_list)
        self.h2g.clear()
        self.h2g_map[:] = NO_FRAME
        self.vcpu.detach()

    # -- guest memory ----------------------------------------------------------------
    def back(self, gfn, fill=None):
        """Back guest frame gfn with a host frame (if not yet); its host address.
        fill: the new frame's 4096 bytes (Hypervisor.alloc_frame); an already
        backed frame is returned as it is."""
        hpa = self.p2m_list[gfn]
        if hpa != NO_FRAME:
            return hpa
        if not self.hypervisor.free_frames:
            self.shadow._recycle(1, host=True)
        hpa = self.hypervisor.alloc_frame(owner=self, fill=fill)
        self._p2m_mv[gfn] = hpa
        self.p2m_list[gfn] = hpa
        self.h2g[hpa // PAGE] = gfn
        self._h2g_mv[hpa // PAGE] = gfn
        self.counters["frames_backed"] += 1
        if self.vcpu.log is not None:
            self.vcpu.log_event("backing", "guest frame %d (gpa %#x) -> host frame %d "
                                 "(hpa %#x)" % (gfn, gfn * PAGE, hpa // PAGE, hpa))
        return hpa

    def gpa_to_hpa(self, gpa):
        """The host physical address backing gpa, or None while its frame is unbacked."""
        gpa = checked_gpa(gpa, self.memory_bytes)
        hpa = self.p2m_list[gpa // PAGE]
        return None if hpa == NO_FRAME else hpa + (gpa % PAGE)

    def host_frames(self):
        """Host frame numbers this VM owns (its memory and its shadow pages)."""
        return set(self.frames_owned)

    def guest_write(self, gpa, value, flood=True, commit=True):
        """Write the 8-byte word at gpa (8-aligned, inside memory) as the hypervisor
        does for an emulated guest store, a DMA write or an mmu_update: the word
        lands in guest memory, then the shadow pages of that frame follow."""
        gfn = gpa >> 12
        hpa = self.p2m_list[gfn]
        if hpa == NO_FRAME:
            hpa = self.back(gfn)
        m = self.hypervisor.words
        i = (hpa + (gpa & 0xFFF)) >> 3
        old = m[i]
        m[i] = value
        sh = self.shadow
        if gfn in sh.gfn_sps:
            sh.pte_written(gfn, gpa & 0xFFF, old, value, 8, flood)
            if commit:
                self.vcpu.commit()

    # -- counters and logs ------------------------------------------------------------
    @property
    def stats(self):
        """The counters (exits.COUNTERS), plus the real MMU's walks: shadow_walks,
        shadow_walk_refs (memory references of walks of the shadow tables)."""
        self.vcpu.absorb_fast_counts()
        st = self.counters
        st["exits"] = sum(st["exit_" + r] for r in EXIT_REASONS)
        st["guest_walks"] = sum(st[c] for c in PF_OUTCOME_COUNTERS)
        t = self.vcpu.tlb._c
        st["shadow_walks"] = int(t.walks)
        st["shadow_walk_refs"] = int(t.walk_refs)
        st["shadow_pages"] = len(self.shadow.hash)
        return st

    def reset_stats(self):
        """Zero the counters, the real TLB's included (e.g. after a warm-up)."""
        self.vcpu.absorb_fast_counts()
        self.counters.reset()
        self.vcpu.tlb.reset_stats()

    def log_exits(self, sink):
        """Record every exit (and every host frame handed out): sink is a list
        (ExitRecord / event tuples appended), a callable, or None to stop."""
        if sink is None:
            self.vcpu.set_log(None)
        elif isinstance(sink, list):
            self.vcpu.set_log(sink.append)
        elif callable(sink):
            self.vcpu.set_log(sink)
        else:
            raise InvalidInput("log_exits takes a list, a callable or None")

    def __repr__(self):
        return "<VM %d: %s%s, %#x bytes, %d frames backed>" % (
            self.id, self.paging, " unsync" if self.unsync else "", self.memory_bytes,
            len(self.h2g))


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
        self._m = vm.hypervisor.words
        self._bytes = memoryview(vm.hypervisor.host.array)     # host memory, for byte copies
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
            hpa = self._vm.p2m_list[pa >> 12]
            return 0 if hpa == NO_FRAME else self._m[(hpa + (pa & 0xFFF)) >> 3]
        pa, _ = self._range(pa, 8)
        if pa & 7:
            return int.from_bytes(self.read(pa, 8), "little")
        hpa = self._vm.p2m_list[pa >> 12]
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
            hpa = self._vm.p2m_list[pa >> 12]
            if hpa == NO_FRAME:
                return bytes(n)
            off = hpa + (pa & 0xFFF)
            return self._bytes[off:off + n].tobytes()
        out = bytearray(n)
        p2m = self._vm.p2m_list
        done = 0
        while done < n:
            cur = pa + done
            k = min(n - done, PAGE - (cur & 0xFFF))
            hpa = p2m[cur >> 12]
            if hpa != NO_FRAME:
                off = hpa + (cur & 0xFFF)
                out[done:done + k] = self._bytes[off:off + k]
            done += k
        return bytes(out)

    def write(self, pa, data):
        n = len(data) if data.__class__ is bytes else -1
        if n > 8 and pa.__class__ is int and 0 <= pa and (pa & 0xFFF) + n <= PAGE and \
                pa + n <= self.size:
            # Within one frame and more than an entry (clear_page / copy_page):
            # the loop below's one step, without its checks and copies.
            self._copy_in_frame(pa >> 12, pa & 0xFFF, data)
            return
        data = bytes(data)
        pa, n = self._range(pa, len(data))
        vm = self._vm
        src = memoryview(data)
        done = 0
        while done < n:
            cur = pa + done
            k = min(n - done, PAGE - (cur & 0xFFF))
            gfn = cur >> 12
            off = cur & 0xFFF
            if k == 8 and not off & 7:
                vm.guest_write(cur, int.from_bytes(data[done:done + 8], "little"))
            else:
                self._copy_in_frame(gfn, off, src[done:done + k])
            done += k

    def _copy_in_frame(self, gfn, off, src):
        """Bytes src into guest frame gfn at off (within the frame, not an
        aligned 8-byte entry store): backed first, and a shadowed frame's
        shadows told what changed (the entry at off's word before and after);
        a frame no shadow page reads just gets the copy."""
        vm = self._vm
        k = len(src)
        if gfn not in vm.shadow.gfn_sps:
            if k == PAGE and vm.p2m_list[gfn] == NO_FRAME:
                vm.back(gfn, fill=src)      # (clear_page of a fresh frame: one copy)
                return
            hpa = vm.back(gfn)
            self._bytes[hpa + off:hpa + off + k] = src
            return
        hpa = vm.back(gfn)
        word = (hpa + (off & ~7)) >> 3
        old = self._m[word]
        self._bytes[hpa + off:hpa + off + k] = src
        vm.shadow.pte_written(gfn, off, old, self._m[word], k)
        vm.vcpu.commit()

    def __repr__(self):
        return "<guest-physical memory of VM %d, %#x bytes>" % (self._vm.id, self.size)
