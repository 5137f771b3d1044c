"""Bringing an unsync page back in sync in C (csrc/shadow.c ptemu_shadow_sync_page).

ShadowMmu.sync_page's loop over the entries (the Python one is the
reference, DESIGN.md "Python decides, C executes") runs in C while the
vCPU's fast paths are on: every present spte whose gpte changed since the
snapshot is remade by leaf_from_gpte's rule and written by set_spte's.
Marking the page synced and write-protecting its frame stay Python's.  The
guest may change an unsync table behind the hypervisor's back and must
invalidate before relying on the change (SDM Vol. 3A 4.10.4.3); a flushing
MOV CR3 (4.10.4.1) is such a point, and the one these tests sync at.  Each
test runs the same guest on a VM with fast paths and on the reference and
compares results, counters, host memory and the rmap (test_shadow_fast.same).
"""
import numpy as np
import pytest

from ptemu import PageFault, bits
from ptemu._native import ffi, lib
from ptemu.hypervisor import Hypervisor, audit
from ptemu.hypervisor.exits import GuestMemoryError
from ptemu.hypervisor.shadow import ShadowMmu, RMAP_LOG_PAIRS
from ptemu.hypervisor.vm import VirtualMachine

from test_shadow import GuestTables
from test_shadow_fast import VA, PAGE, P, W, U, A, D, NX, pair, same

SELF = 0x50000000       # where the guest maps its own level-1 table


def _unsync_world(vms, loads=range(10)):
    """Level-1 table at VA: pages 0..11 mapped (11 clean), the table mapped
    at SELF; `loads` touched (sptes made), then a store through SELF makes
    the table unsync.  Returns the table's gpa per VM."""
    pts = []
    for vm, g in vms:
        for i in range(12):
            g.map(VA + i * PAGE, (40 + i) * PAGE, P | W | U | A | (0 if i == 11 else D))
        pt = g.table_of(VA)
        g.map(SELF, pt, P | W | U | A | D)
        vm.vcpu.write_cr3(g.root)
        for i in loads:
            vm.vcpu.load_u64(VA + i * PAGE)
        vm.vcpu.load_u64(SELF)
        vm.vcpu.store_u64(SELF + 8 * 300, 0)            # a write fault: unsync
        assert vm.shadow.unsync_sps
        pts.append(pt)
    return pts


def _spy(monkeypatch):
    """Record what _sync_entries_in_c answered (True: C did the entries)."""
    seen = []
    orig = ShadowMmu._sync_entries_in_c

    def spy(self, sp):
        r = orig(self, sp)
        seen.append(r)
        return r
    monkeypatch.setattr(ShadowMmu, "_sync_entries_in_c", spy)
    return seen


def _load(vm, va):
    """What the guest gets from a load at va: the value, or the fault."""
    try:
        return vm.vcpu.load_u64(va)
    except PageFault as exc:
        return ("#PF", exc.error_code, exc.cr2)
    except GuestMemoryError as exc:
        return ("MMIO", str(exc))


def _loads(vm, idxs):
    return [_load(vm, VA + i * PAGE) for i in idxs]


