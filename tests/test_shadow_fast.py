"""The C fast paths of the shadow MMU (csrc/shadow.c) and what each declines.

Hand-built guests (tests/test_shadow.py's GuestTables): each test runs the
same guest operations on a VM with fast_paths=True and on one with
fast_paths=False and checks (a) the fast path ran exactly where it should
(fast_pf_fixed), (b) everything else is identical: results, guest memory,
the leaf sptes, the rmap, every other counter (DESIGN.md "Python decides,
C executes"; docs/shadow-mmu.md "Fast paths").
"""
import numpy as np
import ptemu
import pytest

from ptemu import bits
from ptemu._native import lib
from ptemu.hypervisor import Hypervisor, audit
from ptemu.hypervisor.exits import FAST_COUNTERS
from ptemu.hypervisor.shadow import make_leaf_spte, ShadowMmu, TE_W, TE_U, TE_NX
from ptemu.hypervisor.vcpu import VCpu
from ptemu.hypervisor.vm import VirtualMachine
from ptemu.mmu import TRACE_DTYPE

from test_shadow import GuestTables, PAGE, P, W, U, A, D, PS, NX

VA = 0x40000000          # a 2 MiB region of its own: one level-1 guest table


def pair(**kw):
    """The same guest on two hosts: fast paths on, and the Python reference.
    Guest frames 40..59 hold data (so they are backed: backing is Python's)."""
    out = []
    for fast in (True, False):
        hv = Hypervisor(2048 * PAGE)
        vm = hv.create_vm(1024 * PAGE, fast_paths=fast, **kw)
        for gfn in range(40, 60):
            vm.phys.write_u64(gfn * PAGE, 0xD0000 + gfn)
        out.append((vm, GuestTables(vm.phys)))
    return out


def same(a, b):
    sa = {k: v for k, v in a.stats.items() if k not in FAST_COUNTERS}
    sb = {k: v for k, v in b.stats.items() if k not in FAST_COUNTERS}
    assert sa == sb
    assert np.array_equal(a.hypervisor.host.array, b.hypervisor.host.array)
    assert {g: s for g, s in a.shadow.rmap.items() if s} == \
        {g: s for g, s in b.shadow.rmap.items() if s}
    assert audit(a) == [] and audit(b) == []


def both(vms, fn):
    return [fn(vm) for vm, _ in vms]


def test_make_leaf_spte_is_one_rule_in_python_and_c():
    """The spte rule (SDM 4.6 rights, 4.8 D): the Python and C versions agree
    on every combination of rights, D and write protection."""
    for acc in range(8):
        for dirty in (0, 1):
            for prot in (0, 1):
                for copy in (0, bits.PTE_G | bits.PTE_PCD, 0xF << bits.PTE_PKEY_SHIFT):
                    py = make_leaf_spte(0x123000, acc, copy, dirty, prot)
                    assert py == lib.ptemu_make_leaf_spte(0x123000, acc, copy, dirty, prot)
                    assert bool(py & W) == bool(acc & TE_W and dirty and not prot)
                    assert bool(py & U) == bool(acc & TE_U)
                    assert bool(py & NX) == bool(acc & TE_NX)
                    assert py & (P | A) == P | A


def test_hidden_faults_on_a_built_path_are_fixed_in_c():
    """Touching fresh pages of one level-1 guest table: the first fault builds the
    shadow path in Python; the others only need a leaf spte: C installs it,
    inside vcpu.run and inside the scalar accesses."""
    vms = pair()
    for vm, g in vms:
        for i in range(8):
            g.map(VA + i * PAGE, (40 + i) * PAGE, P | W | U | A | D)
        vm.vcpu.write_cr3(g.root)
    tr = np.zeros(4, dtype=TRACE_DTYPE)
    tr["va"] = [VA + i * PAGE for i in range(4)]
    r = both(vms, lambda vm: vm.vcpu.run(tr))
    assert r[0].index == r[1].index == 4
    loads = both(vms, lambda vm: [vm.vcpu.load_u64(VA + i * PAGE) for i in range(4, 6)])
    assert loads[0] == loads[1]
    both(vms, lambda vm: vm.vcpu.store_u64(VA + 6 * PAGE, 77))
    (fast, _), (ref, _) = vms
    assert fast.stats["fast_pf_fixed"] == 6      # all but the first fault of the region
    assert fast.stats["pf_fixed"] == ref.stats["pf_fixed"] == 7
    assert ref.stats["fast_pf_fixed"] == 0
    assert fast.phys.read_u64(46 * PAGE) == 77
    same(fast, ref)


