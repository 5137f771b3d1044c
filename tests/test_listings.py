"""QEMU monitor listings: ptemu.pagetable.info_tlb / info_mem.

Every expected line here is derived by hand from qemu target/i386/monitor.c:

  print_pte:   "%016" PRIx64 ": %016" PRIx64 " %c%c%c%c%c%c%c%c%c\\n"
               addr_canonical(va), pte & mask, then X G P D A C T U W
               (NX bit 63, G 8, PS 7, D 6, A 5, PCD 4, PWT 3, U/S 2, R/W 1),
               '-' when clear; a PTE is printed as pte & ~PG_PSE_MASK.
               mask: 4K 0x3fffffffff000, 2M 0x3ffffffe00000, 1G 0x3ffffc0000000.
  mem_print:   "%016" PRIx64 "-%016" PRIx64 " %016" PRIx64 " %c%c%c\\n"
               canonical(start), canonical(end), canonical(end - start),
               'u'/'-', 'r', 'w'/'-'; prot = leaf & (U|W|P) & every entry above.
  traversal:   raw address (l0 << 48) + (l1 << 39) + (l2 << 30) + (l3 << 21)
               + (l4 << 12), ascending; tables at entry & 0x3fffffffff000;
               only P and (at PDPTE/PDE) PS are looked at; sign extension from
               bit 47 (4-level) or bit 56 (5-level) only when printing.

The rights they summarize are those of SDM 4.6 (U/S and R/W ANDed over the
levels), the leaves those of SDM 4.5 (PTE, PDE with PS=1, PDPTE with PS=1).
"""
from hypothesis import given, settings, strategies as st

import ptemu
from ptemu import bits, pagetable
from ptemu.pagetable import info_tlb, info_mem, PageTableBuilder

P, W, U, PWT, PCD, A, D, PS, G = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80, 0x100
NX = 1 << 63


def make(size=4 << 20):
    return ptemu.PhysicalMemory(size)


def put(mem, table, index, value):
    mem.write_u64(table + 8 * index, value)


def mmu_for(mem, cr3, la57=False, **kw):
    return ptemu.Mmu(mem, ptemu.CpuState.long_mode(cr3=cr3, la57=la57, **kw))


# Frames used below: PML4 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000.
def base_tree(mem, pml4=0x1000):
    put(mem, pml4, 0, 0x2000 | P | W | U)
    put(mem, 0x2000, 0, 0x3000 | P | W | U)
    put(mem, 0x3000, 0, 0x4000 | P | W | U)


# ---- info tlb -----------------------------------------------------------------

def test_tlb_4k_flags_and_pa_mask():
    # SDM 4.5 table 4-20 (PTE); print_pte letters and the 4K mask.
    mem = make()
    base_tree(mem)
    # every flag: P W U PWT PCD A D PAT(bit 7) G, and NX
    put(mem, 0x4000, 1, 0x5000 | P | W | U | PWT | PCD | A | D | PS | G | NX)
    put(mem, 0x4000, 2, 0x6000 | P)
    # bits 51:50 and a protection key (62:59) are outside 0x3fffffffff000
    put(mem, 0x4000, 3, (3 << 50) | (0xF << 59) | 0x7000 | P | W)
    put(mem, 0x4000, 4, 0x8000 | W | U)          # not present: no line
    assert info_tlb(mmu_for(mem, 0x1000)) == (
        "0000000000001000: 0000000000005000 XG-DACTUW\n"   # bit 7 of a PTE is PAT: '-'
        "0000000000002000: 0000000000006000 ---------\n"
        "0000000000003000: 0000000000007000 --------W\n")


def test_tlb_2m_and_1g_leaves():
    # SDM 4.5 tables 4-17 (1 GiB PDPTE) and 4-18 (2 MiB PDE): PS=1 is a leaf.
    mem = make()
    base_tree(mem)
    # 2 MiB at PD[1]: bits 51:50, PAT (bit 12) and bits 20:13 are not printed
    put(mem, 0x3000, 1, (3 << 50) | 0x600000 | 0x1000 | 0x2000 | PS | W | P)
    # 1 GiB at PDPT[1]: bits 29:13 masked off
    put(mem, 0x2000, 1, 0x40000000 | 0x20000000 | 0x2000 | PS | U | P | A)
    assert info_tlb(mmu_for(mem, 0x1000)) == (
        "0000000000200000: 0000000000600000 --P-----W\n"
        "0000000040000000: 0000000040000000 --P-A--U-\n")


