"""Access rights (Intel SDM Vol. 3A 4.6): U/S and R/W ANDed over all levels,
XD ORed, CR0.WP, SMEP, SMAP with RFLAGS.AC and implicit accesses, protection
keys (PKRU with CR4.PKE, PKRS with CR4.PKS).  Hand-built 4-level images; each
expected outcome and #PF error code (SDM 4.7) is derived from the cited rule.

A user-mode address is one with U/S=1 in every paging-structure entry of its
translation; any other address is a supervisor-mode address (SDM 4.6).
"""
import pytest

import ptemu
from ptemu import CpuState, Mmu, PhysicalMemory
from ptemu.pagetable import PageTableBuilder

P, W, U, NX = ptemu.PTE_P, ptemu.PTE_W, ptemu.PTE_U, ptemu.PTE_NX
PF_P, PF_W, PF_U, PF_I, PF_PK = ptemu.PF_P, ptemu.PF_W, ptemu.PF_U, ptemu.PF_I, ptemu.PF_PK
CR4_PKS = ptemu.CR4_PKS

VA = 0x0000_0000_4060_1000       # PML4 0, PDPT 1, PD 3, PT 1
VA2 = VA + 0x1000                # same tables, PT index 2


def setup(wp=True, nxe=True, cr4=0, **kw):
    mem = PhysicalMemory(1 << 20)
    b = PageTableBuilder(mem)
    cr0 = ptemu.CR0_PG | ptemu.CR0_PE | (ptemu.CR0_WP if wp else 0)
    efer = ptemu.EFER_LME | ptemu.EFER_LMA | (ptemu.EFER_NXE if nxe else 0)
    cpu = CpuState(cr0=cr0, cr3=b.cr3, cr4=ptemu.CR4_PAE | cr4, efer=efer, **kw)
    return mem, b, Mmu(mem, cpu)


def ok(mmu, va, access="r", user=False, **kw):
    return mmu.translate(va, access, user=user, update_ad=False, **kw)


def fault(mmu, va, access="r", user=False, **kw):
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(va, access, user=user, update_ad=False, **kw)
    assert ei.value.cr2 == va
    return ei.value.error_code


def clear_at(b, va, level, mask):
    b.set_entry(va, level, b.get_entry(va, level) & ~mask)


def set_at(b, va, level, mask):
    b.set_entry(va, level, b.get_entry(va, level) | mask)


LEVELS = [1, 2, 3, 4]


# ------------------------------------------------------ U/S, R/W, XD ---------

def test_all_rights_granted_control():
    """SDM 4.6.1: U/S=R/W=1 and XD=0 everywhere: every access by every mode
    is allowed (no SMEP/SMAP/keys) -- the baseline the tests below restrict."""
    mem, b, mmu = setup()
    b.map(VA, 0x80000, flags=P | W | U)
    for user in (False, True):
        for acc in "rwx":
            assert ok(mmu, VA, acc, user).pa == 0x80000


@pytest.mark.parametrize("level", LEVELS)
def test_us_anded_over_levels(level):
    """SDM 4.6.1: U/S=0 at any one level makes the address supervisor-mode:
    user-mode reads, writes and fetches all fault with P|U (+W, +I);
    supervisor accesses are fine."""
    mem, b, mmu = setup()
    b.map(VA, 0x80000, flags=P | W | U)
    clear_at(b, VA, level, U)
    assert fault(mmu, VA, "r", True) == PF_P | PF_U
    assert fault(mmu, VA, "w", True) == PF_P | PF_W | PF_U
    assert fault(mmu, VA, "x", True) == PF_P | PF_U | PF_I
    for acc in "rwx":
        ok(mmu, VA, acc, False)
    assert ok(mmu, VA).user is False


@pytest.mark.parametrize("level", LEVELS)
def test_rw_anded_over_levels(level):
    """SDM 4.6.1: R/W=0 at any one level makes the translation read-only:
    user writes fault (P|W|U), supervisor writes fault with CR0.WP=1 (P|W);
    reads are unaffected."""
    mem, b, mmu = setup(wp=True)
    b.map(VA, 0x80000, flags=P | W | U)
    clear_at(b, VA, level, W)
    assert fault(mmu, VA, "w", True) == PF_P | PF_W | PF_U
    assert fault(mmu, VA, "w", False) == PF_P | PF_W
    assert ok(mmu, VA, "r", True).writable is False
    ok(mmu, VA, "r", False)


