"""Nested paging (EPT): the hardware-assisted alternative to shadow paging.

The guest's own page tables are the tables the MMU walks -- CR3 is the
guest's CR3 -- but every guest-physical address, of a guest page-table entry
or of the data, goes through the hypervisor's EPT (csrc/ept.c): a 2-D walk of
up to 24 memory references per TLB miss for a 4-level guest on a 4-level EPT,
against the 4 of a shadow walk.  What the hypervisor no longer does is the
point of the comparison: no CR3 trap, no INVLPG trap, no write-protected guest
page tables, no hidden faults.  Its only exits are EPT violations, on the first
touch of each guest frame (backed lazily here, as KVM's TDP MMU does).

Event flow of an EPT violation (SDM Vol. 3C 29.3.3.2): the walk stops, the
exit carries the guest-physical address and the qualification; the handler
checks the address is inside the VM, backs the frame with a free host frame,
maps it read/write/execute in the EPT, and the access is retried.  A guest
page fault is the guest's own: it never leaves the guest (no exit).
"""
from collections import defaultdict

import numpy as np

from ptemu._native import (ffi, lib, InvalidInput, EptExit, EptMisconfig, PageFault, check_u64,
                           check_array, fault_from_c, GeneralProtection)
from ptemu.ept import Ept
from ptemu.memory import PhysicalMemory
from ptemu.mmu import CpuState, Mmu, RunResult, TRACE_DTYPE
from ptemu.tlb import Tlb
from ptemu.hypervisor.exits import (GuestMemoryError, NoExitControl, ShadowMmuError,
                                    checked_gpa, check_stores)

__all__ = ["NestedVM", "NestedVcpu", "NestedPhys", "create_nested_vm"]

PAGE = 4096
NO_FRAME = PhysicalMemory.NO_FRAME
_VEC_EXIT = lib.PTEMU_VEC_EXIT      # ptemu_fault.vector of an EPT exit (not an exception)


def create_nested_vm(hypervisor, guest_memory_bytes, tlb=None, ept_levels=4, ept_ad=False,
                     populate=False):
    size = check_u64(guest_memory_bytes, "guest_memory_bytes")
    if not size or size % PAGE:
        raise InvalidInput("guest_memory_bytes must be a positive multiple of 4096, not %#x"
                           % size)
    if tlb is not None and not isinstance(tlb, Tlb):
        raise InvalidInput("tlb must be a Tlb or None")
    return hypervisor._add_vm(NestedVM(hypervisor, hypervisor._next_id, size, tlb, ept_levels,
                                       bool(ept_ad)), populate)


