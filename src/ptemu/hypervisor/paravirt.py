"""Paravirtual page-table hypercalls (modelled on Xen PV mmu_update / mmuext_op).

A paravirtual guest knows it runs on a hypervisor: instead of storing into
its page tables and letting the hypervisor trap and emulate every store, it
hands over batches of (entry address, new value) pairs.  The hypervisor
validates each entry, writes it into the guest's table, and updates the
shadow pages of that table directly -- no #PF exit, no flood detection.

    vcpu.hypercall("mmu_update", [(gpa_of_entry, value), ...]) -> number applied
    vcpu.hypercall("new_baseptr", cr3)     a CR3 load without a trap
    vcpu.hypercall("invlpg", va)           INVLPG
    vcpu.hypercall("flush_tlb")            a CR3 reload (every non-global entry)

Validation (Xen's rules, reduced to what ptemu models): a present entry may
not point outside the VM's memory, and a leaf entry known to be one (its
table is shadowed as a level-1 table, or it is a large-page entry of a
level-2/3 table) may not map a guest page-table frame writable.  The batch is
checked whole before anything is written; a refused batch raises
HypercallRejected (an InvalidInput) naming the item, and nothing is applied.

The guest's page-table frames stay read-only to the guest (the shadow
write-protects them as in shadow mode): a plain store into one still traps
and is emulated, as Xen's writable-page-table emulation does, so a guest
that mixes both ways stays correct; it just pays the exit.
"""
from ptemu import bits
from ptemu._native import InvalidInput, check_u64
from ptemu.hypervisor.exits import HypercallRejected

__all__ = ["hypercall", "validate_entry", "HYPERCALLS"]

HYPERCALLS = ("mmu_update", "new_baseptr", "invlpg", "flush_tlb")
_P, _W, _PS = bits.PTE_P, bits.PTE_W, bits.PTE_PS
_U64_MAX = (1 << 64) - 1


def validate_entry(vm, gpa, value):
    """Why entry `value` may not be written at guest-physical `gpa` (None if it may)."""
    if not value & _P:
        return None
    sh = vm.shadow
    nframes = len(vm.p2m_list)
    target = (value & sh.amask) >> 12
    sps = sh.gfn_sps.get(gpa >> 12, ())
    large = [lv for lv in (2, 3) if any(sp.level == lv for sp in sps)] if value & _PS else []
    for lv in large:
        span = 1 << (9 * (lv - 1))
        base = target & ~(span - 1)
        if base >= nframes:
            return "the large page at gfn %#x is outside the VM (%d frames)" % (base, nframes)
        if value & _W:
            for pt in sh.gfn_sps:
                if base <= pt < base + span:
                    return ("it would map page-table frame %#x writable (large page at "
                            "gfn %#x)" % (pt, base))
    if not large:
        if target >= nframes:
            return "it points at gfn %#x, outside the VM (%d frames)" % (target, nframes)
        if value & _W and target in sh.gfn_sps and any(sp.level == 1 for sp in sps):
            return "it would map page-table frame %#x writable" % target
    return None


def mmu_update_items(args, size):
    """The (gpa, value) pairs of an mmu_update call, checked for shape and for
    being aligned entries inside guest memory of `size` bytes; nothing is
    applied.  HypercallRejected names the first bad item."""
    if len(args) != 1:
        raise InvalidInput("mmu_update takes one list of (gpa, value) pairs")
    updates = []
    for i, item in enumerate(args[0]):
        try:
            gpa, value = item
        except (TypeError, ValueError):
            raise InvalidInput("mmu_update entries are (gpa, value) pairs, not %r"
                               % (item,)) from None
        if gpa.__class__ is not int or gpa < 0 or gpa > _U64_MAX:
            gpa = check_u64(gpa, "entry address")
        if value.__class__ is not int or value < 0 or value > _U64_MAX:
            value = check_u64(value, "entry value")
        if gpa & 7 or gpa + 8 > size:
            raise HypercallRejected("mmu_update item %d: entry address %#x is not an "
                                    "aligned entry inside guest memory (size %#x)"
                                    % (i, gpa, size), index=i)
        updates.append((gpa, value))
    return updates


def hypercall(vcpu, op, args):
    """Dispatch one hypercall of a paravirt VM (see the module docstring)."""
    st = vcpu.vm.counters
    st["exit_hypercall"] += 1
    st["hypercall"] += 1
    if op == "mmu_update":
        vm = vcpu.vm
        try:
            updates = mmu_update_items(args, vm.memory_bytes)
            for i, (gpa, value) in enumerate(updates):
                why = validate_entry(vm, gpa, value)
                if why:
                    raise HypercallRejected("mmu_update item %d (%#x <- %#x) refused: %s"
                                            % (i, gpa, value, why), index=i)
        except HypercallRejected:
            st["hypercall_rejected"] += 1
            raise
        st["hypercall_mmu_update"] += 1
        for gpa, value in updates:
            vm.guest_write(gpa, value, flood=False, commit=False)
        vcpu.commit()          # one real-TLB flush for the whole batch
        st["mmu_update_entries"] += len(updates)
        if vcpu.log is not None:
            vcpu.log_exit("hypercall", "mmu_update of %d entries" % len(updates))
        return len(updates)
    if op == "new_baseptr":
        if len(args) != 1:
            raise InvalidInput("new_baseptr takes one CR3 value")
        if not vcpu.fast_cr3(args[0]):
            vcpu.cr3_write_exit(args[0], "hypercall")
        return 0
    if op == "invlpg":
        if len(args) != 1:
            raise InvalidInput("invlpg takes one virtual address")
        va = check_u64(args[0], "virtual address")
        vcpu.sync_cpu()            # the shadow root of the current CR3, for the resync
        if not vcpu.fast_invlpg(va):
            vcpu.invlpg_exit(va)
        return 0
    if op == "flush_tlb":
        if args:
            raise InvalidInput("flush_tlb takes no arguments")
        cr3 = vcpu.cpu._c.cr3
        if not vcpu.fast_cr3(cr3):
            vcpu.cr3_write_exit(cr3, "hypercall")
        return 0
    raise InvalidInput("unknown hypercall %r (known: %s)" % (op, ", ".join(HYPERCALLS)))
