"""The EPT walk on its own (Intel SDM Vol. 3C 29.3 "EPT translation
mechanism", 29.3.3 "EPT-induced VM exits", 29.3.5 "Accessed and dirty flags
for EPT", table 28-7 "Exit qualification for EPT violations"), driven through
Ept.translate over hand-built EPT tables.

Every EPT bit below is typed from the SDM's entry tables (29-1 .. 29-6) and
every qualification bit from table 28-7, not taken from ptemu's constants, so
a wrong constant in the C header fails here too.

Image layout (Ept bump allocation from TABLES): EPT PML4 0x10000, and for the
first 4 KiB mapping of GPA: EPT PDPT 0x11000, PD 0x12000, PT 0x13000.  GPA's
indices are PML4 0, PDPT 1, PD 3, PT 1, so its entries sit at table + 8*index
(E4..E1 below).
"""
import pytest
from hypothesis import given, settings, strategies as st

import ptemu
from ptemu import PhysicalMemory
from ptemu._native import EptMisconfig, EptViolation, EptExit, MmuFault
from ptemu.ept import Ept

# EPT entry bits (SDM tables 29-1 .. 29-6).
R, W, X = 1 << 0, 1 << 1, 1 << 2
RWX = R | W | X
MT_SHIFT = 3                     # bits 5:3: EPT memory type (leaves)
WB = 6                           # write-back (SDM 29.3.7 / table 12-8)
IPAT = 1 << 6
PS = 1 << 7
EA, ED = 1 << 8, 1 << 9          # accessed, dirty (with EPTP bit 6)

# Exit qualification for EPT violations (SDM Vol. 3C table 28-7).
Q_READ, Q_WRITE, Q_FETCH = 1 << 0, 1 << 1, 1 << 2
Q_READABLE, Q_WRITABLE, Q_EXECUTABLE = 1 << 3, 1 << 4, 1 << 5
Q_GLA_VALID, Q_TRANSLATED = 1 << 7, 1 << 8
Q_ACCESS = {"r": Q_READ, "w": Q_WRITE, "x": Q_FETCH}
NEED = {"r": R, "w": W, "x": X}

HOST_SIZE = 1 << 22
TABLES, TABLES_END = 0x10000, 0x100000
GPA = 0x0000_0000_4060_1000      # PML4 0, PDPT 1, PD 3, PT 1
HPA = 0x0020_0000
E4, E3, E2, E1 = 0x10000 + 0 * 8, 0x11000 + 1 * 8, 0x12000 + 3 * 8, 0x13000 + 1 * 8
LEAF = HPA | RWX | WB << MT_SHIFT
GPA_2M = 0x0000_0000_8060_0000   # PML4 0, PDPT 2 (a new EPT PD), PD 3
GPA_1G = 0x0000_0080_c000_0000   # PML4 1, PDPT 3


def setup(levels=4, ad=False, maxphyaddr=52, size=HOST_SIZE):
    host = PhysicalMemory(size)
    ept = Ept(host, TABLES, TABLES_END, levels=levels, ad=ad, maxphyaddr=maxphyaddr)
    return host, ept


def setup_4k(**kw):
    host, ept = setup(**kw)
    ept.map(GPA, HPA)
    return host, ept


def violation(ept, gpa, access):
    with pytest.raises(EptViolation) as ei:
        ept.translate(gpa, access)
    return ei.value


def misconfig(ept, gpa, access="r"):
    with pytest.raises(EptMisconfig) as ei:
        ept.translate(gpa, access)
    return ei.value


def or_entry(host, epa, bits):
    host.write_u64(epa, host.read_u64(epa) | bits)


# ----------------------------------------------------------------- layout ----

