"""The TLB model itself: geometry, replacement, the L1/L2 hierarchy, the
paging-structure caches and the statistics (SDM Vol. 3A 4.10.2, 4.10.3).

Expectations are counted by hand: a cold 4-level walk of a 4 KiB page reads
4 entries (SDM 4.5.4: PML4E, PDPTE, PDE, PTE); a PDE-cache hit leaves only
the PTE to read (SDM 4.10.3.2), a PDPTE-cache hit the PDE and the PTE, a
PML4E-cache hit three.
"""
import numpy as np
import pytest

import ptemu
from ptemu import (CpuState, Mmu, PhysicalMemory, Tlb, TlbArray, InvalidInput, PageFault,
                   PTE_P, PTE_W, PTE_U, PTE_A, PTE_D, PTE_G, PTE_NX, CR4_SMAP, CR4_PGE)
from ptemu._native import ffi
from ptemu.pagetable import PageTableBuilder

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
RW = PTE_P | PTE_W
BASE = 0x0000_4000_0000_0000           # PML4 index 128; 1 GiB, 2 MiB aligned


def make(tlb, la57=False, cr4=0):
    mem = PhysicalMemory(4 * MiB)
    pt = PageTableBuilder(mem, la57=la57, table_start=0x1000, table_end=2 * MiB)
    cpu = CpuState.long_mode(cr3=pt.cr3, la57=la57, cr4=cr4)
    return mem, pt, Mmu(mem, cpu, tlb)


def one_array(entries, ways, sizes=("4K", "2M", "1G"), psc=None):
    return Tlb([TlbArray("t", 1, "unified", sizes, entries, ways)], psc=psc)


# ---------------------------------------------------------------------------
# Geometry validation
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("arrays,psc,words", [
    ([TlbArray("a", 1, "data", ("4K",), 10, 4)], None, "multiple"),
    ([TlbArray("a", 1, "data", ("4K",), 24, 4)], None, "power of two"),   # 6 sets
    ([TlbArray("a", 1, "data", ("4M",), 16, 4)], None, "page size"),
    ([TlbArray("a", 1, "data", (), 16, 4)], None, "no page size"),
    ([TlbArray("a", 1, "code", ("4K",), 16, 4)], None, "kind"),
    ([TlbArray("a", 3, "data", ("4K",), 16, 4)], None, "tier"),
    ([TlbArray("a", 1, "data", ("4K",), 0, 4)], None, "positive"),
    ([TlbArray("a", 1, "data", ("4K",), 16, 0)], None, "positive"),
    ([TlbArray("a", 1, "data", ("4K",), -16, 4)], None, "positive"),
    ([TlbArray("a", 1, "data", ("4K",), 16.0, 4)], None, "integer"),
    ([TlbArray("a%d" % i, 1, "data", ("4K",), 4, 4) for i in range(9)], None, "at most 8"),
    ([], None, "at least one"),
    ([TlbArray("a", 1, "data", ("4K",), 16, 4)], {1: (4, 4)}, "levels 2..5"),
    ([TlbArray("a", 1, "data", ("4K",), 16, 4)], {6: (4, 4)}, "levels 2..5"),
    ([TlbArray("a", 1, "data", ("4K",), 16, 4)], {2: (12, 4)}, "power of two"),
    ([TlbArray("a", 1, "data", ("4K",), 16, 4)], {2: (6, 4)}, "multiple"),
])
def test_bad_geometry_is_invalid_input(arrays, psc, words):
    with pytest.raises(InvalidInput, match=words):
        Tlb(arrays, psc=psc)


def test_invalid_input_is_a_value_error():
    with pytest.raises(ValueError):
        Tlb([TlbArray("a", 1, "data", ("4K",), 10, 4)])


def test_eight_arrays_are_allowed_and_fully_associative_works():
    t = Tlb([TlbArray("a%d" % i, 1, "data", ("4K",), 4, 4) for i in range(8)])
    assert len(t.arrays) == 8
    assert t.valid_entries() == 0
    with pytest.raises(InvalidInput, match="no TLB array named"):
        t.valid_entries("nope")


