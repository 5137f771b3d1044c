"""Unit tests of the shadow MMU, one event at a time, on hand-built guest tables.

Expectations are derived by hand: the guest-visible ones from the Intel SDM
Vol. 3A ch. 4 (cited per test), the hypervisor's own from the event flows of
docs/shadow-mmu.md (KVM's, see Documentation/virt/kvm/x86/mmu.rst).
"""
import numpy as np
import pytest

import ptemu
from ptemu import bits
from ptemu.hypervisor import Hypervisor, GuestMemoryError, audit, ShadowMmuError
from ptemu.hypervisor.exits import PF_SPURIOUS
from ptemu.mmu import TRACE_DTYPE

P, W, U, A, D, PS, NX = (bits.PTE_P, bits.PTE_W, bits.PTE_U, bits.PTE_A, bits.PTE_D,
                         bits.PTE_PS, bits.PTE_NX)
PAGE = 4096
ADDR = 0x000FFFFFFFFFF000


class GuestTables:
    """4-level guest tables written the way a booting guest does (vm.phys writes).
    Table frames come from guest frame `first` upwards; intermediate entries get
    P|W|U so that rights come from the leaves unless a test says otherwise."""

    def __init__(self, phys, first=1):
        self.phys = phys
        self.next = first
        self.root = self.alloc()

    def alloc(self):
        gpa = self.next * PAGE
        self.next += 1
        return gpa

    def entry_pa(self, va, level):
        table = self.root
        for lvl in range(4, level, -1):
            epa = table + ((va >> (12 + 9 * (lvl - 1))) & 511) * 8
            e = self.phys.read_u64(epa)
            if not e & P:
                e = self.alloc() | P | W | U
                self.phys.write_u64(epa, e)
            table = e & ADDR
        return table + ((va >> (12 + 9 * (level - 1))) & 511) * 8

    def map(self, va, gpa, flags=P | W | U, level=1):
        epa = self.entry_pa(va, level)
        self.phys.write_u64(epa, gpa | flags | (PS if level > 1 else 0))
        return epa

    def table_of(self, va, level=1):
        return self.entry_pa(va, level) & ~0xFFF


def setup(frames=64, host_frames=512, **kw):
    hv = Hypervisor(host_frames * PAGE)
    vm = hv.create_vm(frames * PAGE, **kw)
    return hv, vm, GuestTables(vm.phys)


def fill_data(vm, gfns):
    for g in gfns:
        vm.phys.write_u64(g * PAGE, 0xD0000 + g)


def spte_for(vm, va):
    """The shadow's leaf entry for va (walking the shadow from the real CR3), or None."""
    sh = vm.shadow
    sp = sh.root
    for lvl in range(4, 1, -1):
        sp = sp.children.get((va >> (12 + 9 * (lvl - 1))) & 511)
        if sp is None:
            return None
    v = int(sh.table(sp)[(va >> 12) & 511])
    return v or None


# -- MOV CR3 -------------------------------------------------------------------------------
def test_cr3_load_builds_a_root_and_write_protects_the_top_table():
    """The real CR3 holds a shadow root in a host frame of the VM, never the guest's
    value; the guest's top table becomes write-protected: reading it through a
    guest mapping works, a store into it exits and is emulated (docs: MOV CR3)."""
    hv, vm, g = setup()
    g.map(0x5000, g.root, P | W)                  # the guest maps its own PML4
    vc = vm.vcpu
    vc.write_cr3(g.root)
    st = vm.stats
    assert (st["exit_cr3_write"], st["cr3_write"], st["mmu_cache_miss"]) == (1, 1, 1)
    root = vm.shadow.root
    assert root.gfn == g.root >> 12 and root.level == 4
    assert vc.real_cpu.cr3 == root.hpa
    assert root.hpa >> 12 in vm.host_frames()
    assert root.hpa != vm.gpa_to_hpa(g.root)
    assert vc.cpu.cr3 == g.root                   # the guest sees its own CR3
    pml4e = vm.phys.read_u64(g.root)
    assert vc.load_u64(0x5000) == pml4e | A       # the walk of this load set A (SDM 4.8)
    assert spte_for(vm, 0x5000) & W == 0          # write-protected
    vc.store_u64(0x5008, 0)                       # PML4[1] = 0: a page-table store
    assert vm.stats["pf_emulate"] == 1
    assert vm.phys.read_u64(g.root + 8) == 0
    assert audit(vm) == []


def test_prev_roots_cache_is_lru_of_three():
    """KVM keeps the last 3 roots (prev_roots): cycling 4 address spaces hits,
    cycling 5 misses the cache (but the pages stay in the hash: no rebuild)."""
    hv, vm, g = setup()
    roots = [g.root] + [g.alloc() for _ in range(4)]
    vc = vm.vcpu
    for r in roots[:4]:
        vc.write_cr3(r)
    assert vm.stats["prev_root_hit"] == 0
    vc.write_cr3(roots[0])                        # prev = [r3, r2, r1, (r0 evicted?)]
    # after r0..r3 the cache holds r2, r1, r0 (3 entries): r0 is a hit
    assert vm.stats["prev_root_hit"] == 1
    misses = vm.stats["mmu_cache_miss"]
    for r in roots:                                # r1 hit, r2 hit, r3 hit, r4 new
        vc.write_cr3(r)
    assert vm.stats["prev_root_hit"] == 4
    assert vm.stats["mmu_cache_miss"] == misses + 1
    for r in roots[:1]:                            # cache now r3, r2, r1: r0 misses...
        vc.write_cr3(r)
    assert vm.stats["prev_root_hit"] == 4
    assert vm.stats["mmu_cache_miss"] == misses + 1   # ... but the hash still has it