def test_writes_widen_a_clean_spte_in_c_and_the_guest_sees_d():
    """A read maps a clean page read-only; the first write faults again and the
    guest walk sets D (SDM 4.8): C widens the spte (same frame, same rmap)."""
    vms = pair()
    for vm, g in vms:
        g.map(VA, 40 * PAGE, P | W | U)
        g.map(VA + PAGE, 41 * PAGE, P | W | U)
        vm.vcpu.write_cr3(g.root)
        vm.vcpu.load_u64(VA)                      # builds the path (Python)
        vm.vcpu.load_u64(VA + PAGE)               # a new leaf (C)
        vm.vcpu.store_u64(VA + PAGE, 5)           # widened (C)
    (fast, gf), (ref, _) = vms
    assert fast.stats["fast_pf_fixed"] == 2
    assert fast.phys.read_u64(gf.entry_pa(VA + PAGE, 1)) & (A | D) == A | D
    same(fast, ref)


def test_declined_cases_go_to_python():
    """What C declines (docs/shadow-mmu.md): a true fault, a write to a
    write-protected page table (emulated), a large guest page's first fault
    (its direct pages are made), a frame not backed yet, MMIO.  Each is handled by the Python exit with the same result."""
    vms = pair()
    for vm, g in vms:
        g.map(VA, 40 * PAGE, P | W | U | A | D)
        pt = g.table_of(VA)
        g.map(VA + PAGE, pt, P | W | U | A | D)           # the guest maps its own table
        g.map(VA + 3 * PAGE, 0x7FFFF000, P | W | U | A)   # outside memory: MMIO
        g.map(VA + 4 * PAGE, 63 * PAGE, P | W | U | A)    # never touched: not backed
        g.map(VA + 5 * PAGE, 41 * PAGE, P | W | U | A)    # a plain data page
        g.map(0x80000000, 0x200000, P | W | U | PS, level=2)   # a 2 MiB guest page
        vm.vcpu.write_cr3(g.root)
        vm.vcpu.load_u64(VA)                       # path built
        vm.vcpu.store_u64(VA + PAGE + 8 * 9, 0)    # a store into the table: emulated
        with pytest.raises(Exception) as e:
            vm.vcpu.load_u64(VA + 2 * PAGE)        # not present: a true fault
        assert isinstance(e.value, __import__("ptemu").PageFault)
        with pytest.raises(Exception):
            vm.vcpu.load_u64(VA + 3 * PAGE)        # MMIO
        vm.vcpu.load_u64(VA + 4 * PAGE)
        vm.vcpu.load_u64(0x80000000 + 5 * PAGE)
        vm.vcpu.load_u64(VA + 5 * PAGE)            # the only one C fixes
    (fast, _), (ref, _) = vms
    assert fast.stats["fast_pf_fixed"] == 1
    assert fast.stats["pf_emulate"] == 1 and fast.stats["pf_guest"] == 1
    assert fast.stats["pf_mmio"] == 1
    same(fast, ref)


def _pcaches(vms):
    out = []
    for vm, _ in vms:
        vm.shadow._paths_current()
        out.append({k: [p.hpa for p in v] for k, v in vm.shadow._pcache.items()})
    return out


@pytest.mark.parametrize("kw", [{}, {"unsync": True}])
def test_hidden_faults_under_a_guest_2mib_page_are_fixed_in_c(kw):
    """A guest 2 MiB leaf (SDM 4.5, PS=1 in a PDE; the kernel's direct map) is
    shadowed by direct level-1 pages.  The first fault makes them (Python);
    a later one whose direct page exists with the role the leaf gives -- its
    rights, W only once D is set (SDM 4.8), its key, G and caching bits -- is
    filled in C, inside vcpu.run and the scalar accesses.  A clean leaf's
    first write needs the direct page of the W role (Python makes it); a
    1 GiB leaf stays Python's.  The fill cache learns C's paths."""
    big, key = 0x80000000, 5 << bits.PTE_PKEY_SHIFT
    vms = pair(**kw)
    for vm, g in vms:
        for i in range(6):
            vm.phys.write_u64(0x200000 + i * PAGE, i)           # backed (Python's)
        g.map(big, 0x200000, P | W | U | A | D | PS | bits.PTE_G | bits.PTE_PCD | key, level=2)
        g.map(big + 0x200000, 0, P | W | U | PS, level=2)      # clean
        g.map(0xC0000000, 0, P | W | A | D | PS, level=3)      # 1 GiB
        vm.vcpu.write_cr3(g.root)
        vm.vcpu.load_u64(big)                                  # direct pages made
    tr = np.zeros(3, dtype=TRACE_DTYPE)
    tr["va"] = [big + i * PAGE for i in (1, 2, 3)]
    tr["access"] = [0, 1, 0]
    r = both(vms, lambda vm: vm.vcpu.run(tr))
    assert r[0].index == r[1].index == 3
    both(vms, lambda vm: vm.vcpu.store_u64(big + 4 * PAGE, 9))
    assert both(vms, lambda vm: vm.vcpu.load_u64(big + 4 * PAGE)) == [9, 9]
    (fast, _), (ref, _) = vms
    assert fast.stats["fast_pf_fixed"] == 4 and ref.stats["fast_pf_fixed"] == 0
    clean = big + 0x200000
    for vm, _ in vms:
        vm.vcpu.load_u64(clean + 40 * PAGE)                  # a clean leaf: read-only role
        vm.vcpu.load_u64(clean + 41 * PAGE)                  # C
        vm.vcpu.store_u64(clean + 41 * PAGE, 3)              # D set: the W role (Python)
        vm.vcpu.store_u64(clean + 42 * PAGE, 4)              # C
        vm.vcpu.load_u64(0xC0000000 + 43 * PAGE)
        vm.vcpu.load_u64(0xC0000000 + 44 * PAGE)             # 1 GiB: Python
    assert fast.stats["fast_pf_fixed"] == 6
    assert fast.phys.read_u64(42 * PAGE) == 4
    # Every spte carries the leaf's key, G and PCD (SDM 4.6.2, 4.10.2.4, 4.9.2).
    for i in range(5):
        spte = fast.vcpu.mmu.walk_entries(big + i * PAGE)[0][-1][1]
        assert spte & (key | bits.PTE_G | bits.PTE_PCD) == key | bits.PTE_G | bits.PTE_PCD
    caches = _pcaches(vms)
    assert caches[0] == caches[1] and ~(clean >> 21) in caches[0]
    same(fast, ref)


