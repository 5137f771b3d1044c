"""The paravirtual hypercalls' C fast path (csrc/paravirt.c) and what it declines.

Each test runs the same hypercalls on a paravirt VM with fast_paths=True and
on one with fast_paths=False (the all-Python reference, hypervisor/paravirt.py)
and checks (a) C did the batch exactly where it should (fast_mmu_update),
(b) everything else is identical: results and exceptions, guest memory, the
sptes (the whole of host memory), the rmap, every other counter (DESIGN.md
"Python decides, C executes"; docs/shadow-mmu.md "Paravirtual hypercalls").

The validation rules are Xen's (paravirt.py's docstring): a present entry
may not point outside the VM, nor map a guest page-table frame writable
through a known leaf.  Expected sptes follow SDM 4.6 (rights of the whole
walk) and 4.8 (W only once the guest's D is set).
"""
import numpy as np
import pytest

from ptemu import bits
from ptemu._native import lib
from ptemu.hypervisor import Hypervisor, HypercallRejected, audit
from ptemu.hypervisor.exits import FAST_COUNTERS
from ptemu.hypervisor.shadow import make_leaf_spte, TE_W, TE_U
from ptemu.hypervisor.vcpu import VCpu
from ptemu.hypervisor.vm import VirtualMachine
from ptemu.guest import NativeMachine

P, W, U, A, D, PS = (bits.PTE_P, bits.PTE_W, bits.PTE_U, bits.PTE_A, bits.PTE_D, bits.PTE_PS)
PAGE = 4096
ROOT = PAGE                 # PML4 gfn 1, PDPT gfn 2, PD gfn 3, PT gfn 4 (va 0..2 MiB)
PD, PT = 3 * PAGE, 4 * PAGE


def tables(vm):
    ph = vm.phys
    ph.write_u64(ROOT, 2 * PAGE | P | W | U)
    ph.write_u64(2 * PAGE, PD | P | W | U)
    ph.write_u64(PD, PT | P | W | U)
    ph.write_u64(PT + 8 * 7, 10 * PAGE | P | W | U)
    ph.write_u64(PT + 8 * 8, 11 * PAGE | P | W | U | A | D)


def pv_pair(frames=32, host_frames=256, vm_class=None):
    """The same paravirt guest on two hosts: C fast paths on, and the reference.
    Guest frames 10..15 hold data; va 7 * PAGE has been touched, so the tables
    of gfn 1..4 are shadowed and va 7's leaf spte exists."""
    out = []
    for fast in (True, False):
        hv = Hypervisor(host_frames * PAGE)
        if vm_class is None:
            vm = hv.create_vm(frames * PAGE, paging="paravirt", fast_paths=fast)
        else:
            vm = vm_class(hv, hv._next_id, frames * PAGE, "paravirt", False, 3, None, False,
                          None, fast_paths=fast)
            hv._add_vm(vm, False)
        tables(vm)
        for g in range(10, 16):
            vm.phys.write_u64(g * PAGE, 0xA0 + g)
        vm.vcpu.hypercall("new_baseptr", ROOT)
        assert vm.vcpu.load_u64(7 * PAGE) == 0xAA
        out.append(vm)
    return out


def counters(vm):
    return {k: v for k, v in vm.stats.items() if k not in FAST_COUNTERS}


def same(a, b):
    assert counters(a) == counters(b)
    assert np.array_equal(a.hypervisor.host.array, b.hypervisor.host.array)
    assert {g: s for g, s in a.shadow.rmap.items() if s} == \
        {g: s for g, s in b.shadow.rmap.items() if s}
    assert audit(a) == [] and audit(b) == []


def call(vm, *args):
    """A hypercall's outcome: ("ok", result) or the exception's type, text and index."""
    try:
        return ("ok", vm.vcpu.hypercall(*args))
    except Exception as exc:        # noqa: BLE001 - compared, not swallowed
        return (type(exc).__name__, str(exc), getattr(exc, "index", None))


def both(vms, *args):
    a, b = (call(vm, *args) for vm in vms)
    assert a == b
    return a