def test_prev_roots_zero_disables_the_cache():
    hv, vm, g = setup(prev_roots=0)
    r2 = g.alloc()
    for r in (g.root, r2, g.root, r2):
        vm.vcpu.write_cr3(r)
    assert vm.stats["prev_root_hit"] == 0
    assert vm.stats["mmu_cache_miss"] == 2


def test_cr3_with_reserved_bits_is_gp_and_changes_nothing():
    """MOV to CR3 with bits 62:MAXPHYADDR set is #GP(0) (SDM 4.5 / 2.5)."""
    hv, vm, g = setup()
    vm.vcpu.write_cr3(g.root)
    with pytest.raises(ptemu.GeneralProtection):
        vm.vcpu.write_cr3(g.root | (1 << 60))
    assert vm.vcpu.cpu.cr3 == g.root
    assert vm.vcpu.real_cpu.cr3 == vm.shadow.root.hpa


# -- hidden faults and A/D ---------------------------------------------------------------------
def test_hidden_fault_sets_accessed_then_first_write_sets_dirty():
    """SDM 4.8: a walk sets A in every entry it uses, and D in the leaf on a write.
    The shadow leaf is read-only while the guest's D is clear, so the first write
    exits and the guest walk sets D; the second write does not exit."""
    hv, vm, g = setup()
    pte = g.map(0x7000, 10 * PAGE)
    fill_data(vm, [10])
    vc = vm.vcpu
    vc.write_cr3(g.root)
    assert vc.load_u64(0x7000) == 0xD000A
    st = vm.stats
    assert (st["exit_page_fault"], st["pf_fixed"]) == (1, 1)
    chain = [g.root, g.table_of(0x7000, 3), g.table_of(0x7000, 2), pte & ~0xFFF]
    assert all(vm.phys.read_u64(t) & A for t in chain[:3])
    assert vm.phys.read_u64(pte) == 10 * PAGE | P | W | U | A        # no D on a read
    s = spte_for(vm, 0x7000)
    assert s & ADDR == vm.gpa_to_hpa(10 * PAGE) and not s & W
    vc.store_u64(0x7008, 5)
    assert vm.phys.read_u64(pte) == 10 * PAGE | P | W | U | A | D
    assert vm.stats["exit_page_fault"] == 2 and spte_for(vm, 0x7000) & W
    vc.store_u64(0x7010, 6)
    assert vm.stats["exit_page_fault"] == 2
    assert vm.phys.read_u64(10 * PAGE + 8) == 5 and vm.phys.read_u64(10 * PAGE + 16) == 6


def test_read_of_a_dirty_page_maps_it_writable_at_once():
    """A guest PTE with D already set: the hidden fault of a read installs a writable
    leaf (rights = the guest's, SDM 4.6), so a later write does not exit."""
    hv, vm, g = setup()
    g.map(0x7000, 10 * PAGE, P | W | A | D)
    vm.vcpu.write_cr3(g.root)
    vm.vcpu.load_u64(0x7000)
    vm.vcpu.store_u64(0x7000, 1)
    assert vm.stats["exit_page_fault"] == 1


def test_rights_of_the_whole_walk_are_in_the_leaf():
    """SDM 4.6.1: R/W and U/S are ANDed over levels, XD ORed.  A read-only PDE above
    a writable PTE gives a read-only page: a user write is a protection #PF."""
    hv, vm, g = setup()
    g.map(0x7000, 10 * PAGE, P | W | U | D | A)
    pde = g.entry_pa(0x7000, 2)
    vm.phys.write_u64(pde, (vm.phys.read_u64(pde) & ~W) | NX)
    vc = vm.vcpu
    vc.write_cr3(g.root)
    vc.cpu.cpl = 3
    vc.load_u64(0x7000)
    s = spte_for(vm, 0x7000)
    assert s & U and not s & W and s & NX
    with pytest.raises(ptemu.PageFault) as e:
        vc.store_u64(0x7000, 1)
    assert e.value.error_code == bits.PF_P | bits.PF_W | bits.PF_U and e.value.cr2 == 0x7000
    with pytest.raises(ptemu.PageFault) as e:
        vc.access(0x7000, "x")
    assert e.value.error_code == bits.PF_P | bits.PF_U | bits.PF_I


# -- true faults ------------------------------------------------------------------------------
def _native_fault(vm_phys_bytes, cr3, va, access, user):
    mem = ptemu.PhysicalMemory(len(vm_phys_bytes))
    mem.write(0, vm_phys_bytes)
    mmu = ptemu.Mmu(mem, ptemu.CpuState.long_mode(cr3=cr3))
    try:
        mmu.translate(va, access, user=user)
    except ptemu.PageFault as exc:
        return exc.error_code, exc.cr2, mem.read(0, len(vm_phys_bytes))
    return None