@pytest.mark.parametrize("kw", [{}, {"shadow_limit": 8}])
def test_the_direct_fast_fill_declines_what_python_must_decide(kw):
    """A guest 2 MiB page is filled in C only with nothing to make: a direct
    page of another role (the leaf's key changed), a frame not backed yet,
    and memory pressure (a fill makes room first: shadow_limit) go to Python."""
    big = 0x80000000
    vms = pair(**kw)
    for vm, g in vms:
        for i in range(3):
            vm.phys.write_u64(0x200000 + i * PAGE, i)
        g.map(big, 0x200000, P | W | U | A | D | PS, level=2)
        vm.vcpu.write_cr3(g.root)
        vm.vcpu.load_u64(big)
        vm.phys.write_u64(g.entry_pa(big, 2), 0x200000 | P | W | U | A | D | PS
                          | 3 << bits.PTE_PKEY_SHIFT)
        vm.vcpu.invlpg(big)
        vm.vcpu.load_u64(big + PAGE)            # another key: another direct page
        vm.vcpu.load_u64(big + 7 * PAGE)        # not backed yet
        vm.vcpu.load_u64(big + 2 * PAGE)        # C, unless the shadow is at its limit
    (fast, _), (ref, _) = vms
    assert fast.stats["fast_pf_fixed"] == (0 if kw else 1)
    assert _pcaches(vms)[0] == _pcaches(vms)[1]
    same(fast, ref)


def test_unsync_pages_are_filled_in_c_and_keep_their_snapshot():
    """An unsync level-1 page keeps a snapshot of the gptes its sptes came from
    (resynced against at INVLPG / CR3 loads): C fills it and updates the
    snapshot as the Python fill does; a sync ends C's use of it."""
    vms = pair(unsync=True)
    for vm, g in vms:
        for i in range(6):
            g.map(VA + i * PAGE, (40 + i) * PAGE, P | W | U | A | D)
        pt = g.table_of(VA)
        g.map(0x50000000, pt, P | W | U | A | D)
        vm.vcpu.write_cr3(g.root)
        vm.vcpu.load_u64(VA)
        vm.vcpu.store_u64(0x50000000 + 8 * 5, (45 * PAGE) | P | W | U | A | D)   # unsync
        for i in range(1, 4):
            vm.vcpu.load_u64(VA + i * PAGE)
    (fast, _), (ref, _) = vms
    assert fast.stats["mmu_unsync"] == 1
    assert fast.stats["fast_pf_fixed"] >= 2
    snaps = [{sp.gfn: sp.gsnap.tolist() for sp in vm.shadow.unsync_sps} for vm, _ in vms]
    assert snaps[0] == snaps[1] and snaps[0]
    same(fast, ref)
    for vm, g in vms:
        vm.vcpu.write_cr3(g.root)              # syncs
        for i in range(4, 6):
            vm.vcpu.load_u64(VA + i * PAGE)
    assert not fast.shadow.unsync_sps
    same(fast, ref)


class LoggingShadow(ShadowMmu):
    """A researcher's policy: a fill that records what it filled."""

    def fill(self, va, walk, hpa, use=True):
        self.filled = getattr(self, "filled", []) + [va]
        return super().fill(va, walk, hpa, use)


class MyVM(VirtualMachine):
    shadow_class = LoggingShadow


