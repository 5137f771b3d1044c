"""Paging-structure references outside physical memory.

Hardware reads nonexistent memory as all ones; bits 51:MAXPHYADDR of such a
value are reserved (SDM Vol. 3A 4.5.4), so ptemu defines the result as a
#PF with P|RSVD plus the usual W/R, U/S, I/D bits (SDM 4.7), cause
"outside-memory", and .level = the level of the entry that could not be
read (csrc/walk.c, header comment).  Never a crash, never a write, and the
batch path reports the same (vector 14, same error code).

A leaf frame past the end of memory is not a paging-structure reference:
translation only computes the address (SDM 4.5.4), it does not touch it.
"""
import numpy as np
import pytest

import ptemu
from ptemu import CpuState, Mmu, PhysicalMemory
from ptemu.pagetable import PageTableBuilder

P, W, U, A, D = ptemu.PTE_P, ptemu.PTE_W, ptemu.PTE_U, ptemu.PTE_A, ptemu.PTE_D
fP, fW, fU, fR, fI = ptemu.PF_P, ptemu.PF_W, ptemu.PF_U, ptemu.PF_RSVD, ptemu.PF_I
TBL = P | W | U
VA = 0x0000_0000_4060_1000       # PML4 0, PDPT 1, PD 3, PT 1


def outside(mmu, va, access="r", user=False, level=None):
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(va, access, user=user)
    f = ei.value
    assert f.cause == "outside-memory"
    if level is not None:
        assert f.level == level
    assert f.cr2 == va
    return f.error_code


def same_in_batch(mmu, vas, access, user, ec):
    r = mmu.translate_many(np.array(vas, dtype=np.uint64), access, user=user)
    assert r.vector.tolist() == [14] * len(vas)
    assert r.error_code.tolist() == [ec] * len(vas)
    assert r.pa.tolist() == [0] * len(vas)


@pytest.mark.parametrize("cr3", [0x10000, 0x20000, 0x8000_0000,
                                 0x000f_ffff_ffff_f000])
@pytest.mark.parametrize("access,user,ec", [
    ("r", False, fP | fR),
    ("w", True, fP | fR | fW | fU),
    ("x", False, fP | fR | fI),
])
def test_cr3_past_memory(cr3, access, user, ec):
    """CR3 (the PML4 address) beyond 64 KiB of memory: the very first entry
    read is outside -> P|RSVD + access bits, level 4; memory unchanged."""
    mem = PhysicalMemory(0x10000)
    mem.array[:] = 0x5a
    before = mem.array.copy()
    mmu = Mmu(mem, CpuState.long_mode(cr3=cr3))
    assert outside(mmu, VA, access, user, level=4) == ec
    same_in_batch(mmu, [VA, 0xffff_8000_0000_0000], access, user, ec)
    assert np.array_equal(mem.array, before)


def test_cr3_last_page_inside():
    """Control: a PML4 in the last page of memory is read normally."""
    mem = PhysicalMemory(0x10000)
    cr3 = 0xf000
    with pytest.raises(ptemu.PageFault) as ei:
        Mmu(mem, CpuState.long_mode(cr3=cr3)).translate(0xffff_ff80_0000_0000)
    assert ei.value.cause == "not-present" and ei.value.error_code == 0


def chain(size=0x10000):
    """PML4 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000, page 0x8000."""
    mem = PhysicalMemory(size)
    b = PageTableBuilder(mem)
    b.map(VA, 0x8000, flags=P | W | U)
    return mem, b, Mmu(mem, CpuState.long_mode(cr3=b.cr3))


@pytest.mark.parametrize("level,next_level", [(4, 3), (3, 2), (2, 1)])
@pytest.mark.parametrize("target", [0x10000, 0x7_0000_0000, 0xf_ffff_ffff_f000])
def test_entry_pointing_past_memory(level, next_level, target):
    """A PML4E/PDPTE/PDE whose table lies past the end of memory: the next
    level's entry cannot be read -> P|RSVD (+W/U), fault at the next level;
    no A bit set in the entries read before (the walk failed, SDM 4.8 and
    ptemu's A/D-after-checks order)."""
    mem, b, mmu = chain()
    b.set_entry(VA, level, target | TBL)
    before = mem.array.copy()
    assert outside(mmu, VA, "w", True, level=next_level) == fP | fR | fW | fU
    same_in_batch(mmu, [VA], "w", True, fP | fR | fW | fU)
    assert np.array_equal(mem.array, before)


def test_pte_frame_past_memory_translates():
    """SDM 4.5.4: the PTE's frame is only an address; a 4 KiB page beyond
    the end of memory still translates (the MMU does not read the page), and
    A/D land in the PTE as usual (SDM 4.8)."""
    mem, b, mmu = chain()
    b.set_entry(VA, 1, 0x7_0000_0000 | P | W | U)
    t = mmu.translate(VA + 0x123, "w")
    assert t.pa == 0x7_0000_0123
    assert b.get_entry(VA, 1) == 0x7_0000_0000 | P | W | U | A | D


def test_large_leaf_past_memory_translates():
    """SDM 4.5.4: likewise a 1 GiB leaf far beyond memory."""
    mem, b, mmu = chain()
    b.map(0x0000_0080_0000_0000, 0x40_0000_0000, page_size=1 << 30, flags=P | W)
    assert mmu.translate(0x0000_0080_0000_0042).pa == 0x40_0000_0042


