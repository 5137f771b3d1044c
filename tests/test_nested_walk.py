"""2-D (nested) walks: a guest's own 4/5-level page walk over guest-physical
memory behind an EPT (Intel SDM Vol. 3C 29.3.1 "Guest-physical addresses",
29.3.3 "EPT-induced VM exits", 29.3.5 "Accessed and dirty flags for EPT",
29.4 "Caching EPT-derived translation information", table 28-7 "Exit
qualification for EPT violations"; cost model of Bhargava et al., ASPLOS
2008: an n-level guest on an m-level EPT makes up to (n+1)(m+1)-1 memory
references per TLB miss).

Layout.  Host memory 8 MiB; EPT tables from 0x10000.  The guest has 4 MiB of
guest-physical memory whose 4 KiB frames the EPT maps in *reverse* order
into host [0x400000, 0x800000) -- hpa(gpa) below -- so an address that
skipped the EPT, or a combined mapping cached larger than 4 KiB, lands on a
visibly wrong host frame.  The guest's PageTableBuilder takes table frames
from gpa 0x1000: guest PML4 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000 for
VA (indices PML4 0, PDPT 1, PD 3, PT 1), so VA's guest entries are at
G4..G1.  Unless a test says otherwise the guest's entries have A (and the
leaf D) already set, so that no guest A/D write takes part.

Qualification bits are typed from table 28-7, EPT bits from tables
29-1..29-6 and exit reasons from Vol. 3D appendix C, not taken from
ptemu's constants.  The one ptemu convention used, VEC_EXIT, is what the
vector field reads for an EPT exit (no exception: the guest sees none).
"""
import numpy as np
import pytest

import ptemu
from ptemu import CpuState, Mmu, PhysicalMemory, Tlb, TRACE_DTYPE
from ptemu._native import EptExit, EptMisconfig, EptViolation, ffi, lib
from ptemu.ept import Ept
from ptemu.pagetable import PageTableBuilder

P, W, U, A, D = ptemu.PTE_P, ptemu.PTE_W, ptemu.PTE_U, ptemu.PTE_A, ptemu.PTE_D
PF_P, PF_W, PF_U, PF_RSVD = ptemu.PF_P, ptemu.PF_W, ptemu.PF_U, ptemu.PF_RSVD

# EPT entry bits (SDM tables 29-1..29-6).
R, EW, X = 1, 2, 4
RWX = R | EW | X
EA, ED = 1 << 8, 1 << 9
# Exit qualification (SDM table 28-7).
Q_READ, Q_WRITE, Q_FETCH = 1 << 0, 1 << 1, 1 << 2
Q_READABLE, Q_WRITABLE, Q_EXECUTABLE = 1 << 3, 1 << 4, 1 << 5
Q_GLA_VALID, Q_TRANSLATED = 1 << 7, 1 << 8

HOST_SIZE = 1 << 23
GUEST_SIZE = 1 << 22
GUEST_BASE = 0x40_0000
NFRAMES = GUEST_SIZE >> 12
EPT_TABLES = (0x10000, 0x100000)

VA = 0x0000_0000_4060_1000       # PML4 0, PDPT 1, PD 3, PT 1
G4, G3, G2, G1 = 0x1000 + 0 * 8, 0x2000 + 1 * 8, 0x3000 + 3 * 8, 0x4000 + 1 * 8
GUEST_TABLE_PAGES = (0x1000, 0x2000, 0x3000, 0x4000)
DATA = 0x20_0000                 # guest-physical frame of VA
VA2, DATA2 = 0x0000_0000_4060_2000, 0x20_1000   # the next PTE, same guest PT

# Basic exit reasons (SDM Vol. 3D appendix C).
EXIT_EPT_VIOLATION, EXIT_EPT_MISCONFIG = 48, 49
VEC_EXIT = lib.PTEMU_VEC_EXIT    # ptemu's vector field for an exit: not 0 and not an exception

TBL_A = P | W | U | A            # guest non-leaf entries, A preset
LEAF_AD = P | W | A | D          # guest leaf, A and D preset


def hpa_4k(gpa):
    """Host address of gpa under the reversed 4 KiB EPT mapping."""
    return GUEST_BASE + (NFRAMES - 1 - (gpa >> 12)) * 4096 + (gpa & 0xfff)


def hpa_2m(gpa):
    """Host address of gpa under the 2 MiB EPT mapping (in order)."""
    return GUEST_BASE + gpa