def test_a_subclass_overriding_a_handler_turns_its_fast_path_off():
    """DESIGN.md: a Python policy is never bypassed without notice."""
    hv = Hypervisor(512 * PAGE)
    vm = MyVM(hv, hv._next_id, 64 * PAGE, "shadow", False, 3, None, False, None)
    hv._add_vm(vm, False)
    g = GuestTables(vm.phys)
    for i in range(4):
        g.map(VA + i * PAGE, (40 + i) * PAGE, P | W | U | A | D)
    vm.vcpu.write_cr3(g.root)
    for i in range(4):
        vm.vcpu.load_u64(VA + i * PAGE)
    assert vm.shadow.filled == [VA + i * PAGE for i in range(4)]
    # fill stands in for fast paths 1 and 2: those are off; INVLPG, CR3 and the
    # true fault (no fill there) are not.
    assert vm.stats["fast_pf_fixed"] == 0
    assert vm.vcpu._fast_bits == (lib.PTEMU_FP_INVLPG | lib.PTEMU_FP_CR3
                                  | lib.PTEMU_FP_TRUE_FAULT)

    class MyVCpu(VCpu):
        def page_fault_exit(self, va, acc, flags):
            return super().page_fault_exit(va, acc, flags)
    MyVM.vcpu_class = MyVCpu
    MyVM.shadow_class = ShadowMmu
    try:
        vm2 = MyVM(hv, hv._next_id, 64 * PAGE, "shadow", False, 3, None, False, None)
        assert vm2.vcpu._fast_bits == lib.PTEMU_FP_INVLPG | lib.PTEMU_FP_CR3
    finally:
        MyVM.vcpu_class = VCpu


def test_an_exit_log_or_prefetch_turns_the_fast_path_off():
    """The demo's exit log must see every exit; prefetch is a policy of the
    Python fill."""
    for kw in ({"prefetch": True}, {}):
        vms = pair(**kw)
        logs = []
        for vm, g in vms:
            for i in range(4):
                g.map(VA + i * PAGE, (40 + i) * PAGE, P | W | U | A | D)
            if not kw:
                log = []
                logs.append(log)
                vm.log_exits(log)
            vm.vcpu.write_cr3(g.root)
            for i in range(4):
                vm.vcpu.load_u64(VA + i * PAGE)
        (fast, _), (ref, _) = vms
        assert fast.stats["fast_pf_fixed"] == 0
        same(fast, ref)
        if logs:
            assert [str(x) for x in logs[0]] == [str(x) for x in logs[1]]


def test_fast_paths_must_be_a_bool():
    with pytest.raises(ValueError):
        Hypervisor(512 * PAGE).create_vm(64 * PAGE, fast_paths="yes")


def _pt_store_world(vms, large):
    """A guest whose level-1 table for VA is also mapped at MAPVA (by a 4 KiB
    leaf, or by a 2 MiB leaf covering guest-physical 0..2 MiB, the kernel's
    direct map), A and D set so that a store's walk owes nothing."""
    out = []
    for vm, g in vms:
        for i in range(4):
            g.map(VA + i * PAGE, (40 + i) * PAGE, P | W | U | A | D)
        pt = g.table_of(VA)
        if large:
            g.map(0x80000000, 0, P | W | A | D | PS, level=2)
            at = 0x80000000 + pt
        else:
            g.map(0x50000000, pt, P | W | A | D)
            at = 0x50000000
        vm.vcpu.write_cr3(g.root)
        for i in range(4):
            vm.vcpu.load_u64(VA + i * PAGE)          # shadowed and mapped
        vm.vcpu.load_u64(at)                         # the table's own mapping, read-only
        out.append(at)
    return out


@pytest.mark.parametrize("large", [False, True])
def test_a_store_into_a_protected_level1_table_is_emulated_in_c(large):
    """SDM 4.10.4.3: the guest changes a PTE with a store, then invalidates;
    the hypervisor traps the store (its table is write-protected), writes the
    word and updates the spte.  C does the common case; the result, the
    guest's next access and every counter are the reference's."""
    vms = pair()
    ats = _pt_store_world(vms, large)
    for (vm, g), at in zip(vms, ats):
        vc = vm.vcpu
        vc.store_u64(at + 8 * 1, (50 * PAGE) | P | W | U | A | D)     # remap page 1
        vc.invlpg(VA + PAGE)
        assert vc.load_u64(VA + PAGE) == 0xD0000 + 50
        vc.store_u64(at + 8 * 2, 0)                                    # unmap page 2
        vc.invlpg(VA + 2 * PAGE)
        with pytest.raises(Exception):
            vc.load_u64(VA + 2 * PAGE)
    (fast, _), (ref, _) = vms
    assert fast.stats["fast_pf_emulate"] == 2 and ref.stats["fast_pf_emulate"] == 0
    assert fast.stats["pf_emulate"] == ref.stats["pf_emulate"] == 2
    assert fast.stats["mmu_pte_updated"] == 1
    same(fast, ref)


def test_the_third_store_without_a_use_goes_to_python_and_zaps():
    """Flood detection (KVM write_flooding_count) is policy: the store that
    would zap the page is the reference's."""
    vms = pair()
    ats = _pt_store_world(vms, False)
    for (vm, g), at in zip(vms, ats):
        for i in range(3):
            vm.vcpu.store_u64(at + 8 * (10 + i), 0)
    (fast, _), (ref, _) = vms
    assert fast.stats["fast_pf_emulate"] == 2
    assert fast.stats["mmu_flooded"] == ref.stats["mmu_flooded"] == 1
    same(fast, ref)