def test_a_sync_in_c_remakes_every_changed_entry_as_the_reference(monkeypatch):
    """Every kind of gpte change while unsync (SDM 4.10.4.3: visible only after
    the guest's invalidation): a moved frame, not present, A clear, a frame
    outside the VM, W dropped, unchanged, D clear, a frame not backed, the
    table itself (write-protected again right after), NX and U changed, an
    entry with no spte, and one C filled while unsync (its snapshot updated
    by C).  At the flushing CR3 load the sptes, rmap, counters and the real
    TLB flush are the reference's."""
    seen = _spy(monkeypatch)
    vms = pair(unsync=True)
    pts = _unsync_world(vms)
    for (vm, g), pt in zip(vms, pts):
        vm.vcpu.load_u64(VA + 10 * PAGE)                # filled while unsync
        st = vm.vcpu.store_u64
        st(SELF + 8 * 0, (52 * PAGE) | P | W | U | A | D)     # another frame
        st(SELF + 8 * 1, 0)                                   # not present
        st(SELF + 8 * 2, (42 * PAGE) | P | W | U | D)         # A clear: the walk sets it
        st(SELF + 8 * 3, 0x7FFFF000 | P | W | U | A | D)      # outside the VM
        st(SELF + 8 * 4, (44 * PAGE) | P | U | A | D)         # W dropped: a flush
        st(SELF + 8 * 5, (45 * PAGE) | P | W | U | A | D)     # the same value
        st(SELF + 8 * 6, (46 * PAGE) | P | W | U | A)         # D clear: read-only
        st(SELF + 8 * 7, (700 * PAGE) | P | W | U | A | D)    # not backed yet
        st(SELF + 8 * 8, pt | P | W | U | A | D)              # the table itself
        st(SELF + 8 * 9, (49 * PAGE) | P | W | A | D | NX)    # supervisor, no execute
        st(SELF + 8 * 10, (53 * PAGE) | P | W | U | A | D)    # C's fill, changed
        st(SELF + 8 * 11, (54 * PAGE) | P | W | U | A | D)    # no spte: nothing to do
    (fast, _), (ref, _) = vms
    assert fast.shadow.fast.rmap_log_len          # C's fill logged, not yet absorbed
    same(fast, ref)
    flushes = [vm.stats["tlb_flush"] for vm, _ in vms]
    for vm, g in vms:
        vm.vcpu.write_cr3(g.root)                       # syncs
        assert not vm.shadow.unsync_sps
    assert seen == [True, False]                  # C for the fast VM, Python for the reference
    assert fast.stats["mmu_sync"] == ref.stats["mmu_sync"] == 1
    assert [vm.stats["tlb_flush"] for vm, _ in vms] == [f + 1 for f in flushes]
    sp = [s for s in fast.shadow.pages() if s.level == 1 and not s.direct
          and s.gfn == pts[0] >> 12][0]
    tab = fast.shadow.table(sp)
    assert tab[1] == tab[2] == tab[3] == tab[7] == tab[11] == 0
    assert int(tab[0]) & 0xFFFFFFFFFF000 == int(fast.p2m[52])
    assert not tab[4] & W and not tab[6] & W and not tab[8] & W and tab[5] & W
    assert tab[9] & NX and not tab[9] & U
    same(fast, ref)
    r = [_loads(vm, range(12)) for vm, _ in vms]
    assert r[0] == r[1]
    assert r[0][0] == 0xD0000 + 52 and r[0][10] == 0xD0000 + 53
    same(fast, ref)


def test_syncs_in_c_at_every_switch_of_a_long_run(monkeypatch):
    """Several tables unsync at once and synced together, again and again,
    with the guest rewriting entries between switches: C does every sync of
    the fast VM, and both VMs stay identical after each switch."""
    seen = _spy(monkeypatch)
    vms = pair(unsync=True)
    rng = np.random.default_rng(13)
    regions = [VA + k * (2 << 20) for k in range(3)]
    selfs = []
    for vm, g in vms:
        row = []
        for k, base in enumerate(regions):
            for i in range(16):
                g.map(base + i * PAGE, (40 + i) * PAGE, P | W | U | A | D)
            at = 0x60000000 + k * PAGE
            g.map(at, g.table_of(base), P | W | U | A | D)
            row.append(at)
        selfs.append(row)
        g2 = GuestTables(vm.phys, first=g.next + 8)
        g2.map(VA, 59 * PAGE, P | W | U | A | D)
        vm.g2 = g2
    plan = [(int(rng.integers(3)), int(rng.integers(16)), int(rng.integers(40, 60)),
             int(rng.integers(4))) for _ in range(60)]
    outs = ([], [])
    for step in range(6):
        for (vm, g), row, out in zip(vms, selfs, outs):
            vm.vcpu.write_cr3(g.root)
            for base in regions:
                for i in range(0, 16, 3):
                    out.append(_load(vm, base + i * PAGE))
            for k, i, gfn, how in plan[step * 10:step * 10 + 10]:
                flags = (P | W | U | A | D, P | U | A | D, 0, P | W | U | A)[how]
                vm.vcpu.store_u64(row[k] + 8 * i, (gfn * PAGE) | flags if flags else 0)
            vm.vcpu.write_cr3(vm.g2.root)               # syncs every unsync table
            assert not vm.shadow.unsync_sps
        (fast, _), (ref, _) = vms
        same(fast, ref)
        assert outs[0] == outs[1]
    kinds = {type(o) for o in outs[0]}
    assert kinds == {int, tuple}                  # values, and faults on dropped entries
    assert fast.stats["mmu_sync"] == ref.stats["mmu_sync"] >= 6
    assert seen.count(True) == seen.count(False) == fast.stats["mmu_sync"]