class Env:
    pass


def setup(guest_levels=4, ept_levels=4, ad=False, tlb=None, ept_2m=False, flags=LEAF_AD,
          table_flags=TBL_A, map_va=True):
    e = Env()
    e.host = PhysicalMemory(HOST_SIZE)
    e.ept = Ept(e.host, *EPT_TABLES, levels=ept_levels, ad=ad)
    if ept_2m:
        for i in range(GUEST_SIZE >> 21):
            e.ept.map(i << 21, GUEST_BASE + (i << 21), page_size=1 << 21)
        e.hpa = hpa_2m
    else:
        for i in range(NFRAMES):
            e.ept.map(i << 12, hpa_4k(i << 12))
        e.hpa = hpa_4k
    e.gmem = PhysicalMemory.nested(e.ept, GUEST_SIZE)
    e.b = PageTableBuilder(e.gmem, la57=guest_levels == 5, table_start=0x1000,
                           table_end=0x100000)
    e.cpu = CpuState.long_mode(cr3=e.b.cr3, la57=guest_levels == 5)
    e.tlb = tlb
    e.mmu = Mmu(e.gmem, e.cpu, tlb)
    if map_va:
        e.b.map(VA, DATA, flags=flags, table_flags=table_flags)
    return e


def ept_rights(e, gpa, rwx):
    """Set bits 2:0 of the EPT PTE that maps guest frame gpa."""
    epa = e.ept.entry_pa(gpa & ~0xfff, 1)
    e.host.write_u64(epa, e.host.read_u64(epa) & ~7 | rwx)


def ept_exit(mmu, va, access="r", cls=EptViolation):
    with pytest.raises(cls) as ei:
        mmu.translate(va, access)
    return ei.value


# ----------------------------------------------------------------- layout ----

def test_layout_assumption():
    """The hand-computed guest entry addresses are where the builder put
    VA's entries, and they live in host memory where hpa() says: guest
    table writes went through the EPT."""
    e = setup()
    assert e.b.cr3 == 0x1000
    assert [e.b.entry_pa(VA, lvl) for lvl in (4, 3, 2, 1)] == [G4, G3, G2, G1]
    assert e.host.read_u64(hpa_4k(G1)) == DATA | LEAF_AD
    assert e.host.read_u64(hpa_4k(G2)) == 0x4000 | TBL_A
    assert e.gmem.read_u64(G1) == DATA | LEAF_AD
    assert e.ept.translate(DATA + 0x10) == hpa_4k(DATA) + 0x10
    assert hpa_4k(0) == 0x7f_f000 and hpa_4k(GUEST_SIZE - 1) == 0x40_0fff


# ------------------------------------------------------------ translation ----

@pytest.mark.parametrize("access", ["r", "w", "x"])
def test_result_is_the_host_address(access):
    """SDM 29.3.1: with EPT the guest's walk yields a guest-physical address
    that EPT then translates; the memory accessed is the host address."""
    e = setup()
    t = e.mmu.translate(VA + 0x123, access)
    assert t.pa == hpa_4k(DATA) + 0x123
    assert e.ept.last_gpa == DATA + 0x123
    assert t.level == 1 and t.page_size == 4096


def test_guest_2m_page_over_4k_ept_pages():
    """SDM 29.3.1 / 29.4.1: a 2 MiB guest page over 4 KiB EPT pages: each
    4 KiB piece goes to its own host frame (the reversed layout makes
    gpa+4K land 4K *below*)."""
    e = setup(map_va=False)
    va = 0x0000_0000_4060_0000
    e.b.map(va, DATA, page_size=1 << 21, flags=LEAF_AD, table_flags=TBL_A)
    for off in (0, 0x1000, 0x5123, 0x1f_fff8):
        t = e.mmu.translate(va + off)
        assert t.pa == hpa_4k(DATA + off)
        assert t.page_size == 1 << 21


def test_paging_off_still_goes_through_ept():
    """SDM 29.3.1: 'If CR0.PG = 0, a linear address is treated as a
    guest-physical address and is translated using EPT.'  One EPT walk:
    4 references; an EPT violation has GLA valid and 'translated' set (the
    access is to the address itself, not to a paging structure)."""
    e = setup(map_va=False)
    mmu = Mmu(e.gmem, CpuState(cr0=ptemu.CR0_PE))
    t = mmu.translate(0x20_1234, "w")
    assert t.pa == hpa_4k(0x20_1234)
    assert t.mem_refs == 4
    e.ept.unmap(0x30_0000)
    v = ept_exit(mmu, 0x30_0010, "r")
    assert v.gpa == 0x30_0010
    assert v.qualification == Q_READ | Q_GLA_VALID | Q_TRANSLATED


