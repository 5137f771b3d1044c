"""Exit reasons, the per-VM counters, and the hypervisor's named exceptions.

Every guest event that leaves the guest (a VM exit) has a reason; each
reason and each decision the shadow MMU takes has a counter, under the
names KVM uses where one exists (arch/x86/kvm: pf_fixed, pf_guest,
pf_emulate, mmu_pte_write, mmu_flooded, mmu_unsync, mmu_cache_miss,
mmu_shadow_zapped, mmu_recycled, invlpg, ...).
"""
import numpy as np

from ptemu._native import ffi, PtemuError, InvalidInput, check_u64, check_array, check_layout

__all__ = ["EXIT_REASONS", "COUNTERS", "VmStats", "ExitRecord", "GuestMemoryError",
           "HostMemoryExhausted", "HypercallRejected", "ShadowMmuError", "NoExitControl",
           "checked_gpa", "PF_RETRY", "PF_EMULATE", "PF_MMIO", "PF_INJECT", "PF_SPURIOUS",
           "PF_OUTCOME_COUNTERS", "FAST_COUNTERS", "STORE_DTYPE", "check_stores"]

#: A store stream (machine contract `vcpu.store_stream`): 8-byte stores in
#: order, each with its value (ptemu_store_rec in C).
STORE_DTYPE = np.dtype([("va", "<u8"), ("value", "<u8")])
check_layout(STORE_DTYPE.itemsize == ffi.sizeof("ptemu_store_rec"), "ptemu_store_rec")


def check_stores(stores):
    """A checked STORE_DTYPE array (any sequence of (va, value) pairs is turned into one)."""
    if not isinstance(stores, np.ndarray):
        try:
            stores = np.array([(check_u64(va, "virtual address"), check_u64(v, "value"))
                               for va, v in stores], dtype=STORE_DTYPE)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, InvalidInput):
                raise
            raise InvalidInput("stores must be a STORE_DTYPE array or (va, value) pairs") \
                from None
    return check_array(stores, STORE_DTYPE, "stores")

#: Why the guest left guest mode (the `exit_<reason>` counters).
EXIT_REASONS = (
    "page_fault",   # #PF on the shadow tables: hidden, true, emulated or MMIO
    "cr3_write",    # MOV to CR3 (intercepted under shadow paging)
    "cr_write",     # MOV to CR0/CR4, EFER changes: a new paging mode
    "invlpg",       # INVLPG (intercepted under shadow paging)
    "hypercall",    # a paravirtual call (VMCALL)
)

#: What the #PF exit handler decided (VCpu.page_fault_exit); each outcome is
#: also the index of its counter in PF_OUTCOME_COUNTERS.
PF_RETRY = 0        # hidden fault: the shadow now maps the access; retry it
PF_EMULATE = 1      # a write the hypervisor does itself (protected page table, WP=0)
PF_MMIO = 2         # a guest-physical address outside the VM: nothing to map
PF_INJECT = 3       # a true fault: the guest gets it
PF_SPURIOUS = 4     # the shadow allowed it already (a stale real-TLB entry): retry
PF_OUTCOME_COUNTERS = ("pf_fixed", "pf_emulate", "pf_mmio", "pf_guest", "pf_spurious")

#: The counters that say which path ran (csrc/shadow.c or Python): the only
#: counters allowed to differ between fast_paths=True and fast_paths=False.
FAST_COUNTERS = ("fast_pf_fixed", "fast_pf_spurious", "fast_pf_emulate", "fast_invlpg",
                 "fast_cr3_write", "fast_mmu_update", "fast_pf_guest", "fast_path_walk")

#: Every counter a VM keeps, with what it counts.
COUNTERS = {
    "exits": "VM exits of every reason (the sum of the exit_* counters)",
    "exit_page_fault": "exits: #PF on the shadow tables",
    "exit_cr3_write": "exits: MOV to CR3",
    "exit_cr_write": "exits: MOV to CR0/CR4 or a new paging mode",
    "exit_invlpg": "exits: INVLPG",
    "exit_hypercall": "exits: hypercalls",
    "guest_accesses": "guest accesses completed through vcpu.run/access/load/store",
    "pf_fixed": "hidden faults: the shadow was filled from the guest's tables",
    "pf_guest": "true faults injected into the guest (#PF with the guest's error code)",
    "pf_emulate": "guest writes emulated by the hypervisor (write-protected page table, "
                  "or CR0.WP=0 supervisor write to a read-only page)",
    "pf_mmio": "accesses to guest-physical addresses outside the VM's memory",
    "pf_spurious": "exits where the shadow already allowed the access (stale real TLB)",
    "guest_walks": "walks of the guest's own tables by the hypervisor (one per #PF exit)",
    "fast_pf_fixed": "of pf_fixed: hidden faults fixed by the C fast path (csrc/shadow.c)",
    "fast_pf_spurious": "of pf_spurious: spurious exits seen by the C fast path",
    "fast_pf_emulate": "of pf_emulate: stores into protected level-1 tables emulated in C",
    "fast_pf_guest": "of pf_guest: true faults whose guest walk C did inside vcpu.run "
                     "(fast path 5; Python injects them without walking again)",
    "fast_path_walk": "of fast_pf_fixed: fills whose shadow path C found by walking the "
                      "shadow tables (the fill cache had no path for the region)",
    "fast_invlpg": "of invlpg: INVLPGs (and invlpg hypercalls) done in C",
    "fast_cr3_write": "of cr3_write: CR3 loads (MOV CR3, new_baseptr, flush_tlb) to the "
                      "current or a cached root done in C",
    "fast_mmu_update": "of hypercall_mmu_update: mmu_update batches done in C "
                       "(csrc/paravirt.c)",
    "mmu_pte_write": "emulated or DMA writes to a shadowed guest page table",
    "mmu_pte_updated": "shadow leaf entries updated in place after such a write",
    "mmu_pde_zapped": "shadow non-leaf entries dropped after such a write",
    "mmu_flooded": "shadow pages unshadowed because of write flooding",
    "mmu_misaligned": "shadow pages unshadowed because of a misaligned write",
    "mmu_unsync": "shadow pages made unsync (guest page table left writable)",
    "mmu_sync": "unsync shadow pages brought back in sync",
    "mmu_sync_entry": "single unsync entries resynced at INVLPG",
    "mmu_cache_miss": "shadow pages created (no (gfn, role) match in the hash)",
    "mmu_shadow_zapped": "shadow pages destroyed",
    "mmu_recycled": "shadow pages evicted for the shadow limit or host memory",
    "mmu_prefetch": "shadow leaf entries prefetched from neighbouring guest entries",
    "mmu_write_protect": "guest frames write-protected because they became page tables",
    "invlpg": "guest INVLPGs handled",
    "cr3_write": "guest CR3 loads handled",
    "prev_root_hit": "CR3 loads that found their shadow root in the previous-roots cache",
    "root_reload": "shadow roots rebuilt (new paging mode, or the root was zapped)",
    "tlb_flush": "full flushes of the real TLB by the hypervisor (after zaps)",
    "hypercall": "hypercalls",
    "hypercall_mmu_update": "mmu_update hypercalls",
    "mmu_update_entries": "guest page-table entries written by mmu_update",
    "hypercall_rejected": "hypercalls refused by validation",
    "frames_backed": "guest frames backed by a host frame",
    "shadow_walks": "walks of the shadow tables by the real MMU (its TLB misses)",
    "shadow_walk_refs": "memory references of those walks (4 per walk, 5 with LA57)",
    "shadow_pages": "live shadow pages (current)",
    "shadow_pages_peak": "most live shadow pages at once",
}