def test_a_store_whose_walk_sets_d_in_c_or_with_unsync_in_python():
    """A store whose mapping is clean: the guest walk of the exit sets D (SDM
    4.8) -- in C, the hidden-fault path's walk, as the reference's walk does --
    and the emulation follows in C.  With unsync on, a store into a table is
    a policy choice (unsync or emulate): Python."""
    for kw, flags, in_c in (({}, P | W | A, 1), ({"unsync": True}, P | W | A | D, 0)):
        vms = pair(**kw)
        for vm, g in vms:
            g.map(VA, 40 * PAGE, P | W | U | A | D)
            pt = g.table_of(VA)
            g.map(0x50000000, pt, flags)
            vm.vcpu.write_cr3(g.root)
            vm.vcpu.load_u64(VA)
            vm.vcpu.load_u64(0x50000000)
            vm.vcpu.store_u64(0x50000000 + 8 * 7, 0)
        (fast, gf), (ref, _) = vms
        assert fast.stats["fast_pf_emulate"] == in_c
        assert fast.phys.read_u64(gf.entry_pa(0x50000000, 1)) & D
        same(fast, ref)


def test_store_stream_is_store_u64_in_order_on_every_machine():
    """vcpu.store_stream (the guest kernel's page-table work in bulk) does what
    store_u64 one by one does: on the native machine, on a shadow VM with fast
    paths (C leaves the stream only at a store Python must handle) and on the
    reference.  A faulting store raises the guest's #PF (SDM 4.7: W and the
    P of a present page, U clear for CPL 0), with every store before it done."""
    from ptemu import PageFault, InvalidInput
    from ptemu.guest import NativeMachine
    from ptemu.hypervisor.exits import STORE_DTYPE
    vms = pair()
    nat = NativeMachine(1024 * PAGE)
    for gfn in range(40, 60):
        nat.phys.write_u64(gfn * PAGE, 0xD0000 + gfn)
    gn = GuestTables(nat.phys)
    machines = [(vm, g) for vm, g in vms] + [(nat, gn)]
    ats = []
    for m, g in machines:
        for i in range(4):
            g.map(VA + i * PAGE, (40 + i) * PAGE, P | W | U | A | D)
        g.map(VA + 4 * PAGE, 44 * PAGE, P | U | A)              # read-only
        pt = g.table_of(VA)
        g.map(0x50000000, pt, P | W | A | D)
        m.vcpu.write_cr3(g.root)
        ats.append(0x50000000)
    stores = np.array([(VA + 8, 1), (VA + PAGE, 2), (0x50000000 + 8 * 5, (45 * PAGE) | P | W | U),
                       (VA + 2 * PAGE + 16, 3), (0x50000000 + 8 * 6, 0), (VA + 3 * PAGE, 4),
                       (VA + 4 * PAGE, 5), (VA + 8 * 2, 6)], dtype=STORE_DTYPE)
    for m, _ in machines:
        with pytest.raises(PageFault) as e:
            m.vcpu.store_stream(stores)
        assert (e.value.error_code, e.value.cr2) == (bits.PF_P | bits.PF_W, VA + 4 * PAGE)
        with pytest.raises(InvalidInput):
            m.vcpu.store_stream(np.array([(VA + 4, 0)], dtype=STORE_DTYPE))
    images = [m.phys.read(0, 1024 * PAGE) for m, _ in machines]
    assert images[0] == images[1] == images[2]
    assert int.from_bytes(images[2][40 * PAGE + 8:40 * PAGE + 16], "little") == 1
    assert int.from_bytes(images[2][40 * PAGE + 16:40 * PAGE + 24], "little") == 0   # after it
    (fast, _), (ref, _) = vms
    # The first store into the table needs its own mapping filled (Python);
    # the second is emulated in C.
    assert fast.stats["fast_pf_emulate"] == 1 and fast.stats["pf_emulate"] == 2
    same(fast, ref)


def test_invlpg_with_the_shadow_in_sync_is_done_in_c():
    """SDM 4.10.4.1: INVLPG drops the page's translations (and the PCID's
    paging-structure caches).  A synced shadow already follows the guest's
    tables, so only the real TLB acts: in C.  With an unsync page the entry
    may need a resync (FNAME(invlpg)): Python."""
    for kw, in_c in (({}, 3), ({"unsync": True}, None)):
        vms = pair(**kw)
        ats = _pt_store_world(vms, False)
        for (vm, g), at in zip(vms, ats):
            vc = vm.vcpu
            vc.store_u64(at + 8 * 1, (51 * PAGE) | P | W | U | A | D)
            vc.invlpg(VA + PAGE)
            assert vc.load_u64(VA + PAGE) == 0xD0000 + 51
            vc.invlpg(VA + 9 * PAGE)
            vc.invlpg(1 << 60)                 # non-canonical: a no-op
        (fast, _), (ref, _) = vms
        if in_c is not None:
            assert fast.stats["fast_invlpg"] == in_c
        assert fast.stats["invlpg"] == ref.stats["invlpg"] == 3
        same(fast, ref)
        assert fast.vcpu.tlb.stats == ref.vcpu.tlb.stats