# --------------------------------------------------------- reference counts ----

def test_cold_4_on_4_makes_24_references():
    """Bhargava et al. (ASPLOS 2008): (n+1)(m+1)-1 = 5*5-1 = 24 for a
    4-level guest on 4-level EPT: each of the 4 guest entries costs a 4-entry
    EPT walk plus its own read, and the final gpa one more EPT walk
    (SDM 29.3.1: every guest paging-structure reference is a guest-physical
    address)."""
    e = setup()
    refs0, walks0 = e.ept.refs, e.ept.walks
    t = e.mmu.translate(VA)
    assert t.mem_refs == 24
    assert e.ept.walks - walks0 == 5          # 4 guest entries + final gpa
    assert e.ept.refs - refs0 == 20           # 5 EPT walks of 4 entries
    assert len(t.entries) == 4
    assert [epa for epa, _ in t.entries] == [G4, G3, G2, G1]


def test_cold_5_on_5_makes_35_references():
    """(5+1)(5+1)-1 = 35 for a 5-level guest on 5-level EPT."""
    e = setup(guest_levels=5, ept_levels=5)
    t = e.mmu.translate(VA)
    assert t.mem_refs == 35
    assert t.pa == hpa_4k(DATA)


@pytest.mark.parametrize("guest,ept_levels", [(4, 5), (5, 4)])
def test_mixed_levels(guest, ept_levels):
    """(n+1)(m+1)-1 with n != m: (4+1)(5+1)-1 = (5+1)(4+1)-1 = 29."""
    e = setup(guest_levels=guest, ept_levels=ept_levels)
    assert e.mmu.translate(VA).mem_refs == 29


def test_2m_ept_pages_shorten_every_ept_walk():
    """2 MiB EPT leaves end each EPT walk at the PDE (3 references): 4 guest
    entries * (3+1) + 3 = 19 (SDM 29.3.2 for the EPT walk length)."""
    e = setup(ept_2m=True)
    t = e.mmu.translate(VA + 8)
    assert t.mem_refs == 19
    assert t.pa == hpa_2m(DATA) + 8


@pytest.mark.parametrize("size,guest_entries,off", [(1 << 21, 3, 0x1_0040),
                                                     (1 << 30, 2, 0x20_0040)])
def test_guest_large_pages_shorten_the_guest_walk(size, guest_entries, off):
    """A 2 MiB (1 GiB) guest leaf ends the guest walk after 3 (2) entries:
    (3+1)(4+1)-1 = 19, (2+1)(4+1)-1 = 14."""
    e = setup(map_va=False)
    va = 0x0000_0080_0000_0000 if size == 1 << 30 else 0x0000_0000_4060_0000
    gpa = 0 if size == 1 << 30 else DATA
    e.b.map(va, gpa, page_size=size, flags=LEAF_AD, table_flags=TBL_A)
    t = e.mmu.translate(va + off)
    assert t.mem_refs == (guest_entries + 1) * 5 - 1
    assert t.pa == hpa_4k(gpa + off)


# ---------------------------------------------------------- guest faults ----

@pytest.mark.parametrize("case", ["not-present", "read-only", "user", "reserved"])
def test_guest_page_fault_is_the_guests_own(case):
    """SDM 29.3.1: a failure of the guest's own paging is a guest #PF with
    the guest's error code (SDM Vol. 3A 4.7), whatever the EPT allows; the
    data page's EPT entry forbids everything here, yet no EPT exit comes
    first, because the final guest-physical address is never accessed."""
    e = setup()
    ept_rights(e, DATA, 0)          # not present in the EPT
    if case == "not-present":
        e.b.set_entry(VA, 1, 0)
        access, user, ec = "w", False, PF_W
    elif case == "read-only":
        e.b.set_entry(VA, 1, DATA | P | A | D)
        access, user, ec = "w", False, PF_P | PF_W
    elif case == "user":
        access, user, ec = "r", True, PF_P | PF_U      # leaf has no U
    else:                           # bit 46 is reserved with MAXPHYADDR 46
        e.cpu.maxphyaddr = 46
        e.b.set_entry(VA, 2, e.b.get_entry(VA, 2) | 1 << 46)
        access, user, ec = "r", False, PF_P | PF_RSVD
    with pytest.raises(ptemu.PageFault) as ei:
        e.mmu.translate(VA + 0x10, access, user=user)
    assert not isinstance(ei.value, EptExit)
    assert ei.value.error_code == ec
    assert ei.value.cr2 == VA + 0x10