def test_tlb_upper_half_sign_extended_and_ordered_after_lower():
    # SDM 4.5.1: bits 63:48 copy bit 47; QEMU lists PML4 index order.
    mem = make()
    put(mem, 0x1000, 511, 0x2000 | P | W)
    put(mem, 0x2000, 510, 0x80000000 | PS | G | D | A | W | P)       # 1 GiB
    put(mem, 0x1000, 256, 0x3000 | P)
    put(mem, 0x3000, 0, 0x5000 | P)                                   # PD at 0x5000
    put(mem, 0x5000, 3, 0x00600000 | PS | NX | P)                     # 2 MiB
    put(mem, 0x1000, 0, 0x6000 | P)
    put(mem, 0x6000, 0, 0x7000 | P)
    put(mem, 0x7000, 0, 0x8000 | P)
    put(mem, 0x8000, 511, 0x9000 | U | P)                             # 4 KiB
    assert info_tlb(mmu_for(mem, 0x1000)) == (
        "00000000001ff000: 0000000000009000 -------U-\n"
        # (256 << 39) + (3 << 21) = 0x800000600000 -> bit 47 set
        "ffff800000600000: 0000000000600000 X-P------\n"
        # (511 << 39) + (510 << 30) = 0xffff80000000
        "ffffffff80000000: 0000000080000000 -GPDA---W\n")


def test_tlb_qemu_ignores_ps_in_pml4e_and_reserved_bits():
    # SDM 4.5: PS in a PML4E is reserved (a walk faults, RSVD); QEMU's
    # tlb_info_la48 does not look at it and walks the entry as a table.
    mem = make()
    put(mem, 0x1000, 1, 0x9000 | PS | P)
    put(mem, 0x9000, 0, 0x40000000 | PS | P | (1 << 51))   # bit 51 reserved too
    assert info_tlb(mmu_for(mem, 0x1000)) == "0000008000000000: 0000000040000000 --P------\n"


def test_tlb_tables_outside_memory_and_not_present_entries():
    mem = make()
    put(mem, 0x1000, 0, 0x7FFF00000000 | P | W)        # table far past the 4 MiB image
    put(mem, 0x1000, 1, 0xFFFFFFFFFFFFFFFE)            # everything but P: not present
    put(mem, 0x1000, 2, 0x2000 | P)
    put(mem, 0x2000, 0, 0x3FF000 | P)                  # PD is the last frame of memory
    put(mem, 0x3FF000, 511, 0x200000 | PS | P)
    # (2 << 39) + (511 << 21) = 0x1003fe00000
    assert info_tlb(mmu_for(mem, 0x1000)) == "000001003fe00000: 0000000000200000 --P------\n"


def test_tlb_cr3_masked_like_qemu():
    # CR3 bits 11:0 (PCID with CR4.PCIDE) are not part of the root address.
    mem = make()
    base_tree(mem)
    put(mem, 0x4000, 7, 0x7000 | P)
    mmu = mmu_for(mem, 0x1005, cr4=bits.CR4_PCIDE)
    assert info_tlb(mmu) == "0000000000007000: 0000000000007000 ---------\n"


def test_tlb_la57():
    # SDM 4.5: 5-level paging, bits 63:57 copy bit 56; tlb_info_la57 adds l0 << 48.
    mem = make()
    pml5 = 0x1000
    put(mem, pml5, 1, 0x2000 | P)                      # l0 = 1: raw 0x0001000000000000
    put(mem, 0x2000, 0, 0x3000 | P)
    put(mem, 0x3000, 0, 0x40000000 | PS | P | W)
    put(mem, pml5, 511, 0x4000 | P | PS)               # PS in a PML5E: ignored by QEMU
    put(mem, 0x4000, 0, 0x5000 | P)
    put(mem, 0x5000, 0, 0x6000 | P)
    put(mem, 0x6000, 0, 0x7000 | P)
    put(mem, 0x7000, 1, 0x8000 | P | U)
    out = info_tlb(mmu_for(mem, pml5, la57=True))
    assert out == (
        "0001000000000000: 0000000040000000 --P-----W\n"
        # (511 << 48) + (1 << 12) = 0x01ff000000001000, bit 56 set
        "ffff000000001000: 0000000000008000 -------U-\n")


def test_pg_disabled():
    mem = make()
    mmu = ptemu.Mmu(mem, ptemu.CpuState(cr0=bits.CR0_PE))
    assert info_tlb(mmu) == "PG disabled\n"
    assert info_mem(mmu) == "PG disabled\n"


def test_empty_tables_list_nothing():
    mem = make()
    mmu = mmu_for(mem, 0x1000)
    assert info_tlb(mmu) == ""
    assert info_mem(mmu) == ""


# ---- info mem -----------------------------------------------------------------

