"""Canonical linear addresses (Intel SDM Vol. 3A 4.5.1 and 3.3.7.1): with
4-level paging bits 63:47 must all equal bit 47 (48-bit linear addresses);
with 5-level paging (CR4.LA57) bits 63:56 must equal bit 56.  Any other
address is a #GP(0) before any paging structure is read: no walk, no A bit,
no CR2 (PageFault is never raised).
"""
import numpy as np
import pytest

import ptemu
from ptemu import CpuState, Mmu, PhysicalMemory
from ptemu.pagetable import PageTableBuilder

P, W, U, A = ptemu.PTE_P, ptemu.PTE_W, ptemu.PTE_U, ptemu.PTE_A


def setup(la57=False):
    mem = PhysicalMemory(1 << 21)
    b = PageTableBuilder(mem, la57=la57)
    return mem, b, Mmu(mem, CpuState.long_mode(cr3=b.cr3, la57=la57))


def map_page_of(b, va, pa):
    b.map(va & ~0xfff, pa, flags=P | W | U)


# ------------------------------------------------------------ 4-level -------

@pytest.mark.parametrize("va,pa", [
    (0x0000_7fff_ffff_ffff, 0x100fff),      # highest lower-half address
    (0x0000_0000_0000_0000, 0x101000),      # lowest
    (0xffff_8000_0000_0000, 0x102000),      # lowest upper-half address
    (0xffff_ffff_ffff_ffff, 0x103fff),      # highest
])
def test_48bit_canonical_translate(va, pa):
    """SDM 3.3.7.1: bits 63:47 all 0 or all 1 -> canonical, translated."""
    mem, b, mmu = setup()
    map_page_of(b, va, pa & ~0xfff)
    assert mmu.translate(va).pa == pa


@pytest.mark.parametrize("va", [
    0x0000_8000_0000_0000,      # one past the lower half
    0xffff_7fff_ffff_ffff,      # one below the upper half
    0x8000_0000_0000_0000,      # bit 63 alone
    0x0001_0000_0000_0000,      # bit 48 alone
    0x7fff_ffff_ffff_ffff,
    0xfffe_ffff_ffff_f000,      # bits 63:49 set, 48 clear, 47 set
    0x00ff_ffff_ffff_ffff,      # canonical only under LA57
])
@pytest.mark.parametrize("access", ["r", "w", "x"])
def test_48bit_non_canonical_gp(va, access):
    """SDM 4.5.1: a non-canonical address is #GP(0) for every kind of access
    and mode; it never becomes a #PF."""
    mem, b, mmu = setup()
    with pytest.raises(ptemu.GeneralProtection):
        mmu.translate(va, access)
    with pytest.raises(ptemu.GeneralProtection):
        mmu.translate(va, access, user=True)


def test_gp_even_when_low_bits_index_a_mapped_page():
    """SDM 4.5.1: 0x0000800000000000 has the same bits 47:0 as the mapped
    upper-half page 0xffff800000000000 (PML4 index 256), but it is not
    canonical: #GP, not an alias of that page."""
    mem, b, mmu = setup()
    b.map(0xffff_8000_0000_0000, 0x100000, flags=P | W | U)
    assert mmu.translate(0xffff_8000_0000_0000).pa == 0x100000
    with pytest.raises(ptemu.GeneralProtection):
        mmu.translate(0x0000_8000_0000_0000)


def test_gp_has_no_walk_side_effects():
    """SDM 4.5.1 / 4.8: the canonical check comes before the walk, so a #GP
    sets no A (or D) bit anywhere; the aliasing PML4E keeps A=0."""
    mem, b, mmu = setup()
    b.map(0xffff_8000_0000_0000, 0x100000, flags=P | W | U)
    b.map(0x0000_7fff_ffff_f000, 0x101000, flags=P | W | U)
    before = mem.array.copy()
    for va in (0x0000_8000_0000_0000, 0xffff_7fff_ffff_f000, 0x8000_7fff_ffff_f000):
        for acc in "rwx":
            with pytest.raises(ptemu.GeneralProtection):
                mmu.translate(va, acc)
    r = mmu.translate_many(np.array([0x0000_8000_0000_0000] * 3, dtype=np.uint64), "w")
    assert r.vector.tolist() == [13, 13, 13]
    assert r.error_code.tolist() == [0, 0, 0]
    assert np.array_equal(mem.array, before)
    assert not b.get_entry(0xffff_8000_0000_0000, 4) & A


def test_gp_wins_over_missing_tables():
    """SDM 4.5.1: the canonical check precedes the walk: with nothing mapped,
    a non-canonical address is #GP and a canonical one #PF."""
    mem, b, mmu = setup()
    with pytest.raises(ptemu.GeneralProtection):
        mmu.translate(0x0000_8000_0000_0000)
    with pytest.raises(ptemu.PageFault):
        mmu.translate(0x0000_7fff_ffff_ffff)