def test_guest_fault_in_batch_is_vector_14():
    """The same in translate_many: vector 14 and the guest's error code."""
    e = setup()
    e.b.set_entry(VA, 1, 0)
    r = e.mmu.translate_many(np.array([VA], dtype=np.uint64), "w")
    assert (int(r.vector[0]), int(r.error_code[0])) == (14, PF_W)


# ------------------------------------------- EPT exits during the guest walk ----

@pytest.mark.parametrize("level,table_page,entry_gpa", [
    (4, 0x1000, G4), (3, 0x2000, G3), (2, 0x3000, G2), (1, 0x4000, G1)])
def test_ept_violation_on_guest_table_read(level, table_page, entry_gpa):
    """SDM 29.3.3.2: reads of guest paging structures are data reads using
    guest-physical addresses; a not-present EPT entry for the guest table
    page is a violation.  Table 28-7: bit 0 (read), bits 5:3 = 0 (not
    present), bit 7 = 1 (the linear address is valid), bit 8 = 0 (an access
    to a paging-structure entry, not to the translated address).  The exit
    reports the guest entry's gpa and the linear address."""
    e = setup()
    e.ept.unmap(table_page)
    v = ept_exit(e.mmu, VA + 0x30)
    assert v.qualification == Q_READ | Q_GLA_VALID
    assert v.gpa == entry_gpa
    assert v.gla == VA + 0x30
    assert v.exit_reason == v.reason == EXIT_EPT_VIOLATION
    assert v.vector == VEC_EXIT


def test_ept_permission_violation_on_guest_table_read():
    """SDM 29.3.3.2 with an execute-only EPT mapping of the guest PD page:
    the PDE read needs R.  Bits 5:3 = 'executable' only."""
    e = setup()
    ept_rights(e, 0x3000, X)
    v = ept_exit(e.mmu, VA)
    assert v.qualification == Q_READ | Q_EXECUTABLE | Q_GLA_VALID
    assert v.gpa == G2


@pytest.mark.parametrize("access,rwx,q", [
    ("r", 0, Q_READ),
    ("w", R | X, Q_WRITE | Q_READABLE | Q_EXECUTABLE),
    ("x", R | EW, Q_FETCH | Q_READABLE | Q_WRITABLE),
    ("r", X, Q_READ | Q_EXECUTABLE)])
def test_ept_violation_on_final_access(access, rwx, q):
    """SDM 29.3.3.2 on the translated address: table 28-7 bits 7 and 8 both
    set (the gpa is the translation of the linear address), bits 5:3 the
    EPT rights of the data page."""
    e = setup()
    ept_rights(e, DATA, rwx)
    v = ept_exit(e.mmu, VA + 0x88, access)
    assert v.qualification == q | Q_GLA_VALID | Q_TRANSLATED
    assert v.gpa == DATA + 0x88
    assert v.gla == VA + 0x88


def test_cr3_load_is_not_an_ept_access():
    """SDM 29.3.3: loading CR3 with a guest-physical address causes no EPT
    exit 'until that address is used to access a paging structure'."""
    e = setup()
    e.ept.unmap(0x9000)
    e.mmu.write_cr3(0x9000)
    v = ept_exit(e.mmu, VA)
    assert v.gpa == 0x9000 and v.qualification == Q_READ | Q_GLA_VALID


def test_ept_misconfig_on_guest_table():
    """SDM 29.3.3.1: a reserved memory type (7) in the EPT PTE of the guest
    PT page: an EPT misconfiguration (exit reason 49, no qualification, the
    guest-physical address of the guest PTE)."""
    e = setup()
    epa = e.ept.entry_pa(0x4000, 1)
    e.host.write_u64(epa, e.host.read_u64(epa) & ~0x38 | 7 << 3)
    m = ept_exit(e.mmu, VA, cls=EptMisconfig)
    assert m.exit_reason == EXIT_EPT_MISCONFIG
    assert m.qualification == 0
    assert m.gpa == G1


