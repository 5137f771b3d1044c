"""The three leaf levels of a 4-level walk, the fields of Translation, paging
off, and mappings() -- on hand-built images, expectations derived from the
Intel SDM Vol. 3A ch. 4 (section cited in each test).

Layout used throughout: PageTableBuilder allocates table frames bump-wise
from 0x1000, so the root (PML4) is at 0x1000 and the tables a first map()
creates are at 0x2000 (PDPT), 0x3000 (PD), 0x4000 (PT) -- the entry
addresses below are computed from that by hand, not read back.
"""
import pytest

import ptemu
from ptemu import bits
from ptemu import CpuState, Mmu, PhysicalMemory
from ptemu.pagetable import PageTableBuilder

P, W, U, A, D, PS, G, NX = (ptemu.PTE_P, ptemu.PTE_W, ptemu.PTE_U, ptemu.PTE_A,
                            ptemu.PTE_D, ptemu.PTE_PS, ptemu.PTE_G, ptemu.PTE_NX)
PAT_LARGE = bits.PTE_PAT_LARGE          # bit 12 of a PDE/PDPTE with PS=1
TBL = P | W | U                         # what the builder puts in table entries
KiB4, MiB2, GiB1 = 1 << 12, 1 << 21, 1 << 30


def va_of(i4, i3, i2, i1, off=0):
    """A lower-half 4-level address from its table indices (SDM 4.5.4)."""
    return (i4 << 39) | (i3 << 30) | (i2 << 21) | (i1 << 12) | off


def setup(size=1 << 22):
    mem = PhysicalMemory(size)
    b = PageTableBuilder(mem)
    mmu = Mmu(mem, CpuState.long_mode(cr3=b.cr3))
    return mem, b, mmu


# ---------------------------------------------------------------- 4 KiB -----

def test_4k_page_walks_four_levels():
    """SDM 4.5.4: PML4E (bits 47:39), PDPTE (38:30), PDE (29:21), PTE (20:12);
    the PTE's frame (bits M-1:12) plus va bits 11:0 is the physical address."""
    mem, b, mmu = setup()
    va = va_of(3, 5, 7, 9, 0xabc)
    assert va == 0x0181_40e0_9abc
    b.map(va & ~0xfff, 0x123000, flags=P | W | U)
    t = mmu.translate(va)
    assert t.pa == 0x123abc
    assert t.va == va
    assert t.page_size == 4096
    assert t.level == 1
    # Entries top first at (table base + 8 * index); values as in memory
    # after the walk, i.e. with A set (SDM 4.8) and no D on a read.
    assert t.entries == [
        (0x1000 + 3 * 8, 0x2000 | TBL | A),
        (0x2000 + 5 * 8, 0x3000 | TBL | A),
        (0x3000 + 7 * 8, 0x4000 | TBL | A),
        (0x4000 + 9 * 8, 0x123000 | P | W | U | A),
    ]
    assert t.leaf == 0x123000 | P | W | U | A
    assert (t.writable, t.user, t.executable) == (True, True, True)


def test_4k_page_offset_and_neighbours():
    """SDM 4.5.4: only bits 11:0 are offset; the next page (PTE index + 1)
    is a different entry and, unmapped, faults not-present (SDM 4.7)."""
    mem, b, mmu = setup()
    b.map(va_of(0, 0, 1, 0), 0x200000, flags=P | W)
    assert mmu.translate(va_of(0, 0, 1, 0, 0xfff)).pa == 0x200fff
    assert mmu.translate(va_of(0, 0, 1, 0, 0)).pa == 0x200000
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(va_of(0, 0, 1, 1, 0))
    assert ei.value.error_code == 0 and ei.value.cause == "not-present"
    assert ei.value.level == 1


# ---------------------------------------------------------------- 2 MiB -----

def test_2m_page_pde_ps():
    """SDM 4.5.4 table 4-18: PDE with PS=1 maps a 2 MiB page; frame is bits
    M-1:21, va bits 20:0 are the offset; the walk reads three entries."""
    mem, b, mmu = setup()
    va = va_of(1, 2, 3, 0x1a5, 0x678)
    b.map(va_of(1, 2, 3, 0), 0x40000000 + 5 * MiB2, page_size=MiB2, flags=P | W)
    t = mmu.translate(va)
    assert t.pa == 0x40000000 + 5 * MiB2 + (0x1a5 << 12) + 0x678
    assert t.page_size == MiB2
    assert t.level == 2
    assert t.entries == [
        (0x1000 + 1 * 8, 0x2000 | TBL | A),
        (0x2000 + 2 * 8, 0x3000 | TBL | A),
        (0x3000 + 3 * 8, (0x40000000 + 5 * MiB2) | P | W | PS | A),
    ]
    assert t.leaf == (0x40000000 + 5 * MiB2) | P | W | PS | A
    assert (t.writable, t.user, t.executable) == (True, False, True)