class OwnRule(ShadowMmu):
    """A researcher's rule for leaf sptes: C, which applies shadow.py's own,
    must leave the sync to Python."""

    def leaf_from_gpte(self, sp, gpte):
        return super().leaf_from_gpte(sp, gpte)


class OwnRuleVM(VirtualMachine):
    shadow_class = OwnRule


def test_a_subclass_with_its_own_spte_rule_syncs_in_python(monkeypatch):
    seen = _spy(monkeypatch)
    hv = Hypervisor(2048 * PAGE)
    vm = OwnRuleVM(hv, hv._next_id, 1024 * PAGE, "shadow", True, 3, None, False, None)
    hv._add_vm(vm, False)
    for gfn in range(40, 60):
        vm.phys.write_u64(gfn * PAGE, 0xD0000 + gfn)
    g = GuestTables(vm.phys)
    _unsync_world([(vm, g)])
    assert vm.shadow._sync_c is False
    vm.vcpu.store_u64(SELF, (55 * PAGE) | P | W | U | A | D)
    vm.vcpu.write_cr3(g.root)                           # syncs
    assert seen == [False] and not vm.shadow.unsync_sps
    assert vm.vcpu.load_u64(VA) == 0xD0000 + 55
    assert audit(vm) == []


def test_the_c_sync_declines_what_it_cannot_do_and_writes_nothing():
    """Driven directly (no guest operation reaches these): no room in the rmap
    log for a whole page, a frame past host memory or unaligned, a gfn past
    guest memory, a page that is not a level-1 page (the root), no snapshot.
    Each returns 0 with host memory and the log untouched; then the real
    call does the page."""
    (vm, g), _ = pair(unsync=True)
    _unsync_world([(vm, g)])
    vm.vcpu.store_u64(SELF, (55 * PAGE) | P | W | U | A | D)
    sh = vm.shadow
    sh.take_rmap_log()
    (sp,) = sh.unsync_sps
    f, hmem = sh.fast, vm.hypervisor.host.c_handle
    flush = ffi.new("int *")
    before = vm.hypervisor.host.array.copy()
    nhost = vm.hypervisor.host.size
    cases = [(sp.hpa, sp.gfn, sp.gsnap_c, flush),
             (nhost, sp.gfn, sp.gsnap_c, flush),
             (sp.hpa + 8, sp.gfn, sp.gsnap_c, flush),
             (sp.hpa, sh.nframes, sp.gsnap_c, flush),
             (sh.root.hpa, sp.gfn, sp.gsnap_c, flush),
             (sp.hpa, sp.gfn, ffi.NULL, flush),
             (sp.hpa, sp.gfn, sp.gsnap_c, ffi.NULL)]
    cap = f.rmap_log_cap
    f.rmap_log_cap = 2 * 512 - 1                # one entry short of a whole page
    try:
        assert lib.ptemu_shadow_sync_page(f, hmem, *cases[0]) == 0
    finally:
        f.rmap_log_cap = cap
    for args in cases[1:]:
        assert lib.ptemu_shadow_sync_page(f, hmem, *args) == 0
    assert np.array_equal(vm.hypervisor.host.array, before)
    assert f.rmap_log_len == 0 and flush[0] == 0
    assert lib.ptemu_shadow_sync_page(f, hmem, *cases[0]) == 1
    assert f.rmap_log_len == 2 and flush[0] == 1         # moved: remove, add, flush