def test_resume_after_exit():
    """An EPT exit is the hypervisor's: once it maps the page, the same
    access succeeds (nothing stale was cached by the failed walk)."""
    e = setup(tlb=Tlb.simple())
    e.ept.unmap(DATA)
    ept_exit(e.mmu, VA, "w")
    e.ept.map(DATA, 0x10_0000)
    assert e.mmu.translate(VA + 4, "w").pa == 0x10_0004


# ------------------------------------------------- guest A/D through the EPT ----

def test_guest_accessed_update_needs_ept_write():
    """SDM 29.3.3.2: 'Writes by the logical processor to guest paging
    structures to update accessed and dirty flags are considered to be data
    writes.'  The guest PT page is read-only in the EPT and the guest PTE's A
    is clear: the walk reads it, then must set A -> violation with bit 1
    (write), bits 5:3 = R|X, GLA valid, bit 8 clear (a paging-structure
    update), the PTE's gpa.  (Bit 0 for this locked read-modify-write is
    implementation-specific, table 28-7 note, so not checked.)"""
    e = setup(flags=P | W)
    ept_rights(e, 0x4000, R | X)
    v = ept_exit(e.mmu, VA, "r")
    assert v.qualification & ~Q_READ == Q_WRITE | Q_READABLE | Q_EXECUTABLE | Q_GLA_VALID
    assert v.gpa == G1


def test_guest_dirty_update_needs_ept_write():
    """The same for D: the guest leaf has A but not D; a write must set D
    in the guest PTE, whose page the EPT maps read-only."""
    e = setup(flags=P | W | A)
    ept_rights(e, 0x4000, R | X)
    assert e.mmu.translate(VA, "r").pa == hpa_4k(DATA)       # no update needed
    v = ept_exit(e.mmu, VA, "w")
    assert v.qualification & Q_WRITE and not v.qualification & Q_TRANSLATED
    assert v.gpa == G1


def test_guest_ad_preset_needs_no_ept_write():
    """SDM 29.3.3.2: without EPT A/D, reading guest paging structures needs
    only EPT read permission; with the guest's A/D already set nothing is
    written, so read-only guest table pages are fine, for writes too."""
    e = setup()
    for page in GUEST_TABLE_PAGES:
        ept_rights(e, page, R)
    assert e.mmu.translate(VA, "w").pa == hpa_4k(DATA)


def test_guest_ad_bits_land_in_host_memory():
    """SDM 4.8 under EPT: the guest's A/D bits are set in its entries, which
    live at their host addresses."""
    e = setup(flags=P | W, table_flags=P | W | U)
    e.mmu.translate(VA, "w")
    assert e.host.read_u64(hpa_4k(G1)) == DATA | P | W | A | D
    for g in (G4, G3, G2):
        assert e.host.read_u64(hpa_4k(g)) & (A | D) == A


# --------------------------------------------------------------- EPT A/D ----

def test_ept_ad_guest_table_reads_count_as_writes():
    """SDM 29.3.3.2: 'If bit 6 of the EPTP is 1, processor accesses to guest
    paging-structure entries are treated as writes with regard to EPT
    violations'; table 28-7 note: 'If such an access causes an EPT
    violation, the processor sets both bit 0 and bit 1 of the exit
    qualification.'  The guest PD page is read-only in the EPT, every guest
    A/D flag already set: the PDE read itself exits."""
    e = setup(ad=True)
    ept_rights(e, 0x3000, R | X)
    v = ept_exit(e.mmu, VA, "r")
    assert v.qualification == (Q_READ | Q_WRITE | Q_READABLE | Q_EXECUTABLE
                               | Q_GLA_VALID)
    assert v.gpa == G2


def test_without_ept_ad_the_same_reads_pass():
    """The contrast: EPTP bit 6 clear, the same read-only guest PD page is
    only read (29.3.3.2: 'considered to be data reads')."""
    e = setup(ad=False)
    ept_rights(e, 0x3000, R | X)
    assert e.mmu.translate(VA, "r").pa == hpa_4k(DATA)


def test_ept_ad_dirty_in_guest_table_pages():
    """SDM 29.3.5: with EPT A/D a guest paging-structure access 'will cause
    the processor to set the dirty flag in the EPT paging-structure entry
    that identifies the final physical address of the guest paging-structure
    entry'.  The data page is only read: its EPT leaf gets A, not D; a write
    then sets D."""
    e = setup(ad=True)
    e.mmu.translate(VA, "r")
    for page in GUEST_TABLE_PAGES:
        assert e.host.read_u64(e.ept.entry_pa(page, 1)) & (EA | ED) == EA | ED
    data_epte = e.ept.entry_pa(DATA, 1)
    assert e.host.read_u64(data_epte) & (EA | ED) == EA
    untouched = e.ept.entry_pa(0x30_0000, 1)
    assert e.host.read_u64(untouched) & (EA | ED) == 0
    e.mmu.translate(VA, "w")
    assert e.host.read_u64(data_epte) & (EA | ED) == EA | ED