def test_2m_pat_bit_is_not_address():
    """SDM 4.5.4 table 4-18: in a 2 MiB PDE bit 12 is PAT; the frame is bits
    M-1:21, so setting bit 12 must not move the physical address (and it is
    not a reserved bit: bits 20:13 are)."""
    mem, b, mmu = setup()
    b.map(va_of(0, 0, 4, 0), 0x600000, page_size=MiB2, flags=P | W | PAT_LARGE)
    t = mmu.translate(va_of(0, 0, 4, 0, 0x345))
    assert t.pa == 0x600345
    assert t.leaf & PAT_LARGE


# ---------------------------------------------------------------- 1 GiB -----

def test_1g_page_pdpte_ps():
    """SDM 4.5.4 table 4-16: PDPTE with PS=1 maps a 1 GiB page; frame bits
    M-1:30, va bits 29:0 are the offset; the walk reads two entries."""
    mem, b, mmu = setup()
    va = va_of(2, 7, 0x155, 0x0aa, 0x321)
    b.map(va_of(2, 7, 0, 0), 3 * GiB1, page_size=GiB1, flags=P | W | U | NX)
    t = mmu.translate(va)
    assert t.pa == 3 * GiB1 + (0x155 << 21) + (0x0aa << 12) + 0x321
    assert t.page_size == GiB1
    assert t.level == 3
    assert t.entries == [
        (0x1000 + 2 * 8, 0x2000 | TBL | A),
        (0x2000 + 7 * 8, 3 * GiB1 | P | W | U | PS | NX | A),
    ]
    assert (t.writable, t.user, t.executable) == (True, True, False)


def test_1g_pat_bit_is_not_address():
    """SDM 4.5.4 table 4-16: bit 12 of a 1 GiB PDPTE is PAT, not address."""
    mem, b, mmu = setup()
    b.map(va_of(0, 1, 0, 0), 2 * GiB1, page_size=GiB1, flags=P | PAT_LARGE)
    t = mmu.translate(va_of(0, 1, 0, 0, 0x1234))
    assert t.pa == 2 * GiB1 + 0x1234


def test_pte_bit12_is_address():
    """SDM 4.5.4 table 4-19: in a PTE bit 12 is an address bit (the PAT bit
    of a PTE is bit 7), unlike in large entries."""
    mem, b, mmu = setup()
    b.map(va_of(0, 0, 0, 5), 0x201000, flags=P)
    assert mmu.translate(va_of(0, 0, 0, 5, 8)).pa == 0x201008


def test_rights_fields_are_combined_over_levels():
    """SDM 4.6.1: the translation is writable only if R/W=1 at every level,
    user only if U/S=1 at every level, executable only if XD=0 at every
    level (NXE=1)."""
    mem, b, mmu = setup()
    va = va_of(0, 0, 0, 1)
    b.map(va, 0x300000, flags=P | W | U)
    b.set_entry(va, 3, b.get_entry(va, 3) & ~W)     # PDPTE read-only
    b.set_entry(va, 2, b.get_entry(va, 2) | NX)     # PDE execute-disable
    t = mmu.translate(va)
    assert (t.writable, t.user, t.executable) == (False, True, False)
    b.set_entry(va, 4, b.get_entry(va, 4) & ~U)     # PML4E supervisor
    t = mmu.translate(va)
    assert (t.writable, t.user, t.executable) == (False, False, False)


# ------------------------------------------------------------ paging off ----

@pytest.mark.parametrize("cr0", [0, ptemu.CR0_PE])
def test_paging_off_is_identity(cr0):
    """SDM 4.1.2 / 2.5: with CR0.PG=0 linear addresses are physical; no
    paging structure is read, whatever CR3 points at."""
    mem = PhysicalMemory(1 << 16)
    mem.array[:] = 0xff                  # garbage everywhere, CR3 included
    mmu = Mmu(mem, CpuState(cr0=cr0, cr3=0x1000))
    for va in (0, 0x1234, 0xfff, 0x12345678, 0xdead_beef):
        for acc in "rwx":
            t = mmu.translate(va, acc)
            assert t.pa == va
            assert t.level == 0
            assert t.entries == []
    assert bytes(mem.array) == b"\xff" * (1 << 16)
    assert list(mmu.mappings()) == []