@pytest.mark.parametrize("level", LEVELS)
def test_xd_ored_over_levels(level):
    """SDM 4.6.1 (NXE=1): XD=1 at any one level forbids instruction fetches
    in both modes (P|I, +U); data accesses are unaffected."""
    mem, b, mmu = setup()
    b.map(VA, 0x80000, flags=P | W | U)
    set_at(b, VA, level, NX)
    assert fault(mmu, VA, "x", False) == PF_P | PF_I
    assert fault(mmu, VA, "x", True) == PF_P | PF_U | PF_I
    ok(mmu, VA, "r", True)
    ok(mmu, VA, "w", True)
    assert ok(mmu, VA).executable is False


def test_restriction_at_one_level_leaves_sibling_alone():
    """SDM 4.6.1: only entries that control the translation count: clearing
    U in one PTE does not affect the neighbouring page."""
    mem, b, mmu = setup()
    b.map(VA, 0x80000, flags=P | W | U)
    b.map(VA2, 0x81000, flags=P | W | U)
    clear_at(b, VA, 1, U)
    assert fault(mmu, VA, "r", True) == PF_P | PF_U
    assert ok(mmu, VA2, "r", True).pa == 0x81000


@pytest.mark.parametrize("page_size,level", [(1 << 21, 2), (1 << 30, 3)])
def test_large_pages_and_upper_levels(page_size, level):
    """SDM 4.6.1 applies to large leaves too: U/S and R/W of the large leaf
    and of every entry above it are ANDed."""
    mem, b, mmu = setup()
    va = 0x0000_0080_0000_0000
    b.map(va, page_size, page_size=page_size, flags=P | W | U)
    ok(mmu, va, "w", True)
    clear_at(b, va, 4, W)                       # the PML4E above the leaf
    assert fault(mmu, va, "w", True) == PF_P | PF_W | PF_U
    set_at(b, va, 4, W)
    clear_at(b, va, level, U)                   # the leaf itself
    assert fault(mmu, va, "r", True) == PF_P | PF_U


def test_xd_ignored_when_nxe_clear_is_reserved_not_rights():
    """SDM 4.6.1: with NXE=0 instructions may be fetched from any address the
    mode may read (bit 63 is then reserved, test_reserved covers it)."""
    mem, b, mmu = setup(nxe=False)
    b.map(VA, 0x80000, flags=P | U)
    assert ok(mmu, VA, "x", True).executable is True
    assert ok(mmu, VA, "x", False).pa == 0x80000


# ------------------------------------------------ supervisor writes, WP -----

@pytest.mark.parametrize("leaf_u", [False, True])
def test_supervisor_write_wp0_writes_anything(leaf_u):
    """SDM 4.6.1: with CR0.WP=0 supervisor-mode data writes are allowed to
    any supervisor-mode address and (SMAP=0) any user-mode address,
    whatever R/W says."""
    mem, b, mmu = setup(wp=False)
    b.map(VA, 0x80000, flags=P | (U if leaf_u else 0))     # read-only
    clear_at(b, VA, 3, W)
    assert ok(mmu, VA, "w", False).pa == 0x80000
    # user-mode writes are refused whatever WP says
    if leaf_u:
        assert fault(mmu, VA, "w", True) == PF_P | PF_W | PF_U


@pytest.mark.parametrize("leaf_u", [False, True])
def test_supervisor_write_wp1_needs_rw(leaf_u):
    """SDM 4.6.1: with CR0.WP=1 supervisor writes need R/W=1 at every level,
    for supervisor-mode and user-mode addresses alike."""
    mem, b, mmu = setup(wp=True)
    b.map(VA, 0x80000, flags=P | (U if leaf_u else 0))
    assert fault(mmu, VA, "w", False) == PF_P | PF_W
    set_at(b, VA, 1, W)
    assert ok(mmu, VA, "w", False).pa == 0x80000