# ------------------------------------------------------------------- TLB ----

def test_tlb_caches_the_combined_mapping():
    """SDM 29.4.1: combined mappings (linear -> host physical) are cached:
    the second access is a TLB hit with no memory reference, same pa."""
    tlb = Tlb.simple()
    e = setup(tlb=tlb)
    t1 = e.mmu.translate(VA + 0x10)
    assert (t1.tlb_hit, t1.mem_refs) == (False, 24)
    refs = e.ept.refs
    t2 = e.mmu.translate(VA + 0x20)
    assert t2.tlb_hit and t2.mem_refs == 0
    assert t2.pa == hpa_4k(DATA) + 0x20
    assert e.ept.refs == refs
    assert tlb.stats.walk_refs == 24


def test_combined_mapping_never_larger_than_ept_page():
    """SDM 29.4.1: a combined mapping's page is no larger than the EPT page:
    after an access to a 2 MiB guest page, the neighbouring 4 KiB (another
    host frame) must not be served by the cached entry."""
    e = setup(tlb=Tlb.simple(), map_va=False)
    va = 0x0000_0000_4060_0000
    e.b.map(va, DATA, page_size=1 << 21, flags=LEAF_AD, table_flags=TBL_A)
    e.mmu.translate(va)
    t = e.mmu.translate(va + 0x1008)
    assert t.pa == hpa_4k(DATA + 0x1008)


def test_cached_read_entry_does_not_grant_ept_write():
    """SDM 29.4.2: a cached combined mapping carries the EPT rights it was
    built with; with the data page read-only in the EPT (guest leaf W, A, D
    set, so the guest side allows the write and needs no D update), a read
    fills the TLB and a later write must still exit."""
    e = setup(tlb=Tlb.simple())
    ept_rights(e, DATA, R | X)
    e.mmu.translate(VA, "r")
    assert e.mmu.translate(VA, "r").tlb_hit
    v = ept_exit(e.mmu, VA + 8, "w")
    assert v.qualification == Q_WRITE | Q_READABLE | Q_EXECUTABLE | Q_GLA_VALID | Q_TRANSLATED


def test_write_after_ept_change_rewalks():
    """A read caches the mapping while the guest leaf's D is clear; the
    hypervisor then makes the data page read-only in the EPT.  The write
    cannot use the cached entry (SDM 4.8: D must be set in memory, so the
    walk is redone), and the re-walk meets the new EPT entry: an exit.
    (ptemu keeps no guest-physical mappings, SDM 29.4.1 allows that.)"""
    e = setup(tlb=Tlb.simple(), flags=P | W | A)
    e.mmu.translate(VA, "r")
    ept_rights(e, DATA, R)
    v = ept_exit(e.mmu, VA, "w")
    assert v.qualification & (Q_WRITE | Q_TRANSLATED) == Q_WRITE | Q_TRANSLATED


# ------------------------------------------------------- batch and stream ----

def test_translate_many_reports_ept_exits():
    """translate_many under nested paging (API.md): an EPT violation is no
    exception the guest sees -- vector VEC_EXIT (never 0: `ok` is False),
    exit_reason 48 (SDM Vol. 3D appendix C), the qualification in
    error_code, pa 0; the guest's #PF is vector 14 with exit_reason 0; a
    translation is vector 0, exit_reason 0, the host address."""
    e = setup()
    e.b.map(VA2, DATA2, flags=LEAF_AD, table_flags=TBL_A)
    e.ept.unmap(DATA2)
    va3 = 0x0000_0000_4060_3000                  # guest PTE not present
    r = e.mmu.translate_many(np.array([VA + 1, VA2 + 2, va3], dtype=np.uint64), "r")
    assert r.vector.tolist() == [0, VEC_EXIT, 14]
    assert r.exit_reason.dtype == np.uint16
    assert r.exit_reason.tolist() == [0, EXIT_EPT_VIOLATION, 0]
    assert r.ok.tolist() == [True, False, False]
    assert r.pa.tolist() == [hpa_4k(DATA) + 1, 0, 0]
    assert int(r.error_code[1]) == Q_READ | Q_GLA_VALID | Q_TRANSLATED
    assert int(r.error_code[2]) == 0