def test_layout_assumption():
    """The hand-computed entry addresses are where Ept.map put GPA's
    entries, with the values SDM 29.3.2 says a walk follows (guards the
    constants the other tests use)."""
    host, ept = setup_4k()
    assert ept.root == 0x10000
    assert [ept.entry_pa(GPA, lvl) for lvl in (4, 3, 2, 1)] == [E4, E3, E2, E1]
    assert host.read_u64(E4) == 0x11000 | RWX
    assert host.read_u64(E3) == 0x12000 | RWX
    assert host.read_u64(E2) == 0x13000 | RWX
    assert host.read_u64(E1) == LEAF
    # EPTP (SDM 25.6.11): memory type WB in 2:0, walk length - 1 = 3 in 5:3.
    assert ept.eptp == 0x10000 | 6 | (3 << 3)


# ------------------------------------------------------------ translation ----

@pytest.mark.parametrize("access", ["r", "w", "x"])
def test_4k_page(access):
    """SDM 29.3.2: a 4 KiB EPT PTE gives bits 51:12 of the physical address,
    bits 11:0 come from the guest-physical address."""
    host, ept = setup_4k()
    assert ept.translate(GPA + 0x123, access) == HPA + 0x123
    assert ept.translate(GPA + 0xfff, access) == HPA + 0xfff


def test_4k_walk_reads_four_entries():
    """SDM 29.3.2: 4-level EPT accesses at most 4 EPT entries per
    translation (PML4E, PDPTE, PDE, PTE)."""
    host, ept = setup_4k()
    r0, w0 = ept.refs, ept.walks
    ept.translate(GPA)
    assert ept.refs - r0 == 4
    assert ept.walks - w0 == 1


def test_2m_page():
    """SDM 29.3.2: an EPT PDE with bit 7 set maps a 2 MiB page: bits 51:21
    from the PDE, 20:0 from the guest-physical address; 3 entries read."""
    host, ept = setup()
    epa = ept.map(GPA_2M, 0x0060_0000, page_size=1 << 21)
    assert host.read_u64(epa) == 0x0060_0000 | RWX | WB << MT_SHIFT | PS
    r0 = ept.refs
    assert ept.translate(GPA_2M + 0x1_2345, "w") == 0x0060_0000 + 0x1_2345
    assert ept.refs - r0 == 3
    assert ept.translate(GPA_2M + 0x1f_ffff) == 0x0060_0000 + 0x1f_ffff


def test_1g_page():
    """SDM 29.3.2: an EPT PDPTE with bit 7 set maps a 1 GiB page: bits 51:30
    from the PDPTE, 29:0 from the guest-physical address; 2 entries read."""
    host, ept = setup()
    ept.map(GPA_1G, 0x40_0000_0000, page_size=1 << 30)
    r0 = ept.refs
    assert ept.translate(GPA_1G + 0x2345_6789, "x") == 0x40_0000_0000 + 0x2345_6789
    assert ept.refs - r0 == 2


def test_large_leaf_low_address_bits_not_used():
    """SDM 29.3.2: for a 2 MiB page bits 20:0 of the result come from the
    guest-physical address, for 1 GiB bits 29:0 -- never from the entry.
    (Setting any of those bits in the entry is reserved, tested below; here
    the entry's address field is exact and the offset must pass through.)"""
    host, ept = setup()
    ept.map(GPA_2M, 0x0060_0000, page_size=1 << 21)
    ept.map(GPA_1G, 0x40_0000_0000, page_size=1 << 30)
    assert ept.translate(GPA_2M | 0x1f_f000) == 0x0060_0000 | 0x1f_f000
    assert ept.translate(GPA_1G | 0x3fff_f000) == 0x40_0000_0000 | 0x3fff_f000


def test_5level_ept():
    """SDM 29.3.2 (5-level EPT, EPTP bits 5:3 = 4): the EPT PML5E is chosen
    by gpa bits 56:48, then the 4-level walk; 5 entries read.  Two gpas that
    differ only in bit 48 must reach different pages."""
    host, ept = setup(levels=5)
    assert ept.eptp & 0x38 == 4 << 3
    lo, hi = GPA, (1 << 48) | GPA
    ept.map(lo, 0x20_0000)
    ept.map(hi, 0x30_0000)
    r0 = ept.refs
    assert ept.translate(lo + 8) == 0x20_0008
    assert ept.refs - r0 == 5
    assert ept.translate(hi + 8) == 0x30_0008
    # PML5 index of hi is 1: the PML5E at root + 8 leads to it.
    assert host.read_u64(ept.root + 8) & 7 == RWX