@pytest.mark.parametrize("case, va, access, user, ec", [
    ("not present, supervisor read", 0x9000, "r", False, 0),                      # SDM 4.7
    ("not present, user write", 0x9000, "w", True, bits.PF_W | bits.PF_U),
    ("user read of a supervisor page", 0x8000, "r", True, bits.PF_P | bits.PF_U),  # 4.6.1
    ("PS in a PML4E is reserved", 0x8000000000, "r", False, bits.PF_P | bits.PF_RSVD),  # 4.5.4
    ("fetch from an XD page", 0x7000, "x", False, bits.PF_P | bits.PF_I),          # 4.6.1
])
def test_true_faults_reach_the_guest_with_its_error_code(case, va, access, user, ec):
    """The guest's own walk fails: #PF injected with exactly its error code and CR2
    (SDM 4.7), and the guest's memory as native hardware leaves it (SDM 4.8)."""
    hv, vm, g = setup()
    g.map(0x7000, 10 * PAGE, P | W | U | NX)
    g.map(0x8000, 11 * PAGE, P | W)
    vm.phys.write_u64(g.root + 8, g.alloc() | P | W | U | PS)     # PML4[1]: PS (reserved)
    before = vm.phys.read(0, vm.memory_bytes)
    native = _native_fault(before, g.root, va, access, user)
    assert native is not None and native[0] == ec
    vc = vm.vcpu
    vc.write_cr3(g.root)
    vc.cpu.cpl = 3 if user else 0
    with pytest.raises(ptemu.PageFault) as e:
        vc.access(va, access)
    assert (e.value.error_code, e.value.cr2) == (ec, va)
    assert vm.stats["pf_guest"] == 1
    assert vm.phys.read(0, vm.memory_bytes) == native[2]
    assert spte_for(vm, va) is None


def test_run_handles_hidden_faults_and_stops_at_the_true_one():
    """vcpu.run: hidden faults are handled inside; the first true fault stops the
    run with its index, error code and CR2 (the RunResult of Mmu.run)."""
    hv, vm, g = setup()
    for i in range(4):
        g.map(0x10000 + i * PAGE, (20 + i) * PAGE)
    vm.vcpu.write_cr3(g.root)
    tr = np.zeros(7, dtype=ptemu.TRACE_DTYPE)
    tr["va"] = [0x10000, 0x11000, 0x10008, 0x12000, 0x13000, 0x14000, 0x10000]
    tr["access"] = [0, 1, 0, 2, 1, 0, 0]
    r = vm.vcpu.run(tr)
    assert (r.index, r.vector, r.error_code, r.cr2) == (5, 14, 0, 0x14000)
    assert isinstance(r.fault, ptemu.PageFault)
    st = vm.stats
    assert st["pf_fixed"] == 4 and st["pf_guest"] == 1 and st["guest_accesses"] == 5
    # D only where written (SDM 4.8)
    d = [bool(vm.phys.read_u64(g.entry_pa(0x10000 + i * PAGE, 1)) & D) for i in range(4)]
    assert d == [False, True, False, True]
    r = vm.vcpu.run(tr, start=6)
    assert r.index == 7 and vm.stats["exit_page_fault"] == 5


def test_run_rejects_bad_traces():
    hv, vm, g = setup()
    vm.vcpu.write_cr3(g.root)
    with pytest.raises(ptemu.InvalidInput):
        vm.vcpu.run(np.zeros(3, dtype=np.uint64))
    tr = np.zeros(2, dtype=ptemu.TRACE_DTYPE)
    tr["access"][0] = 5
    with pytest.raises(ptemu.InvalidInput, match=r"trace\[0\]: access code 5"):
        vm.vcpu.run(tr)
    # A bad code is refused where the run reaches it, as on the native machine:
    # trace[0] (va 0, unmapped) faults first, and the run stops there.
    tr["access"] = [0, 5]
    r = vm.vcpu.run(tr)
    assert (r.index, r.vector) == (0, 14)
    with pytest.raises(ptemu.InvalidInput, match=r"trace\[1\]: access code 5"):
        vm.vcpu.run(tr, start=1)
    # With paging off no C loop runs: run() itself refuses the code.
    cpu = vm.vcpu.cpu      # (both at once: MOV CR0 cannot clear PG in 64-bit mode)
    cpu._assign(cr0=cpu.cr0 & ~bits.CR0_PG, efer=cpu.efer & ~(bits.EFER_LMA | bits.EFER_LME))
    before = vm.stats["guest_accesses"]
    tr["access"] = [0, 0]
    assert vm.vcpu.run(tr).index == 2
    tr["access"] = [0, 7]
    with pytest.raises(ptemu.InvalidInput, match=r"trace\[1\]: access code 7"):
        vm.vcpu.run(tr)
    assert vm.stats["guest_accesses"] == before + 3
    with pytest.raises(ptemu.InvalidInput):
        vm.vcpu.run(np.zeros(2, dtype=ptemu.TRACE_DTYPE), start=3)