def test_a_nearly_full_rmap_log_is_taken_in_before_a_sync_in_c(monkeypatch):
    """sync_page leaves C room for every entry of the page: a log with less
    room left is absorbed first, and C still does the sync."""
    seen = _spy(monkeypatch)
    vms = pair(unsync=True)
    _unsync_world(vms)
    (fast, g), (ref, gr) = vms
    for vm, _ in vms:
        vm.vcpu.store_u64(SELF, (55 * PAGE) | P | W | U | A | D)
    sh = fast.shadow
    sh.take_rmap_log()
    # Pending entries C would have logged: re-log the rmap's own entries
    # (absorbing them again changes nothing) until little room is left.
    pairs = [(gfn, a) for gfn, s in sorted(sh.rmap.items()) for a in sorted(s)]
    k = 0
    while sh.fast.rmap_log_len < RMAP_LOG_PAIRS - 100:
        gfn, a = pairs[k % len(pairs)]
        sh.rmap_log[2 * sh.fast.rmap_log_len] = gfn
        sh.rmap_log[2 * sh.fast.rmap_log_len + 1] = a
        sh.fast.rmap_log_len += 1
        k += 1
    for vm, gg in vms:
        vm.vcpu.write_cr3(gg.root)
    assert seen == [True, False]
    same(fast, ref)


@pytest.mark.parametrize("fast_paths", [True, False])
def test_the_guest_sees_its_changes_after_the_flush_either_way(fast_paths):
    """Transparency (docs/shadow-mmu.md): after the flushing CR3 load every
    changed translation is the guest's own, with C's sync or Python's."""
    hv = Hypervisor(2048 * PAGE)
    vm = hv.create_vm(1024 * PAGE, unsync=True, fast_paths=fast_paths)
    for gfn in range(40, 60):
        vm.phys.write_u64(gfn * PAGE, 0xD0000 + gfn)
    g = GuestTables(vm.phys)
    _unsync_world([(vm, g)])
    for i in range(10):
        vm.vcpu.store_u64(SELF + 8 * i, ((59 - i) * PAGE) | P | W | U | A | D)
    vm.vcpu.write_cr3(g.root)
    assert _loads(vm, range(10)) == [0xD0000 + 59 - i for i in range(10)]
    assert audit(vm) == []


def test_c_sees_the_reserved_bits_of_a_new_maxphyaddr_at_once():
    """SDM Vol. 3A 4.5.4: bits 51:MAXPHYADDR of a present entry are reserved, so
    such a gpte has no spte.  set_mode hands C the reserved bits of the new
    MAXPHYADDR with the mode (not the old mode's, until the next change):
    a store into a protected level-1 table (fast path 2) and an unsync sync
    in C give what the reference gives."""
    from test_shadow_fast import _pt_store_world
    for kw in ({}, {"unsync": True}):
        vms = pair(**kw)
        for vm, _ in vms:
            vm.vcpu.cpu.maxphyaddr = 40
        ats = _pt_store_world(vms, False)
        for (vm, g), at in zip(vms, ats):
            bad = (1 << 45) | (50 * PAGE) | P | W | U | A | D     # bit 45: reserved
            vm.vcpu.store_u64(at + 8 * 1, bad)
            vm.vcpu.write_cr3(g.root)
            assert vm.shadow.fast.rsvd_phys == vm.shadow.rsvd_phys == ((1 << 52) - (1 << 40))
        (fast, _), (ref, _) = vms
        same(fast, ref)
        r = [_load(vm, VA + PAGE) for vm, _ in vms]
        assert r[0] == r[1] and r[0][0] == "#PF"
        same(fast, ref)