class NestedVM:
    """A VM whose guest-physical memory is mapped by an EPT (machine contract:
    paging, unsync, memory_bytes, phys, vcpu, stats; plus gpa_to_hpa, p2m,
    ept, host_frames())."""

    paging = "nested"
    unsync = False

    def __init__(self, hv, vm_id, memory_bytes, tlb, ept_levels, ept_ad):
        self.hypervisor = hv
        self.id = vm_id
        self.memory_bytes = memory_bytes
        n = memory_bytes // PAGE
        self.p2m = np.full(n, NO_FRAME, dtype=np.uint64)
        self.h2g = {}
        self.frames_owned = set()
        self.counters = defaultdict(int)
        self.ept = Ept(hv.host, levels=ept_levels, ad=ept_ad,
                       alloc=lambda: hv.alloc_frame(owner=self))
        self.gmem = PhysicalMemory.nested(self.ept, memory_bytes)
        self.phys = NestedPhys(self)
        self.vcpu = NestedVcpu(self, tlb if tlb is not None else Tlb.default())

    def back(self, gfn):
        """Back guest frame gfn with a host frame and map it in the EPT; the hpa."""
        hpa = int(self.p2m[gfn])
        if hpa != NO_FRAME:
            return hpa
        hpa = self.hypervisor.alloc_frame(owner=self)
        self.p2m[gfn] = hpa
        self.h2g[hpa // PAGE] = gfn
        self.ept.map(gfn * PAGE, hpa)
        self.counters["frames_backed"] += 1
        return hpa

    def gpa_to_hpa(self, gpa):
        """The host physical address backing gpa, or None while its frame is unbacked."""
        gpa = checked_gpa(gpa, self.memory_bytes)
        hpa = int(self.p2m[gpa // PAGE])
        return None if hpa == NO_FRAME else hpa + gpa % PAGE

    def host_frames(self):
        return set(self.frames_owned)

    def ept_exit(self, exc):
        """The EPT-violation exit handler: back the frame, or refuse an address
        outside the VM (an MMIO access with no device behind it)."""
        st = self.counters
        if isinstance(exc, EptMisconfig):
            st["exit_ept_misconfig"] += 1
            raise ShadowMmuError("EPT misconfiguration at gpa %#x: the hypervisor's own "
                                 "tables are wrong" % exc.gpa)
        st["exit_ept_violation"] += 1
        if exc.gpa >= self.memory_bytes:
            raise GuestMemoryError(exc.gla, exc.gpa, self.memory_bytes)
        if self.p2m[exc.gpa // PAGE] != NO_FRAME:
            raise ShadowMmuError("EPT violation at backed gpa %#x (qualification %#x)"
                                 % (exc.gpa, exc.qualification))
        self.back(exc.gpa // PAGE)

    def destroy(self):
        """Give every host frame back (memory and EPT tables)."""
        for f in sorted(self.frames_owned):
            self.hypervisor.free_frame(f * PAGE)
        self.frames_owned.clear()
        self.p2m[:] = NO_FRAME
        self.h2g.clear()

    @property
    def stats(self):
        """Counters: exits by reason (exit_ept_violation), guest page faults
        (delivered with no exit), EPT walks and their memory references, and
        the 2-D walks of the vCPU's TLB misses (walks, walk_refs)."""
        st = self.counters
        st["exits"] = st["exit_ept_violation"] + st["exit_ept_misconfig"]
        st["ept_walks"] = self.ept.walks
        st["ept_walk_refs"] = self.ept.refs
        t = self.vcpu.tlb.c_handle
        st["walks"] = int(t.walks)
        st["walk_refs"] = int(t.walk_refs)
        return st

    def __repr__(self):
        return "NestedVM(%d, %#x bytes)" % (self.id, self.memory_bytes)


class NestedPhys:
    """Guest-physical memory as the guest sees it with paging off or by DMA:
    unbacked frames read as zeros; a write backs its frame first."""

    def __init__(self, vm):
        self.vm = vm
        self.size = vm.memory_bytes
        self._host = vm.hypervisor.host

    def __len__(self):
        return self.size

    def _check(self, gpa, n):
        gpa = check_u64(gpa, "guest-physical address")
        if gpa + n > self.size:
            raise GuestMemoryError(gpa, gpa, self.size)
        return gpa

    def _pieces(self, gpa, n, back):
        done = 0
        while done < n:
            cur = gpa + done
            k = min(n - done, PAGE - cur % PAGE)
            hpa = self.vm.back(cur // PAGE) if back else int(self.vm.p2m[cur // PAGE])
            yield (None if hpa == NO_FRAME else hpa + cur % PAGE), done, k
            done += k

    def read(self, gpa, n):
        gpa = self._check(gpa, check_u64(n, "length"))
        return b"".join(bytes(k) if hpa is None else self._host.read(hpa, k)
                        for hpa, _, k in self._pieces(gpa, n, back=False))

    def write(self, gpa, data):
        data = bytes(data)
        gpa = self._check(gpa, len(data))
        for hpa, start, k in self._pieces(gpa, len(data), back=True):
            self._host.write(hpa, data[start:start + k])

    def read_u64(self, gpa):
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u64(self, gpa, value):
        self.write(gpa, check_u64(value, "value").to_bytes(8, "little"))


class NestedVcpu(NoExitControl):
    """The vCPU of a nested-paging VM: guest accesses run on an Mmu whose CR3 is
    the guest's own, over guest-physical memory behind the EPT.  MOV CR3 and
    INVLPG do not exit (they act on the vCPU's TLB as on bare metal)."""

    def __init__(self, vm, tlb):
        self.vm = vm
        self.cpu = CpuState.long_mode()
        self.tlb = tlb
        self.mmu = Mmu(vm.gmem, self.cpu, tlb)
        self._host = vm.hypervisor.host
        self._stats = vm.counters
        self._fault = ffi.new("ptemu_fault *")

    def _translate(self, va, access):
        """Translate, handling EPT exits until the access completes; a guest
        #PF propagates (it is the guest's own, delivered without an exit)."""
        self._stats["guest_accesses"] += 1
        for _ in range(8):
            try:
                return self.mmu.translate(va, access)
            except EptExit as exc:
                self.vm.ept_exit(exc)
            except Exception as exc:
                if isinstance(exc, PageFault):
                    self._stats["page_fault"] += 1
                raise
        raise ShadowMmuError("no progress translating %#x" % va)

    def access(self, va, access="r"):
        """One access at the current CPL; the guest-physical address it reaches."""
        hpa = self._translate(va, access).pa
        return (self.vm.h2g[hpa // PAGE] * PAGE) | (hpa % PAGE)

    def _aligned(self, va):
        va = check_u64(va, "virtual address")
        if va & 7:
            raise InvalidInput("load_u64/store_u64 need an 8-byte aligned address, not %#x" % va)
        return va

    def load_u64(self, va):
        return self._host.read_u64(self._translate(self._aligned(va), "r").pa)

    def store_u64(self, va, value):
        value = check_u64(value, "value")
        self._host.write_u64(self._translate(self._aligned(va), "w").pa, value)

    def run(self, trace, start=0):
        """Run trace[start:] on the MMU in C; EPT exits are handled here and the
        run resumes, up to the first guest fault (RunResult)."""
        trace = check_array(trace, TRACE_DTYPE, "trace")
        n = len(trace)
        i = check_u64(start, "start")
        if i > n:
            raise InvalidInput("start %d is past the end of the trace (%d)" % (i, n))
        tp = ffi.from_buffer("ptemu_trace_rec[]", trace)
        f = self._fault
        mem_c, tlb_c = self.vm.gmem.c_handle, self.tlb.c_handle
        st = self._stats
        first = i
        last, tries = -1, 0
        while True:
            idx = int(lib.ptemu_run(self.cpu.c_handle, mem_c, tlb_c, tp, n, i, ffi.NULL, f))
            if idx == n:
                st["guest_accesses"] += n - first
                return RunResult(n, 0, 0, 0, "none", None)
            if f.vector == _VEC_EXIT:       # an EPT exit: handled here, the guest sees none
                tries = tries + 1 if idx == last else 0
                if tries > 8:
                    raise ShadowMmuError("no progress on trace[%d]" % idx)
                last = i = idx
                self.vm.ept_exit(fault_from_c(f, self.vm.memory_bytes, self.vm.ept.c_handle))
                continue
            st["guest_accesses"] += idx - first
            if f.vector == lib.PTEMU_VEC_GP:
                if f.cause == lib.PTEMU_CAUSE_NONE:
                    raise InvalidInput("trace[%d]: access code %d is not 0, 1 or 2"
                                       % (idx, int(trace["access"][idx])))
                return RunResult(idx, GeneralProtection.vector, 0, 0, "non-canonical",
                                 GeneralProtection(int(trace["va"][idx])))
            st["page_fault"] += 1
            exc = fault_from_c(f, self.vm.memory_bytes)
            return RunResult(idx, int(f.vector), int(f.error_code), int(f.cr2), exc.cause, exc)

    def store_stream(self, stores):
        """The stores in order, as store_u64 one by one (EPT exits handled)."""
        for va, value in check_stores(stores).tolist():
            self.store_u64(va, value)

    def hypercall(self, op, *args):
        raise InvalidInput("hypercalls are for paravirtual VMs; this VM uses nested paging")