def test_4level_ept_ignores_pml5():
    """SDM 29.3.2: with a page-walk length of 4 the walk starts at the PML4
    table named by the EPTP: the same gpa reads 4 entries, not 5."""
    host, ept = setup_4k(levels=4)
    r0 = ept.refs
    ept.translate(GPA)
    assert ept.refs - r0 == 4


def test_entry_bits_ignored_by_the_walk_do_not_matter():
    """SDM tables 29-1..29-6: bits 11:8 (9..11 without EPT A/D) and 62:52 are
    ignored, bit 63 is suppress-#VE (only meaningful with the EPT-violation
    #VE control) and bit 7 of an EPT PTE is ignored: setting them changes
    neither the translation nor raises a misconfiguration."""
    host, ept = setup_4k()
    ign = (1 << 9) | (1 << 11) | (1 << 52) | (1 << 62)
    for epa in (E4, E3, E2):
        or_entry(host, epa, ign | EA)
    or_entry(host, E1, ign | EA | ED | PS | (1 << 63))
    assert ept.translate(GPA + 0x10, "w") == HPA + 0x10


def test_ipat_allowed_in_leaf():
    """SDM table 29-6: bit 6 of a leaf is 'ignore PAT', not reserved."""
    host, ept = setup_4k()
    or_entry(host, E1, IPAT)
    assert ept.translate(GPA) == HPA


def test_host_address_matches_translate_without_side_effects():
    """Ept.host_address reads the tables without an EPT walk: the same
    answer as translate (SDM 29.3.2) but no A flag is set (29.3.5 applies
    to the processor's translations only)."""
    host, ept = setup_4k(ad=True)
    ept.map(GPA_2M, 0x0060_0000, page_size=1 << 21)
    before = [host.read_u64(e) for e in (E4, E3, E2, E1)]
    assert ept.host_address(GPA + 0x77) == HPA + 0x77
    assert ept.host_address(GPA_2M + 0x1234) == 0x0060_0000 + 0x1234
    assert ept.host_address(0x5000) is None
    assert [host.read_u64(e) for e in (E4, E3, E2, E1)] == before
    assert ept.translate(GPA + 0x77) == HPA + 0x77


# ------------------------------------------------------- not present ----

@pytest.mark.parametrize("access", ["r", "w", "x"])
@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_not_present_at_each_level(level, access):
    """SDM 29.3.3.2: an EPT entry with bits 2:0 = 000b is not present and
    the access is an EPT violation.  Table 28-7: bits 2:0 say the access
    (read/write/fetch); bits 5:3 are the AND of R/W/X over the entries used,
    which includes the not-present one, so all 0; bits 7/8 clear (no linear
    address behind a direct EPT translation).  The guest-physical address is
    reported (SDM 28.2.1)."""
    host, ept = setup_4k()
    ept.set_entry(GPA, level, 0)
    v = violation(ept, GPA + 0x44, access)
    assert v.qualification == Q_ACCESS[access]
    assert v.gpa == GPA + 0x44
    assert v.level == level
    assert v.exit_reason == 48 and isinstance(v, EptExit) and isinstance(v, MmuFault)
    assert v.vector not in (0, 13, 14, 48, 49)  # a VM exit: no exception vector (Vol. 3D app. C)


@pytest.mark.parametrize("level", [5, 4, 3, 2, 1])
def test_not_present_5level(level):
    """SDM 29.3.3.2 with 5-level EPT: a not-present PML5E is a violation too."""
    host, ept = setup(levels=5)
    ept.map(GPA, HPA)
    ept.set_entry(GPA, level, 0)
    v = violation(ept, GPA, "w")
    assert v.qualification == Q_WRITE
    assert v.level == level


