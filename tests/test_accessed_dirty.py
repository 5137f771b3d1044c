"""Accessed and dirty flags (Intel SDM Vol. 3A 4.8): A in every entry the
walk used, D only in the leaf and only on a write; both sticky.  ptemu sets
them only once every check has passed (Bochs order, DESIGN.md); the
eager_accessed option asks for QEMU's order, where A is set in each
non-leaf entry as the walk passes it, even if the walk then faults.

Image layout (PageTableBuilder, bump allocation from 0x1000): PML4 0x1000,
PDPT 0x2000, PD 0x3000, PT 0x4000 for the first mapping; the entry
addresses for VA below are computed by hand from its indices.
"""
import numpy as np
import pytest

import ptemu
from ptemu import CpuState, Mmu, PhysicalMemory
from ptemu.pagetable import PageTableBuilder

P, W, U, A, D, PS, NX = (ptemu.PTE_P, ptemu.PTE_W, ptemu.PTE_U, ptemu.PTE_A,
                         ptemu.PTE_D, ptemu.PTE_PS, ptemu.PTE_NX)
TBL = P | W | U

VA = 0x0000_0000_4060_1000       # PML4 0, PDPT 1, PD 3, PT 1
# Entry addresses of VA's walk: table base + 8 * index.
E4, E3, E2, E1 = 0x1000 + 0 * 8, 0x2000 + 1 * 8, 0x3000 + 3 * 8, 0x4000 + 1 * 8
VA_2M = 0x0000_0000_0040_0000    # PML4 0, PDPT 0 (new PD), PD 2


def setup(eager=False, **kw):
    mem = PhysicalMemory(1 << 20)
    b = PageTableBuilder(mem)
    mmu = Mmu(mem, CpuState.long_mode(cr3=b.cr3, eager_accessed=eager, **kw))
    return mem, b, mmu


def snapshot(mem):
    return mem.array.copy()


def assert_unchanged(mem, before):
    changed = np.flatnonzero(mem.array != before)
    assert changed.size == 0, "memory changed at %s" % [hex(i) for i in changed[:8]]


def test_layout_assumption():
    """The hand-computed entry addresses are where the builder put VA's
    entries (guards the constants the other tests use)."""
    mem, b, mmu = setup()
    b.map(VA, 0x80000, flags=P | W | U)
    assert [b.entry_pa(VA, lvl) for lvl in (4, 3, 2, 1)] == [E4, E3, E2, E1]


def test_read_sets_a_everywhere_no_d():
    """SDM 4.8: the processor sets A in every paging-structure entry used
    for the translation; a read sets no D."""
    mem, b, mmu = setup()
    b.map(VA, 0x80000, flags=P | W | U)
    mmu.translate(VA, "r")
    assert mem.read_u64(E4) == 0x2000 | TBL | A
    assert mem.read_u64(E3) == 0x3000 | TBL | A
    assert mem.read_u64(E2) == 0x4000 | TBL | A
    assert mem.read_u64(E1) == 0x80000 | P | W | U | A


def test_fetch_sets_a_no_d():
    """SDM 4.8: D is for writes only; an instruction fetch sets A only."""
    mem, b, mmu = setup()
    b.map(VA, 0x80000, flags=P | W | U)
    mmu.translate(VA, "x")
    assert mem.read_u64(E1) == 0x80000 | P | W | U | A
    assert not mem.read_u64(E2) & D


def test_write_sets_d_in_leaf_only():
    """SDM 4.8: a write sets D in the entry that maps the page (the leaf)
    and nowhere else (bit 6 of a non-leaf entry is ignored, never set)."""
    mem, b, mmu = setup()
    b.map(VA, 0x80000, flags=P | W | U)
    mmu.translate(VA, "w")
    assert mem.read_u64(E1) == 0x80000 | P | W | U | A | D
    for epa, nxt in ((E4, 0x2000), (E3, 0x3000), (E2, 0x4000)):
        assert mem.read_u64(epa) == nxt | TBL | A


@pytest.mark.parametrize("page_size,leaf_level", [(1 << 21, 2), (1 << 30, 3)])
def test_write_sets_d_in_large_leaf(page_size, leaf_level):
    """SDM 4.8: for a 2 MiB / 1 GiB page the PDE / PDPTE is the leaf and gets
    D; the entries above get A only."""
    mem, b, mmu = setup()
    va = 0x0000_0080_0000_0000
    b.map(va, page_size, page_size=page_size, flags=P | W)
    leaf = b.entry_pa(va, leaf_level)
    mmu.translate(va + 0x123, "w")
    assert mem.read_u64(leaf) == page_size | P | W | PS | A | D
    for lvl in range(4, leaf_level, -1):
        e = mem.read_u64(b.entry_pa(va, lvl))
        assert e & A and not e & D


