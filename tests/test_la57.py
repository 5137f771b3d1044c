"""5-level paging (Intel SDM Vol. 3A 4.5, CR4.LA57=1): the PML5 table is
indexed by linear-address bits 56:48 and its entry references a PML4 table;
below that the walk is the 4-level one.  Hand-built images, expectations from
the SDM sections cited.

Layout (PageTableBuilder, bump allocation from 0x1000): PML5 0x1000, then for
the first mapping PML4 0x2000, PDPT 0x3000, PD 0x4000, PT 0x5000.
"""
import pytest

import ptemu
from ptemu import CpuState, Mmu, PhysicalMemory
from ptemu.pagetable import PageTableBuilder

P, W, U, A, D, PS, NX = (ptemu.PTE_P, ptemu.PTE_W, ptemu.PTE_U, ptemu.PTE_A,
                         ptemu.PTE_D, ptemu.PTE_PS, ptemu.PTE_NX)
TBL = P | W | U
MiB2, GiB1 = 1 << 21, 1 << 30


def va5(i5, i4, i3, i2, i1, off=0):
    """A 57-bit linear address from its indices (SDM 4.5.4),
    sign-extended from bit 56."""
    va = (i5 << 48) | (i4 << 39) | (i3 << 30) | (i2 << 21) | (i1 << 12) | off
    if va >> 56:
        va |= 0xff << 56
    return va


def setup(size=1 << 21, **kw):
    mem = PhysicalMemory(size)
    b = PageTableBuilder(mem, la57=True)
    return mem, b, Mmu(mem, CpuState.long_mode(cr3=b.cr3, la57=True, **kw))


def test_4k_five_levels():
    """SDM 4.5.4: PML5E (bits 56:48) -> PML4E (47:39) -> PDPTE (38:30) ->
    PDE (29:21) -> PTE (20:12); five entries read."""
    mem, b, mmu = setup()
    va = va5(0x12, 3, 5, 7, 9, 0xabc)
    assert va == 0x0012_0181_40e0_9abc
    b.map(va & ~0xfff, 0x123000, flags=P | W | U)
    t = mmu.translate(va, "w")
    assert t.pa == 0x123abc
    assert (t.page_size, t.level) == (4096, 1)
    assert t.entries == [
        (0x1000 + 0x12 * 8, 0x2000 | TBL | A),
        (0x2000 + 3 * 8, 0x3000 | TBL | A),
        (0x3000 + 5 * 8, 0x4000 | TBL | A),
        (0x4000 + 7 * 8, 0x5000 | TBL | A),
        (0x5000 + 9 * 8, 0x123000 | P | W | U | A | D),
    ]


def test_2m_five_levels():
    """SDM 4.5.4 table 4-18 under LA57: PDE.PS=1 -> 2 MiB page, 4 entries."""
    mem, b, mmu = setup()
    va = va5(1, 2, 3, 4, 0x155, 0x678)
    b.map(va5(1, 2, 3, 4, 0), 7 * MiB2, page_size=MiB2, flags=P | W)
    t = mmu.translate(va)
    assert t.pa == 7 * MiB2 + (0x155 << 12) + 0x678
    assert (t.page_size, t.level, len(t.entries)) == (MiB2, 2, 4)
    assert t.entries[0] == (0x1000 + 1 * 8, 0x2000 | TBL | A)
    assert t.entries[-1] == (0x4000 + 4 * 8, 7 * MiB2 | P | W | PS | A)


def test_1g_five_levels():
    """SDM 4.5.4 table 4-16 under LA57: PDPTE.PS=1 -> 1 GiB page, 3 entries."""
    mem, b, mmu = setup()
    va = va5(0x1ff, 0x1ff, 0x1ff, 0x12, 0x34, 0x56)       # upper half
    assert va == 0xffff_ffff_c243_4056
    b.map(va5(0x1ff, 0x1ff, 0x1ff, 0, 0), 5 * GiB1, page_size=GiB1, flags=P | W)
    t = mmu.translate(va)
    assert t.pa == 5 * GiB1 + (0x12 << 21) + (0x34 << 12) + 0x56
    assert (t.page_size, t.level, len(t.entries)) == (GiB1, 3, 3)
    assert t.entries[0] == (0x1000 + 0x1ff * 8, 0x2000 | TBL | A)


def test_pml5_index_is_bits_56_48():
    """SDM 4.5.4: bits 56:48 choose the PML5E; addresses that differ only in
    bit 48 or only in bit 55 use different PML5 entries and so different
    pages."""
    mem, b, mmu = setup()
    b.map(va5(0, 0, 0, 0, 1), 0x100000, flags=P)
    b.map(va5(1, 0, 0, 0, 1), 0x101000, flags=P)
    b.map(va5(0x80, 0, 0, 0, 1), 0x102000, flags=P)
    assert mmu.translate(0x0000_0000_0000_1000).pa == 0x100000
    assert mmu.translate(0x0001_0000_0000_1000).pa == 0x101000
    assert mmu.translate(0x0080_0000_0000_1000).pa == 0x102000
    e = mmu.translate(0x0080_0000_0000_1000).entries
    assert e[0][0] == 0x1000 + 0x80 * 8
    # bit 49 set: PML5 index 2, not mapped -> not-present at level 5
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(0x0002_0000_0000_1000)
    assert ei.value.level == 5 and ei.value.error_code == 0


