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

Fast path (create_vm(fast_paths=True), the default): an mmu_update batch
given as a list or tuple of (int, int) tuples goes to C first
(csrc/paravirt.c, ptemu_pv_mmu_update), which validates it whole by the
rules above and, when every item passes and every shadow page involved is
one it can update (in sync, a level-1 page or a level-2+ page whose child
stays), writes the entries and updates the sptes through the rmap as
`vm.guest_write` -> `ShadowMmu.pte_written` do here.  Anything else it
declines with nothing written, and the Python code below runs the batch
from the start (and raises HypercallRejected where it refuses).  The
counters are the same either way, but for `fast_mmu_update` (how many
batches C did).  The other hypercalls use the shadow MMU's fast paths for
INVLPG and CR3 loads (csrc/shadow.c) through the vCPU.
"""
from itertools import chain

from ptemu import bits
from ptemu._native import ffi, lib, InvalidInput, check_u64
from ptemu.hypervisor.exits import HypercallRejected

__all__ = ["hypercall", "validate_entry", "HYPERCALLS", "MMU_UPDATE_HANDLERS",
           "fast_mmu_update", "fast_mmu_update1"]

HYPERCALLS = ("mmu_update", "new_baseptr", "invlpg", "flush_tlb")
_P, _W, _PS = bits.PTE_P, bits.PTE_W, bits.PTE_PS
_U64_MAX = (1 << 64) - 1
_FP_MMU_UPDATE = lib.PTEMU_FP_MMU_UPDATE
_PV_DONE_FLUSH, _PV_LOG_FULL = lib.PTEMU_PV_DONE_FLUSH, lib.PTEMU_PV_LOG_FULL
_pv_update, _pv_update1 = lib.ptemu_pv_mmu_update, lib.ptemu_pv_mmu_update1
_TUPLE, _PAIR, _INT = {tuple}, {2}, {int}

#: The Python handlers the mmu_update fast path stands in for (VCpu.FAST_PATH_HANDLERS):
#: a subclass overriding one of them keeps the batch in Python.
MMU_UPDATE_HANDLERS = (("VCpu", "hypercall"), ("VCpu", "hypercall_exit"),
                       ("VirtualMachine", "guest_write"), ("ShadowMmu", "pte_written"),
                       ("ShadowMmu", "leaf_from_gpte"), ("ShadowMmu", "set_spte"),
                       ("ShadowMmu", "drop_spte"))


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


def fast_mmu_update(vcpu, ctx, batch):
    """The batch through C (csrc/paravirt.c): the number of entries written, or
    None when C declined or the batch is not a list/tuple of (int, int)
    tuples (then nothing was written, and the caller runs the Python path)."""
    if batch.__class__ is not list and batch.__class__ is not tuple:
        return None
    n = len(batch)
    if n == 1:
        item = batch[0]
        if item.__class__ is not tuple or len(item) != 2:
            return None
        gpa, value = item
        if gpa.__class__ is not int or value.__class__ is not int:
            return None
        return fast_mmu_update1(vcpu, ctx, gpa, value)
    # Shape and types checked at C speed; cffi refuses what is out of range.
    if not n or set(map(type, batch)) != _TUPLE or set(map(len, batch)) != _PAIR:
        return None
    flat = list(chain.from_iterable(batch))
    if set(map(type, flat)) != _INT:
        return None
    items = vcpu._pv_items      # the vCPU's own buffer, grown to the largest batch
    if len(items) < 2 * n:
        items = vcpu._pv_items = ffi.new("uint64_t[]", 2 * n)
    try:
        items[0:2 * n] = flat
    except OverflowError:
        return None
    r = _pv_update(ctx, vcpu._hmem, items, n)
    if r == _PV_LOG_FULL:
        vcpu.shadow.take_rmap_log()
        r = _pv_update(ctx, vcpu._hmem, items, n)
    if not r or r == _PV_LOG_FULL:
        return None
    return _applied(vcpu, r, n)


def fast_mmu_update1(vcpu, ctx, gpa, value):
    """fast_mmu_update of the one entry (gpa, value), two ints: 1 when C wrote
    it, None when C declined (nothing written)."""
    try:
        r = _pv_update1(ctx, vcpu._hmem, gpa, value)
    except OverflowError:       # (cffi's range check of a uint64_t: nothing written)
        return None
    if r == _PV_LOG_FULL:
        vcpu.shadow.take_rmap_log()
        r = _pv_update1(ctx, vcpu._hmem, gpa, value)
    if not r or r == _PV_LOG_FULL:
        return None
    return _applied(vcpu, r, 1)


def _applied(vcpu, r, n):
    """After C applied a batch of n entries (r: how): count it, and flush."""
    # Counted in two ints; absorb_fast_counts folds them into exit_hypercall,
    # hypercall, hypercall_mmu_update, mmu_update_entries and fast_mmu_update.
    vcpu._pv_batches += 1
    vcpu._pv_entries += n
    sh = vcpu.shadow
    if r == _PV_DONE_FLUSH:
        sh.need_flush = True
    if sh.need_flush or sh.need_reload:
        vcpu.commit()      # one real-TLB flush for the whole batch, as the Python path does
    return n


def load_cr3(vcpu, cr3):
    """new_baseptr and flush_tlb, counted and checked: the CR3 load by fast
    path 4 (csrc/shadow.c) when it can, else the CR3 exit."""
    if not vcpu.fast_cr3(cr3):
        vcpu.cr3_write_exit(cr3, "hypercall")
    return 0


def invlpg(vcpu, va):
    """The invlpg hypercall, counted and checked, the CPU state synced: fast
    path 3 when it can, else the INVLPG exit."""
    if not vcpu.fast_invlpg(va):
        vcpu.invlpg_exit(va)
    return 0


def hypercall(vcpu, op, args, fast=True):
    """Dispatch one hypercall of a paravirt VM (see the module docstring).
    fast=False: the caller has tried fast_mmu_update already (VCpu.hypercall)."""
    if fast and op == "mmu_update" and len(args) == 1:
        ctx = vcpu.shadow.fast
        if ctx.enabled & _FP_MMU_UPDATE:
            n = fast_mmu_update(vcpu, ctx, args[0])
            if n is not None:
                return n
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
        return load_cr3(vcpu, args[0])
    if op == "invlpg":
        if len(args) != 1:
            raise InvalidInput("invlpg takes one virtual address")
        va = check_u64(args[0], "virtual address")
        vcpu.sync_cpu()            # the shadow root of the current CR3, for the resync
        return invlpg(vcpu, va)
    if op == "flush_tlb":
        if args:
            raise InvalidInput("flush_tlb takes no arguments")
        return load_cr3(vcpu, vcpu.cpu._c.cr3)
    raise InvalidInput("unknown hypercall %r (known: %s)" % (op, ", ".join(HYPERCALLS)))