def _random_gpte(rng, nframes):
    """A guest PTE of any kind sync_page must handle: mostly present with
    A set, some without A or P, frames backed, not yet backed or outside
    the VM, any of W/U/D/NX/G/PCD/PWT, now and then a reserved bit."""
    r = int(rng.integers(16))
    if r == 0:
        return 0
    gfn = int(rng.choice([rng.integers(40, 60), rng.integers(60, nframes),
                          rng.integers(nframes, nframes + 64)], p=[0.7, 0.2, 0.1]))
    flags = P | A
    for bit, p in ((W, 0.7), (U, 0.8), (D, 0.6), (NX, 0.2), (bits.PTE_G, 0.1),
                   (bits.PTE_PCD, 0.1), (bits.PTE_PWT, 0.1)):
        if rng.random() < p:
            flags |= bit
    if r == 1:
        flags &= ~A
    if r == 2:
        flags &= ~P
    if r == 3:
        flags |= 1 << 51                    # reserved below MAXPHYADDR 52
    return (gfn * PAGE) | flags


def _rmap_order(vm):
    """The rmap with each set in its iteration order: the same rmap changes
    in the same order leave the same order (write_protect walks it)."""
    return {g: list(s) for g, s in vm.shadow.rmap.items() if s}


@pytest.mark.parametrize("seed", range(8))
def test_random_tables_sync_the_same_in_c_and_python(monkeypatch, seed):
    """Random guest tables, fast paths on (C syncs) vs off (Python's loop):
    a whole level-1 table of random gptes, a random half of it touched
    (sptes made), the table made unsync, a random set of its entries
    rewritten with random gptes behind the hypervisor's back (SDM Vol. 3A
    4.10.4.3: the guest may not rely on them before it invalidates), then a
    flushing MOV CR3 (4.10.4.1), at which both VMs sync.  Afterwards: the
    same sptes and host memory, the same rmap (and the order of its sets),
    every counter but the fast ones, the real TLB flushed once because the
    sync lowered or moved a translation (need_flush), and the same answer
    for every one of the 512 pages."""
    seen = _spy(monkeypatch)
    rng = np.random.default_rng(1000 + seed)
    vms = pair(unsync=True)
    nframes = vms[0][0].shadow.nframes
    table = [_random_gpte(rng, nframes) for _ in range(512)]
    touched = sorted(rng.choice(512, 256, replace=False).tolist())
    rewrites = [(int(i), _random_gpte(rng, nframes) if rng.random() < 0.9 else table[int(i)])
                for i in rng.choice(512, int(rng.integers(32, 300)), replace=False)]
    outs = []
    for vm, g in vms:
        for i, e in enumerate(table):
            g.map(VA + i * PAGE, e & ~0xFFF, e & 0xFFF | e & (NX | 1 << 51))
        pt = g.table_of(VA)
        g.map(SELF, pt, P | W | U | A | D)
        vm.vcpu.write_cr3(g.root)
        out = _loads(vm, touched)
        vm.vcpu.load_u64(SELF)
        for i, e in rewrites:
            vm.vcpu.store_u64(SELF + 8 * i, e)          # the first one unsyncs
        assert vm.shadow.unsync_sps
        # The guest unmaps its window on the table and invalidates it (4.10.4.1
        # INVLPG): no writable spte maps the table any more, so the flush at
        # the CR3 load below is the sync's own (a translation lowered or moved).
        vm.phys.write_u64(g.entry_pa(SELF, 1), 0)
        vm.vcpu.invlpg(SELF)
        assert not vm.shadow.need_flush
        outs.append(out)
    (fast, _), (ref, _) = vms
    assert outs[0] == outs[1]
    same(fast, ref)
    flushes = [vm.stats["tlb_flush"] for vm, _ in vms]
    for vm, g in vms:
        vm.vcpu.write_cr3(g.root)                       # syncs
        assert not vm.shadow.unsync_sps
    assert seen == [True, False]
    assert [vm.stats["tlb_flush"] - f for (vm, _), f in zip(vms, flushes)] == [1, 1]
    assert fast.stats["mmu_sync"] == ref.stats["mmu_sync"] == 1
    same(fast, ref)
    assert _rmap_order(fast) == _rmap_order(ref)
    assert _loads(fast, range(512)) == _loads(ref, range(512))
    same(fast, ref)
    assert _rmap_order(fast) == _rmap_order(ref)