def spte_of(vm, va):
    """The leaf spte for va (level-1 shadow page of PT), from host memory."""
    sp = next(sp for sp in vm.shadow.gfn_sps[PT >> 12] if sp.level == 1)
    return int(vm.shadow.table(sp)[(va >> 12) & 511])


def test_a_valid_batch_is_done_in_c_with_the_shadow_following():
    """Entries land in the guest's table and the level-1 shadow follows at once:
    an accessed entry gets its spte (rights of the walk, W only with D, SDM
    4.6/4.8), a cleared entry loses it; no #PF exit, no flood count."""
    vms = pv_pair()
    batch = [(PT + 8 * 7, 12 * PAGE | P | W | U | A),           # remap, clean: no W
             (PT + 8 * 9, 13 * PAGE | P | W | U | A | D),       # new, dirty: W
             (PT + 8 * 8, 0)]                                   # unmap
    assert both(vms, "mmu_update", batch) == ("ok", 3)
    fast, ref = vms
    assert fast.stats["fast_mmu_update"] == 1 and ref.stats["fast_mmu_update"] == 0
    for vm in vms:
        hpa = vm.gpa_to_hpa
        assert spte_of(vm, 7 * PAGE) == make_leaf_spte(hpa(12 * PAGE), TE_W | TE_U, 0, 0, 0)
        assert spte_of(vm, 9 * PAGE) == make_leaf_spte(hpa(13 * PAGE), TE_W | TE_U, 0, 1, 0)
        assert spte_of(vm, 9 * PAGE) & W
        assert spte_of(vm, 8 * PAGE) == 0
        assert vm.phys.read_u64(PT + 8 * 8) == 0
        st = vm.stats
        assert (st["exit_hypercall"], st["hypercall_mmu_update"], st["mmu_update_entries"],
                st["mmu_pte_write"], st["mmu_pte_updated"]) == (2, 1, 3, 3, 2)
        assert st["mmu_flooded"] == 0
    exits = [vm.stats["exit_page_fault"] for vm in vms]
    assert [vm.vcpu.load_u64(7 * PAGE) for vm in vms] == [0xAC, 0xAC]
    assert [vm.vcpu.load_u64(9 * PAGE) for vm in vms] == [0xAD, 0xAD]
    assert [vm.stats["exit_page_fault"] for vm in vms] == exits
    same(*vms)


def test_lowering_an_spte_flushes_the_real_tlb_once_widening_does_not():
    """A translation lowered or moved must leave the real TLB (one flush for
    the whole batch, KVM's kvm_flush_remote_tlbs); one that only gains rights
    may stay (a TLB entry may be narrower than the entry, SDM 4.10.4.3)."""
    vms = pv_pair()
    flushes = [vm.stats["tlb_flush"] for vm in vms]
    both(vms, "mmu_update", [(PT + 8 * 8, 11 * PAGE | P | W | U | A | D)])  # as it is
    both(vms, "mmu_update", [(PT + 8 * 7, 10 * PAGE | P | W | U | A | D)])  # widened: +W
    assert [vm.stats["tlb_flush"] for vm in vms] == flushes
    both(vms, "mmu_update", [(PT + 8 * 7, 10 * PAGE | P | U | A), (PT + 8 * 9, 0),
                             (PT + 8 * 8, 12 * PAGE | P | U | A)])          # lowered, moved
    assert [vm.stats["tlb_flush"] for vm in vms] == [f + 1 for f in flushes]
    assert vms[0].stats["fast_mmu_update"] == 3
    same(*vms)