def test_wp_change_through_live_cpu():
    """SDM 2.5 (CR0.WP) with a live CpuState: clearing WP lets the next
    supervisor write through a read-only page succeed."""
    mem, b, mmu = setup(wp=True)
    b.map(VA, 0x80000, flags=P)
    assert fault(mmu, VA, "w") == PF_P | PF_W
    mmu.cpu.cr0 = mmu.cpu.cr0 & ~ptemu.CR0_WP
    ok(mmu, VA, "w")


# ------------------------------------------------------ user accesses -------

def test_user_none_follows_cpl():
    """API: user=None is a user-mode access iff CPL = 3 (SDM 4.6: 'accesses
    made while CPL = 3 are user-mode accesses'); U/S in the error code
    follows (SDM 4.7)."""
    mem, b, mmu = setup()
    b.map(VA, 0x80000, flags=P | W)                         # supervisor page
    mmu.cpu.cpl = 0
    mmu.translate(VA, "r")
    for cpl in (1, 2):
        mmu.cpu.cpl = cpl
        mmu.translate(VA, "r")                              # still supervisor
    mmu.cpu.cpl = 3
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(VA, "w")
    assert ei.value.error_code == PF_P | PF_W | PF_U


def test_user_true_overrides_cpl0():
    """user=True makes a user-mode access at any CPL (SDM 4.6)."""
    mem, b, mmu = setup(cpl=0)
    b.map(VA, 0x80000, flags=P | W)
    assert fault(mmu, VA, "r", True) == PF_P | PF_U


def test_user_write_needs_rw_and_user_fetch_needs_xd_clear():
    """SDM 4.6.1 (user-mode access): reads need U everywhere, writes R/W
    everywhere too, fetches XD=0 everywhere too."""
    mem, b, mmu = setup()
    b.map(VA, 0x80000, flags=P | U | NX)
    ok(mmu, VA, "r", True)
    assert fault(mmu, VA, "w", True) == PF_P | PF_W | PF_U
    assert fault(mmu, VA, "x", True) == PF_P | PF_U | PF_I


# ------------------------------------------------------------------ SMEP ----

def test_smep_blocks_supervisor_fetch_from_user_page():
    """SDM 4.6.1: with CR4.SMEP=1 instructions may not be fetched in
    supervisor mode from any user-mode address: P|I."""
    mem, b, mmu = setup(cr4=ptemu.CR4_SMEP)
    b.map(VA, 0x80000, flags=P | W | U)
    assert fault(mmu, VA, "x", False) == PF_P | PF_I
    ok(mmu, VA, "r", False)               # data reads unaffected (SMAP off)
    ok(mmu, VA, "x", True)                # user-mode fetch unaffected


def test_smep_off_allows_supervisor_fetch_from_user_page():
    """SDM 4.6.1: with SMEP=0 (and XD=0) supervisor fetches from user pages
    are allowed."""
    mem, b, mmu = setup()
    b.map(VA, 0x80000, flags=P | W | U)
    ok(mmu, VA, "x", False)


@pytest.mark.parametrize("level", LEVELS)
def test_smep_needs_user_at_every_level(level):
    """SDM 4.6: an address with U/S=0 at any level is supervisor-mode, so
    SMEP does not apply to it."""
    mem, b, mmu = setup(cr4=ptemu.CR4_SMEP)
    b.map(VA, 0x80000, flags=P | W | U)
    clear_at(b, VA, level, U)
    ok(mmu, VA, "x", False)


def test_smep_fault_sets_id_even_without_nxe():
    """SDM 4.7: I/D is set for a fetch when SMEP=1 even if NXE=0."""
    mem, b, mmu = setup(nxe=False, cr4=ptemu.CR4_SMEP)
    b.map(VA, 0x80000, flags=P | U)
    assert fault(mmu, VA, "x", False) == PF_P | PF_I


# ------------------------------------------------------------------ SMAP ----

@pytest.mark.parametrize("access,ec", [("r", PF_P), ("w", PF_P | PF_W)])
def test_smap_blocks_supervisor_data_access_ac0(access, ec):
    """SDM 4.6.1: with CR4.SMAP=1 and RFLAGS.AC=0, supervisor-mode data
    reads and writes to user-mode addresses are refused."""
    mem, b, mmu = setup(cr4=ptemu.CR4_SMAP, ac=False)
    b.map(VA, 0x80000, flags=P | W | U)
    assert fault(mmu, VA, access, False) == ec


