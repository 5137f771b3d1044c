"""Reserved bits in paging-structure entries (Intel SDM Vol. 3A 4.5.4,
tables 4-14..4-20, and 4.7): every rule in its own test.  A reserved bit in
a present entry ends the walk with #PF, error code P|RSVD plus the access
bits (W/R, U/S, I/D); the fault's .level says which entry.

Image layout (PageTableBuilder, bump allocation from 0x1000): PML4 0x1000,
PDPT 0x2000, PD 0x3000, PT 0x4000 for the first mapping.
"""
import pytest

import ptemu
from ptemu import CpuState, Mmu, PhysicalMemory
from ptemu.pagetable import PageTableBuilder

P, W, U, PS, NX = ptemu.PTE_P, ptemu.PTE_W, ptemu.PTE_U, ptemu.PTE_PS, ptemu.PTE_NX
PF_P, PF_W, PF_U, PF_RSVD, PF_I = (ptemu.PF_P, ptemu.PF_W, ptemu.PF_U, ptemu.PF_RSVD,
                                   ptemu.PF_I)
LONG = ptemu.EFER_LME | ptemu.EFER_LMA
PAGING = ptemu.CR0_PG | ptemu.CR0_PE | ptemu.CR0_WP

VA = 0x0000_0000_4060_1000       # PML4 0, PDPT 1, PD 3, PT 1
VA_2M = 0x0000_0000_0040_0000    # PML4 0, PDPT 0, PD 2
VA_1G = 0x0000_0080_0000_0000    # PML4 1, PDPT 0


def setup(nxe=True, maxphyaddr=52, la57=False, **kw):
    mem = PhysicalMemory(1 << 20)
    b = PageTableBuilder(mem, la57=la57)
    efer = LONG | (ptemu.EFER_NXE if nxe else 0)
    cpu = CpuState(cr0=PAGING, cr3=b.cr3,
                   cr4=ptemu.CR4_PAE | (ptemu.CR4_LA57 if la57 else 0) | kw.pop("cr4", 0),
                   efer=efer, maxphyaddr=maxphyaddr, **kw)
    return mem, b, Mmu(mem, cpu)


def rsvd_fault(mmu, va, access="r", user=False, **kw):
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(va, access, user=user, **kw)
    assert ei.value.cause == "reserved-bit"
    return ei.value


def set_bits(b, va, level, mask):
    b.set_entry(va, level, b.get_entry(va, level) | mask)


# ---------------------------------------------------- bits 51:MAXPHYADDR ----

@pytest.mark.parametrize("maxphyaddr", [36, 46])
@pytest.mark.parametrize("level", [1, 2, 3, 4])
@pytest.mark.parametrize("which", ["lowest", "51"])
def test_bits_51_to_maxphyaddr_reserved(maxphyaddr, level, which):
    """SDM 4.5.4 tables 4-15..4-19 ('Reserved (must be 0)' bits 51:M) and
    4.7: bit M (lowest reserved) or bit 51 set in a present entry at any
    level -> #PF P|RSVD, walk stops at that level."""
    mem, b, mmu = setup(maxphyaddr=maxphyaddr)
    b.map(VA, 0x80000, flags=P | W)
    bit = maxphyaddr if which == "lowest" else 51
    set_bits(b, VA, level, 1 << bit)
    f = rsvd_fault(mmu, VA)
    assert f.error_code == PF_P | PF_RSVD
    assert f.level == level


@pytest.mark.parametrize("maxphyaddr", [36, 46])
def test_bit_below_maxphyaddr_is_address(maxphyaddr):
    """SDM 4.5.4: bit M-1 of a PTE is the top address bit, not reserved:
    the translation carries it into the physical address."""
    mem, b, mmu = setup(maxphyaddr=maxphyaddr)
    b.map(VA, 0x80000, flags=P | W)
    set_bits(b, VA, 1, 1 << (maxphyaddr - 1))
    assert mmu.translate(VA + 0x10).pa == (1 << (maxphyaddr - 1)) | 0x80010


def test_maxphyaddr_52_bit_51_is_address():
    """SDM 4.5.4: with MAXPHYADDR = 52 there are no reserved bits 51:M; bit
    51 of a PTE is an address bit."""
    mem, b, mmu = setup(maxphyaddr=52)
    b.map(VA, 0x80000, flags=P | W)
    set_bits(b, VA, 1, 1 << 51)
    assert mmu.translate(VA).pa == (1 << 51) | 0x80000