def test_mem_merging_rights_and_holes():
    # SDM 4.6: U and W are ANDed over the levels; mem_print compares P|W|U
    # only (NX, A, D, G do not split a range); a hole ends a range.
    mem = make()
    base_tree(mem)
    put(mem, 0x4000, 1, 0x11000 | P | W | U)
    put(mem, 0x4000, 2, 0x12000 | P | W | U | NX | A | D | G)   # same rights: merges
    put(mem, 0x4000, 3, 0x13000 | P | U)                        # read-only: new range
    put(mem, 0x4000, 5, 0x15000 | P | U)                        # after a hole: new range
    put(mem, 0x4000, 511, 0x16000 | P | W | U)
    put(mem, 0x3000, 1, 0x200000 | PS | P | W | U)              # 2 MiB, joins PT[511]
    # PML4[1] -> a PDPT whose entry lacks U and W: its 1 GiB user page is "-r-"
    put(mem, 0x1000, 1, 0x9000 | P)
    put(mem, 0x9000, 0, 0x40000000 | PS | P | W | U)
    assert info_mem(mmu_for(mem, 0x1000)) == (
        "0000000000001000-0000000000003000 0000000000002000 urw\n"
        "0000000000003000-0000000000004000 0000000000001000 ur-\n"
        "0000000000005000-0000000000006000 0000000000001000 ur-\n"
        "00000000001ff000-0000000000400000 0000000000201000 urw\n"
        "0000008000000000-0000008040000000 0000000040000000 -r-\n")


def test_mem_and_over_every_level():
    # U/S=0 at the PDE only: every PTE under it is supervisor (SDM 4.6.1).
    mem = make()
    put(mem, 0x1000, 0, 0x2000 | P | W | U)
    put(mem, 0x2000, 0, 0x3000 | P | W | U)
    put(mem, 0x3000, 0, 0x4000 | P | W)            # no U here
    put(mem, 0x4000, 0, 0x5000 | P | W | U)
    put(mem, 0x3000, 1, 0x6000 | P | U)            # no W here
    put(mem, 0x6000, 0, 0x7000 | P | W | U)
    assert info_mem(mmu_for(mem, 0x1000)) == (
        "0000000000000000-0000000000001000 0000000000001000 -rw\n"
        "0000000000200000-0000000000201000 0000000000001000 ur-\n")


def test_mem_merges_across_the_canonical_hole():
    # QEMU merges over raw addresses: PML4[255]'s last GiB and PML4[256]'s
    # first GiB are adjacent there (0x7fffc0000000 + 0x40000000 = 0x800000000000).
    mem = make()
    put(mem, 0x1000, 255, 0x2000 | P | W)
    put(mem, 0x2000, 511, 0x40000000 | PS | P | W)
    put(mem, 0x1000, 256, 0x3000 | P | W)
    put(mem, 0x3000, 0, 0x80000000 | PS | P | W)
    assert info_mem(mmu_for(mem, 0x1000)) == (
        "00007fffc0000000-ffff800040000000 0000000080000000 -rw\n")


def test_mem_end_at_half_and_final_flush():
    # A range ending at raw 1 << 47 prints its end sign-extended
    # (ffff800000000000); the final flush is at raw 1 << 48, whose bit 47 is
    # clear, so it prints as 0001000000000000.
    mem = make()
    put(mem, 0x1000, 255, 0x2000 | P | W | U)
    put(mem, 0x2000, 511, 0x40000000 | PS | P | U)
    put(mem, 0x1000, 511, 0x3000 | P | W)
    put(mem, 0x3000, 511, 0x80000000 | PS | P | W)
    assert info_mem(mmu_for(mem, 0x1000)) == (
        "00007fffc0000000-ffff800000000000 0000000040000000 ur-\n"
        "ffffffffc0000000-0001000000000000 0000000040000000 -rw\n")


def test_mem_size_column_is_sign_extended_too():
    # mem_print passes end - start through addr_canonical as well: a range
    # of 257 * 512 GiB = 0x808000000000 bytes has bit 47 set.
    mem = make()
    for i in range(512):
        put(mem, 0x2000, i, (i << 30) | PS | P | W)    # one PDPT of 1 GiB pages
    for i in range(257):
        put(mem, 0x1000, i, 0x2000 | P | W)           # shared by PML4[0..256]
    assert info_mem(mmu_for(mem, 0x1000)) == (
        "0000000000000000-ffff808000000000 ffff808000000000 -rw\n")