def test_cr3_loads_to_cached_roots_are_done_in_c():
    """SDM 4.10.4.1: MOV CR3 flushes the PCID's non-global translations.  A load
    whose shadow root is the current one or in prev_roots (KVM's 3 previous
    roots) needs no new shadow: in C; a root from the hash or a new one, a
    reserved bit (#GP, SDM 4.5.2), or unsync pages to sync: Python."""
    from ptemu import GeneralProtection
    vms = pair()
    for vm, g in vms:
        g.map(VA, 40 * PAGE, P | W | U | A | D)
        tops = [g.root] + [g.alloc() for _ in range(4)]
        for t in tops[1:]:
            vm.phys.write(t, vm.phys.read(g.root, PAGE))      # the same address space
        vc = vm.vcpu
        for t in tops[:3]:
            vc.write_cr3(t)                # new roots (Python)
            vc.load_u64(VA)
        for t in (tops[0], tops[1], tops[1], tops[2], tops[0]):
            vc.write_cr3(t)                # cached or current (C)
            vc.load_u64(VA)
        for t in tops:
            vc.write_cr3(t)                # tops[3], tops[4] are new; then prev hits
        with pytest.raises(GeneralProtection):
            vc.write_cr3(tops[0] | (1 << 62))
    (fast, _), (ref, _) = vms
    assert fast.stats["fast_cr3_write"] >= 5
    assert fast.stats["prev_root_hit"] == ref.stats["prev_root_hit"] > 0
    assert [sp.gfn for sp in fast.shadow.prev_roots] == [sp.gfn for sp in ref.shadow.prev_roots]
    same(fast, ref)
    assert fast.vcpu.tlb.stats == ref.vcpu.tlb.stats


def test_invlpg_resyncs_an_unsync_entry_in_c():
    """Unsync (KVM): the guest's stores into an unsync table do not trap; its
    INVLPG of the page is where the shadow catches up (FNAME(invlpg)): the
    entry is resynced from the guest's table, the real TLB loses the page."""
    vms = pair(unsync=True)
    ats = _pt_store_world(vms, False)
    for (vm, g), at in zip(vms, ats):
        vc = vm.vcpu
        vc.store_u64(at + 8 * 1, (51 * PAGE) | P | W | U | A | D)    # traps once: unsync
        vc.invlpg(VA + PAGE)
        vc.store_u64(at + 8 * 4, (44 * PAGE) | P | W | U | A | D)    # a new page (no trap)
        vc.load_u64(VA + 4 * PAGE)                                   # its fill: the slot again
        vc.store_u64(at + 8 * 2, (52 * PAGE) | P | W | U | A | D)    # no trap now
        assert vc.load_u64(VA + 2 * PAGE) == 0xD0000 + 42            # stale until INVLPG
        vc.invlpg(VA + 2 * PAGE)
        assert vc.load_u64(VA + 2 * PAGE) == 0xD0000 + 52
    (fast, _), (ref, _) = vms
    assert fast.stats["fast_invlpg"] >= 1
    assert fast.stats["mmu_sync_entry"] == ref.stats["mmu_sync_entry"] >= 1
    same(fast, ref)
    assert fast.vcpu.tlb.stats == ref.vcpu.tlb.stats


def test_cr3_loads_to_roots_in_the_hash_are_done_in_c():
    """More address spaces than prev_roots holds: a CR3 load whose root is still
    in the (gfn, role) hash makes no page (KVM's kvm_mmu_get_page hit): in C,
    with prev_roots rotated as load_root does; under a shadow limit (room may
    have to be made first) Python."""
    for kw, in_c in (({"prev_roots": 1}, True), ({"prev_roots": 1, "shadow_limit": 8}, False)):
        vms = pair(**kw)
        for vm, g in vms:
            g.map(VA, 40 * PAGE, P | W | U | A | D)
            tops = [g.root] + [g.alloc() for _ in range(2)]
            for t in tops[1:]:
                vm.phys.write(t, vm.phys.read(g.root, PAGE))
            for _ in range(3):
                for t in tops:
                    vm.vcpu.write_cr3(t)
                    vm.vcpu.load_u64(VA)
        (fast, _), (ref, _) = vms
        assert (fast.stats["fast_cr3_write"] > 3) == in_c
        assert [sp.gfn for sp in fast.shadow.prev_roots] == \
            [sp.gfn for sp in ref.shadow.prev_roots]
        same(fast, ref)
        assert fast.vcpu.tlb.stats == ref.vcpu.tlb.stats


# ---- fast path 5 (a true fault inside vcpu.run) and fast path 1's shadow descent ----

def _fault_tuple(r):
    f = r.fault
    return (r.index, r.vector, r.error_code, r.cr2, r.cause,
            None if f is None else (type(f).__name__, f.error_code, f.cause, f.level, str(f)))