def test_default_shape():
    """Tlb.default(): split first-level I/D arrays per page size, a unified
    second level, and PDE/PDPTE/PML4E/PML5E caches (SDM 4.10.3.1)."""
    t = Tlb.default()
    arrays = {a.name: a for a in t.arrays}
    assert len(arrays) <= 8
    for a in t.arrays:
        sets = a.entries // a.ways
        assert a.entries % a.ways == 0 and sets & (sets - 1) == 0
    firsts = [a for a in t.arrays if a.tier == 1]
    seconds = [a for a in t.arrays if a.tier == 2]
    assert {a.kind for a in firsts} == {"data", "fetch"}
    assert all(a.kind == "unified" for a in seconds)
    # every page size has a data array at each level of the hierarchy
    for size in ("4K", "2M", "1G"):
        assert any(size in a.sizes and a.kind == "data" for a in firsts)
        assert any(size in a.sizes for a in seconds)
    assert sum(a.entries for a in seconds) > sum(a.entries for a in firsts if a.kind == "data")
    assert sorted(t.psc_geometry) == [2, 3, 4, 5]
    s = t.stats
    assert set(s.psc) == {"pde", "pdpte", "pml4e", "pml5e"}
    assert set(s.arrays) == set(arrays)
    assert t.valid_entries() == 0


def test_default_tlb_fills_both_levels_by_kind():
    """A data read fills a first-level data array and the second level; a
    fetch fills a first-level fetch array; a data array never answers a
    fetch (SDM 4.10.2.2: TLBs may be for instruction fetches only)."""
    t = Tlb.default()
    mem, pt, mmu = make(t)
    pt.map(BASE, 0x200000, 4096, RW)
    mmu.translate(BASE, "r")
    assert t.valid_entries("dtlb_4k") == 1 and t.valid_entries("stlb") == 1
    assert t.valid_entries("itlb_4k") == 0
    t.reset_stats()
    mmu.translate(BASE, "x")                   # ITLB miss, STLB hit, ITLB refilled
    s = t.stats
    assert s.by_access["fetch"] == {"lookups": 1, "l1_hits": 0, "l2_hits": 1, "misses": 0}
    assert t.valid_entries("itlb_4k") == 1
    assert s.walks == 0


# ---------------------------------------------------------------------------
# Replacement: LRU within a set
# ---------------------------------------------------------------------------

def test_lru_replacement_in_a_set():
    """8 entries, 4 ways: 2 sets indexed by bit 12 of the address.  Five
    even pages fill set 0 and one more; the least recently used goes."""
    t = one_array(8, 4, ("4K",))
    mem, pt, mmu = make(t)
    pages = [BASE + 2 * k * 4096 for k in range(5)]      # all in set 0
    odd = BASE + 4096                                    # set 1
    for k, va in enumerate(pages):
        pt.map(va, 0x200000 + k * 4096, 4096, RW)
    pt.map(odd, 0x300000, 4096, RW)
    for va in pages[:4]:
        mmu.translate(va)
    assert t.stats.arrays["t"]["evictions"] == 0
    assert mmu.translate(pages[0]).tlb_hit               # page 0 is now the most recent
    mmu.translate(odd)                                   # set 1: no effect on set 0
    assert t.stats.arrays["t"]["evictions"] == 0
    mmu.translate(pages[4])                              # evicts page 1, the LRU
    assert t.stats.arrays["t"]["evictions"] == 1
    assert t.valid_entries() == 5
    for va in (pages[0], pages[2], pages[3], pages[4], odd):
        assert mmu.translate(va).tlb_hit, hex(va)
    assert not mmu.translate(pages[1]).tlb_hit