def test_non_canonical_is_gp_without_exit():
    """SDM 4.5.1: a non-canonical address is #GP(0), no walk (no exit either)."""
    hv, vm, g = setup()
    vm.vcpu.write_cr3(g.root)
    with pytest.raises(ptemu.GeneralProtection):
        vm.vcpu.load_u64(0x0000800000000000)
    assert vm.stats["exit_page_fault"] == 0


# -- writes to protected page tables ------------------------------------------------------------
WIN = 0x200000     # the window: in another 2 MiB region, so mapped by another PT


def _window_setup(**kw):
    """va 0x7000 -> gfn 10; the guest's PT page mapped at va WIN (supervisor RW)."""
    hv, vm, g = setup(**kw)
    g.map(0x7000, 10 * PAGE)
    pt = g.table_of(0x7000)
    g.map(WIN, pt, P | W)
    fill_data(vm, range(10, 20))
    vm.vcpu.write_cr3(g.root)
    return hv, vm, g, pt


def test_store_into_a_page_table_is_emulated_and_the_shadow_follows():
    """docs: emulated write.  A synced shadow is exactly coherent after the store:
    an accessed new entry is installed at once (mmu_pte_updated); a not-present
    one drops the translation -- no INVLPG needed to see either."""
    hv, vm, g, pt = _window_setup()
    vc = vm.vcpu
    assert vc.load_u64(0x7000) == 0xD000A
    fixed = vm.stats["pf_fixed"]
    vc.store_u64(WIN + 7 * 8, 11 * PAGE | P | W | U | A)
    st = vm.stats
    assert st["pf_emulate"] == 1 and st["mmu_pte_write"] == 1 and st["mmu_pte_updated"] == 1
    assert vm.phys.read_u64(pt + 7 * 8) == 11 * PAGE | P | W | U | A
    assert spte_for(vm, 0x7000) & ADDR == vm.gpa_to_hpa(11 * PAGE)
    assert vc.load_u64(0x7000) == 0xD000B
    assert vm.stats["pf_fixed"] == fixed             # no hidden fault for 0x7000 again
    vc.store_u64(WIN + 7 * 8, 0)
    assert spte_for(vm, 0x7000) is None
    with pytest.raises(ptemu.PageFault) as e:
        vc.load_u64(0x7000)
    assert e.value.error_code == 0
    assert audit(vm) == []


def test_store_of_an_unaccessed_entry_drops_the_spte():
    """The new gpte has A clear: no spte until the guest's walk sets A (SDM 4.8)."""
    hv, vm, g, pt = _window_setup()
    vc = vm.vcpu
    vc.load_u64(0x7000)
    vc.store_u64(WIN + 7 * 8, 12 * PAGE | P | W | U)
    assert spte_for(vm, 0x7000) is None
    assert vc.load_u64(0x7000) == 0xD000C
    assert vm.phys.read_u64(pt + 7 * 8) == 12 * PAGE | P | W | U | A


def test_write_flooding_unshadows_the_page():
    """Three emulated writes with no use of the page in between (KVM
    write_flooding_count): the shadow page is zapped, the frame unprotected; the
    next write fault maps it writable, after which stores no longer exit."""
    hv, vm, g, pt = _window_setup()
    vc = vm.vcpu
    vc.load_u64(0x7000)
    for i in range(3):
        vc.store_u64(WIN + (100 + i) * 8, 0)
    st = vm.stats
    assert st["mmu_flooded"] == 1 and st["pf_emulate"] == 3
    assert pt >> 12 not in vm.shadow.gfn_sps and pt >> 12 not in vm.shadow.wp
    exits = st["exit_page_fault"]
    vc.store_u64(WIN + 103 * 8, 0)
    assert vm.stats["exit_page_fault"] == exits + 1 and vm.stats["pf_emulate"] == 3
    vc.store_u64(WIN + 104 * 8, 0)
    assert vm.stats["exit_page_fault"] == exits + 1
    assert vc.load_u64(0x7000) == 0xD000A            # rebuilt on demand
    assert audit(vm) == []


def test_use_of_the_page_resets_the_flood_count():
    """A fault filled through the page counts as use: 2 writes, a use, 2 writes:
    not flooded."""
    hv, vm, g, pt = _window_setup()
    g.map(0x6000, 13 * PAGE)
    vc = vm.vcpu
    vc.load_u64(0x7000)
    vc.store_u64(WIN + 100 * 8, 0)
    vc.store_u64(WIN + 101 * 8, 0)
    assert vc.load_u64(0x6000) == 0xD000D            # a hidden fault through the PT
    vc.store_u64(WIN + 102 * 8, 0)
    vc.store_u64(WIN + 103 * 8, 0)
    assert vm.stats["mmu_flooded"] == 0 and pt >> 12 in vm.shadow.wp