def test_paging_on_is_not_identity():
    """Control for the test above: the same address, with paging on and
    nothing mapped, faults (SDM 4.7)."""
    mem, b, mmu = setup()
    with pytest.raises(ptemu.PageFault):
        mmu.translate(0x1234)


# ------------------------------------------------------------- mappings -----

def test_mappings_ascending_sign_extended():
    """mappings() lists every present leaf in ascending sign-extended
    virtual order (lower half 0x0000... before upper half 0xffff..., as
    QEMU's `info tlb`), with the leaf's pa, size and flag bits (SDM 4.5.4:
    the flags are the bits outside the address field M-1:12)."""
    mem, b, mmu = setup(1 << 24)
    upper_k = 0xffff_ffff_ffff_f000       # PML4 511, last 4 KiB page
    upper_2m = 0xffff_8000_0020_0000      # PML4 256, PD index 1
    low_1g = 0x0000_0040_0000_0000        # PML4 0, PDPT index 256
    low_4k_hi = 0x0000_7fff_ffff_f000     # PML4 255
    low_4k = 0x0000_0000_0040_1000
    low_2m = 0x0000_0000_0060_0000
    # Inserted out of order, so that order comes from the walk, not from us.
    b.map(upper_k, 0x700000, flags=P | W | G)
    b.map(low_4k_hi, 0x701000, flags=P | U | NX)
    b.map(upper_2m, 0x800000, page_size=MiB2, flags=P | W)
    b.map(low_4k, 0x702000, flags=P | W | U, pkey=5)
    b.map(low_1g, 1 * GiB1, page_size=GiB1, flags=P | W | U | D)
    b.map(low_2m, 0xa00000, page_size=MiB2, flags=P)
    b.map(low_4k + 0x1000, 0x703000, flags=W | U)      # not present: not listed
    got = [tuple(m) for m in mmu.mappings()]
    assert got == [
        (low_4k, 0x702000, KiB4, P | W | U | (5 << 59)),
        (low_2m, 0xa00000, MiB2, P | PS),
        (low_1g, GiB1, GiB1, P | W | U | D | PS),
        (low_4k_hi, 0x701000, KiB4, P | U | NX),
        (upper_2m, 0x800000, MiB2, P | W | PS),
        (upper_k, 0x700000, KiB4, P | W | G),
    ]


def test_mappings_large_page_pa_drops_pat():
    """SDM 4.5.4: bit 12 of a large leaf is PAT, so Mapping.pa is the frame
    only."""
    mem, b, mmu = setup()
    b.map(va_of(0, 0, 2, 0), 0x400000, page_size=MiB2, flags=P | PAT_LARGE)
    (m,) = list(mmu.mappings())
    assert m.va == va_of(0, 0, 2, 0)
    assert m.pa == 0x400000
    assert m.page_size == MiB2


def test_mappings_rights_combined():
    """Mapping.writable/user/executable are the rights ANDed/ORed over all
    levels (SDM 4.6.1), like Translation's."""
    mem, b, mmu = setup()
    va = va_of(0, 0, 0, 3)
    b.map(va, 0x300000, flags=P | W | U)
    b.set_entry(va, 2, b.get_entry(va, 2) & ~U | NX)
    (m,) = list(mmu.mappings())
    assert (m.writable, m.user, m.executable) == (True, False, False)
    t = mmu.translate(va)
    assert (t.writable, t.user, t.executable) == (m.writable, m.user, m.executable)


def test_mappings_agree_with_translate():
    """Every listed leaf translates to the listed pa at its first and last
    byte (SDM 4.5.4)."""
    mem, b, mmu = setup(1 << 24)
    b.map(0x1000, 0x5000, flags=P | W)
    b.map(0x200000, 0x400000, page_size=MiB2, flags=P | W)
    b.map(0xffff_8000_0000_0000, 2 * GiB1, page_size=GiB1, flags=P | W)
    ms = list(mmu.mappings())
    assert len(ms) == 3
    for m in ms:
        assert mmu.translate(m.va, update_ad=False).pa == m.pa
        t = mmu.translate(m.va + m.page_size - 1, update_ad=False)
        assert t.pa == m.pa + m.page_size - 1
        assert t.page_size == m.page_size