def test_gp_reports_the_address():
    """GeneralProtection carries the address (.va), error code 0 (#GP(0))."""
    mem, b, mmu = setup()
    with pytest.raises(ptemu.GeneralProtection) as ei:
        mmu.translate(0xdead_0000_0000_0000)
    assert ei.value.va == 0xdead_0000_0000_0000
    assert ei.value.error_code == 0


def test_paging_off_has_no_canonical_check():
    """SDM 4.5.1 concerns linear addresses translated by 4/5-level paging;
    with CR0.PG=0 ptemu's identity map does no canonical check."""
    mem = PhysicalMemory(1 << 12)
    mmu = Mmu(mem, CpuState(cr0=ptemu.CR0_PE))
    assert mmu.translate(0x0000_8000_0000_0000).pa == 0x0000_8000_0000_0000


# ------------------------------------------------------------ 5-level -------

@pytest.mark.parametrize("va,pa", [
    (0x00ff_ffff_ffff_ffff, 0x100fff),      # highest lower-half 57-bit address
    (0x0000_8000_0000_0000, 0x101000),      # non-canonical for 48 bits, fine here
    (0xffff_8000_0000_0000, 0x102000),      # canonical for both widths
    (0xff00_0000_0000_0000, 0x103000),      # lowest upper-half 57-bit address
    (0xffff_ffff_ffff_ffff, 0x104fff),
])
def test_57bit_canonical_translate(va, pa):
    """SDM 4.5.1: with CR4.LA57=1 bits 63:56 must equal bit 56."""
    mem, b, mmu = setup(la57=True)
    map_page_of(b, va, pa & ~0xfff)
    assert mmu.translate(va).pa == pa


@pytest.mark.parametrize("va", [
    0x0100_0000_0000_0000,      # one past the 57-bit lower half
    0xfeff_ffff_ffff_ffff,      # one below the 57-bit upper half
    0x8000_0000_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0xfe00_0000_0000_0000,
])
def test_57bit_non_canonical_gp(va):
    """SDM 4.5.1: with LA57 an address whose bits 63:56 differ from bit 56
    is #GP(0), with no side effect."""
    mem, b, mmu = setup(la57=True)
    b.map(0xff00_0000_0000_0000, 0x100000, flags=P | W | U)
    b.map(0x0000_0000_0000_0000, 0x101000, flags=P | W | U)
    before = mem.array.copy()
    with pytest.raises(ptemu.GeneralProtection):
        mmu.translate(va, "w")
    assert np.array_equal(mem.array, before)


def test_width_follows_la57_live():
    """SDM 4.5.1: the canonical width is chosen by CR4.LA57 at the time of
    the access (a live CpuState): 0x0000800000000000 is #GP with 4-level
    paging and walks (here: not mapped, #PF) with 5-level paging."""
    mem = PhysicalMemory(1 << 20)
    b = PageTableBuilder(mem)
    cpu = CpuState.long_mode(cr3=b.cr3)
    mmu = Mmu(mem, cpu)
    with pytest.raises(ptemu.GeneralProtection):
        mmu.translate(0x0000_8000_0000_0000)
    cpu.cr4 = cpu.cr4 | ptemu.CR4_LA57        # plain state change, not MOV CR4
    with pytest.raises(ptemu.PageFault):
        mmu.translate(0x0000_8000_0000_0000)


def test_gp_leaves_no_entries_of_an_earlier_walk_in_the_c_output():
    """SDM 4.5.1: a #GP reads no paging structure; the C walk output (the
    entries read) must say so, not keep the previous walk's four entries."""
    from ptemu._native import ffi, lib
    mem, b, mmu = setup()
    map_page_of(b, 0x5000, 0x105000)
    out = ffi.new("ptemu_walk_out *")
    fault = ffi.new("ptemu_fault *")
    walk = ffi.new("ptemu_walk_in *")
    walk.va, walk.access, walk.flags = 0x5000, lib.PTEMU_ACC_READ, 0
    assert lib.ptemu_translate(mmu.cpu._c, mem._c, ffi.NULL, walk, out, fault) == 0
    assert out.nentries == 4 and out.mem_refs == 4
    walk.va = 0x0000_8000_0000_0000
    assert lib.ptemu_translate(mmu.cpu._c, mem._c, ffi.NULL, walk, out, fault) == 13
    assert (out.va, out.nentries, out.mem_refs, out.tlb_hit) == (0x0000_8000_0000_0000, 0, 0, 0)