@pytest.mark.parametrize("update, why", [
    ((PT + 7 * 8, 999 * PAGE | P | W), "outside the VM"),               # target past memory
    ((PT + 7 * 8, 32 * PAGE | P), "outside the VM"),                    # the first gfn past
    ((PT + 7 * 8 + 4, 12 * PAGE | P), "aligned entry"),                 # misaligned entry
    ((32 * PAGE, 0), "aligned entry"),                                  # past guest memory
    (((1 << 64) - 8, 0), "aligned entry"),                              # far past it
    ((PT + 7 * 8, PT | P | W), "page-table frame"),                     # RW map of the PT
    ((PT + 7 * 8, ROOT | P | W | U | A | D), "page-table frame"),       # ... of the PML4
    ((PD + 1 * 8, 0 | P | W | PS), "page-table frame"),                 # 2M RW over tables
    ((PD + 1 * 8, 1 << 21 | P | PS), "outside the VM"),                 # 2M past memory
    ((2 * PAGE + 8, 0 | P | W | PS), "page-table frame"),               # 1G RW over tables
])
def test_a_refused_item_refuses_the_whole_batch_both_ways(update, why):
    """Xen's rules: C declines, Python raises HypercallRejected naming the item;
    nothing of the batch is written."""
    vms = pv_pair()
    before = [vm.hypervisor.host.array.copy() for vm in vms]
    r = both(vms, "mmu_update", [(PT + 8 * 20, 12 * PAGE | P | U), update])
    assert r[0] == "HypercallRejected" and why in r[1] and r[2] == 1
    for vm, b in zip(vms, before):
        assert np.array_equal(vm.hypervisor.host.array, b)
        assert vm.stats["hypercall_rejected"] == 1 and vm.stats["fast_mmu_update"] == 0
    same(*vms)


def test_read_only_and_non_leaf_mappings_of_tables_are_allowed():
    """What the rules do not refuse: a read-only map of a page table, a
    writable one through an entry of a table not known as level-1 (here an
    unshadowed frame), an entry that is not present whatever it holds."""
    vms = pv_pair()
    batch = [(PT + 8 * 9, PT | P | U | A), (14 * PAGE + 8, PT | P | W),
             (PT + 8 * 10, 0xFFFF_FFFF_FFFF_FFFE)]
    assert both(vms, "mmu_update", batch) == ("ok", 3)
    assert vms[0].stats["fast_mmu_update"] == 1
    assert [vm.vcpu.load_u64(9 * PAGE + 8 * 7) for vm in vms] == [10 * PAGE | P | W | U | A] * 2
    same(*vms)


def test_upper_level_entries_are_done_in_c_unless_a_child_is_unlinked():
    """A PD entry whose shadow has no child there (or that does not change) is
    only written; one that would unlink a shadow child (KVM mmu_pde_zapped)
    is Python's: C declines the batch and the reference does it."""
    vms = pv_pair()
    both(vms, "mmu_update", [(PD + 8 * 5, 5 * PAGE | P | W | U), (PD, PT | P | W | U | A)])
    assert vms[0].stats["fast_mmu_update"] == 1
    assert vms[0].stats["mmu_pde_zapped"] == 0
    both(vms, "mmu_update", [(PT + 8 * 9, 0), (PD, 5 * PAGE | P | W | U)])
    assert vms[0].stats["fast_mmu_update"] == 1          # declined: an unlink
    assert [vm.stats["mmu_pde_zapped"] for vm in vms] == [1, 1]
    same(*vms)


def test_large_pages_inside_memory_and_free_of_tables_are_done_in_c():
    """A writable 2 MiB entry is allowed when its range holds no page table; C
    checks the range when it lies inside memory and declines one running
    past the end (a table may sit there: a guest CR3 may name any frame)."""
    vms = pv_pair(frames=1024 + 100, host_frames=2048)
    batch = [(PD + 8 * 1, 512 * PAGE | P | W | U | PS)]              # gfn 512..1023: free
    assert both(vms, "mmu_update", batch) == ("ok", 1)
    assert vms[0].stats["fast_mmu_update"] == 1
    batch = [(PD + 8 * 2, 1024 * PAGE | P | W | U | PS)]             # runs past the end
    assert both(vms, "mmu_update", batch) == ("ok", 1)
    assert vms[0].stats["fast_mmu_update"] == 1                      # declined, Python did it
    for vm in vms:
        vm.phys.write_u64(1100 * PAGE - 8, 0x77)
        assert vm.vcpu.load_u64((4 << 20) + 76 * PAGE - 8) == 0x77
    same(*vms)