def test_maxphyaddr_52_bits_62_52_ignored():
    """SDM 4.5.4 table 4-19: PTE bits 58:52 are ignored, 62:59 are the
    protection key (ignored with CR4.PKE=0): never reserved, never address."""
    mem, b, mmu = setup(maxphyaddr=52)
    b.map(VA, 0x80000, flags=P | W)
    set_bits(b, VA, 1, 0x7ff << 52)
    set_bits(b, VA, 2, 0x7ff << 52)
    assert mmu.translate(VA).pa == 0x80000


def test_maxphyaddr_in_large_leaf():
    """SDM 4.5.4 table 4-18: bits 51:M are reserved in a 2 MiB PDE as well."""
    mem, b, mmu = setup(maxphyaddr=39)
    b.map(VA_2M, 0x200000, page_size=1 << 21, flags=P)
    set_bits(b, VA_2M, 2, 1 << 39)
    f = rsvd_fault(mmu, VA_2M)
    assert f.error_code == PF_P | PF_RSVD and f.level == 2


# ------------------------------------------------------ PS in PML4E/PML5E ---

def test_ps_in_pml4e_reserved():
    """SDM 4.5.4 table 4-15: bit 7 of a PML4E is reserved (must be 0); there
    are no 512 GiB pages."""
    mem, b, mmu = setup()
    b.map(VA, 0x80000, flags=P | W)
    set_bits(b, VA, 4, PS)
    f = rsvd_fault(mmu, VA)
    assert f.error_code == PF_P | PF_RSVD and f.level == 4


def test_ps_in_pml5e_reserved():
    """SDM 4.5.4 table 4-14: bit 7 of a PML5E is reserved (must be 0)."""
    mem, b, mmu = setup(la57=True)
    b.map(VA, 0x80000, flags=P | W)
    set_bits(b, VA, 5, PS)
    f = rsvd_fault(mmu, VA)
    assert f.error_code == PF_P | PF_RSVD and f.level == 5


def test_ps_in_pml4e_reserved_under_la57():
    """SDM 4.5.4 table 4-15 applies to the PML4E of a 5-level walk too."""
    mem, b, mmu = setup(la57=True)
    b.map(VA, 0x80000, flags=P | W)
    set_bits(b, VA, 4, PS)
    f = rsvd_fault(mmu, VA)
    assert f.level == 4


# ------------------------------------------------ large-page reserved bits --

@pytest.mark.parametrize("bit", [13, 14, 20, 21, 29])
def test_1g_pdpte_bits_29_13_reserved(bit):
    """SDM 4.5.4 table 4-16: a PDPTE with PS=1 has bits 29:13 reserved
    (bit 12 is PAT, the frame starts at bit 30)."""
    mem, b, mmu = setup()
    b.map(VA_1G, 1 << 30, page_size=1 << 30, flags=P | W)
    set_bits(b, VA_1G, 3, 1 << bit)
    f = rsvd_fault(mmu, VA_1G)
    assert f.error_code == PF_P | PF_RSVD and f.level == 3


@pytest.mark.parametrize("bit", [12, 30])
def test_1g_pdpte_pat_and_frame_bits_not_reserved(bit):
    """SDM 4.5.4 table 4-16: bit 12 (PAT) and bit 30 (frame) of a 1 GiB
    PDPTE are not reserved."""
    mem, b, mmu = setup()
    b.map(VA_1G, 2 << 30, page_size=1 << 30, flags=P | W)
    set_bits(b, VA_1G, 3, 1 << bit)
    expect = (2 << 30) | ((1 << 30) if bit == 30 else 0)
    assert mmu.translate(VA_1G + 5).pa == expect + 5


def test_bits_29_13_of_table_pdpte_are_address():
    """SDM 4.5.4 table 4-17: a PDPTE with PS=0 references a page directory;
    its bits 29:13 are address bits, not reserved."""
    mem, b, mmu = setup()
    b.map(VA, 0x80000, flags=P | W)
    pd = b.get_entry(VA, 3) & 0x000f_ffff_ffff_f000
    # Move the page directory to 0x3e000 (bits 13..17 set) and walk through it.
    mem.write(0x3e000, mem.read(pd, 4096))
    b.set_entry(VA, 3, 0x3e000 | P | W | U)
    assert mmu.translate(VA).pa == 0x80000