def test_size_not_page_multiple_table_straddles_end():
    """Memory of 0x5008 bytes (a multiple of 8, not of 4096) with a page
    table at 0x5000 straddling the end: its entry 0 (0x5000..0x5007) is
    inside and translates, its entry 1 (0x5008) is outside -> P|RSVD."""
    mem = PhysicalMemory(0x5008)
    b = PageTableBuilder(mem)
    b.map(VA, 0x8000, flags=P | W | U)          # PT at 0x4000, entry 1
    mem.write_u64(0x5000, 0x9000 | P | W)       # the would-be entry 0 of a PT at 0x5000
    b.set_entry(VA, 2, 0x5000 | TBL)            # PDE -> PT at 0x5000
    va0 = VA & ~0x1ff000                        # PT index 0
    assert mmu_of(mem, b).translate(va0 + 4).pa == 0x9004
    before = mem.array.copy()
    ec = outside(mmu_of(mem, b), VA, "r", True, level=1)     # PT index 1: 0x5008
    assert ec == fP | fR | fU
    same_in_batch(mmu_of(mem, b), [VA, va0 + 0x2000], "r", True, fP | fR | fU)
    assert np.array_equal(mem.array, before)


def mmu_of(mem, b):
    return Mmu(mem, CpuState.long_mode(cr3=b.cr3))


def test_last_entry_of_memory_is_readable():
    """The last 8 bytes of memory hold a valid entry (no off-by-one): a PT
    whose entry 511 is the last word of memory."""
    mem = PhysicalMemory(0x6000)
    b = PageTableBuilder(mem)
    va = 0x0000_0000_001f_f000                   # PML4 0, PDPT 0, PD 0, PT 511
    b.map(va, 0x5000, flags=P | W)
    pte = b.entry_pa(va, 1)
    assert pte == 0x4000 + 511 * 8 == mem.size - 0x1000 - 8
    # move the PT to the last page so its entry 511 is the final 8 bytes
    mem.write(0x5000, mem.read(0x4000, 4096))
    b.set_entry(va, 2, 0x5000 | TBL)
    assert 0x5000 + 511 * 8 == mem.size - 8
    t = mmu_of(mem, b).translate(va, "w")
    assert t.pa == 0x5000
    assert mem.read_u64(mem.size - 8) == 0x5000 | P | W | A | D


@pytest.mark.parametrize("size", [8, 16, 0xff8])
def test_tiny_memories(size):
    """Memories smaller than one table (PML4 at 0): entry 0 is inside,
    entry 511 (0xff8..0xfff) is not; both walks fail cleanly."""
    mem = PhysicalMemory(size)
    mmu = Mmu(mem, CpuState.long_mode(cr3=0))
    # PML4 index 0 lies at 0..7 (inside, zero -> not present); index 1 at 8.
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(0)
    assert ei.value.cause == "not-present"
    ec = outside(mmu, 0xffff_ff80_0000_0000, "w", level=4)   # index 511 at 0xff8
    assert ec == fP | fR | fW


def test_la57_pml5_past_memory():
    """The same rule at level 5 (SDM 4.5, CR4.LA57)."""
    mem = PhysicalMemory(0x4000)
    mmu = Mmu(mem, CpuState.long_mode(cr3=0x8000, la57=True))
    assert outside(mmu, 0x0100_0000_0000_0000 - 1, "x", True, level=5) == fP | fR | fU | fI


def test_eager_accessed_outside_memory():
    """With the eager (QEMU-order) option the entries passed before the
    unreadable one get A; nothing outside memory is written, no crash."""
    mem = PhysicalMemory(0x10000)
    b = PageTableBuilder(mem)
    b.map(VA, 0x8000, flags=P | W | U)
    b.set_entry(VA, 2, 0x7_0000_0000 | TBL)
    mmu = Mmu(mem, CpuState.long_mode(cr3=b.cr3, eager_accessed=True))
    outside(mmu, VA, level=1)
    assert b.get_entry(VA, 4) & A and b.get_entry(VA, 3) & A and b.get_entry(VA, 2) & A


def test_walk_entries_reports_read_entries_before_outside():
    """walk_entries (side-effect free) lists the entries read before the
    unreadable one, and the fault."""
    mem, b, mmu = chain()
    b.set_entry(VA, 3, 0x7_0000_0000 | TBL)
    before = mem.array.copy()
    entries, exc = mmu.walk_entries(VA)
    assert isinstance(exc, ptemu.PageFault) and exc.cause == "outside-memory"
    assert entries == [(0x1000, 0x2000 | TBL), (0x2000 + 8, 0x7_0000_0000 | TBL)]
    assert np.array_equal(mem.array, before)


def test_mappings_skips_tables_outside_memory():
    """mappings() does not fail on a table past the end of memory."""
    mem, b, mmu = chain()
    b.map(0x0000_0080_0000_0000, 0x9000, flags=P)
    b.set_entry(VA, 3, 0x7_0000_0000 | TBL)
    assert [(m.va, m.pa) for m in mmu.mappings()] == [(0x0000_0080_0000_0000, 0x9000)]