def test_entries_into_an_unbacked_frame_are_python_s():
    """Backing a guest frame is the hypervisor's allocation (policy): C declines."""
    vms = pv_pair()
    assert both(vms, "mmu_update", [(20 * PAGE + 8, 12 * PAGE | P)]) == ("ok", 1)
    assert vms[0].stats["fast_mmu_update"] == 0
    assert all(vm.gpa_to_hpa(20 * PAGE) is not None for vm in vms)
    same(*vms)


def test_a_frame_with_more_shadow_pages_than_c_tracks_is_python_s():
    """One guest PT reached through PD entries of different rights has a shadow
    page per role; past PTEMU_GFN_SPS of them C cannot see them all: Python."""
    vms = pv_pair()
    rights = [P | W | U, P | U, P | W, P, P | W | U | bits.PTE_NX]
    for vm in vms:
        for i, r in enumerate(rights):
            vm.phys.write_u64(PD + 8 * (8 + i), PT | r)
            vm.vcpu.load_u64(((8 + i) << 21) + 7 * PAGE)
    assert len(vms[0].shadow.gfn_sps[PT >> 12]) > lib.PTEMU_GFN_SPS
    assert both(vms, "mmu_update", [(PT + 8 * 7, 12 * PAGE | P | W | U | A)]) == ("ok", 1)
    assert vms[0].stats["fast_mmu_update"] == 0
    assert [vm.vcpu.load_u64((9 << 21) + 7 * PAGE) for vm in vms] == [0xAC, 0xAC]
    same(*vms)


@pytest.mark.parametrize("batch", [
    [[PT + 8 * 9, 0]],                          # a list, not a tuple: Python accepts it
    [(np.uint64(PT + 8 * 9), np.uint64(0))],    # numpy ints: Python accepts them
    ([(PT + 8 * 9, 0)] * 3),
    ((PT + 8 * 9, 0), (PT + 8 * 10, 0)),        # a tuple of pairs
    [(PT + 8 * 9, True)],                       # refused: bool
    [(PT + 8 * 9, 1.0)],                        # refused: float
    [(PT + 8 * 9, None)],
    [(PT + 8 * 9, -1)],
    [(PT + 8 * 9, 1 << 64)],
    [(-8, 0)],
    [(PT + 8 * 9, 0, 0)],                       # three
    [(PT + 8 * 9,)],                            # one
    [{"a": 1, "b": 2}],                         # unpacks to its keys
    [(PT, 0), (PT + 8, 0), 5],
    [(PT, 0), (PT + 8, 0, 1)],
    [(PT, 0), (PT + 8, (1 << 64) - 1)],         # present, all bits: outside the VM
    [],
    "ab",
    5,
    None,
])
def test_hostile_batches_get_the_same_answer_both_ways(batch):
    vms = pv_pair()
    both(vms, "mmu_update", batch)
    same(*vms)


def test_a_generator_batch_is_python_s():
    vms = pv_pair()
    a, b = (call(vm, "mmu_update", ((PT + 8 * i, 0) for i in (9, 10))) for vm in vms)
    assert a == b == ("ok", 2)
    same(*vms)


def test_huge_batches():
    """100,000 entries into a data frame (no shadow: only written), then the same
    with one bad item at the end (nothing written), then a batch into a level-1
    table needing more rmap-log room than there is (Python's)."""
    vms = pv_pair()
    batch = [(14 * PAGE + 8 * (i % 512), i) for i in range(100_000)]
    assert both(vms, "mmu_update", batch) == ("ok", 100_000)
    assert vms[0].stats["fast_mmu_update"] == 1
    bad = [(15 * PAGE + 8 * (i % 512), i) for i in range(100_000)] + [(PT, 999 * PAGE | P)]
    assert both(vms, "mmu_update", bad)[2] == 100_000
    assert [vm.phys.read_u64(15 * PAGE + 8) for vm in vms] == [0, 0]
    cap = vms[0].shadow.fast.rmap_log_cap
    big = [(PT + 8 * (i % 512), (10 + i % 2) * PAGE | P | U | A) for i in range(cap)]
    assert both(vms, "mmu_update", big) == ("ok", cap)
    assert vms[0].stats["fast_mmu_update"] == 1      # (2 log pairs an item: Python did it)
    same(*vms)