@pytest.mark.parametrize("ways", [1, 2, 3, 4, 8, 12, 16])
@pytest.mark.parametrize("clock", [0, (1 << 60) - 40])
def test_lru_victims_match_a_model(ways, clock):
    """One fully associative set of each associativity the C core treats
    apart (2, 4 and 12 unrolled, the rest looped), from a fresh clock and
    from one that crosses 2^60 halfway -- where the victim search changes
    form (csrc/tlb.c oldest_way): after each access exactly the pages a
    least-recently-used list of `ways` holds are cached, in any order of
    accesses."""
    t = one_array(ways, ways, ("4K",))
    t._c.arr[0].clock = clock
    mem, pt, mmu = make(t)
    pages = [BASE + k * 4096 for k in range(ways + 3)]
    for k, va in enumerate(pages):
        pt.map(va, 0x200000 + k * 4096, 4096, RW)
    rng = np.random.default_rng(ways)
    lru = []                                # least recently used first
    evictions = 0
    for step in range(80):
        va = pages[int(rng.integers(0, len(pages)))]
        hit = va in lru
        assert mmu.translate(va).tlb_hit == hit, (step, hex(va))
        if hit:
            lru.remove(va)
        elif len(lru) == ways:
            lru.pop(0)
            evictions += 1
        lru.append(va)
    assert t.stats.arrays["t"]["evictions"] == evictions
    assert t.valid_entries() == len(lru)
    if clock:
        assert t._c.arr[0].clock > 1 << 60  # both forms were used


def test_fill_prefers_an_invalid_way():
    """After INVLPG frees a way in a full set, the next fill takes it and
    evicts nothing."""
    t = one_array(4, 4, ("4K",))
    mem, pt, mmu = make(t)
    pages = [BASE + k * 4096 for k in range(5)]
    for k, va in enumerate(pages):
        pt.map(va, 0x200000 + k * 4096, 4096, RW)
    for va in pages[:4]:
        mmu.translate(va)
    mmu.invlpg(pages[3])
    mmu.translate(pages[4])
    assert t.stats.arrays["t"]["evictions"] == 0
    assert all(mmu.translate(va).tlb_hit for va in pages[:3])


def test_refill_of_a_cached_page_overwrites_it():
    """A D-bit re-walk refills the same page: no second copy, no eviction."""
    t = one_array(4, 4, ("4K",))
    mem, pt, mmu = make(t)
    pt.map(BASE, 0x200000, 4096, RW)
    mmu.translate(BASE, "r")
    mmu.translate(BASE, "w")
    assert t.valid_entries() == 1
    s = t.stats.arrays["t"]
    assert (s["fills"], s["evictions"]) == (2, 0)


# ---------------------------------------------------------------------------
# Two levels
# ---------------------------------------------------------------------------

def two_level():
    return Tlb([TlbArray("l1", 1, "data", ("4K",), 4, 4),        # 1 set of 4
                TlbArray("l2", 2, "unified", ("4K",), 16, 4)])   # 4 sets of 4


def test_l2_hit_refills_l1():
    t = two_level()
    mem, pt, mmu = make(t)
    pages = [BASE + k * 4096 for k in range(5)]
    for k, va in enumerate(pages):
        pt.map(va, 0x200000 + k * 4096, 4096, RW)
    for va in pages:
        mmu.translate(va)                      # page 0 falls out of L1, stays in L2
    assert t.valid_entries("l1") == 4 and t.valid_entries("l2") == 5
    t.reset_stats()
    tr = mmu.translate(pages[0] + 0x10)
    assert tr.tlb_hit and tr.pa == 0x200010 and tr.mem_refs == 0
    s = t.stats
    assert (s.l1_hits, s.l2_hits, s.misses, s.walks) == (0, 1, 0, 0)
    assert s.arrays["l1"] == {"hits": 0, "misses": 1, "fills": 1, "evictions": 1}
    assert s.arrays["l2"]["hits"] == 1
    tr = mmu.translate(pages[0])
    assert tr.tlb_hit
    assert t.stats.l1_hits == 1 and t.stats.l2_hits == 1


def test_fetch_skips_data_only_l1():
    """A fetch never probes a data-only array; the unified L2 answers it and,
    with no first-level fetch array, nothing is refilled."""
    t = two_level()
    mem, pt, mmu = make(t)
    pt.map(BASE, 0x200000, 4096, RW)
    mmu.translate(BASE, "r")
    t.reset_stats()
    assert mmu.translate(BASE, "x").tlb_hit
    s = t.stats
    assert s.by_access["fetch"] == {"lookups": 1, "l1_hits": 0, "l2_hits": 1, "misses": 0}
    assert s.arrays["l1"]["misses"] == 0 and s.arrays["l1"]["fills"] == 0