def test_same_root_read_as_pml4_without_la57():
    """SDM 4.5: CR4.LA57 decides whether CR3 points at a PML5 or a PML4
    table: the same image walked 4-level takes the PML5E as a PML4E, so
    the address resolves differently (here: to the page mapped for
    PML4 index 0 of the other interpretation)."""
    mem, b, mmu = setup()
    b.map(va5(0, 0, 0, 0, 1), 0x100000, flags=P)
    assert mmu.translate(0x1000).pa == 0x100000
    mmu.cpu.cr4 = mmu.cpu.cr4 & ~ptemu.CR4_LA57     # plain state change
    # 4-level: PML4 = 0x1000 (was PML5), PDPT = 0x2000 (was PML4),
    # PD = 0x3000 (was PDPT), PT = 0x4000 (was PD): PT[1] is empty.
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(0x1000)
    assert ei.value.level == 1
    # and va 0 reads PT index 0 = the PD's entry 0, which points at 0x5000
    t = mmu.translate(0x0)
    assert t.pa == 0x5000 and t.level == 1


def test_pml5e_ps_reserved():
    """SDM 4.5.4 table 4-14: PML5E bit 7 is reserved: P|RSVD at level 5."""
    mem, b, mmu = setup()
    va = va5(3, 0, 0, 0, 0)
    b.map(va, 0x100000, flags=P | W)
    b.set_entry(va, 5, b.get_entry(va, 5) | PS)
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(va, "w", user=True)
    assert ei.value.error_code == ptemu.PF_P | ptemu.PF_RSVD | ptemu.PF_W | ptemu.PF_U
    assert ei.value.level == 5 and ei.value.cause == "reserved-bit"


def test_pml5e_maxphyaddr_and_xd_reserved():
    """SDM 4.5.4 table 4-14: bits 51:M and (NXE=0) bit 63 of a PML5E are
    reserved."""
    mem, b, mmu = setup(maxphyaddr=40)
    va = va5(3, 0, 0, 0, 0)
    b.map(va, 0x100000, flags=P | W)
    orig = b.get_entry(va, 5)
    b.set_entry(va, 5, orig | (1 << 40))
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(va)
    assert ei.value.error_code == ptemu.PF_P | ptemu.PF_RSVD and ei.value.level == 5
    b.set_entry(va, 5, orig | NX)
    mmu.translate(va)                                   # NXE=1: XD, fine for reads
    mmu.cpu.efer = mmu.cpu.efer & ~ptemu.EFER_NXE
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(va)
    assert ei.value.error_code == ptemu.PF_P | ptemu.PF_RSVD and ei.value.level == 5


def test_pml5e_not_present():
    """SDM 4.7: a P=0 PML5E is a not-present fault at level 5."""
    mem, b, mmu = setup()
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(va5(7, 0, 0, 0, 0), "x", user=True)
    assert ei.value.error_code == ptemu.PF_U | ptemu.PF_I
    assert ei.value.level == 5


def test_pml5e_rights_combine():
    """SDM 4.6.1: U/S, R/W of the PML5E are ANDed with the others and its XD
    ORed, like any level's."""
    mem, b, mmu = setup()
    va = va5(4, 0, 0, 0, 0)
    b.map(va, 0x100000, flags=P | W | U)
    e5 = b.get_entry(va, 5)
    b.set_entry(va, 5, e5 & ~U)
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(va, "r", user=True)
    assert ei.value.error_code == ptemu.PF_P | ptemu.PF_U
    b.set_entry(va, 5, e5 & ~W)
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(va, "w")
    assert ei.value.error_code == ptemu.PF_P | ptemu.PF_W
    b.set_entry(va, 5, e5 | NX)
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(va, "x")
    assert ei.value.error_code == ptemu.PF_P | ptemu.PF_I
    t = mmu.translate(va, "r", user=True)
    assert (t.user, t.writable, t.executable) == (True, True, False)


def test_pml5e_gets_accessed():
    """SDM 4.8: A is set in the PML5E too."""
    mem, b, mmu = setup()
    va = va5(9, 1, 1, 1, 1)
    b.map(va, 0x100000, flags=P | W)
    assert not b.get_entry(va, 5) & A
    mmu.translate(va)
    assert b.get_entry(va, 5) & A


@pytest.mark.parametrize("va,pa", [
    (0xff00_0000_0000_0000, 0x100000),        # PML5 index 0x100
    (0xff80_0000_0020_0000, 0x200000),        # PML5 index 0x180, 2 MiB
    (0xffff_8000_0000_0000, 0x40000000),      # PML5 index 0x1ff, PML4 256, 1 GiB
    (0xffff_ffff_ffff_f000, 0x101000),        # all indices 511
])
def test_upper_half(va, pa):
    """SDM 4.5.4: an upper-half 57-bit address walks with the PML5 index in
    bits 56:48 (bit 56 set: index >= 256); translation as usual."""
    mem, b, mmu = setup()
    size = 4096 if pa < 0x200000 else (MiB2 if pa < GiB1 else GiB1)
    b.map(va, pa, page_size=size, flags=P | W)
    i5 = (va >> 48) & 0x1ff
    t = mmu.translate(va + 0x18)
    assert t.pa == pa + 0x18
    assert t.entries[0][0] == 0x1000 + i5 * 8
    assert i5 >= 0x100


def test_mappings_five_level_order():
    """mappings() under LA57: sign extension from bit 56 (not 47); lower half
    first, then upper half, each ascending."""
    mem, b, mmu = setup()
    b.map(0xffff_ffff_ffff_f000, 0x104000, flags=P)
    b.map(0x0100_0000_0000_0000 - 0x1000, 0x103000, flags=P)   # top of lower half
    b.map(0xff00_0000_0000_0000, 0x102000, flags=P)
    b.map(0x0000_8000_0000_0000, 0x101000, flags=P)
    got = [(m.va, m.pa) for m in mmu.mappings()]
    assert got == [(0x0000_8000_0000_0000, 0x101000),
                   (0x00ff_ffff_ffff_f000, 0x103000),
                   (0xff00_0000_0000_0000, 0x102000),
                   (0xffff_ffff_ffff_f000, 0x104000)]