@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_not_present_entry_other_bits_ignored(level):
    """SDM 29.3.2: 'if bits 2:0 of an EPT entry are all 0, the entry is not
    present; the processor ignores bits 63:3'.  Reserved bits, a W-only
    pattern above bit 2, a bad memory type there: still a violation, never
    a misconfiguration."""
    host, ept = setup_4k(maxphyaddr=40)
    ept.set_entry(GPA, level, 0xffff_ffff_ffff_fff8)
    v = violation(ept, GPA, "r")
    assert v.qualification == Q_READ
    assert v.level == level


def test_unmapped_gpa_in_fresh_ept():
    """SDM 29.3.3.2: an empty EPT PML4 table makes every gpa a violation at
    the PML4E (level 4)."""
    host, ept = setup()
    v = violation(ept, 0x1234_5000, "x")
    assert (v.qualification, v.level) == (Q_FETCH, 4)


# ------------------------------------------------------------ permissions ----

@pytest.mark.parametrize("level", [4, 3, 2, 1])
@pytest.mark.parametrize("rwx,access", [(R | X, "w"), (R, "x"), (R | W, "x"), (X, "r"),
                                        (X, "w")])
def test_permission_violation_at_any_level(level, rwx, access):
    """SDM 29.3.3.2: a read needs bit 0, a write bit 1, a fetch bit 2 in
    every EPT entry used.  Removing the right at any one level is enough.
    Table 28-7 bits 5:3: the AND of R/W/X over the walk (here exactly the
    restricted entry's bits, the others being RWX)."""
    host, ept = setup_4k()
    epa = ept.entry_pa(GPA, level)
    old = host.read_u64(epa)
    host.write_u64(epa, old & ~7 | rwx)
    v = violation(ept, GPA + 0x8, access)
    assert v.qualification == Q_ACCESS[access] | rwx << 3
    assert v.gpa == GPA + 0x8


@pytest.mark.parametrize("rwx,access", [(R, "r"), (R | W, "w"), (R | X, "x"), (X, "x")])
def test_permission_allows(rwx, access):
    """SDM 29.3.3.2: the right the access needs, everywhere, suffices;
    execute-only (100b) allows fetches (SDM 29.3.3.1: 100b is valid when
    the processor supports it, as the processors ptemu models do)."""
    host, ept = setup_4k()
    for epa in (E4, E3, E2, E1):
        host.write_u64(epa, host.read_u64(epa) & ~7 | rwx)
    assert ept.translate(GPA, access) == HPA


VALID_RWX = [R, R | W, X, R | X, RWX]   # present, not 010b/110b


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(VALID_RWX), min_size=4, max_size=4),
       st.sampled_from(["r", "w", "x"]))
def test_rights_are_anded_over_the_walk(rights, access):
    """SDM 29.3.3.2 and table 28-7: allowed iff the needed bit is set at
    every level; otherwise a violation whose bits 5:3 are R/W/X ANDed over
    all four entries."""
    host, ept = setup_4k()
    for epa, rwx in zip((E4, E3, E2, E1), rights):
        host.write_u64(epa, host.read_u64(epa) & ~7 | rwx)
    anded = rights[0] & rights[1] & rights[2] & rights[3]
    if anded & NEED[access]:
        assert ept.translate(GPA + 0x40, access) == HPA + 0x40
    else:
        v = violation(ept, GPA + 0x40, access)
        assert v.qualification == Q_ACCESS[access] | anded << 3


# -------------------------------------------------------- misconfigurations ----

@pytest.mark.parametrize("level", [4, 3, 2, 1])
@pytest.mark.parametrize("bad", [W, W | X], ids=["010b", "110b"])
@pytest.mark.parametrize("access", ["r", "w", "x"])
def test_write_without_read_is_misconfig(level, bad, access):
    """SDM 29.3.3.1: bits 2:0 = 010b (write-only) or 110b (write/execute) in
    any EPT entry is an EPT misconfiguration (exit reason 49), whatever the
    access.  The exit qualification is not saved for misconfigurations
    (SDM 28.2.1: cleared), the guest-physical address is."""
    host, ept = setup_4k()
    epa = ept.entry_pa(GPA, level)
    host.write_u64(epa, host.read_u64(epa) & ~7 | bad)
    m = misconfig(ept, GPA + 0x18, access)
    assert m.exit_reason == 49
    assert m.qualification == 0
    assert m.gpa == GPA + 0x18
    assert m.level == level