def test_entries_in_translation_show_new_bits():
    """Translation.entries are the values as in memory after the walk."""
    mem, b, mmu = setup()
    b.map(VA, 0x80000, flags=P | W | U)
    t = mmu.translate(VA, "w")
    assert t.entries == [(E4, 0x2000 | TBL | A), (E3, 0x3000 | TBL | A),
                         (E2, 0x4000 | TBL | A), (E1, 0x80000 | P | W | U | A | D)]
    assert t.leaf == 0x80000 | P | W | U | A | D


def test_only_entries_of_the_walk_are_touched():
    """SDM 4.8: entries that were not used (the neighbouring PTE) keep A=0;
    nothing else in memory changes."""
    mem, b, mmu = setup()
    b.map(VA, 0x80000, flags=P | W | U)
    b.map(VA + 0x1000, 0x81000, flags=P | W | U)
    before = snapshot(mem)
    mmu.translate(VA, "w")
    changed = sorted(set(np.flatnonzero(mem.array != before).tolist()))
    # A (bit 5) and D (bit 6) live in byte 0 of each entry.
    assert changed == [E4, E3, E2, E1]
    assert mem.read_u64(E1 + 8) == 0x81000 | P | W | U


def test_ad_sticky():
    """SDM 4.8: the processor never clears A or D; a read through a dirty
    leaf leaves D set, and entries with A already set are not changed."""
    mem, b, mmu = setup()
    b.map(VA, 0x80000, flags=P | W | U | A | D)
    for lvl in (4, 3, 2):
        b.set_entry(VA, lvl, b.get_entry(VA, lvl) | A)
    before = snapshot(mem)
    mmu.translate(VA, "r")
    mmu.translate(VA, "x")
    mmu.translate(VA, "w")
    assert_unchanged(mem, before)
    assert mem.read_u64(E1) == 0x80000 | P | W | U | A | D


def test_second_write_keeps_d():
    """SDM 4.8: D once set stays set across later reads and writes."""
    mem, b, mmu = setup()
    b.map(VA, 0x80000, flags=P | W | U)
    mmu.translate(VA, "w")
    mmu.translate(VA, "r")
    assert mem.read_u64(E1) & (A | D) == A | D


# ------------------------------------------------ no writes on a fault ------

@pytest.mark.parametrize("clear_level", [1, 2, 3])
def test_not_present_fault_writes_nothing(clear_level):
    """DESIGN.md (Bochs order, SDM 4.8 leaves it to the implementation):
    a not-present fault below upper levels that were already read sets no
    A bit anywhere."""
    mem, b, mmu = setup()
    b.map(VA, 0x80000, flags=P | W | U)
    b.set_entry(VA, clear_level, 0)
    before = snapshot(mem)
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(VA, "w")
    assert ei.value.level == clear_level
    assert_unchanged(mem, before)


def test_reserved_fault_at_lower_level_writes_nothing():
    """A reserved-bit fault in the PTE, after PML4E/PDPTE/PDE were read and
    found valid: no A anywhere (SDM 4.7 RSVD; ptemu order)."""
    mem, b, mmu = setup()
    b.map(VA, 0x80000, flags=P | W | U)
    b.set_entry(VA, 1, b.get_entry(VA, 1) | (1 << 51))
    mmu.cpu.maxphyaddr = 40
    before = snapshot(mem)
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(VA, "w")
    assert ei.value.cause == "reserved-bit"
    assert_unchanged(mem, before)


@pytest.mark.parametrize("access,user,flags", [
    ("r", True, P | W),            # user read of a supervisor leaf
    ("w", True, P | U),            # user write to a read-only leaf
    ("w", False, P),               # supervisor write, WP=1
    ("x", False, P | W | NX),      # fetch from XD page
])
def test_protection_fault_at_leaf_writes_nothing(access, user, flags):
    """A walk that reads every entry and then fails the rights check of SDM
    4.6 sets neither A nor D anywhere (ptemu's default order)."""
    mem, b, mmu = setup()
    b.map(VA, 0x80000, flags=flags)
    before = snapshot(mem)
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(VA, access, user=user)
    assert ei.value.cause == "protection"
    assert_unchanged(mem, before)


def test_protection_fault_from_upper_level_writes_nothing():
    """U/S=0 in the PDPTE makes a user access fail after the whole walk
    (SDM 4.6.1): still nothing written."""
    mem, b, mmu = setup()
    b.map(VA, 0x80000, flags=P | W | U)
    b.set_entry(VA, 3, b.get_entry(VA, 3) & ~U)
    before = snapshot(mem)
    with pytest.raises(ptemu.PageFault):
        mmu.translate(VA, "r", user=True)
    assert_unchanged(mem, before)


def test_pk_fault_writes_nothing():
    """A protection-key fault (SDM 4.6.2) is a rights failure: no A/D."""
    mem, b, mmu = setup(cr4=ptemu.CR4_PKE, pkru=0x3 << 6)
    b.map(VA, 0x80000, flags=P | W | U, pkey=3)
    before = snapshot(mem)
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(VA, "w", user=True)
    assert ei.value.error_code & ptemu.PF_PK
    assert_unchanged(mem, before)