@pytest.mark.parametrize("bit", [13, 16, 20])
def test_2m_pde_bits_20_13_reserved(bit):
    """SDM 4.5.4 table 4-18: a PDE with PS=1 has bits 20:13 reserved."""
    mem, b, mmu = setup()
    b.map(VA_2M, 0x200000, page_size=1 << 21, flags=P | W)
    set_bits(b, VA_2M, 2, 1 << bit)
    f = rsvd_fault(mmu, VA_2M)
    assert f.error_code == PF_P | PF_RSVD and f.level == 2


@pytest.mark.parametrize("bit", [12, 21])
def test_2m_pde_pat_and_frame_bits_not_reserved(bit):
    """SDM 4.5.4 table 4-18: bit 12 (PAT) and bit 21 (frame) of a 2 MiB PDE
    are not reserved."""
    mem, b, mmu = setup()
    b.map(VA_2M, 0x400000, page_size=1 << 21, flags=P | W)
    set_bits(b, VA_2M, 2, 1 << bit)
    expect = 0x400000 | ((1 << 21) if bit == 21 else 0)
    assert mmu.translate(VA_2M + 7).pa == expect + 7


def test_bits_20_13_of_table_pde_are_address():
    """SDM 4.5.4 table 4-19: a PDE with PS=0 references a page table; bits
    20:13 are address bits."""
    mem, b, mmu = setup()
    b.map(VA, 0x80000, flags=P | W)
    pt = b.get_entry(VA, 2) & 0x000f_ffff_ffff_f000
    mem.write(0x7e000, mem.read(pt, 4096))         # bits 13..18 set
    b.set_entry(VA, 2, 0x7e000 | P | W | U)
    assert mmu.translate(VA).pa == 0x80000


# ------------------------------------------------------ bit 63 and NXE ------

@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_xd_reserved_when_nxe_clear(level):
    """SDM 4.5.4 (all entry tables, bit 63: 'if IA32_EFER.NXE = 1, XD;
    otherwise reserved') -> with NXE=0 bit 63 at any level is P|RSVD."""
    mem, b, mmu = setup(nxe=False)
    b.map(VA, 0x80000, flags=P | W)
    set_bits(b, VA, level, NX)
    f = rsvd_fault(mmu, VA)
    assert f.error_code == PF_P | PF_RSVD and f.level == level


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_xd_not_reserved_when_nxe_set(level):
    """SDM 4.5.4 / 4.6.1: with NXE=1 bit 63 is XD: reads pass, fetches are
    refused as a protection fault (P|I, no RSVD)."""
    mem, b, mmu = setup(nxe=True)
    b.map(VA, 0x80000, flags=P | W)
    set_bits(b, VA, level, NX)
    assert mmu.translate(VA).pa == 0x80000
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(VA, "x")
    assert ei.value.error_code == PF_P | PF_I
    assert ei.value.cause == "protection"


def test_xd_reserved_in_large_leaves_when_nxe_clear():
    """SDM 4.5.4 tables 4-16, 4-18: bit 63 is reserved in 1 GiB and 2 MiB
    leaves too when NXE=0."""
    mem, b, mmu = setup(nxe=False)
    b.map(VA_1G, 1 << 30, page_size=1 << 30, flags=P | NX)
    b.map(VA_2M, 0x200000, page_size=1 << 21, flags=P | NX)
    assert rsvd_fault(mmu, VA_1G).level == 3
    assert rsvd_fault(mmu, VA_2M).level == 2


# --------------------------------------------------- not-present entries ----

@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_reserved_bits_ignored_when_not_present(level):
    """SDM 4.7 (RSVD: 'reserved bits are not checked in a paging-structure
    entry whose P flag is 0'): a P=0 entry full of reserved bits is a
    not-present fault, error code without P and RSVD."""
    mem, b, mmu = setup(nxe=False, maxphyaddr=36)
    b.map(VA, 0x80000, flags=P | W)
    junk = (((1 << 52) - 1) & ~((1 << 36) - 1)) | NX | PS | 0x3fffe000
    b.set_entry(VA, level, junk)          # P=0
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(VA, "w", user=True)
    assert ei.value.error_code == PF_W | PF_U
    assert ei.value.cause == "not-present"
    assert ei.value.level == level


