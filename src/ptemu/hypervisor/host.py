"""The host: its physical memory, the frame allocator, and the registry of VMs.

    Hypervisor(host bytes)
      ├─ host       one PhysicalMemory of host frames (`words`: the same as
      │             uint64 words, how shadow pages and guest data are written)
      ├─ frames     a free list, lowest frame first (heap); each frame handed
      │             out is zeroed and recorded in its owner's `frames_owned`
      └─ vms        every VM living in that memory, of any paging kind:
                    shadow / paravirt (vm.py) and nested (nested.py)

Every VM kind offers the same registry interface: `id`, `frames_owned`,
`back(gfn)` (used by populate) and `destroy()` (give every frame back).
"""
import heapq

import numpy as np

from ptemu._native import lib, InvalidInput, check_u64, WORD64
from ptemu.memory import PhysicalMemory
from ptemu.tlb import Tlb
from ptemu.hypervisor.exits import HostMemoryExhausted

__all__ = ["Hypervisor", "PAGE"]

PAGE = 4096
_PREV_ROOTS_MAX = lib.PTEMU_PREV_ROOTS_MAX
_ZERO_PAGE = bytes(PAGE)


def _check_guest_size(guest_memory_bytes):
    size = check_u64(guest_memory_bytes, "guest_memory_bytes")
    if not size or size % PAGE:
        raise InvalidInput("guest_memory_bytes must be a positive multiple of 4096, not %#x"
                           % size)
    return size


class Hypervisor:
    """Host memory (`host_memory_bytes`, a positive multiple of 4096) and the VMs
    living in it.  Host frames go out lowest-first from one free list."""

    def __init__(self, host_memory_bytes):
        size = check_u64(host_memory_bytes, "host_memory_bytes")
        if not size or size % PAGE:
            raise InvalidInput("host_memory_bytes must be a positive multiple of 4096, not %#x"
                               % size)
        self.host = PhysicalMemory(size)
        #: Host memory as uint64 words (a memoryview: the fastest scalar access).
        self.words = memoryview(self.host.array).cast(WORD64)
        self._bytes = memoryview(self.host.array)   # the same as bytes (frame zeroing)
        self._free = list(range(size // PAGE))      # a heap: lowest frame first
        #: len(_free) as one word C reads (the fast paths decline under pressure)
        self.free_count = np.array([len(self._free)], dtype=np.uint64)
        self._free_count = memoryview(self.free_count)      # (scalar writes)
        self.vms = []
        self._next_id = 1

    # -- the frame allocator --------------------------------------------------------
    @property
    def free_frames(self):
        return len(self._free)

    def alloc_frame(self, owner=None, fill=None):
        """A zeroed host frame (its address); HostMemoryExhausted when none is left.
        (Zeroed every time, fresh or not: host memory is public (`host`), and
        a frame some caller wrote must not carry its bytes into a VM.)
        owner: the VM the frame is charged to (its `frames_owned`).
        fill: the frame's 4096 bytes instead of zeros (a guest write of a whole
        frame into an unbacked one: one copy, not zeros and then the copy)."""
        if fill is None:
            fill = _ZERO_PAGE
        if not self._free:
            raise HostMemoryExhausted("no free host frame left (host memory %#x bytes)"
                                      % self.host.size)
        f = self._free[0]           # the lowest free frame, taken once it is filled:
        self._bytes[f * PAGE:(f + 1) * PAGE] = fill     # (a memoryview copy; a bad fill
        heapq.heappop(self._free)                       # raises with the frame still free)
        self._free_count[0] = len(self._free)
        if owner is not None:
            owner.frames_owned.add(f)
        return f * PAGE

    def free_frame(self, hpa, owner=None):
        f = hpa // PAGE
        if owner is not None:
            owner.frames_owned.discard(f)
        heapq.heappush(self._free, f)
        self._free_count[0] = len(self._free)

    # -- the VM registry ------------------------------------------------------------
    def create_vm(self, guest_memory_bytes, paging="shadow", unsync=False, prev_roots=3,
                  shadow_limit=None, prefetch=False, populate=False, tlb=None,
                  fast_paths=True, ept_levels=4):
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
        (default Tlb.default()).  fast_paths: run the common exits in C
        (csrc/shadow.c; docs/shadow-mmu.md "Fast paths"); False runs the
        all-Python reference.  Guest-visible results never depend on it.
        ept_levels: 4 or 5, the EPT's page-walk length (EPTP bits 5:3, SDM
        Vol. 3C 29.3.2; nested only).
        """
        if (not isinstance(ept_levels, int) or isinstance(ept_levels, bool)
                or ept_levels not in (4, 5)):
            raise InvalidInput("ept_levels must be 4 or 5, not %r" % (ept_levels,))
        if paging == "nested":
            if unsync or shadow_limit is not None or prefetch or prev_roots != 3:
                raise InvalidInput("unsync, prev_roots, shadow_limit and prefetch are shadow "
                                   "paging options; nested paging has no shadow pages")
            from ptemu.hypervisor.nested import create_nested_vm
            return create_nested_vm(self, guest_memory_bytes, tlb=tlb, ept_levels=ept_levels,
                                    populate=populate)
        if paging not in ("shadow", "paravirt"):
            raise InvalidInput("paging must be 'shadow', 'paravirt' or 'nested', not %r"
                               % (paging,))
        size = _check_guest_size(guest_memory_bytes)
        if ept_levels != 4:
            raise InvalidInput("ept_levels applies to nested paging only (a %s VM has no EPT)"
                               % paging)
        if unsync and paging != "shadow":
            raise InvalidInput("unsync applies to shadow paging only")
        if (not isinstance(prev_roots, int) or isinstance(prev_roots, bool)
                or not 0 <= prev_roots <= _PREV_ROOTS_MAX):
            raise InvalidInput("prev_roots must be an integer 0..%d, not %r"
                               % (_PREV_ROOTS_MAX, prev_roots))
        if shadow_limit is not None and (not isinstance(shadow_limit, int)
                                         or isinstance(shadow_limit, bool) or shadow_limit < 8):
            raise InvalidInput("shadow_limit must be None or an integer >= 8 (a root and "
                               "a full path of shadow pages), not %r" % (shadow_limit,))
        if tlb is not None and not isinstance(tlb, Tlb):
            raise InvalidInput("tlb must be a Tlb or None")
        if not isinstance(fast_paths, bool):
            raise InvalidInput("fast_paths must be True or False, not %r" % (fast_paths,))
        if populate and size // PAGE > len(self._free):
            raise HostMemoryExhausted("populate: %d guest frames, %d free host frames"
                                      % (size // PAGE, len(self._free)))
        from ptemu.hypervisor.vm import VirtualMachine
        return self._add_vm(VirtualMachine(self, self._next_id, size, paging, bool(unsync),
                                           prev_roots, shadow_limit, bool(prefetch), tlb,
                                           fast_paths),
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
        """Give every host frame of vm back (its shadow pages or EPT, and its memory)."""
        if vm not in self.vms:
            raise InvalidInput("%r does not belong to this hypervisor" % (vm,))
        vm.destroy()
        self.vms.remove(vm)

    def __repr__(self):
        return "Hypervisor(%#x, %d VMs, %d free frames)" % (self.host.size, len(self.vms),
                                                             len(self._free))