def test_translate_many_misconfig():
    """An EPT misconfiguration in a batch is an EPT exit too, told apart by
    its exit reason: 49 (SDM Vol. 3D appendix C), qualification 0 (SDM
    28.2.1: not saved for misconfigurations)."""
    e = setup()
    ept_rights(e, DATA, EW)                      # 010b
    r = e.mmu.translate_many(np.array([VA], dtype=np.uint64), "r")
    assert (int(r.vector[0]), int(r.exit_reason[0]), int(r.error_code[0])) == (
        VEC_EXIT, EXIT_EPT_MISCONFIG, 0)
    assert not r.ok[0]


def test_vector_is_an_exception_vector_or_the_exit_marker():
    """Over a batch mixing every outcome, vector holds 0 (translated), 13,
    14 (the guest's exceptions, SDM Vol. 3A 6.15) or VEC_EXIT, and
    exit_reason is nonzero exactly where vector is VEC_EXIT: no exit reason
    is ever read as a vector, nor an exit as a translation."""
    e = setup()
    e.b.map(VA2, DATA2, flags=LEAF_AD, table_flags=TBL_A)
    e.ept.unmap(DATA2)
    ept_rights(e, 0x3000, X)                     # guest PD page: the PDE read needs R
    vas = np.array([VA, VA2, 0x0000_8000_0000_0000, 0x0000_0000_8000_0000, VA + 8],
                   dtype=np.uint64)
    r = e.mmu.translate_many(vas, "r")
    assert set(r.vector.tolist()) <= {0, 13, 14, VEC_EXIT}
    assert VEC_EXIT not in (0, 13, 14, EXIT_EPT_VIOLATION, EXIT_EPT_MISCONFIG)
    assert ((r.exit_reason != 0) == (r.vector == VEC_EXIT)).all()
    assert (r.ok == ((r.vector == 0) & (r.exit_reason == 0))).all()
    assert r.vector[2] == 13                     # not canonical: #GP before any walk
    assert r.exit_reason[0] == EXIT_EPT_VIOLATION    # the PD page is execute-only


def test_c_fault_record_keeps_vector_and_exit_reason_apart():
    """ptemu_fault (csrc/ptemu_cdef.h) as C fills it: an EPT exit has vector
    VEC_EXIT, exit_reason 48, cause EPT, CR2 the linear address, the
    qualification as error code; a #PF assigned into the same record
    afterwards leaves no exit reason behind (a fault is assigned whole)."""
    e = setup()
    e.ept.unmap(DATA)
    f = ffi.new("ptemu_fault *")
    out = ffi.new("ptemu_walk_out *")
    w = ffi.new("ptemu_walk_in *", {"va": VA + 0x18, "access": 0, "flags": 0})
    r = lib.ptemu_translate(e.cpu.c_handle, e.gmem.c_handle, ffi.NULL, w, out, f)
    assert (r, f.vector, f.exit_reason, f.cause) == (
        VEC_EXIT, VEC_EXIT, EXIT_EPT_VIOLATION, lib.PTEMU_CAUSE_EPT)
    assert (f.cr2, f.error_code) == (VA + 0x18, Q_READ | Q_GLA_VALID | Q_TRANSLATED)
    e.b.set_entry(VA, 1, 0)                      # now the guest's own #PF
    r = lib.ptemu_translate(e.cpu.c_handle, e.gmem.c_handle, ffi.NULL, w, out, f)
    assert (r, f.vector, f.exit_reason, f.error_code) == (14, 14, 0, 0)


def test_c_handles_are_the_structs_the_wrappers_use():
    """The C-level tests here pass `c_handle`s: each is the wrapper's own
    struct (a change through the wrapper shows in it, and C reads it)."""
    e = setup(tlb=Tlb.simple())
    assert ffi.typeof(e.cpu.c_handle) is ffi.typeof("ptemu_cpu *")
    assert ffi.typeof(e.gmem.c_handle) is ffi.typeof("ptemu_mem *")
    assert ffi.typeof(e.tlb.c_handle) is ffi.typeof("ptemu_tlb *")
    assert ffi.typeof(e.ept.c_handle) is ffi.typeof("ptemu_ept *")
    e.cpu.cr3 = 0x2000
    assert e.cpu.c_handle.cr3 == 0x2000
    assert e.gmem.c_handle.ept == e.ept.c_handle
    walks = e.tlb.stats.walks
    e.cpu.cr3 = e.b.cr3
    e.mmu.translate(VA)
    assert e.tlb.c_handle.walks == e.tlb.stats.walks == walks + 1
    assert e.ept.c_handle.walks == e.ept.walks > 0