def test_mem_la57():
    # 5-level: sign extension from bit 56, final flush at raw 1 << 57.
    # (QEMU's own mem_info_la57 inverts its P tests at PDPTE/PDE level; see
    # pagetable.py -- the expected text is what mem_info_la48 would print.)
    mem = make()
    put(mem, 0x1000, 0, 0x2000 | P | W | U)
    put(mem, 0x2000, 0, 0x3000 | P | W | U)
    put(mem, 0x3000, 0, 0x4000 | P | W | U)
    put(mem, 0x4000, 1, 0x200000 | PS | P | W | U)
    put(mem, 0x1000, 511, 0x5000 | P | W)
    put(mem, 0x5000, 511, 0x6000 | P | W)
    put(mem, 0x6000, 511, 0x40000000 | PS | P | W)
    assert info_mem(mmu_for(mem, 0x1000, la57=True)) == (
        "0000000000200000-0000000000400000 0000000000200000 urw\n"
        # raw (511 << 48) + (511 << 39) + (511 << 30) = 0x01ffffffc0000000
        "ffffffffc0000000-0200000000000000 0000000040000000 -rw\n")


# ---- cross-checks -------------------------------------------------------------

def _builder_image(data, la57=False):
    mem = make(8 << 20)
    b = PageTableBuilder(mem, la57=la57, table_start=0x400000)
    width = 57 if la57 else 48
    for (va_idx, size, flags) in data:
        shift = {4096: 12, 1 << 21: 21, 1 << 30: 30}[size]
        va = (va_idx << shift) & ((1 << width) - 1)
        if va >> (width - 1):
            va |= ((1 << 64) - 1) & ~((1 << width) - 1)
        try:
            b.map(va, (va_idx << shift) & ((1 << 46) - 1), size, flags=flags | P)
        except ptemu.InvalidInput:
            pass                      # inside a large page mapped before
    return mmu_for(mem, b.cr3, la57=la57)


_mapping = st.tuples(st.integers(0, (1 << 26) - 1), st.sampled_from([4096, 1 << 21, 1 << 30]),
                     st.sampled_from([0, W, U, W | U, W | U | NX, G | A | D]))


@settings(max_examples=25, deadline=None)
@given(st.lists(_mapping, max_size=12), st.booleans())
def test_tlb_agrees_with_mappings(data, la57):
    # Without bits 51:50 set and with P/PS-only walks, QEMU's listing and
    # Mmu.mappings() see the same leaves (SDM 4.5), in the same order.
    mmu = _builder_image(data, la57)
    lines = info_tlb(mmu).splitlines()
    maps = list(mmu.mappings())
    assert [int(x.split(":")[0], 16) for x in lines] == [m.va for m in maps]
    assert [int(x.split()[1], 16) for x in lines] == [m.pa for m in maps]
    # info mem covers exactly the mapped bytes, with rights of SDM 4.6
    total = sum(m.page_size for m in maps)
    mem_lines = info_mem(mmu).splitlines()
    width = 57 if la57 else 48
    assert sum(int(x.split()[1], 16) & ((1 << width) - 1) for x in mem_lines) == total


def test_chunked_gathers_keep_order(monkeypatch):
    # The walk gathers tables in chunks; with one table per chunk the leaves
    # of a level interleave with subtrees chunk by chunk and must still come
    # out ascending (QEMU's nested-loop order).
    mem = make()
    for i in range(0, 512, 3):
        put(mem, 0x1000, i, 0x2000 | P)                    # every 3rd PML4E -> same PDPT
    put(mem, 0x2000, 0, 0x40000000 | PS | P)               # 1 GiB leaf
    put(mem, 0x2000, 1, 0x3000 | P)                        # PD
    put(mem, 0x2000, 2, 0x80000000 | PS | P | W)           # 1 GiB leaf after the PD
    put(mem, 0x3000, 0, 0x4000 | P)                        # PT
    put(mem, 0x3000, 1, 0x200000 | PS | P)                 # 2 MiB leaf
    put(mem, 0x3000, 2, 0x4000 | P)                        # the same PT again
    put(mem, 0x4000, 0, 0x9000 | P | U)
    put(mem, 0x4000, 511, 0xA000 | P)
    mmu = mmu_for(mem, 0x1000)
    whole_tlb, whole_mem = info_tlb(mmu), info_mem(mmu)
    monkeypatch.setattr(pagetable, "_CHUNK_TABLES", 1)
    assert info_tlb(mmu) == whole_tlb
    assert info_mem(mmu) == whole_mem
    raw = [int(x.split(":")[0], 16) & ((1 << 48) - 1) for x in whole_tlb.splitlines()]
    assert raw == sorted(raw) and len(raw) == 171 * 7
    # first PML4E's subtree, by hand: 1G at 0, PT under PD[0], 2M, PT under PD[2], 1G
    assert whole_tlb.splitlines()[:7] == [
        "0000000000000000: 0000000040000000 --P------",
        "0000000040000000: 0000000000009000 -------U-",
        "00000000401ff000: 000000000000a000 ---------",
        "0000000040200000: 0000000000200000 --P------",
        "0000000040400000: 0000000000009000 -------U-",
        "00000000405ff000: 000000000000a000 ---------",
        "0000000080000000: 0000000080000000 --P-----W",
    ]