def test_use_resets_the_flood_count_of_every_page_on_the_path():
    """docs: hidden fault, step 1 (KVM clears write_flooding_count of each shadow
    page on the way): a fill through an upper table counts as its use too, also
    when the level-1 page comes from the fill cache.  Here the page directory:
    2 writes, a fill through it, 2 writes: not flooded."""
    hv, vm, g, pt = _window_setup()
    pd = g.table_of(0x7000, level=2)
    g.map(0x6000, 13 * PAGE)
    g.map(WIN + PAGE, pd, P | W)
    fill_data(vm, [13])
    vc = vm.vcpu
    vc.load_u64(0x7000)                              # the path, and the cached L1 page
    pd_win = WIN + PAGE
    vc.store_u64(pd_win + 300 * 8, 0)
    vc.store_u64(pd_win + 301 * 8, 0)
    assert vc.load_u64(0x6000) == 0xD000D            # a hidden fault through the PD
    vc.store_u64(pd_win + 302 * 8, 0)
    vc.store_u64(pd_win + 303 * 8, 0)
    assert vm.stats["mmu_flooded"] == 0 and pd >> 12 in vm.shadow.wp
    assert audit(vm) == []


def test_misaligned_write_unshadows_but_a_byte_at_an_entry_start_does_not():
    """KVM detect_write_misaligned: a write straddling two entries zaps the shadow
    page; a 1-byte write at an entry's start (clear_bit) is an entry update."""
    hv, vm, g, pt = _window_setup()
    g.map(0x6000, 13 * PAGE, P | W | U | A)
    vc = vm.vcpu
    vc.load_u64(0x7000)
    vc.load_u64(0x6000)
    vm.phys.write(pt + 6 * 8, b"\x00")              # clears P of the entry for 0x6000
    assert vm.stats["mmu_misaligned"] == 0 and spte_for(vm, 0x6000) is None
    with pytest.raises(ptemu.PageFault):
        vc.load_u64(0x6000)
    vm.phys.write(pt + 7 * 8 + 4, bytes(8))          # entries 7 and 8, half each
    assert vm.stats["mmu_misaligned"] == 1
    assert pt >> 12 not in vm.shadow.gfn_sps
    assert vm.phys.read_u64(pt + 7 * 8) & 0xFFFFFFFF == (10 * PAGE | P | W | U | A) & 0xFFFFFFFF
    assert audit(vm) == []


def test_dma_write_to_a_page_table_keeps_the_shadow_coherent():
    """vm.phys writes are DMA: a write landing on a shadowed frame is a page-table
    write (the contract); the next access sees the new entry."""
    hv, vm, g, pt = _window_setup()
    vc = vm.vcpu
    assert vc.load_u64(0x7000) == 0xD000A
    vm.phys.write_u64(pt + 7 * 8, 14 * PAGE | P | W | U | A)
    assert vc.load_u64(0x7000) == 0xD000E


def test_cr0_wp_clear_supervisor_write_to_read_only_page_is_emulated():
    """SDM 4.6.1: with CR0.WP=0 supervisor writes ignore R/W.  The real CPU keeps
    WP=1 (write protection must hold), so the hypervisor emulates the write."""
    hv, vm, g = setup()
    g.map(0x7000, 10 * PAGE, P | U)
    vc = vm.vcpu
    vc.write_cr3(g.root)
    with pytest.raises(ptemu.PageFault):
        vc.store_u64(0x7000, 1)
    vc.cpu.cr0 = vc.cpu.cr0 & ~bits.CR0_WP
    vc.store_u64(0x7000, 42)
    assert vm.phys.read_u64(10 * PAGE) == 42
    assert vm.stats["pf_emulate"] == 1
    assert vc.real_cpu.cr0 & bits.CR0_WP
    assert vm.stats["root_reload"] == 2               # the first root, then the WP=0 role
    assert spte_for(vm, 0x7000) & W == 0


# -- unsync ---------------------------------------------------------------------------------------
def test_unsync_leaf_table_is_writable_until_the_guest_flushes():
    """KVM unsync: a level-1 table is left writable; its shadow is as fresh as a TLB
    until INVLPG (that entry) or a CR3 load (all), the flush points the SDM requires
    of the guest (4.10.4.3)."""
    hv, vm, g, pt = _window_setup(unsync=True)
    g.map(0x6000, 13 * PAGE, P | W | U | A)
    vc = vm.vcpu
    assert vc.load_u64(0x7000) == 0xD000A
    assert vc.load_u64(0x6000) == 0xD000D
    vc.store_u64(WIN + 7 * 8, 11 * PAGE | P | W | U | A)
    st = vm.stats
    assert st["mmu_unsync"] == 1 and st["pf_emulate"] == 0
    exits = st["exit_page_fault"]
    vc.store_u64(WIN + 6 * 8, 12 * PAGE | P | W | U | A)
    assert vm.stats["exit_page_fault"] == exits      # the table is writable now
    assert vc.load_u64(0x7000) == 0xD000A            # stale, like a TLB entry
    assert vc.load_u64(0x6000) == 0xD000D
    vc.invlpg(0x7000)
    assert vm.stats["mmu_sync_entry"] == 1
    assert vc.load_u64(0x7000) == 0xD000B            # that entry resynced
    assert vc.load_u64(0x6000) == 0xD000D            # the other one not yet
    vc.write_cr3(g.root)
    assert vm.stats["mmu_sync"] == 1 and not vm.shadow.unsync_sps
    assert vc.load_u64(0x6000) == 0xD000C
    assert pt >> 12 in vm.shadow.wp
    vc.store_u64(WIN + 5 * 8, 0)                 # write-protected again: exits
    assert vm.stats["mmu_unsync"] == 2
    assert audit(vm) == []