@pytest.mark.parametrize("access", ["r", "w"])
def test_smap_ac1_allows_explicit(access):
    """SDM 4.6.1: with SMAP=1 and AC=1, explicit supervisor accesses to
    user-mode addresses are allowed."""
    mem, b, mmu = setup(cr4=ptemu.CR4_SMAP, ac=True)
    b.map(VA, 0x80000, flags=P | W | U)
    ok(mmu, VA, access, False)


@pytest.mark.parametrize("access,ec", [("r", PF_P), ("w", PF_P | PF_W)])
def test_smap_implicit_always_checked(access, ec):
    """SDM 4.6.1: implicit supervisor-mode accesses to user-mode addresses
    are refused under SMAP whatever RFLAGS.AC says."""
    mem, b, mmu = setup(cr4=ptemu.CR4_SMAP, ac=True)
    b.map(VA, 0x80000, flags=P | W | U)
    assert fault(mmu, VA, access, implicit=True) == ec


def test_implicit_without_smap_allowed():
    """SDM 4.6.1: with SMAP=0, supervisor (implicit) reads of user-mode
    addresses are allowed."""
    mem, b, mmu = setup(ac=False)
    b.map(VA, 0x80000, flags=P | W | U)
    ok(mmu, VA, "r", implicit=True)


def test_implicit_access_at_cpl3_is_supervisor():
    """SDM 4.6: implicit accesses (e.g. to the GDT) are supervisor-mode even
    at CPL 3: they may read a supervisor page, and a fault has U/S=0."""
    mem, b, mmu = setup(cpl=3, cr4=ptemu.CR4_SMAP)
    b.map(VA, 0x80000, flags=P)                   # supervisor, read-only
    b.map(VA2, 0x81000, flags=P | U)              # user
    with pytest.raises(ptemu.PageFault):
        mmu.translate(VA, "r")                    # CPL 3 explicit: user
    assert mmu.translate(VA, "r", implicit=True).pa == 0x80000
    assert fault(mmu, VA, "w", implicit=True) == PF_P | PF_W     # WP=1
    assert fault(mmu, VA2, "r", implicit=True) == PF_P           # SMAP


def test_smap_wp0_readonly_user_page_writable_with_ac():
    """SDM 4.6.1 (writes to user-mode addresses, CR0.WP=0, SMAP=1): allowed
    with AC=1 and explicit, regardless of R/W; refused with AC=0."""
    mem, b, mmu = setup(wp=False, cr4=ptemu.CR4_SMAP, ac=True)
    b.map(VA, 0x80000, flags=P | U)
    ok(mmu, VA, "w", False)
    mmu.cpu.ac = False
    assert fault(mmu, VA, "w", False) == PF_P | PF_W


def test_smap_wp1_readonly_user_page_needs_rw_with_ac():
    """SDM 4.6.1 (CR0.WP=1, SMAP=1): writes to user-mode addresses need AC=1,
    explicit, and R/W=1 everywhere."""
    mem, b, mmu = setup(wp=True, cr4=ptemu.CR4_SMAP, ac=True)
    b.map(VA, 0x80000, flags=P | U)
    assert fault(mmu, VA, "w", False) == PF_P | PF_W


def test_smap_ignores_user_mode_and_supervisor_pages_and_fetches():
    """SDM 4.6.1: SMAP concerns supervisor-mode data accesses to user-mode
    addresses only: user-mode accesses, supervisor pages and fetches (SMEP's
    business) are unaffected."""
    mem, b, mmu = setup(cr4=ptemu.CR4_SMAP, ac=False)
    b.map(VA, 0x80000, flags=P | W | U)
    b.map(VA2, 0x81000, flags=P | W)
    ok(mmu, VA, "r", True)
    ok(mmu, VA, "w", True)
    ok(mmu, VA2, "w", False)
    ok(mmu, VA, "x", False)