def test_not_present_pml5e_with_ps_is_not_present():
    """SDM 4.7: PS in a not-present PML5E is not checked."""
    mem, b, mmu = setup(la57=True)
    b.map(VA, 0x80000, flags=P | W)
    b.set_entry(VA, 5, b.get_entry(VA, 5) & ~P | PS)
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(VA)
    assert ei.value.error_code == 0 and ei.value.level == 5


# ------------------------------------------------------- PTE bit 7 (PAT) ----

def test_pte_bit7_is_pat_not_reserved_nor_ps():
    """SDM 4.5.4 table 4-20: bit 7 of a PTE is PAT (processors that support
    PAT, i.e. all 64-bit ones); it is neither reserved nor a page size."""
    mem, b, mmu = setup()
    b.map(VA, 0x80000, flags=P | W | PS)     # bit 7 in the PTE
    assert b.get_entry(VA, 1) & PS
    t = mmu.translate(VA + 0x42)
    assert t.pa == 0x80042
    assert t.page_size == 4096 and t.level == 1


# ------------------------------------------- RSVD reports W/U/I as usual -----

@pytest.mark.parametrize("access,user,nxe,smep,expect", [
    ("r", False, True, False, PF_P | PF_RSVD),
    ("w", False, True, False, PF_P | PF_RSVD | PF_W),
    ("r", True, True, False, PF_P | PF_RSVD | PF_U),
    ("w", True, True, False, PF_P | PF_RSVD | PF_W | PF_U),
    ("x", False, True, False, PF_P | PF_RSVD | PF_I),
    ("x", True, True, False, PF_P | PF_RSVD | PF_U | PF_I),
    # I/D only when NXE=1 or SMEP=1 (SDM 4.7)
    ("x", False, False, False, PF_P | PF_RSVD),
    ("x", True, False, False, PF_P | PF_RSVD | PF_U),
    ("x", False, False, True, PF_P | PF_RSVD | PF_I),
])
def test_reserved_fault_reports_access_bits(access, user, nxe, smep, expect):
    """SDM 4.7: a reserved-bit fault sets P and RSVD, and W/R, U/S and I/D
    describe the access exactly as for any other #PF."""
    mem, b, mmu = setup(nxe=nxe, maxphyaddr=40,
                        cr4=ptemu.CR4_SMEP if smep else 0)
    b.map(VA, 0x80000, flags=P | W | U)
    set_bits(b, VA, 2, 1 << 45)
    f = rsvd_fault(mmu, VA, access, user=user)
    assert f.error_code == expect
    assert f.cr2 == VA


def test_reserved_fault_precedes_rights():
    """SDM 4.7: a reserved bit means there is no translation at all; a user
    access to a supervisor page whose PTE also has a reserved bit reports
    RSVD (P|U|RSVD), the walk never reaching the rights check."""
    mem, b, mmu = setup(maxphyaddr=40)
    b.map(VA, 0x80000, flags=P)              # supervisor, read-only
    set_bits(b, VA, 1, 1 << 40)
    f = rsvd_fault(mmu, VA, "w", user=True)
    assert f.error_code == PF_P | PF_W | PF_U | PF_RSVD


def test_reserved_bit_upper_level_stops_walk():
    """SDM 4.7: the PML4E's reserved bit is found before the (absent) lower
    tables matter: fault at level 4 even though the PDPTE is not present."""
    mem, b, mmu = setup(maxphyaddr=40)
    b.map(VA, 0x80000, flags=P | W)
    b.set_entry(VA, 3, 0)
    set_bits(b, VA, 4, 1 << 41)
    f = rsvd_fault(mmu, VA)
    assert f.level == 4


def test_translate_many_reports_rsvd():
    """The batch path reports the same #PF error code (SDM 4.7)."""
    import numpy as np
    mem, b, mmu = setup(nxe=False)
    b.map(VA, 0x80000, flags=P | W | U)
    b.map(VA + 0x1000, 0x81000, flags=P | W | U | NX)
    r = mmu.translate_many(np.array([VA, VA + 0x1000], dtype=np.uint64), "w", user=True)
    assert r.vector.tolist() == [0, 14]
    assert r.error_code.tolist() == [0, PF_P | PF_W | PF_U | PF_RSVD]
    assert int(r.pa[0]) == 0x80000