def test_true_faults_in_run_are_handed_over_by_c():
    """A true fault inside vcpu.run (SDM 4.7): the guest's walk in C faults, so
    Python injects that walk's #PF without walking again.  Not present, a user
    access to a supervisor page, a write to a read-only page, a reserved bit:
    the same RunResult (error code, CR2, cause, level) and counters both ways.
    A table frame not backed yet (the walk's BUS) is Python's to back: declined."""
    vms = pair()
    for vm, g in vms:
        g.map(VA, 40 * PAGE, P | W | U | A | D)
        g.map(VA + PAGE, 41 * PAGE, P | A | D | U)            # read-only
        g.map(VA + 2 * PAGE, 42 * PAGE, P | W | A | D)        # supervisor only
        # A 2 MiB leaf with bit 13 set: reserved (SDM 4.5.4, table 4-18).
        g.map(VA + (4 << 21), (1 << 21) | (1 << 13), P | W | U | A, level=2)
        # A level-1 table in a guest frame never written (not backed yet).
        vm.phys.write_u64(g.entry_pa(VA + (1 << 21), 2), (70 * PAGE) | P | W | U)
        vm.vcpu.write_cr3(g.root)
        vm.vcpu.cpu.cpl = 3
    cases = [(VA + 5 * PAGE, 0), (VA + PAGE, 1), (VA + 2 * PAGE, 0), (VA + (4 << 21), 0),
             (VA + (1 << 21), 0)]
    results = [[], []]
    runs = [[], []]
    for va, acc in cases:
        tr = np.zeros(3, dtype=TRACE_DTYPE)
        tr["va"] = [VA, va, VA]
        tr["access"] = [0, acc, 0]
        tr["user"] = 1
        for k, (vm, _) in enumerate(vms):
            r = vm.vcpu.run(tr)
            runs[k].append(r)
            results[k].append(_fault_tuple(r))
    assert results[0] == results[1]
    # A RunResult's PageFault is made when first asked for: still the fault of
    # its own run when asked for only after the later runs refilled C's struct.
    late = [[], []]
    for k, (vm, _) in enumerate(vms):
        for va, acc in cases:
            tr = np.zeros(1, dtype=TRACE_DTYPE)
            tr["va"], tr["access"], tr["user"] = va, acc, 1
            runs[k].append(vm.vcpu.run(tr))
    for k in (0, 1):
        late[k] = [_fault_tuple(r) for r in runs[k]]
    assert late[0] == late[1] and late[0][:5] == results[0]
    assert [r[1] for r in results[0]] == [14] * 5
    assert [r[2] for r in results[0]][:4] == [lib.PTEMU_PF_U, lib.PTEMU_PF_P | lib.PTEMU_PF_W |
                                              lib.PTEMU_PF_U, lib.PTEMU_PF_P | lib.PTEMU_PF_U,
                                              lib.PTEMU_PF_P | lib.PTEMU_PF_U |
                                              lib.PTEMU_PF_RSVD]
    (fast, _), (ref, _) = vms
    assert fast.stats["pf_guest"] == ref.stats["pf_guest"] == 10
    # All but the first fault through the unbacked table (then backed by Python).
    assert fast.stats["fast_pf_guest"] == 9
    assert ref.stats["fast_pf_guest"] == 0
    same(fast, ref)


def test_a_subclass_overriding_inject_turns_fast_path_5_off():
    class MyVCpu(VCpu):
        def _inject(self, va, acc, r):
            return super()._inject(va, acc, r)
    hv = Hypervisor(512 * PAGE)
    MyVM.vcpu_class = MyVCpu
    MyVM.shadow_class = ShadowMmu
    try:
        vm = MyVM(hv, hv._next_id, 64 * PAGE, "shadow", False, 3, None, False, None)
        assert not vm.vcpu._fast_bits & lib.PTEMU_FP_TRUE_FAULT
        assert vm.vcpu._fast_bits & lib.PTEMU_FP_HIDDEN_FAULT
    finally:
        MyVM.vcpu_class = VCpu


def test_a_fill_cache_miss_on_an_existing_path_is_walked_in_c():
    """The fill cache forgets every path at a generation step (here: a CR3 load
    to another root and back).  The next hidden fault in the region finds every
    shadow page of its path in place: C walks the shadow from the root, checks
    each page's (gfn, role) as shadow.py's _descend would, and fills -- the
    same sptes, rmap and counters as the Python descent."""
    vms = pair()
    for vm, g in vms:
        for i in range(8):
            g.map(VA + i * PAGE, (40 + i) * PAGE, P | W | U | A | D)
        g2 = GuestTables(vm.phys, first=g.next + 4)
        g2.map(VA, 50 * PAGE, P | W | U | A | D)
        vm.vcpu.write_cr3(g.root)
        vm.vcpu.load_u64(VA)                      # builds the path (Python)
        vm.vcpu.write_cr3(g2.root)                # a new root (Python)
        vm.vcpu.load_u64(VA)
        vm.vcpu.write_cr3(g.root)                 # a cached root: the generation moves
        tr = np.zeros(3, dtype=TRACE_DTYPE)
        tr["va"] = [VA + i * PAGE for i in (1, 2, 3)]
        vm.vcpu.run(tr)
        vm.vcpu.store_u64(VA + 4 * PAGE, 9)
    (fast, _), (ref, _) = vms
    assert fast.stats["fast_path_walk"] == 1      # once: the slot holds the path again
    assert fast.stats["fast_pf_fixed"] == 4
    assert ref.stats["fast_path_walk"] == 0
    # The Python fill cache learns the path C cached (so that a later Python
    # fill in the region makes no room where the reference makes none).
    caches = []
    for vm in (fast, ref):
        vm.shadow._paths_current()
        caches.append({k: [p.hpa for p in v] if isinstance(v, list) else v.hpa
                       for k, v in vm.shadow._pcache.items()})
    assert caches[0] == caches[1] and VA >> 21 in caches[0]
    same(fast, ref)