def test_upper_level_tables_never_go_unsync():
    hv, vm, g = setup(unsync=True)
    g.map(0x7000, 10 * PAGE)
    pd = g.table_of(0x7000, 2)
    g.map(WIN, pd, P | W)
    vc = vm.vcpu
    vc.write_cr3(g.root)
    vc.load_u64(0x7000)
    vc.store_u64(WIN + 100 * 8, 0)
    assert vm.stats["mmu_unsync"] == 0 and vm.stats["pf_emulate"] == 1


# -- INVLPG ----------------------------------------------------------------------------------------
def test_invlpg_reaches_the_real_tlb():
    """SDM 4.10.4.1: INVLPG invalidates the page's TLB entries: the next access
    misses the real TLB (and the exit is counted)."""
    hv, vm, g = setup()
    g.map(0x7000, 10 * PAGE)
    vc = vm.vcpu
    vc.write_cr3(g.root)
    vc.load_u64(0x7000)
    misses = vc.tlb.stats.misses
    vc.load_u64(0x7000)
    assert vc.tlb.stats.misses == misses
    vc.invlpg(0x7000)
    vc.load_u64(0x7000)
    assert vc.tlb.stats.misses == misses + 1
    assert vm.stats["exit_invlpg"] == 1 and vm.stats["invlpg"] == 1


# -- large pages -----------------------------------------------------------------------------------
def test_guest_2m_page_is_shadowed_by_4k_direct_pages():
    """A guest 2 MiB page (PDE with PS, SDM 4.5) backed by scattered 4 KiB host
    frames: one direct level-1 shadow page holds a 4 KiB spte per touched frame;
    A and then D are set in the guest's PDE, the leaf (SDM 4.8)."""
    hv, vm, g = setup()
    pde = g.map(0x200000, 0, P | W | U, level=2)
    fill_data(vm, [3, 5])
    vc = vm.vcpu
    vc.write_cr3(g.root)
    assert vc.load_u64(0x203000) == 0xD0003
    assert vc.load_u64(0x205000) == 0xD0005
    sp = vm.shadow.root.children[0].children[0].children[1]
    assert sp.direct and sp.level == 1 and sp.gfn == 0
    assert spte_for(vm, 0x203000) & ADDR == vm.gpa_to_hpa(3 * PAGE)
    assert spte_for(vm, 0x205000) & ADDR == vm.gpa_to_hpa(5 * PAGE)
    assert not spte_for(vm, 0x205000) & W
    assert vm.phys.read_u64(pde) == P | W | U | PS | A
    vc.store_u64(0x205000, 7)
    assert vm.phys.read_u64(pde) == P | W | U | PS | A | D
    assert spte_for(vm, 0x205000) & W
    assert audit(vm) == []


def test_guest_1g_page_and_addresses_past_memory():
    """A 1 GiB guest page at gpa 0 (PDPTE with PS): inside the VM's 64 frames the
    4 KiB pieces map; past them nothing is ever mapped (isolation) and a load is
    GuestMemoryError, while access() returns the guest-physical address, as the
    native machine's translation does."""
    hv, vm, g = setup()
    g.map(1 << 30, 0, P | W, level=3)
    fill_data(vm, [7])
    vc = vm.vcpu
    vc.write_cr3(g.root)
    assert vc.load_u64((1 << 30) + 7 * PAGE) == 0xD0007
    with pytest.raises(GuestMemoryError) as e:
        vc.load_u64((1 << 30) + 200 * PAGE)
    assert e.value.gpa == 200 * PAGE
    assert isinstance(e.value, ptemu.InvalidInput)
    assert vc.access((1 << 30) + 200 * PAGE + 8) == 200 * PAGE + 8
    assert spte_for(vm, (1 << 30) + 200 * PAGE) is None
    assert vm.stats["pf_mmio"] == 2
    tr = np.zeros(2, dtype=ptemu.TRACE_DTYPE)
    tr["va"] = [(1 << 30) + 300 * PAGE, (1 << 30) + 7 * PAGE]
    assert vc.run(tr).index == 2 and vm.stats["pf_mmio"] == 3
    assert audit(vm) == []


def test_gpte_pointing_outside_memory_is_never_mapped():
    """Isolation: a 4 KiB gpte naming a frame past guest memory gets no spte."""
    hv, vm, g = setup()
    g.map(0x7000, 5000 * PAGE)
    vm.vcpu.write_cr3(g.root)
    with pytest.raises(GuestMemoryError):
        vm.vcpu.store_u64(0x7000, 1)
    assert spte_for(vm, 0x7000) is None
    assert hv.free_frames == 512 - len(vm.host_frames())