def test_smap_needs_user_at_every_level():
    """SDM 4.6: U/S=0 in the PDPTE makes the address supervisor-mode, so
    SMAP does not block a supervisor read of it."""
    mem, b, mmu = setup(cr4=ptemu.CR4_SMAP)
    b.map(VA, 0x80000, flags=P | W | U)
    clear_at(b, VA, 3, U)
    ok(mmu, VA, "r", False)


# ------------------------------------------------------- protection keys ----

KEY = 5
AD = 1 << (2 * KEY)
WD = 1 << (2 * KEY + 1)


def keyed(cr4, pkru=0, pkrs=0, wp=True, user_page=True, key=KEY):
    mem, b, mmu = setup(wp=wp, cr4=cr4, pkru=pkru, pkrs=pkrs)
    b.map(VA, 0x80000, flags=P | W | (U if user_page else 0), pkey=key)
    return b, mmu


def test_pkru_ad_blocks_user_page_data():
    """SDM 4.6.2: CR4.PKE=1, AD=1 for the key of a user-mode address: no data
    access, user or supervisor mode, read or write; P|PK (+W, +U) (4.7)."""
    b, mmu = keyed(ptemu.CR4_PKE, pkru=AD)
    assert fault(mmu, VA, "r", True) == PF_P | PF_U | PF_PK
    assert fault(mmu, VA, "w", True) == PF_P | PF_W | PF_U | PF_PK
    assert fault(mmu, VA, "r", False) == PF_P | PF_PK
    assert fault(mmu, VA, "w", False) == PF_P | PF_W | PF_PK


def test_pkru_wd_blocks_user_writes():
    """SDM 4.6.2: WD=1: user-mode writes refused, reads allowed."""
    b, mmu = keyed(ptemu.CR4_PKE, pkru=WD)
    ok(mmu, VA, "r", True)
    assert fault(mmu, VA, "w", True) == PF_P | PF_W | PF_U | PF_PK


@pytest.mark.parametrize("wp", [True, False])
def test_pkru_wd_supervisor_writes_depend_on_wp(wp):
    """SDM 4.6.2: WD=1 refuses supervisor-mode writes to the user-mode
    address only if CR0.WP=1."""
    b, mmu = keyed(ptemu.CR4_PKE, pkru=WD, wp=wp)
    ok(mmu, VA, "r", False)
    if wp:
        assert fault(mmu, VA, "w", False) == PF_P | PF_W | PF_PK
    else:
        ok(mmu, VA, "w", False)


def test_pkru_other_keys_do_not_matter():
    """SDM 4.6.2: only the two PKRU bits of the page's key count."""
    b, mmu = keyed(ptemu.CR4_PKE, pkru=0xffffffff & ~(AD | WD))
    ok(mmu, VA, "r", True)
    ok(mmu, VA, "w", True)


def test_pkru_key_zero_and_fifteen():
    """SDM 4.6.2: key i uses PKRU bits 2i (AD) and 2i+1 (WD), i = 0..15."""
    b, mmu = keyed(ptemu.CR4_PKE, pkru=1 << 30, key=15)      # AD15
    assert fault(mmu, VA, "r", True) == PF_P | PF_U | PF_PK
    b, mmu = keyed(ptemu.CR4_PKE, pkru=1 << 1, key=0)        # WD0
    ok(mmu, VA, "r", True)
    assert fault(mmu, VA, "w", True) == PF_P | PF_W | PF_U | PF_PK


def test_pkru_ignored_when_pke_clear():
    """SDM 4.6.2: with CR4.PKE=0 PKRU has no effect (bits 62:59 ignored)."""
    b, mmu = keyed(0, pkru=0xffffffff)
    ok(mmu, VA, "r", True)
    ok(mmu, VA, "w", True)


def test_pkru_not_for_supervisor_pages():
    """SDM 4.6.2: PKRU governs user-mode addresses only; a supervisor page
    with the same key (and PKS=0) is unaffected."""
    b, mmu = keyed(ptemu.CR4_PKE, pkru=AD | WD, user_page=False)
    ok(mmu, VA, "r", False)
    ok(mmu, VA, "w", False)


def test_pkru_not_for_page_made_supervisor_at_upper_level():
    """SDM 4.6: leaf U=1 but PDE U=0 is a supervisor-mode address, so PKRU
    does not apply to it."""
    b, mmu = keyed(ptemu.CR4_PKE, pkru=AD)
    clear_at(b, VA, 2, U)
    ok(mmu, VA, "r", False)