@pytest.mark.parametrize("nested", [True, False])
def test_c_batch_writes_every_output_when_not_zeroed(nested):
    """ptemu_translate_many (the entry point that does not take zero-filled
    outputs) writes vector, exit_reason, error_code and pa for every address,
    on the nested path and on the quick path of plain memory alike."""
    e = setup()
    e.b.map(VA2, DATA2, flags=LEAF_AD, table_flags=TBL_A)
    e.ept.unmap(DATA2)
    if nested:
        mem_c, want_vec, want_reason = e.gmem.c_handle, [0, VEC_EXIT, 14], [0, EXIT_EPT_VIOLATION, 0]
        want_pa0 = hpa_4k(DATA)
    else:                                        # the guest's tables, read as plain memory
        plain = PhysicalMemory(GUEST_SIZE)
        for page in GUEST_TABLE_PAGES:
            plain.write(page, e.gmem.read(page, 4096))
        mem_c, want_vec, want_reason, want_pa0 = plain.c_handle, [0, 0, 14], [0, 0, 0], DATA
    vas = np.array([VA, VA2, 0x0000_0000_4060_3000], dtype=np.uint64)
    pa = np.full(3, 0x5a5a, dtype=np.uint64)
    vec = np.full(3, 0xa5, dtype=np.uint8)
    reason = np.full(3, 0xa5a5, dtype=np.uint16)
    ec = np.full(3, 0xa5a5a5a5, dtype=np.uint32)
    lib.ptemu_translate_many(e.cpu.c_handle, mem_c, ffi.NULL, ffi.from_buffer("uint64_t[]", vas),
                             ffi.NULL, 0, 0, 3, ffi.from_buffer("uint64_t[]", pa),
                             ffi.from_buffer("uint8_t[]", vec), ffi.from_buffer("uint16_t[]", reason),
                             ffi.from_buffer("uint32_t[]", ec))
    assert vec.tolist() == want_vec and reason.tolist() == want_reason
    assert int(pa[0]) == want_pa0 and int(pa[2]) == 0 and int(ec[0]) == 0


def test_run_stops_at_ept_exit():
    """mmu.run stops at the first access that exits; RunResult.fault is the
    EptViolation with the gpa and the qualification (write to a page the
    EPT maps read-only)."""
    e = setup(tlb=Tlb.simple())
    e.b.map(VA2, DATA2, flags=LEAF_AD, table_flags=TBL_A)
    ept_rights(e, DATA2, R)
    trace = np.zeros(4, dtype=TRACE_DTYPE)
    trace["va"] = [VA, VA + 8, VA2 + 0x10, VA]
    trace["access"] = [0, 1, 1, 0]
    pa = np.zeros(4, dtype=np.uint64)
    res = e.mmu.run(trace, pa=pa)
    assert res.index == 2
    assert (res.vector, res.exit_reason) == (VEC_EXIT, EXIT_EPT_VIOLATION)
    assert not res.completed
    assert isinstance(res.fault, EptViolation)
    assert res.fault.gpa == DATA2 + 0x10
    assert res.error_code == res.fault.qualification == (
        Q_WRITE | Q_READABLE | Q_GLA_VALID | Q_TRANSLATED)
    assert pa[:2].tolist() == [hpa_4k(DATA), hpa_4k(DATA) + 8]
    ept_rights(e, DATA2, RWX)
    assert e.mmu.run(trace, start=2).index == 4


def test_probe_sets_no_ept_accessed_dirty():
    """update_ad=False is a probe (API.md): under nested paging it writes
    neither the guest's A/D bits (SDM 4.8) nor the EPT's (SDM 29.3.5, EPTP
    bit 6) -- host memory is byte-for-byte unchanged."""
    e = setup(ad=True)
    before = e.host.array.copy()
    t = e.mmu.translate(VA + 0x10, "w", update_ad=False)
    assert t.pa == e.hpa(DATA) + 0x10
    assert np.array_equal(e.host.array, before)
    e.mmu.translate(VA + 0x10, "w")          # a real access does write them
    assert not np.array_equal(e.host.array, before)