# -- shadow memory limit -------------------------------------------------------------------------
def test_shadow_limit_evicts_the_oldest_pages():
    """shadow_limit: at most that many shadow pages; the oldest (not the root) are
    zapped to make room (mmu_recycled), and their host frames go back to the host."""
    hv, vm, g = setup(frames=96, shadow_limit=8)
    vas = [i << 21 for i in range(12)]                # 12 page tables under one PD
    for i, va in enumerate(vas):
        g.map(va, (40 + i) * PAGE)
    fill_data(vm, range(40, 52))
    vc = vm.vcpu
    vc.write_cr3(g.root)
    for i, va in enumerate(vas):
        assert vc.load_u64(va) == 0xD0000 + 40 + i
        assert len(vm.shadow.hash) <= 8
    st = vm.stats
    assert st["mmu_recycled"] >= 12 + 3 - 8 and st["shadow_pages_peak"] <= 8
    for i, va in enumerate(vas):                      # refilled as needed
        assert vc.load_u64(va) == 0xD0000 + 40 + i
    frames_in_use = len(vm.host_frames())
    assert hv.free_frames == 512 - frames_in_use
    assert audit(vm) == []


def test_host_memory_pressure_recycles_shadow_pages():
    hv = Hypervisor(36 * PAGE)          # 27 guest frames in use + 15 shadow pages > 36
    vm = hv.create_vm(64 * PAGE)
    g = GuestTables(vm.phys)
    for i in range(12):
        g.map(i << 21, (40 + i) * PAGE)
    fill_data(vm, range(40, 52))
    vc = vm.vcpu
    vc.write_cr3(g.root)
    for rnd in range(2):
        for i in range(12):
            assert vc.load_u64(i << 21) == 0xD0000 + 40 + i
    assert vm.stats["mmu_recycled"] > 0
    assert audit(vm) == []


# -- prefetch, modes -----------------------------------------------------------------------------
def test_prefetch_maps_accessed_neighbours_only():
    """prefetch=True: the aligned group of 8 around the fault; only gptes already
    accessed (A set), so no A bit owed to a walk is skipped (SDM 4.8)."""
    hv, vm, g = setup(prefetch=True)
    fill_data(vm, [10, 11, 12])                       # backed (KVM: resident) frames
    g.map(0x8000, 10 * PAGE, P | W | U | A)           # index 8
    g.map(0x9000, 11 * PAGE, P | W | U | A)           # index 9: accessed
    g.map(0xA000, 12 * PAGE, P | W | U)               # index 10: not accessed
    vc = vm.vcpu
    vc.write_cr3(g.root)
    vc.load_u64(0x8000)
    assert vm.stats["mmu_prefetch"] == 1
    assert spte_for(vm, 0x9000) and spte_for(vm, 0xA000) is None
    vc.load_u64(0x9000)
    assert vm.stats["exit_page_fault"] == 1
    vc.load_u64(0xA000)
    assert vm.stats["exit_page_fault"] == 2
    assert vm.phys.read_u64(g.entry_pa(0xA000, 1)) & A


def test_smep_applies_through_the_shadow():
    """SDM 4.6.1: with CR4.SMEP a supervisor fetch from a user page is a #PF (P|I);
    the real CPU carries SMEP, so the fault is the guest's, injected."""
    hv, vm, g = setup()
    g.map(0x7000, 10 * PAGE, P | U)
    vc = vm.vcpu
    vc.write_cr3(g.root)
    assert vc.access(0x7000, "x") == 10 * PAGE
    vc.write_cr4(vc.cpu.cr4 | bits.CR4_SMEP)
    assert vm.stats["exit_cr_write"] == 1
    with pytest.raises(ptemu.PageFault) as e:
        vc.access(0x7000, "x")
    assert e.value.error_code == bits.PF_P | bits.PF_I


def test_pcid_is_carried_to_the_real_cr3():
    """SDM 4.10.1: with CR4.PCIDE the PCID is CR3[11:0]; the real CR3 tags the real
    TLB with the guest's PCID, and bit 63 (no flush) is not stored."""
    hv, vm, g = setup()
    vc = vm.vcpu
    vc.write_cr3(g.root)
    vc.write_cr4(vc.cpu.cr4 | bits.CR4_PCIDE)
    vc.write_cr3(g.root | 5 | (1 << 63))
    assert vc.cpu.cr3 == g.root | 5
    assert vc.real_cpu.cr3 == vm.shadow.root.hpa | 5


def test_no_progress_is_a_named_error_not_a_hang(monkeypatch):
    """If the shadow ever failed to converge the vCPU says so (ShadowMmuError)."""
    hv, vm, g = setup()
    g.map(0x7000, 10 * PAGE)
    vm.vcpu.write_cr3(g.root)
    monkeypatch.setattr(vm.vcpu, "page_fault_exit", lambda va, acc, flags: PF_SPURIOUS)
    with pytest.raises(ShadowMmuError):
        vm.vcpu.load_u64(0x7000)
    with pytest.raises(ShadowMmuError):
        vm.vcpu.run(np.array([(0x7008, 0, False)], dtype=TRACE_DTYPE))


