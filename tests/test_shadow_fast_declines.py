"""What the C fast paths (csrc/shadow.c) must decline, case by case, where no
guest operation of the public API reaches the case (issue 13: "the flood
counter, misalignment and non-level-1 cases go to Python"; a full rmap log
never overflows).  Each test drives the C entry point or the public API on
a VM with fast paths on and checks that C left everything as it was (or
that the Python reference's result came out)."""
import pytest

from ptemu import PageFault
from ptemu._native import lib

from test_shadow_fast import VA, PAGE, P, W, U, A, D, pair, same, _pt_store_world


def _fast_store(vm, va, value):
    vc = vm.vcpu
    return lib.ptemu_shadow_store(vm.shadow.fast, vc._rm, vc._rtlb, va, value)


def test_a_misaligned_store_into_a_protected_table_is_declined():
    """KVM detect_write_misaligned: a store that is not one whole entry is a
    policy case (it zaps the page).  store_u64 refuses unaligned addresses,
    so C is driven directly: it declines with #PF and writes nothing."""
    (vm, g), _ = pair()
    at = _pt_store_world([(vm, g)], False)[0]
    before = vm.hypervisor.host.array.copy()
    stats = dict(vm.stats)
    r = _fast_store(vm, at + 8 * 1 + 4, (50 * PAGE) | P | W | U | A | D)
    assert r == lib.PTEMU_VEC_PF
    assert (vm.hypervisor.host.array == before).all()
    assert vm.stats["fast_pf_emulate"] == stats["fast_pf_emulate"]
    assert vm.shadow.fast.rmap_log_len == 0


def test_a_store_into_an_upper_level_table_goes_to_python():
    """A store into a guest page directory (a level-2 shadow page): KVM unlinks
    the child (mmu_pde_zapped), which the fill cache must hear of: Python."""
    vms = pair()
    for vm, g in vms:
        g.map(VA, 40 * PAGE, P | W | U | A | D)
        g.map(0x50000000, g.table_of(VA, 2), P | W | A | D)    # the guest maps its PD
        vm.vcpu.write_cr3(g.root)
        vm.vcpu.load_u64(VA)
        vm.vcpu.load_u64(0x50000000)
        vm.vcpu.store_u64(0x50000000 + 8 * ((VA >> 21) & 511), 0)   # unmap VA's table
        with pytest.raises(PageFault):
            vm.vcpu.load_u64(VA)
    (fast, _), (ref, _) = vms
    assert fast.stats["fast_pf_emulate"] == 0
    assert fast.stats["mmu_pde_zapped"] == ref.stats["mmu_pde_zapped"] == 1
    same(fast, ref)


def test_a_full_rmap_log_declines_every_fast_path_that_adds_to_it():
    """C appends each rmap change to a log Python absorbs; with no room left a
    fill, a protected-table store and an unsync INVLPG resync decline to
    Python rather than drop an entry (the rmap must list every leaf spte)."""
    for kw in ({}, {"unsync": True}):
        vms = pair(**kw)
        ats = _pt_store_world(vms, False)
        for (vm, g), at in zip(vms, ats):
            g.map(VA + 5 * PAGE, 45 * PAGE, P | W | U | A | D)
            sh = vm.shadow
            sh.take_rmap_log()
            before = (vm.stats["fast_pf_fixed"], vm.stats["fast_pf_emulate"],
                      vm.stats["fast_invlpg"])
            cap = sh.fast.rmap_log_cap
            sh.fast.rmap_log_cap = 0             # the log is full
            try:
                vm.vcpu.load_u64(VA + 5 * PAGE)                             # a fill
                vm.vcpu.store_u64(at + 8 * 1, (50 * PAGE) | P | W | U | A | D)  # a store
                vm.vcpu.store_u64(at + 8 * 1, (51 * PAGE) | P | W | U | A | D)  # (unsync)
                vm.vcpu.invlpg(VA + PAGE)                                   # a resync
                assert vm.vcpu.load_u64(VA + PAGE) == 0xD0000 + 51
                assert sh.fast.rmap_log_len == 0
                after = (vm.stats["fast_pf_fixed"], vm.stats["fast_pf_emulate"],
                         vm.stats["fast_invlpg"])
                if vm.vcpu.fast_paths:
                    assert after[:2] == before[:2]          # fill and store: Python
                    assert after[2] == before[2] + (0 if kw else 1)   # unsync: Python
            finally:
                sh.fast.rmap_log_cap = cap
        (fast, _), (ref, _) = vms
        same(fast, ref)


def test_a_p2m_entry_outside_host_memory_is_never_mapped_by_c():
    """Every index into a Python-owned array is checked (csrc/shadow.c): the
    host frame of a new spte indexes h2g, so a p2m value past host memory
    (Python's bug, not the guest's) gives no spte rather than a read past
    h2g and an spte onto memory that is not there."""
    (vm, g), _ = pair()
    at = _pt_store_world([(vm, g)], False)[0]
    sh = vm.shadow
    sh.take_rmap_log()
    saved = int(sh.p2m[50])
    sh.p2m[50] = vm.hypervisor.host.size + 64 * PAGE
    try:
        r = _fast_store(vm, at + 8 * 1, (50 * PAGE) | P | W | U | A | D)
        assert r == lib.PTEMU_OK                 # emulated: the word is the guest's
        l1 = [sp for sp in sh.pages() if sp.level == 1 and not sp.direct
              and sp.gfn == g.table_of(VA) >> 12]
        assert len(l1) == 1
        assert sh.table(l1[0])[1] == 0
        assert sh.fast.rmap_log_len == 1 and sh.rmap_log[0] & lib.PTEMU_RMAP_REMOVE
    finally:
        sh.p2m[50] = saved


def test_supervisor_stores_under_guest_cr0_wp_0_go_to_python():
    """SDM 4.6.1: with CR0.WP=0 a supervisor write ignores R/W.  The real CPU
    keeps WP=1 (so that write protection holds), so such a write exits and is
    emulated: policy, never a fast fill or a fast table store (ctx.role_wp)."""
    from ptemu import bits
    vms = pair()
    for vm, g in vms:
        for i in range(2):
            g.map(VA + i * PAGE, (40 + i) * PAGE, P | A | D)         # read-only data
        g.map(0x50000000, g.table_of(VA), P | A | D)                # its table, read-only
        vc = vm.vcpu
        vc.write_cr3(g.root)
        vc.write_cr0(vc.cpu.cr0 & ~bits.CR0_WP)
        vc.load_u64(VA)
        vc.load_u64(0x50000000)
        vc.store_u64(VA + 8, 0x1234)                                # R/W=0, allowed
        vc.store_u64(0x50000000 + 8 * 1, (50 * PAGE) | P | A | D)   # a table store
        vc.invlpg(VA + PAGE)
        assert vc.load_u64(VA + 8) == 0x1234
        assert vc.load_u64(VA + PAGE) == 0xD0000 + 50
    (fast, _), (ref, _) = vms
    assert fast.stats["fast_pf_emulate"] == 0
    assert fast.stats["pf_emulate"] == ref.stats["pf_emulate"] >= 2
    same(fast, ref)