@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_execute_only_is_not_misconfig(level):
    """SDM 29.3.3.1: 100b (execute-only) is a misconfiguration only on
    processors without the capability; ptemu models processors that have it:
    a fetch passes, a read is a violation with only 'executable' in 5:3."""
    host, ept = setup_4k()
    epa = ept.entry_pa(GPA, level)
    host.write_u64(epa, host.read_u64(epa) & ~7 | X)
    assert ept.translate(GPA, "x") == HPA
    v = violation(ept, GPA, "r")
    assert v.qualification == Q_READ | Q_EXECUTABLE


@pytest.mark.parametrize("maxphyaddr", [36, 40, 46])
@pytest.mark.parametrize("level", [4, 3, 2, 1])
@pytest.mark.parametrize("which", ["lowest", "51"])
def test_bits_51_to_maxphyaddr_reserved(maxphyaddr, level, which):
    """SDM 29.3.3.1: 'a reserved bit is set. This includes the setting of a
    bit in the range 51:12 that is beyond the logical processor's
    physical-address width' -- in every EPT entry (tables 29-1..29-6)."""
    host, ept = setup_4k(maxphyaddr=maxphyaddr)
    or_entry(host, ept.entry_pa(GPA, level), 1 << (maxphyaddr if which == "lowest" else 51))
    m = misconfig(ept, GPA)
    assert m.level == level


def test_bit_below_maxphyaddr_is_address():
    """SDM table 29-6: bits M-1:12 of a PTE are the page address: bit M-1
    set moves the page, it is not reserved."""
    host, ept = setup_4k(maxphyaddr=40)
    or_entry(host, E1, 1 << 39)
    assert ept.translate(GPA + 4) == (1 << 39) | HPA | 4


@pytest.mark.parametrize("bit", [3, 4, 5, 6, 7])
def test_pml4e_bits_7_to_3_reserved(bit):
    """SDM table 29-2 (EPT PML4E): bits 7:3 reserved (must be 0)."""
    host, ept = setup_4k()
    or_entry(host, E4, 1 << bit)
    assert misconfig(ept, GPA, "x").level == 4


@pytest.mark.parametrize("bit", [3, 4, 5, 6, 7])
def test_pml5e_bits_7_to_3_reserved(bit):
    """SDM table 29-1 (EPT PML5E, 5-level EPT): bits 7:3 reserved."""
    host, ept = setup(levels=5)
    ept.map(GPA, HPA)
    or_entry(host, ept.entry_pa(GPA, 5), 1 << bit)
    assert misconfig(ept, GPA).level == 5


@pytest.mark.parametrize("level", [3, 2])
@pytest.mark.parametrize("bit", [3, 4, 5, 6])
def test_nonleaf_bits_6_to_3_reserved(level, bit):
    """SDM tables 29-4 (PDPTE referencing a PD) and 29-6's companion (PDE
    referencing a PT): bits 6:3 reserved.  A memory type is only for
    leaves."""
    host, ept = setup_4k()
    or_entry(host, ept.entry_pa(GPA, level), 1 << bit)
    assert misconfig(ept, GPA, "w").level == level


@pytest.mark.parametrize("bit", [12, 13, 20, 21, 29])
def test_1g_leaf_bits_29_to_12_reserved(bit):
    """SDM table 29-3 (PDPTE mapping a 1 GiB page): bits 29:12 reserved."""
    host, ept = setup()
    epa = ept.map(GPA_1G, 0x40_0000_0000, page_size=1 << 30)
    or_entry(host, epa, 1 << bit)
    assert misconfig(ept, GPA_1G).level == 3


@pytest.mark.parametrize("bit", [12, 13, 16, 20])
def test_2m_leaf_bits_20_to_12_reserved(bit):
    """SDM table 29-5 (PDE mapping a 2 MiB page): bits 20:12 reserved."""
    host, ept = setup()
    epa = ept.map(GPA_2M, 0x0060_0000, page_size=1 << 21)
    or_entry(host, epa, 1 << bit)
    assert misconfig(ept, GPA_2M).level == 2