def test_a_full_rmap_log_is_taken_in_and_the_batch_done_in_c():
    """C leaves the rmap to Python (rmap_log): when the log has not the room a
    batch needs, Python takes it in and C does the batch."""
    vms = pv_pair()
    for vm in vms:
        for i in range(20, 30):                          # hidden faults C fixes: log entries
            vm.phys.write_u64(PT + 8 * i, (10 + i % 4) * PAGE | P | W | U)
            vm.vcpu.load_u64(i * PAGE)
    ctx = vms[0].shadow.fast
    pending = ctx.rmap_log_len
    assert pending > 0
    n = (ctx.rmap_log_cap - pending) // 2 + 1            # one pair too many
    batch = [(PT + 8 * (i % 512), 12 * PAGE | P | U | A | (i & 1) * W) for i in range(n)]
    assert both(vms, "mmu_update", batch) == ("ok", n)
    assert vms[0].stats["fast_mmu_update"] == 1
    same(*vms)


def test_other_hypercalls_both_ways():
    """invlpg, flush_tlb and new_baseptr go through the shadow MMU's C paths for
    INVLPG and CR3 loads; the counters are the same as the reference's."""
    vms = pv_pair()
    second = 5 * PAGE
    for vm in vms:
        vm.phys.write_u64(second, 2 * PAGE | P | W | U)
    for args in [("invlpg", 7 * PAGE), ("invlpg", 1 << 63), ("flush_tlb",),
                 ("new_baseptr", second), ("new_baseptr", ROOT), ("new_baseptr", second),
                 ("new_baseptr", 1 << 62), ("invlpg", -1), ("flush_tlb", 1), ("nope",)]:
        both(vms, *args)
        assert [vm.vcpu.load_u64(7 * PAGE) for vm in vms] == [0xAA, 0xAA]
    same(*vms)


class Reviewing(VCpu):
    """A researcher's policy: every hypercall seen in Python."""

    def hypercall_exit(self, op, args):
        self.seen = getattr(self, "seen", 0) + 1
        return super().hypercall_exit(op, args)


class ReviewingVM(VirtualMachine):
    vcpu_class = Reviewing


class LoggingWrites(VirtualMachine):
    def guest_write(self, gpa, value, flood=True, commit=True):
        self.writes = getattr(self, "writes", 0) + 1
        return super().guest_write(gpa, value, flood, commit)


@pytest.mark.parametrize("vm_class", [ReviewingVM, LoggingWrites])
def test_a_subclass_overriding_a_handler_keeps_mmu_update_in_python(vm_class):
    """DESIGN.md: a Python policy is never bypassed without notice."""
    vms = pv_pair(vm_class=vm_class)
    fast = vms[0]
    assert not fast.vcpu._fast_bits & lib.PTEMU_FP_MMU_UPDATE
    assert fast.vcpu._fast_bits & lib.PTEMU_FP_HIDDEN_FAULT      # the others stay on
    both(vms, "mmu_update", [(PT + 8 * 9, 12 * PAGE | P | U | A)])
    assert fast.stats["fast_mmu_update"] == 0
    if vm_class is ReviewingVM:
        assert fast.vcpu.seen == 2               # new_baseptr and mmu_update
    else:
        assert fast.writes == vms[1].writes >= 1
    same(*vms)


def test_an_exit_log_keeps_mmu_update_in_python():
    """The exit log (the demo) wants every exit in Python, as it sees them."""
    vms = pv_pair()
    logs = [[], []]
    for vm, log in zip(vms, logs):
        vm.log_exits(log)
    both(vms, "mmu_update", [(PT + 8 * 9, 12 * PAGE | P | U | A)])
    assert vms[0].stats["fast_mmu_update"] == 0
    assert logs[0] == logs[1] and any("mmu_update" in r[2] for r in logs[0])