# ------------------------------------------------------- update_ad=False ----

@pytest.mark.parametrize("eager", [False, True])
def test_update_ad_false_writes_nothing(eager):
    """update_ad=False is a probe: a successful write translation and a
    faulting one leave memory as it was, eager option or not."""
    mem, b, mmu = setup(eager=eager)
    b.map(VA, 0x80000, flags=P | W | U)
    b.map(VA + 0x1000, 0x81000, flags=P | U)
    before = snapshot(mem)
    t = mmu.translate(VA, "w", update_ad=False)
    assert t.pa == 0x80000
    assert t.entries[-1] == (E1, 0x80000 | P | W | U)      # as in memory: no A/D
    with pytest.raises(ptemu.PageFault):
        mmu.translate(VA + 0x1000, "w", user=True, update_ad=False)
    r = mmu.translate_many([VA, VA + 0x1000], "w", user=True, update_ad=False)
    assert r.vector.tolist() == [0, 14]
    assert_unchanged(mem, before)


def test_translate_many_sets_ad():
    """The batch path sets A/D as the scalar one does (SDM 4.8)."""
    mem, b, mmu = setup()
    b.map(VA, 0x80000, flags=P | W | U)
    b.map(VA + 0x1000, 0x81000, flags=P | W | U)
    mmu.translate_many(np.array([VA, VA + 0x1000], dtype=np.uint64),
                       np.array([1, 0], dtype=np.uint8))
    assert mem.read_u64(E1) == 0x80000 | P | W | U | A | D
    assert mem.read_u64(E1 + 8) == 0x81000 | P | W | U | A


# ---------------------------------------------------------- eager (QEMU) ----

def test_eager_sets_upper_a_before_not_present_fault():
    """eager_accessed (QEMU's mmu_translate order): A is set in the PML4E,
    PDPTE and PDE as the walk passes them, then the PTE is found not present;
    the A bits stay."""
    mem, b, mmu = setup(eager=True)
    b.map(VA, 0x80000, flags=P | W | U)
    b.set_entry(VA, 1, 0)
    with pytest.raises(ptemu.PageFault):
        mmu.translate(VA, "w")
    assert mem.read_u64(E4) == 0x2000 | TBL | A
    assert mem.read_u64(E3) == 0x3000 | TBL | A
    assert mem.read_u64(E2) == 0x4000 | TBL | A
    assert mem.read_u64(E1) == 0


def test_eager_reserved_entry_not_marked():
    """QEMU order: an entry is marked after its P and reserved-bit checks,
    so a PDE with a reserved bit gets no A while the PML4E and PDPTE do."""
    mem, b, mmu = setup(eager=True, maxphyaddr=40)
    b.map(VA, 0x80000, flags=P | W | U)
    b.set_entry(VA, 2, b.get_entry(VA, 2) | (1 << 45))
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(VA)
    assert ei.value.cause == "reserved-bit" and ei.value.level == 2
    assert mem.read_u64(E4) & A and mem.read_u64(E3) & A
    assert not mem.read_u64(E2) & A
    assert not mem.read_u64(E1) & A


def test_eager_protection_fault_marks_upper_levels_not_leaf():
    """QEMU order: on a rights failure at the end of the walk the non-leaf
    entries have A (set on the way down); the leaf is marked only after the
    rights check passed, so it keeps A=0 and D=0."""
    mem, b, mmu = setup(eager=True)
    b.map(VA, 0x80000, flags=P | U)              # read-only
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(VA, "w", user=True)
    assert ei.value.cause == "protection"
    for epa in (E4, E3, E2):
        assert mem.read_u64(epa) & A
    assert mem.read_u64(E1) == 0x80000 | P | U


def test_eager_2m_leaf_not_marked_on_fault():
    """QEMU order for a 2 MiB leaf: A is set in the PDE only after the rights
    check (QEMU's do_check_protect path)."""
    mem, b, mmu = setup(eager=True)
    b.map(VA_2M, 0x200000, page_size=1 << 21, flags=P)      # supervisor
    with pytest.raises(ptemu.PageFault):
        mmu.translate(VA_2M, "r", user=True)
    assert mem.read_u64(b.entry_pa(VA_2M, 3)) & A
    assert not mem.read_u64(b.entry_pa(VA_2M, 2)) & A


def test_eager_success_same_result_as_default():
    """On success the eager order ends in the same memory state: A in every
    entry, D in the leaf on a write (SDM 4.8)."""
    states = []
    for eager in (False, True):
        mem, b, mmu = setup(eager=eager)
        b.map(VA, 0x80000, flags=P | W | U)
        mmu.translate(VA, "w")
        states.append(mem.array.copy())
    assert np.array_equal(states[0], states[1])
    assert states[1][E1] == (P | W | U | A | D)