def test_invalidation_reaches_the_second_level():
    """SDM 4.10.4.1: INVLPG invalidates the page in every TLB, not only L1."""
    t = two_level()
    mem, pt, mmu = make(t)
    pt.map(BASE, 0x200000, 4096, RW)
    mmu.translate(BASE)
    pt.map(BASE, 0x300000, 4096, RW)
    mmu.invlpg(BASE)
    assert t.valid_entries() == 0
    assert mmu.translate(BASE).pa == 0x300000


# ---------------------------------------------------------------------------
# Paging-structure caches and walk costs
# ---------------------------------------------------------------------------

def test_walk_refs_with_psc_hits_at_each_level():
    """SDM 4.10.3.2: a walk starts below the deepest PSC hit.  Per-level PSC
    stats: a probe of a level that misses counts a miss; probing stops at
    the first (deepest) hit."""
    t = one_array(64, 4, psc={2: (16, 4), 3: (4, 4), 4: (2, 2), 5: (2, 2)})
    mem, pt, mmu = make(t)
    a = BASE                                   # cold
    b = BASE + 0x1000                          # same 2 MiB region -> PDE cache
    c = BASE + 2 * MiB                         # same 1 GiB region -> PDPTE cache
    d = BASE + GiB                             # same 512 GiB region -> PML4E cache
    for k, va in enumerate((a, b, c, d)):
        pt.map(va, 0x200000 + k * 4096, 4096, RW)
    refs = [mmu.translate(va).mem_refs for va in (a, b, c, d)]
    assert refs == [4, 1, 2, 3]
    s = t.stats
    assert (s.walks, s.walk_refs) == (4, 10)
    assert s.refs_per_walk == 2.5
    assert s.psc["pde"] == {"hits": 1, "misses": 3, "fills": 3, "evictions": 0}
    assert s.psc["pdpte"] == {"hits": 1, "misses": 2, "fills": 2, "evictions": 0}
    assert s.psc["pml4e"] == {"hits": 1, "misses": 1, "fills": 1, "evictions": 0}
    assert s.psc["pml5e"] == {"hits": 0, "misses": 0, "fills": 0, "evictions": 0}
    assert mmu.translate(b).mem_refs == 0 and t.stats.walks == 4


@pytest.mark.parametrize("size,refs", [(4096, 4), (2 * MiB, 3), (GiB, 2)])
def test_cold_walk_costs_by_page_size(size, refs):
    """SDM 4.5.4: a 4 KiB page takes PML4E, PDPTE, PDE, PTE; a 2 MiB page
    stops at the PDE; a 1 GiB page at the PDPTE."""
    t = Tlb.simple()
    mem, pt, mmu = make(t)
    pt.map(BASE, 0x4000_0000, size, RW)
    tr = mmu.translate(BASE + 0x123)
    assert tr.mem_refs == refs and tr.page_size == size and tr.pa == 0x4000_0123
    assert len(tr.entries) == refs
    assert (t.stats.walks, t.stats.walk_refs) == (1, refs)


def test_five_level_walk_and_pml5e_cache():
    """SDM 4.5: 5-level paging reads a PML5E first (5 references cold); a
    PML5E-cache hit saves one."""
    t = Tlb.simple()
    mem, pt, mmu = make(t, la57=True)
    a = 0x0080_0000_0000_0000                  # PML5 index 1
    b = a + (1 << 39)                          # same PML5E, other PML4E
    pt.map(a, 0x200000, 4096, RW)
    pt.map(b, 0x201000, 4096, RW)
    assert mmu.translate(a).mem_refs == 5
    assert mmu.translate(b).mem_refs == 4
    assert t.stats.psc["pml5e"]["hits"] == 1
    assert t.valid_psc_entries(5) == 1