def test_key_comes_from_leaf_only():
    """SDM 4.6.2: the protection key is bits 62:59 of the entry that maps
    the page; in non-leaf entries those bits are ignored."""
    b, mmu = keyed(ptemu.CR4_PKE, pkru=1 << (2 * 9), key=0)   # AD for key 9
    for level in (2, 3, 4):
        set_at(b, VA, level, 9 << 59)
    ok(mmu, VA, "r", True)
    b.set_entry(VA, 1, b.get_entry(VA, 1) | (9 << 59))
    assert fault(mmu, VA, "r", True) == PF_P | PF_U | PF_PK


@pytest.mark.parametrize("page_size", [1 << 21, 1 << 30])
def test_key_of_large_leaf(page_size):
    """SDM 4.5.4 tables 4-16/4-18: bits 62:59 of a large leaf are its key."""
    mem, b, mmu = setup(cr4=ptemu.CR4_PKE, pkru=AD)
    va = 0x0000_0080_0000_0000
    b.map(va, page_size, page_size=page_size, flags=P | W | U, pkey=KEY)
    assert fault(mmu, va + 0x1234, "r", True) == PF_P | PF_U | PF_PK


def test_pkrs_ad_blocks_supervisor_page():
    """SDM 4.6.2: CR4.PKS=1, PKRS AD=1 for the key of a supervisor-mode
    address: data reads and writes refused, P|PK (+W) (4.7)."""
    b, mmu = keyed(CR4_PKS, pkrs=AD, user_page=False)
    assert fault(mmu, VA, "r", False) == PF_P | PF_PK
    assert fault(mmu, VA, "w", False) == PF_P | PF_W | PF_PK


@pytest.mark.parametrize("wp", [True, False])
def test_pkrs_wd_supervisor_writes_depend_on_wp(wp):
    """SDM 4.6.2: PKRS WD=1 refuses supervisor writes only with CR0.WP=1."""
    b, mmu = keyed(CR4_PKS, pkrs=WD, wp=wp, user_page=False)
    ok(mmu, VA, "r", False)
    if wp:
        assert fault(mmu, VA, "w", False) == PF_P | PF_W | PF_PK
    else:
        ok(mmu, VA, "w", False)


def test_pkrs_ignored_when_pks_clear_and_for_user_pages():
    """SDM 4.6.2: PKRS applies only with CR4.PKS=1 and only to
    supervisor-mode addresses."""
    b, mmu = keyed(0, pkrs=0xffffffff, user_page=False)
    ok(mmu, VA, "w", False)
    b, mmu = keyed(CR4_PKS, pkrs=0xffffffff, user_page=True)
    ok(mmu, VA, "w", True)
    ok(mmu, VA, "w", False)


def test_pkru_and_pkrs_are_separate():
    """SDM 4.6.2: a user page is checked against PKRU, a supervisor page
    against PKRS, each with its own bits for the same key."""
    mem, b, mmu = setup(cr4=ptemu.CR4_PKE | CR4_PKS, pkru=AD, pkrs=0)
    b.map(VA, 0x80000, flags=P | W | U, pkey=KEY)
    b.map(VA2, 0x81000, flags=P | W, pkey=KEY)
    assert fault(mmu, VA, "r", False) == PF_P | PF_PK
    ok(mmu, VA2, "r", False)
    mmu.cpu.pkru, mmu.cpu.pkrs = 0, AD
    ok(mmu, VA, "r", False)
    assert fault(mmu, VA2, "r", False) == PF_P | PF_PK


@pytest.mark.parametrize("user_page", [True, False])
def test_fetches_never_blocked_by_keys(user_page):
    """SDM 4.6.2: protection keys control data accesses only; instruction
    fetches ignore them."""
    b, mmu = keyed(ptemu.CR4_PKE | CR4_PKS, pkru=0xffffffff, pkrs=0xffffffff,
                   user_page=user_page)
    ok(mmu, VA, "x", user_page)
    if user_page:
        ok(mmu, VA, "x", False)           # SMEP off: supervisor fetch too