def test_2m_leaf_bit_21_is_address():
    """SDM table 29-5: bits M-1:21 of a 2 MiB leaf are the address: bit 21
    moves the page by 2 MiB, no misconfiguration."""
    host, ept = setup()
    epa = ept.map(GPA_2M, 0x0040_0000, page_size=1 << 21)
    or_entry(host, epa, 1 << 21)
    assert ept.translate(GPA_2M + 5) == 0x0060_0000 + 5


@pytest.mark.parametrize("size", [4096, 1 << 21, 1 << 30])
@pytest.mark.parametrize("memtype", [2, 3, 7])
def test_reserved_memory_types_in_leaves(size, memtype):
    """SDM 29.3.3.1: in the entry that maps the page (PTE, or PDE/PDPTE with
    bit 7 set) a memory type (bits 5:3) of 2, 3 or 7 is reserved."""
    host, ept = setup()
    gpa = {4096: GPA, 1 << 21: GPA_2M, 1 << 30: GPA_1G}[size]
    hpa = {4096: HPA, 1 << 21: 0x0060_0000, 1 << 30: 0x40_0000_0000}[size]
    ept.map(gpa, hpa, page_size=size, memtype=memtype)
    m = misconfig(ept, gpa)
    assert m.level == {4096: 1, 1 << 21: 2, 1 << 30: 3}[size]


@pytest.mark.parametrize("memtype", [0, 1, 4, 5, 6])
def test_valid_memory_types(memtype):
    """SDM 29.3.7: UC 0, WC 1, WT 4, WP 5, WB 6 are the EPT memory types."""
    host, ept = setup()
    ept.map(GPA, HPA, memtype=memtype)
    assert ept.translate(GPA) == HPA


def test_misconfig_wins_over_permission_violation():
    """SDM 29.3.3.2: 'an EPT violation may occur ... using a guest-physical
    address whose translation does not cause an EPT misconfiguration': a
    write through a read-only PML4E to a leaf with memory type 7 is a
    misconfiguration, not a violation."""
    host, ept = setup()
    ept.map(GPA, HPA, memtype=7)
    host.write_u64(E4, host.read_u64(E4) & ~7 | R)
    misconfig(ept, GPA, "w")


def test_not_present_above_hides_misconfig_below():
    """SDM 29.3.2: a not-present entry is not used to reference anything:
    a misconfigured PTE under a not-present PDE is never reached."""
    host, ept = setup()
    ept.map(GPA, HPA, memtype=3)
    host.write_u64(E2, 0)
    assert violation(ept, GPA, "r").level == 2


# ----------------------------------------------------- accessed and dirty ----

def test_ad_read_sets_accessed_everywhere():
    """SDM 29.3.5: with EPTP bit 6 the processor sets bit 8 (accessed) in
    every EPT entry used; a read sets no dirty flag."""
    host, ept = setup_4k(ad=True)
    assert ept.eptp & (1 << 6)
    ept.translate(GPA, "r")
    assert host.read_u64(E4) == 0x11000 | RWX | EA
    assert host.read_u64(E3) == 0x12000 | RWX | EA
    assert host.read_u64(E2) == 0x13000 | RWX | EA
    assert host.read_u64(E1) == LEAF | EA


def test_ad_fetch_sets_accessed_only():
    """SDM 29.3.5: D is for writes; a fetch sets only A."""
    host, ept = setup_4k(ad=True)
    ept.translate(GPA, "x")
    assert host.read_u64(E1) == LEAF | EA


def test_ad_write_sets_dirty_in_leaf_only():
    """SDM 29.3.5: a write sets bit 9 (dirty) in the entry that identifies
    the final physical address, and nowhere else (bit 9 of a non-leaf entry
    is ignored)."""
    host, ept = setup_4k(ad=True)
    ept.translate(GPA + 0x100, "w")
    assert host.read_u64(E1) == LEAF | EA | ED
    assert host.read_u64(E4) == 0x11000 | RWX | EA
    assert host.read_u64(E3) == 0x12000 | RWX | EA
    assert host.read_u64(E2) == 0x13000 | RWX | EA