@pytest.mark.parametrize("la57,level,refs", [
    (False, 2, 2), (False, 3, 3), (False, 4, 4),
    (True, 2, 2), (True, 3, 3), (True, 4, 4), (True, 5, 5),
])
def test_psc_entries_of_neighbouring_regions_do_not_collide(la57, level, refs):
    """SDM 4.10.3.1: a PSC entry is for the linear-address bits above the
    level's index (PML4E cache: bits 47:39, ...).  Two regions whose index
    at `level` differs by one (even, then odd) must not share an entry: the
    second walk reads `level` entries (every cache above it hits, its own
    level misses) and reaches its own frame."""
    t = Tlb.simple()
    mem, pt, mmu = make(t, la57=la57)
    shift = 12 + 9 * (level - 1)
    a = 0x0000_4000_0000_0000 if not la57 else 0x0080_0000_0000_0000
    b = a + (1 << shift)
    pt.map(a, 0x200000, 4096, RW)
    pt.map(b, 0x201000, 4096, RW)
    assert mmu.translate(a).mem_refs == (5 if la57 else 4)
    tr = mmu.translate(b)
    assert tr.pa == 0x201000
    assert tr.mem_refs == refs


def test_without_psc_every_walk_is_full():
    t = Tlb.simple(psc=False)
    mem, pt, mmu = make(t)
    pt.map(BASE, 0x200000, 4096, RW)
    pt.map(BASE + 0x1000, 0x201000, 4096, RW)
    assert [mmu.translate(va).mem_refs for va in (BASE, BASE + 0x1000)] == [4, 4]
    assert t.stats.psc == {}


def test_faulting_walk_counts_its_refs_and_caches_nothing():
    """A walk that stops at a not-present PDE made 3 references; nothing is
    cached (SDM 4.10.2.3: only translations with P=1 everywhere)."""
    t = Tlb.simple()
    mem, pt, mmu = make(t)
    pt.map(BASE, 0x200000, 4096, RW)
    pt.set_entry(BASE, 2, 0)
    with pytest.raises(PageFault):
        mmu.translate(BASE)
    s = t.stats
    assert (s.walks, s.walk_refs) == (1, 3)
    assert t.valid_entries() == 0


# ---------------------------------------------------------------------------
# Rights are checked per access on a hit (SDM 4.10.2.2, 4.6)
# ---------------------------------------------------------------------------

def test_user_access_to_cached_supervisor_page_faults():
    t = Tlb.simple()
    mem, pt, mmu = make(t)
    pt.map(BASE, 0x200000, 4096, RW | PTE_A | PTE_D)
    mmu.translate(BASE, "r", user=False)
    with pytest.raises(PageFault) as ei:
        mmu.translate(BASE, "r", user=True)
    assert ei.value.error_code == ptemu.PF_P | ptemu.PF_U
    assert t.stats.walks == 1                  # decided from the cached rights


def test_smap_applies_to_cached_user_page():
    """SDM 4.6.1: SMAP is a property of the access, not of the entry; setting
    CR4.SMAP (no flush, SDM 4.10.4.1) makes a cached user page fault for a
    supervisor read, unless RFLAGS.AC=1."""
    t = Tlb.simple()
    mem, pt, mmu = make(t)
    pt.map(BASE, 0x200000, 4096, RW | PTE_U | PTE_A | PTE_D)
    mmu.translate(BASE, "r", user=False)
    mmu.write_cr4(mmu.cpu.cr4 | CR4_SMAP)
    mmu.cpu.ac = True
    assert mmu.translate(BASE, "r", user=False).tlb_hit
    mmu.cpu.ac = False
    with pytest.raises(PageFault) as ei:
        mmu.translate(BASE, "r", user=False)
    assert ei.value.error_code == ptemu.PF_P


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------