def test_shadow_vms_have_no_mmu_update_fast_path():
    hv = Hypervisor(64 * PAGE)
    vm = hv.create_vm(16 * PAGE)
    assert not vm.vcpu._fast_bits & lib.PTEMU_FP_MMU_UPDATE


def test_the_reused_items_buffer_carries_only_the_current_batch():
    """The fast path copies each batch into one buffer of the vCPU, grown to the
    largest batch: a short batch after a long one writes its own entries only,
    a batch with a value out of range after them is refused both ways, and the
    counters the fast path keeps in two ints reach vm.stats."""
    vms = pv_pair()
    long = [(14 * PAGE + 8 * i, i + 1) for i in range(200)]
    assert both(vms, "mmu_update", long) == ("ok", 200)
    short = [(15 * PAGE + 8 * i, 7) for i in range(3)]
    assert both(vms, "mmu_update", short) == ("ok", 3)
    for vm in vms:
        assert [vm.phys.read_u64(15 * PAGE + 8 * i) for i in range(5)] == [7, 7, 7, 0, 0]
    a = both(vms, "mmu_update", [(15 * PAGE, 1), (15 * PAGE + 8, 1 << 64)])
    assert a[0] == "InvalidInput"
    # One entry out of range (the one-entry path leaves the range check to cffi):
    for bad in ([(15 * PAGE, 1 << 64)], [(15 * PAGE, -1)], [(-8, 1)], [(1 << 64, 1)]):
        assert both(vms, "mmu_update", bad)[0] == "InvalidInput"
    for vm in vms:
        assert vm.phys.read_u64(15 * PAGE) == 7
    assert vms[0].stats["fast_mmu_update"] == 2 and vms[1].stats["fast_mmu_update"] == 0
    for vm in vms:
        st = vm.stats
        assert (st["exit_hypercall"], st["hypercall_mmu_update"], st["mmu_update_entries"]) \
            == (8, 2, 203)      # (pv_pair loaded CR3 by new_baseptr; 4 refused calls)
    same(*vms)


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except Exception as exc:        # noqa: BLE001 - compared, not swallowed
        return (type(exc).__name__, str(exc), getattr(exc, "index", None))


@pytest.mark.parametrize("gpa, value", [
    (PT + 8 * 9, 12 * PAGE | P | U | A),          # a new leaf: C writes it and the spte
    (PT + 8 * 7, 13 * PAGE | P | W | U | A | D),  # a remap of va 7's entry (a flush)
    (PT + 8 * 7, 0),                              # an unmap
    (PT + 8 * 9, 999 * PAGE | P),                 # outside the VM: refused
    (PT + 8 * 9 + 4, 1),                          # misaligned: refused
    (PT + 8 * 9, 1 << 64),                        # out of range: refused
    (-8, 1),
])
def test_mmu_update1_is_the_one_entry_hypercall(gpa, value):
    """vcpu.mmu_update1(gpa, value) is hypercall("mmu_update", [(gpa, value)]):
    the same outcome, guest and host memory, shadow, rmap and counters, with the
    fast paths on and off, and on the native machine."""
    one, ref = pv_pair(), pv_pair()
    got = [_outcome(vm.vcpu.mmu_update1, gpa, value) for vm in one]
    want = [call(vm, "mmu_update", [(gpa, value)]) for vm in ref]
    assert got == want and got[0] == got[1]
    for a, b in zip(one, ref):
        same(a, b)
    assert one[0].stats["fast_mmu_update"] == (1 if got[0][0] == "ok" else 0)
    nm = NativeMachine(32 * PAGE)
    nm2 = NativeMachine(32 * PAGE)
    assert (_outcome(nm.vcpu.mmu_update1, gpa, value)
            == call(nm2, "mmu_update", [(gpa, value)]))
    assert np.array_equal(nm.phys.array, nm2.phys.array) and dict(nm.stats) == dict(nm2.stats)