def test_five_level_guest():
    """SDM 4.5: with CR4.LA57 the walk has 5 levels (PML5 first); the shadow root
    is a level-5 page and the fill builds four pages below it."""
    hv, vm, g = setup()
    vc = vm.vcpu
    vc.cpu.cr4 = vc.cpu.cr4 | bits.CR4_LA57           # a VM configured for 5-level paging
    pml5 = g.alloc()
    vm.phys.write_u64(pml5 + 8 * 1, g.root | P | W | U)    # PML5[1] -> the 4-level tree
    g.map(0x7000, 10 * PAGE)
    fill_data(vm, [10])
    va = (1 << 48) | 0x7000
    vc.write_cr3(pml5)
    assert vc.load_u64(va) == 0xD000A
    root = vm.shadow.root
    assert root.level == 5 and root.gfn == pml5 >> 12
    assert len(vm.shadow.hash) == 5
    with pytest.raises(ptemu.PageFault) as e:          # PML5[0] not present
        vc.load_u64(0x7000)
    assert e.value.error_code == 0
    with pytest.raises(ptemu.GeneralProtection):       # canonical at 57 bits only
        vc.load_u64(1 << 57)
    assert audit(vm) == []


@pytest.mark.parametrize("how", ["store", "run"])
def test_wp0_supervisor_write_with_pkru_wd_is_allowed(how):
    """SDM 4.6.2: PKRU.WD blocks supervisor-mode writes to user-mode pages only if
    CR0.WP=1.  The real CPU keeps WP=1, so with the guest's WP=0 the real walk
    refuses what the guest's allows: the hypervisor emulates the write (it used
    to loop -- found by the hostile-guest fuzzer, tests/test_fuzz_regressions.py)."""
    hv, vm, g = setup()
    g.map(0x7000, 10 * PAGE, P | W | U)
    vc = vm.vcpu
    vc.write_cr3(g.root)
    vc.write_cr4(vc.cpu.cr4 | bits.CR4_PKE)
    vc.cpu.pkru = 0b10                                # key 0: WD=1
    with pytest.raises(ptemu.PageFault) as e:         # WP=1: refused, PK in the code
        vc.store_u64(0x7000, 1)
    assert e.value.error_code == bits.PF_P | bits.PF_W | bits.PF_PK
    vc.write_cr0(vc.cpu.cr0 & ~bits.CR0_WP)
    if how == "store":
        vc.store_u64(0x7008, 7)
        assert vm.phys.read_u64(10 * PAGE + 8) == 7
    else:
        tr = np.zeros(2, dtype=ptemu.TRACE_DTYPE)
        tr["va"] = [0x7000, 0x7010]
        tr["access"] = 1
        assert vc.run(tr).index == 2
    assert vm.phys.read_u64(g.entry_pa(0x7000, 1)) & D    # the write set D (SDM 4.8)
    assert vm.stats["pf_emulate"] >= 1
    assert audit(vm) == []


@pytest.mark.parametrize("unsync", [False, True], ids=["sync", "unsync"])
@pytest.mark.parametrize("fast_paths", [True, False], ids=["fast", "python"])
def test_five_level_guest_kernel_keeps_the_shadows_coherent(fast_paths, unsync):
    """A 5-level guest kernel (Kernel(levels=5), SDM 4.5) forking, breaking COW,
    unmapping and exiting, with memory above 47 bits (PML5 slot 240): the
    shadow root is a level-5 page of the guest's PML5, every invariant holds
    (audit) in the C fast paths and the Python reference alike, and the values
    the guest reads are those of the native machine."""
    from ptemu.guest import Kernel, NativeMachine, SegmentationFault
    high = 0x00f0000000000000
    seen = []
    for machine in (NativeMachine(8 << 20),
                    Hypervisor(64 << 20).create_vm(8 << 20, unsync=unsync,
                                                   fast_paths=fast_paths)):
        k = Kernel(machine, levels=5)
        a = k.spawn()
        k.mmap(a, 8 * PAGE, "rw", addr=high)
        for i in range(8):
            k.store(a, high + i * PAGE, i + 1)
        b = k.fork(a)
        k.store(b, high + 3 * PAGE, 99)                 # COW break in the child
        k.munmap(a, high + 6 * PAGE, 2 * PAGE)
        got = [k.load(p, high + i * PAGE) for p in (a, b) for i in range(6)]
        try:
            k.load(a, high + 7 * PAGE)
        except SegmentationFault as exc:
            got.append(exc.error_code)
        k.exit(b, 0)
        k.wait(b)
        got.append(k.load(a, high + 3 * PAGE))
        seen.append(got)
        if machine.paging == "shadow":
            sh = machine.shadow
            assert sh.levels == 5 and sh.root.level == 5
            assert sh.root.gfn == k.procs[a].cr3 >> 12
            assert 240 in sh.root.children
            assert audit(machine) == []
    assert seen[0] == seen[1]
    assert seen[0][:6] == [1, 2, 3, 4, 5, 6] and seen[0][6:12] == [1, 2, 3, 99, 5, 6]
    assert seen[0][12] == bits.PF_U and seen[0][13] == 4