def test_flushes_are_counted_by_cause():
    t = Tlb.simple()
    mem, pt, mmu = make(t, cr4=CR4_PGE)
    pt.map(BASE, 0x200000, 4096, PTE_P)
    mmu.write_cr3(mmu.cpu.cr3)
    mmu.write_cr3(mmu.cpu.cr3)
    mmu.write_cr4(mmu.cpu.cr4 & ~CR4_PGE)
    mmu.invlpg(BASE)
    mmu.invlpg(BASE + 0x1000)
    mmu.invlpg(BASE + 0x2000)
    mmu.invpcid(3, 0)
    mmu.translate(BASE)
    with pytest.raises(PageFault):
        mmu.translate(BASE, "w")
    t.flush_all()
    s = t.stats
    assert s.flushes_by_cause == {"cr3": 2, "cr4": 1, "cr0": 0, "invlpg": 3, "invpcid": 1,
                                  "page_fault": 1, "user": 1}
    assert s.flushes == 9
    assert s.fault_invalidations == 1
    assert t.valid_entries() == 0


def test_flushes_reach_every_set_of_an_array_larger_than_its_occupancy_map():
    """A flush sweeps only the sets the occupancy map marks (csrc/tlb.c); an
    array of 2,048 sets has sets s, s + 512, ... on one bit.  MOV CR3 with
    PCIDE=0 drops every non-global entry and keeps the global ones (SDM
    4.10.4.1, CR4.PGE=1): pages 512 apart, one global and one not, share a
    bit, so the sweep must visit both sets and keep the bit for the global
    one, which a later flush must then find."""
    t = Tlb([TlbArray("big", 1, "data", ("4K",), 4096, 2)], psc={2: (16, 4)})
    assert int(ffi.sizeof(t._c.arr[0].occ)) * 8 < 2048
    mem, pt, mmu = make(t, cr4=CR4_PGE)
    n = 1536
    for i in range(n):
        pt.map(BASE + i * 4096, i * 4096, 4096, RW | PTE_A | (PTE_G if i // 512 == 1 else 0))
    for i in range(n):
        mmu.translate(BASE + i * 4096)
    assert t.valid_entries() == n
    for i in range(n):                      # remap every page: the TLB keeps the old ones
        pt.map(BASE + i * 4096, (n + i) * 4096, 4096,
               RW | PTE_A | (PTE_G if i // 512 == 1 else 0))
    mmu.write_cr3(mmu.cpu.cr3)
    assert t.valid_entries() == 512
    for i in range(n):
        old, new = i * 4096, (n + i) * 4096
        assert mmu.translate(BASE + i * 4096).pa == (old if i // 512 == 1 else new), i
    assert t.valid_entries() == n
    mmu.write_cr3(mmu.cpu.cr3)              # the global entries survive a second sweep too
    assert t.valid_entries() == 512
    t.flush_all()
    assert t.valid_entries() == 0
    assert all(mmu.translate(BASE + i * 4096).pa == (n + i) * 4096 for i in range(n))


def test_lookup_counters_by_access_kind():
    t = Tlb.simple()
    mem, pt, mmu = make(t)
    pt.map(BASE, 0x200000, 4096, RW)
    for acc in ("r", "r", "w", "w", "x"):
        mmu.translate(BASE, acc)
    s = t.stats
    # r: miss, hit; w: hit with D=0 (re-walk), hit; x: hit
    assert s.by_access["read"] == {"lookups": 2, "l1_hits": 1, "l2_hits": 0, "misses": 1}
    assert s.by_access["write"] == {"lookups": 2, "l1_hits": 2, "l2_hits": 0, "misses": 0}
    assert s.by_access["fetch"] == {"lookups": 1, "l1_hits": 1, "l2_hits": 0, "misses": 0}
    assert (s.lookups, s.hits, s.misses) == (5, 4, 1)
    assert s.hit_rate == 0.8
    assert (s.walks, s.dirty_rewalks) == (2, 1)


def test_probe_translation_does_not_touch_the_tlb():
    """update_ad=False is a side-effect-free probe: no lookup, no fill."""
    t = Tlb.simple()
    mem, pt, mmu = make(t)
    pt.map(BASE, 0x200000, 4096, RW)
    tr = mmu.translate(BASE, update_ad=False)
    assert tr.pa == 0x200000 and not tr.tlb_hit
    assert t.valid_entries() == 0 and t.stats.lookups == 0 and t.stats.walks == 0


def test_reset_stats_keeps_entries():
    t = Tlb.simple()
    mem, pt, mmu = make(t)
    pt.map(BASE, 0x200000, 4096, RW)
    mmu.translate(BASE)
    mmu.invlpg(BASE + 0x1000)
    mmu.translate(BASE + 0x1000 - 8)
    t.reset_stats()
    s = t.stats
    assert (s.lookups, s.hits, s.misses, s.walks, s.walk_refs, s.flushes) == (0,) * 6
    assert all(v == 0 for a in s.arrays.values() for v in a.values())
    assert all(v == 0 for a in s.psc.values() for v in a.values())
    assert s.hit_rate == 0.0 and s.refs_per_walk == 0.0
    assert t.valid_entries() == 1
    assert mmu.translate(BASE).tlb_hit
    assert t.stats.hits == 1


# ---------------------------------------------------------------------------
# A TLB is invisible when nothing changes
# ---------------------------------------------------------------------------

def _mixed_image():
    mem = PhysicalMemory(4 * MiB)
    pt = PageTableBuilder(mem, table_start=0x1000, table_end=2 * MiB)
    pt.map(BASE, 0x200000, 4096, RW)                           # supervisor RW
    pt.map(BASE + 0x1000, 0x201000, 4096, PTE_P)               # read-only
    pt.map(BASE + 0x2000, 0x202000, 4096, RW | PTE_U)          # user RW
    pt.map(BASE + 0x3000, 0x203000, 4096, RW | PTE_U | PTE_NX)  # user, no exec
    pt.map(BASE + 2 * MiB, 0x400000, 2 * MiB, RW | PTE_U)      # 2 MiB
    pt.map(BASE + GiB, 0x4000_0000, GiB, PTE_P | PTE_U)        # 1 GiB, read-only
    # BASE + 0x4000: not present
    vas = [BASE + 0x10, BASE + 0x1008, BASE + 0x2ff0, BASE + 0x3000, BASE + 0x4000,
           BASE + 2 * MiB + 0x12345, BASE + GiB + 0x3456789, 0x0000_8000_0000_0000]
    return mem, pt, vas


@pytest.mark.parametrize("tlb", [Tlb.simple, Tlb.default, lambda: one_array(2, 1)],
                         ids=["simple", "default", "tiny"])
def test_tlb_gives_the_same_results_as_no_tlb(tlb):
    """With no paging-structure change, a TLB changes nothing visible:
    translations, faults, error codes, and A/D bits in memory (SDM 4.10.2:
    a TLB entry is the translation the walk gives)."""
    mem_a, pt, vas = _mixed_image()
    mem_b = PhysicalMemory(mem_a.size)
    mem_b.array[:] = mem_a.array
    cpu = CpuState.long_mode(cr3=pt.cr3)
    with_tlb = Mmu(mem_a, cpu, tlb())
    without = Mmu(mem_b, cpu.copy())
    rng = np.random.default_rng(7)
    seq_va = np.array([vas[i] for i in rng.integers(0, len(vas), 300)], dtype=np.uint64)
    seq_acc = rng.integers(0, 3, 300).astype(np.uint8)
    for user in (False, True):
        for _ in range(2):                     # cold, then warm
            ra = with_tlb.translate_many(seq_va, seq_acc, user=user)
            rb = without.translate_many(seq_va, seq_acc, user=user)
            assert np.array_equal(ra.vector, rb.vector)
            assert np.array_equal(ra.error_code, rb.error_code)
            assert np.array_equal(ra.pa, rb.pa)
        for va, acc in zip(seq_va[:60].tolist(), seq_acc[:60].tolist()):
            a = "rwx"[acc]
            out = []
            for m in (with_tlb, without):
                try:
                    tr = m.translate(va, a, user=user)
                    out.append((tr.pa, tr.page_size, tr.level, tr.writable, tr.user,
                                tr.executable))
                except ptemu.MmuFault as exc:
                    out.append((type(exc), exc.error_code, getattr(exc, "cr2", None)))
            assert out[0] == out[1], (hex(va), a, user)
    assert np.array_equal(mem_a.array, mem_b.array)
    assert with_tlb.tlb.stats.hits > 0