def test_the_shadow_descent_declines_what_python_must_decide():
    """No walk in C when a page on the path is missing (Python creates it).  An
    unsync level-1 page's slot gets its snapshot of gptes, which C then keeps as
    the Python fill does (the guest's INVLPG resyncs against it)."""
    for kw in ({}, {"unsync": True}):
        vms = pair(**kw)
        for vm, g in vms:
            for i in range(8):
                g.map(VA + i * PAGE, (40 + i) * PAGE, P | W | U | A | D)
            pt = g.table_of(VA)
            g.map(VA + 8 * PAGE, pt, P | W | U | A | D)      # the guest maps its table
            g.map(VA + (1 << 21), 48 * PAGE, P | W | U | A | D)
            vm.vcpu.write_cr3(g.root)
            vm.vcpu.load_u64(VA)
            # A store into the level-1 table: emulated (shadow) or unsync.
            vm.vcpu.store_u64(VA + 8 * PAGE + 8 * 7, (49 * PAGE) | P | W | U | A | D)
            vm.shadow._forget_paths()             # a generation step (as any zap makes)
            vm.vcpu.load_u64(VA + 6 * PAGE)       # the path exists: walked in C
            vm.vcpu.load_u64(VA + 7 * PAGE)
            # The guest changes an entry behind the unsync shadow, then INVLPGs it.
            vm.vcpu.store_u64(VA + 8 * PAGE + 8 * 6, (50 * PAGE) | P | W | U | A | D)
            vm.vcpu.invlpg(VA + 6 * PAGE)
            vm.vcpu.load_u64(VA + 6 * PAGE)
            vm.vcpu.load_u64(VA + (1 << 21))      # another region: built (Python)
        (fast, _), (ref, _) = vms
        assert fast.stats["fast_path_walk"] == 1
        assert [fast.vcpu.load_u64(VA + i * PAGE) for i in (6, 7)] == \
            [ref.vcpu.load_u64(VA + i * PAGE) for i in (6, 7)] == [0xD0000 + 50, 0xD0000 + 49]
        if kw:
            assert fast.stats["mmu_unsync"] == 1
            assert fast.stats["mmu_sync_entry"] == ref.stats["mmu_sync_entry"] == 1
            (sf,), (sr,) = fast.shadow.unsync_sps, ref.shadow.unsync_sps
            assert np.array_equal(sf.gsnap, sr.gsnap)
        same(fast, ref)


def test_a_flushing_cr3_load_with_unsync_pages_syncs_in_python_then_switches_in_c():
    """MOV CR3 (flushing, SDM 4.10.4.1) while pages are unsync: Python syncs them
    (policy: cr3_write_exit's first step), then fast path 4 switches to the
    cached root.  A reserved-bit CR3 still raises #GP with nothing synced."""
    vms = pair(unsync=True)
    for vm, g in vms:
        for i in range(4):
            g.map(VA + i * PAGE, (40 + i) * PAGE, P | W | U | A | D)
        pt = g.table_of(VA)
        g.map(VA + 8 * PAGE, pt, P | W | U | A | D)
        g2 = GuestTables(vm.phys, first=g.next + 4)
        g2.map(VA, 50 * PAGE, P | W | U | A | D)
        vm.vcpu.write_cr3(g2.root)
        vm.vcpu.load_u64(VA)
        vm.vcpu.write_cr3(g.root)
        vm.vcpu.load_u64(VA)
        vm.vcpu.store_u64(VA + 8 * PAGE + 8 * 2, (51 * PAGE) | P | W | U | A | D)   # unsync
        with pytest.raises(ptemu.GeneralProtection):
            vm.vcpu.write_cr3(g2.root | (1 << 62))
        assert vm.shadow.unsync_sps
        vm.vcpu.write_cr3(g2.root)                 # syncs, then the cached root
        assert not vm.shadow.unsync_sps
        vm.vcpu.write_cr3(g.root)
        assert vm.vcpu.load_u64(VA + 2 * PAGE) == 0xD0000 + 51
    (fast, _), (ref, _) = vms
    assert fast.stats["mmu_sync"] == ref.stats["mmu_sync"] == 1
    assert fast.stats["fast_cr3_write"] == 2          # both loads after the sync
    same(fast, ref)