class VmStats(dict):
    """The counters of one VM: a dict of name -> int (see COUNTERS).

    Counters are plain dict items, incremented in place on the exit paths;
    `exits_by_reason()` gives the exit counters keyed by reason.
    """

    def __init__(self):
        super().__init__((k, 0) for k in COUNTERS)

    def __missing__(self, key):
        return 0

    def exits_by_reason(self):
        return {r: self["exit_" + r] for r in EXIT_REASONS}

    def reset(self):
        """Zero the event counters (not the gauges shadow_pages, frames_backed)."""
        for k in self:
            if k not in ("shadow_pages", "frames_backed"):
                self[k] = 0


class ExitRecord(tuple):
    """One logged exit: (number, reason, what happened) -- see VirtualMachine.log_exits."""

    __slots__ = ()

    def __new__(cls, number, reason, detail):
        return tuple.__new__(cls, (number, reason, detail))

    number = property(lambda self: self[0])
    reason = property(lambda self: self[1])
    detail = property(lambda self: self[2])

    def __str__(self):
        return "exit #%d %-10s %s" % self


class GuestMemoryError(InvalidInput):
    """A guest access to a guest-physical address outside the VM's memory.

    A guest page table may map any guest-physical address; the hypervisor
    never lets a shadow entry map one the VM does not own (isolation).  The
    access is handled as an MMIO exit with no device behind it: the vCPU
    operation (load_u64/store_u64) raises this error, as the native machine
    raises InvalidInput for a physical address past its memory; in a bulk
    `run` (no data moves) the access is counted (pf_mmio) and skipped.
    """

    def __init__(self, va, gpa, size):
        self.va = va
        self.gpa = gpa
        super().__init__("guest access at %#x reaches guest-physical %#x, outside the "
                         "VM's memory (size %#x)" % (va, gpa, size))


class HostMemoryExhausted(PtemuError, MemoryError):
    """The hypervisor has no free host frame left (even after recycling shadow pages)."""


class HypercallRejected(InvalidInput):
    """A paravirtual call refused by validation (nothing of the batch applied).

    `.index` is the refused item of an mmu_update batch (or None).
    """

    def __init__(self, message, index=None):
        self.index = index
        super().__init__(message)


class ShadowMmuError(PtemuError):
    """An internal inconsistency of the shadow MMU (a bug, never a guest's doing)."""


class NoExitControl:
    """MOV to CR3/CR4 and INVLPG on a vCPU where they do not exit (bare metal,
    nested paging): they act on the vCPU's own Mmu and TLB with the rules of
    SDM 4.10.4.1, and are counted; and mmu_update1 as the hypercall it stands
    for.  Needs self.mmu, self._stats and self.hypercall."""

    def write_cr3(self, value):
        """MOV to CR3 (SDM 4.10.4.1: flush non-global entries of the PCID)."""
        self.mmu.write_cr3(value)
        self._stats["cr3_write"] += 1

    def write_cr4(self, value):
        self.mmu.write_cr4(value)
        self._stats["cr4_write"] += 1

    def invlpg(self, va):
        """INVLPG va (SDM 4.10.4.1)."""
        self.mmu.invlpg(va)
        self._stats["invlpg"] += 1

    def mmu_update1(self, gpa, value):
        """hypercall("mmu_update", [(gpa, value)]), as a shadow VM's vCPU offers it."""
        return self.hypercall("mmu_update", [(gpa, value)])


def checked_gpa(gpa, memory_bytes):
    """gpa as an int inside a VM's guest-physical memory, else InvalidInput."""
    gpa = check_u64(gpa, "guest-physical address")
    if gpa >= memory_bytes:
        raise InvalidInput("gpa %#x is outside the VM's memory (size %#x)" % (gpa, memory_bytes))
    return gpa