def test_ad_write_2m_dirty_in_pde():
    """SDM 29.3.5: for a 2 MiB page the dirty flag goes in the PDE (the
    entry with bit 7 set), A in the PML4E, PDPTE and PDE."""
    host, ept = setup(ad=True)
    epa = ept.map(GPA_2M, 0x0060_0000, page_size=1 << 21)
    pdpte = ept.entry_pa(GPA_2M, 3)
    ept.translate(GPA_2M, "w")
    assert host.read_u64(epa) == 0x0060_0000 | RWX | WB << MT_SHIFT | PS | EA | ED
    assert host.read_u64(pdpte) & (EA | ED) == EA
    assert host.read_u64(E4) & (EA | ED) == EA


def test_ad_write_1g_dirty_in_pdpte():
    """SDM 29.3.5: for a 1 GiB page the dirty flag goes in the PDPTE."""
    host, ept = setup(ad=True)
    epa = ept.map(GPA_1G, 0x40_0000_0000, page_size=1 << 30)
    ept.translate(GPA_1G, "w")
    assert host.read_u64(epa) & (EA | ED) == EA | ED
    assert host.read_u64(ept.entry_pa(GPA_1G, 4)) & (EA | ED) == EA


def test_ad_flags_are_sticky():
    """SDM 29.3.5: the flags are sticky -- never cleared by the processor;
    a later read leaves D set."""
    host, ept = setup_4k(ad=True)
    ept.translate(GPA, "w")
    ept.translate(GPA, "r")
    assert host.read_u64(E1) == LEAF | EA | ED


@pytest.mark.parametrize("access", ["r", "w", "x"])
def test_no_ad_without_eptp_bit6(access):
    """SDM 29.3.5: only with EPTP bit 6 = 1 are the flags set; with it clear,
    bits 8 and 9 are ignored and nothing in the EPT is written."""
    host, ept = setup_4k(ad=False)
    assert not ept.eptp & (1 << 6)
    before = host.array.copy()
    ept.translate(GPA, access)
    assert (host.array == before).all()


def test_ad_5level_sets_pml5e_accessed():
    """SDM 29.3.5: every entry used -- with 5-level EPT the PML5E too."""
    host, ept = setup(levels=5, ad=True)
    ept.map(GPA, HPA)
    ept.translate(GPA, "r")
    for level in (5, 4, 3, 2, 1):
        assert host.read_u64(ept.entry_pa(GPA, level)) & (EA | ED) == EA


# ---------------------------------------------------- defined edge cases ----

def test_table_outside_host_memory_is_reported_not_read():
    """An EPT PDE whose page table lies past the end of host memory: the
    hypervisor's own error.  ptemu reports it as an EPT misconfiguration
    at the level of the entry it could not read (DESIGN.md: every physical
    access bounds-checked, a defined result), and writes nothing."""
    host, ept = setup_4k(ad=True)
    host.write_u64(E2, HOST_SIZE | RWX)
    before = host.array.copy()
    m = misconfig(ept, GPA, "r")
    assert m.level == 1
    assert m.gpa == GPA
    assert (host.array == before).all()


def test_table_far_outside_host_memory():
    """The same with a table address near the top of the 52-bit space (no
    wrap-around, no crash)."""
    host, ept = setup_4k()
    host.write_u64(E4, 0x000f_ffff_ffff_f000 | RWX)
    assert misconfig(ept, GPA).level == 3


@pytest.mark.parametrize("maxphyaddr", [36, 40, 52])
def test_gpa_beyond_maxphyaddr(maxphyaddr):
    """SDM 29.3.2 footnote: no processor produces a guest-physical address
    wider than its physical-address width.  Ept.translate accepts any u64,
    so ptemu defines it: an EPT violation that reads no EPT entry and
    reports nothing readable (bits 5:3 = 0), the access in bits 2:0."""
    host, ept = setup_4k(maxphyaddr=maxphyaddr)
    gpa = (1 << maxphyaddr) | GPA
    r0 = ept.refs
    v = violation(ept, gpa, "w")
    assert v.gpa == gpa
    assert v.qualification & 0x3f == Q_WRITE
    assert ept.refs == r0
    # Just below the width, a mapped gpa still translates.
    assert ept.translate(GPA) == HPA


def test_qualification_no_linear_address_for_direct_translation():
    """Table 28-7: bit 7 (guest linear address valid) and bit 8 only concern
    accesses made for a linear address; Ept.translate has none."""
    host, ept = setup_4k()
    host.write_u64(E1, LEAF & ~7 | R)
    v = violation(ept, GPA, "w")
    assert not v.qualification & (Q_GLA_VALID | Q_TRANSLATED)
    assert v.gla == 0


# --------------------------------------------------------------- bad input ----

def test_bad_access_kind():
    host, ept = setup_4k()
    with pytest.raises(ptemu.InvalidInput):
        ept.translate(GPA, "q")


@pytest.mark.parametrize("gpa", [-1, 1 << 64, 1.5, "0x1000"])
def test_bad_gpa(gpa):
    host, ept = setup_4k()
    with pytest.raises(ptemu.InvalidInput):
        ept.translate(gpa)


@pytest.mark.parametrize("kw", [dict(levels=3), dict(levels=6), dict(maxphyaddr=60),
                                dict(maxphyaddr=20)])
def test_bad_ept_parameters(kw):
    host = PhysicalMemory(HOST_SIZE)
    with pytest.raises(ptemu.InvalidInput):
        Ept(host, TABLES, TABLES_END, **kw)


@pytest.mark.parametrize("start,end", [(0x10001, 0x20000), (0x20000, 0x10000),
                                       (0x10000, HOST_SIZE + 0x1000)])
def test_bad_table_region(start, end):
    host = PhysicalMemory(HOST_SIZE)
    with pytest.raises(ptemu.InvalidInput):
        Ept(host, start, end)


def test_map_misaligned_and_bad_size():
    host, ept = setup()
    with pytest.raises(ptemu.InvalidInput):
        ept.map(GPA + 0x10, HPA)
    with pytest.raises(ptemu.InvalidInput):
        ept.map(GPA_2M, 0x0060_1000, page_size=1 << 21)
    with pytest.raises(ptemu.InvalidInput):
        ept.map(GPA, HPA, page_size=8192)


def test_table_region_exhausted():
    host = PhysicalMemory(HOST_SIZE)
    ept = Ept(host, TABLES, TABLES + 0x2000)   # root + one table
    with pytest.raises(ptemu.InvalidInput):
        ept.map(GPA, HPA)


def test_ept_needs_plain_host():
    _, ept = setup()
    nested = PhysicalMemory.nested(ept, 1 << 20)
    with pytest.raises(ptemu.InvalidInput):
        Ept(nested, TABLES, TABLES_END)
    with pytest.raises(ptemu.InvalidInput):
        Ept(object(), TABLES, TABLES_END)


def test_a_4_level_ept_refuses_guest_physical_addresses_of_49_bits_or_more():
    """SDM Vol. 3C 29.3.2: a 4-level EPT translates 48-bit guest-physical
    addresses; gpa 2^48 is an EPT violation, not gpa 0 with bit 48 cut off
    (the walker fuzzer found a CR3 there reading gpa 0's table)."""
    size = 4 * 4096
    host = ptemu.PhysicalMemory(size + 64 * 4096)
    ept = Ept(host, size, size + 64 * 4096, levels=4, ad=False)
    for g in range(4):
        ept.map(g * 4096, g * 4096)
    host.write_u64(0, 0x1003)                   # a present PML4E at gpa 0
    gmem = ptemu.PhysicalMemory.nested(ept, size)
    cpu = ptemu.CpuState.long_mode(cr3=1 << 48, maxphyaddr=52)
    with pytest.raises(EptViolation) as exc:
        ptemu.Mmu(gmem, cpu).translate(0, "r", update_ad=False)
    assert exc.value.gpa == 1 << 48
