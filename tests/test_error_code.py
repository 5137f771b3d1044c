"""The #PF error code, bit by bit (Intel SDM Vol. 3A 4.7, figure 4-12):

  bit 0 P     0: no translation (a P=0 entry); 1: protection or reserved bit
  bit 1 W/R   the access was a write
  bit 2 U/S   the access was a user-mode access (CPL 3, not implicit)
  bit 3 RSVD  a reserved bit was set in some paging-structure entry (with P)
  bit 4 I/D   the access was an instruction fetch AND (CR4.SMEP=1 or
              (CR4.PAE=1 and IA32_EFER.NXE=1))
  bit 5 PK    the key check failed: (PKE and a user-mode address with PKRU
              AD, or WD on a write by user mode or with CR0.WP=1) or the
              same with PKS/PKRS for a supervisor-mode address; data
              accesses only -- set even if another check failed as well

Each row of CASES is one access on a hand-built 4-level image with the
expected error code written out from the rules above; CR2 (PageFault.cr2)
is the faulting linear address.  Non-canonical addresses are #GP(0), not #PF.
"""
import numpy as np
import pytest

import ptemu
from ptemu import CpuState, Mmu, PhysicalMemory
from ptemu.pagetable import PageTableBuilder

P, W, U, NX = ptemu.PTE_P, ptemu.PTE_W, ptemu.PTE_U, ptemu.PTE_NX
fP, fW, fU, fR, fI, fK = (ptemu.PF_P, ptemu.PF_W, ptemu.PF_U, ptemu.PF_RSVD,
                          ptemu.PF_I, ptemu.PF_PK)

VA = 0x0000_7f00_1234_5000
RSVD_BIT = 1 << 45            # reserved with maxphyaddr=40 (SDM 4.5.4)
KEY = 7
AD, WD = 1 << (2 * KEY), 1 << (2 * KEY + 1)


def build(leaf, pkey=0, nxe=True, smep=False, smap=False, ac=False, wp=True,
          pke=False, pks=False, pkru=0, pkrs=0, cpl=0, upper_u=True):
    """leaf: the leaf flags, or None for "not mapped" (PTE P=0)."""
    mem = PhysicalMemory(1 << 20)
    b = PageTableBuilder(mem)
    cr0 = ptemu.CR0_PG | ptemu.CR0_PE | (ptemu.CR0_WP if wp else 0)
    cr4 = (ptemu.CR4_PAE | (ptemu.CR4_SMEP if smep else 0) | (ptemu.CR4_SMAP if smap else 0)
           | (ptemu.CR4_PKE if pke else 0) | (ptemu.CR4_PKS if pks else 0))
    efer = ptemu.EFER_LME | (ptemu.EFER_NXE if nxe else 0)
    cpu = CpuState(cr0=cr0, cr3=b.cr3, cr4=cr4, efer=efer, cpl=cpl, ac=ac,
                   pkru=pkru, pkrs=pkrs, maxphyaddr=40)
    if leaf is None:
        b.map(VA, 0x80000, flags=P | W | U)
        b.set_entry(VA, 1, 0)
    else:
        b.map(VA, 0x80000, flags=leaf, pkey=pkey)
    if not upper_u:
        b.set_entry(VA, 3, b.get_entry(VA, 3) & ~U)
    return Mmu(mem, cpu)


# (id, leaf flags or None, build options, access, user, expected error code)
CASES = [
    # -- not present: P=0, only the access bits ------------------------------
    ("np-read-sup", None, {}, "r", False, 0),
    ("np-write-sup", None, {}, "w", False, fW),
    ("np-read-user", None, {}, "r", True, fU),
    ("np-write-user", None, {}, "w", True, fW | fU),
    ("np-fetch-sup-nxe", None, {}, "x", False, fI),
    ("np-fetch-user-nxe", None, {}, "x", True, fU | fI),
    ("np-fetch-nonxe-nosmep", None, {"nxe": False}, "x", False, 0),
    ("np-fetch-user-nonxe-nosmep", None, {"nxe": False}, "x", True, fU),
    ("np-fetch-nonxe-smep", None, {"nxe": False, "smep": True}, "x", False, fI),
    ("np-read-pkey-ad", None, {"pke": True, "pkru": 0xffffffff}, "r", True, fU),
    # -- protection: P=1 -----------------------------------------------------
    ("user-read-sup-page", P | W, {}, "r", True, fP | fU),
    ("user-read-sup-upper", P | W | U, {"upper_u": False}, "r", True, fP | fU),
    ("user-write-ro", P | U, {}, "w", True, fP | fW | fU),
    ("sup-write-ro-wp1", P, {}, "w", False, fP | fW),
    ("sup-fetch-xd", P | NX, {}, "x", False, fP | fI),
    ("user-fetch-xd", P | U | NX, {}, "x", True, fP | fU | fI),
    ("user-fetch-sup-page-nonxe", P | W, {"nxe": False}, "x", True, fP | fU),
    ("smep-fetch", P | U, {"smep": True}, "x", False, fP | fI),
    ("smep-fetch-nonxe", P | U, {"smep": True, "nxe": False}, "x", False, fP | fI),
    ("smap-read", P | W | U, {"smap": True}, "r", False, fP),
    ("smap-write", P | W | U, {"smap": True}, "w", False, fP | fW),
    # -- reserved bit: P|RSVD plus the access bits ----------------------------
    ("rsvd-read", P | W | U | RSVD_BIT, {}, "r", False, fP | fR),
    ("rsvd-write-user", P | W | U | RSVD_BIT, {}, "w", True, fP | fR | fW | fU),
    ("rsvd-fetch-nxe", P | W | U | RSVD_BIT, {}, "x", False, fP | fR | fI),
    ("rsvd-fetch-nonxe", P | W | U | RSVD_BIT, {"nxe": False}, "x", False, fP | fR),
    ("rsvd-xd-nonxe", P | W | U | NX, {"nxe": False}, "r", True, fP | fR | fU),
    # -- protection keys -------------------------------------------------------
    ("pku-ad-user-read", P | W | U, {"pke": True, "pkru": AD}, "r", True, fP | fU | fK),
    ("pku-ad-sup-read", P | W | U, {"pke": True, "pkru": AD}, "r", False, fP | fK),
    ("pku-wd-user-write", P | W | U, {"pke": True, "pkru": WD}, "w", True,
     fP | fW | fU | fK),
    ("pku-wd-sup-write-wp1", P | W | U, {"pke": True, "pkru": WD}, "w", False,
     fP | fW | fK),
    # PK with another failure too: still PK (SDM 4.7)
    ("pku-wd-and-ro", P | U, {"pke": True, "pkru": WD}, "w", True, fP | fW | fU | fK),
    ("pku-ad-and-smap", P | W | U, {"pke": True, "pkru": AD, "smap": True}, "r", False,
     fP | fK),
    ("pku-wd-and-ro-wp0-user", P | U, {"pke": True, "pkru": WD, "wp": False}, "w", True,
     fP | fW | fU | fK),
    ("pks-ad-sup-read", P | W, {"pks": True, "pkrs": AD}, "r", False, fP | fK),
    ("pks-wd-sup-write", P | W, {"pks": True, "pkrs": WD}, "w", False, fP | fW | fK),
    ("pks-ad-user-read-sup-page", P | W, {"pks": True, "pkrs": AD}, "r", True,
     fP | fU | fK),
    # ... but never PK where the key check itself passes or does not apply
    ("pku-sup-page-no-pk", P, {"pke": True, "pkru": AD}, "r", True, fP | fU),
    ("pku-fetch-no-pk", P | U | NX, {"pke": True, "pkru": AD | WD}, "x", True,
     fP | fU | fI),
    ("pku-sup-page-wd-no-pk", P, {"pke": True, "pkru": WD}, "w", True, fP | fW | fU),
    ("pku-other-key", P | U, {"pke": True, "pkru": 0xffffffff & ~(AD | WD)}, "w", True,
     fP | fW | fU),
    ("pku-disabled", P | U, {"pkru": 0xffffffff}, "w", True, fP | fW | fU),
    ("pku-wd-sup-write-wp0-ro", P | U, {"pke": True, "pkru": WD, "wp": False}, "w", False,
     None),  # allowed: WP=0, and WD only blocks supervisor writes with WP=1
    ("pku-rsvd-no-pk", P | W | U | RSVD_BIT, {"pke": True, "pkru": AD}, "r", True,
     fP | fR | fU),
]


@pytest.mark.parametrize("leaf,opts,access,user,expect",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_code_table(leaf, opts, access, user, expect):
    """SDM 4.7: the error code of each case, derived in the table above."""
    opts = dict(opts)
    mmu = build(leaf, pkey=KEY, **opts)
    if expect is None:
        assert mmu.translate(VA, access, user=user).pa == 0x80000
        return
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(VA + 0x10, access, user=user)
    f = ei.value
    assert f.error_code == expect, "%#x != %#x" % (f.error_code, expect)
    assert f.cr2 == VA + 0x10 and f.va == VA + 0x10
    assert f.vector == 14
    assert isinstance(f, ptemu.MmuFault)


@pytest.mark.parametrize("leaf,opts,access,user,expect",
                         [c[1:] for c in CASES if c[5] is not None],
                         ids=[c[0] for c in CASES if c[5] is not None])
def test_error_code_table_batch(leaf, opts, access, user, expect):
    """translate_many reports vector 14 and the same error code (SDM 4.7)."""
    mmu = build(leaf, pkey=KEY, **opts)
    r = mmu.translate_many(np.array([VA + 0x10], dtype=np.uint64), access, user=user)
    assert int(r.vector[0]) == 14
    assert int(r.error_code[0]) == expect
    assert int(r.pa[0]) == 0


def test_implicit_access_error_code_has_no_us():
    """SDM 4.7: U/S reflects the mode of the access; an implicit supervisor
    access at CPL 3 under SMAP reports P only (no U)."""
    mmu = build(P | W | U, smap=True, cpl=3, ac=True)
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(VA, "r", implicit=True)
    assert ei.value.error_code == fP
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(VA, "w", implicit=True)
    assert ei.value.error_code == fP | fW


def test_cpl3_default_sets_us():
    """SDM 4.7: an access at CPL 3 (user=None) is a user-mode access: U/S."""
    mmu = build(None, cpl=3)
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(VA, "w")
    assert ei.value.error_code == fW | fU


@pytest.mark.parametrize("va", [0x0000_7f00_1234_5ff8, 0xffff_8000_0000_0000,
                                0xffff_ffff_ffff_ffff, 0])
def test_cr2_is_the_faulting_address(va):
    """SDM 4.7: CR2 receives the linear address that caused the #PF (the
    whole 64-bit address, upper half included)."""
    mmu = build(None)
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(va)
    assert ei.value.cr2 == va and ei.value.va == va


@pytest.mark.parametrize("va", [0x0000_8000_0000_0000, 0x8000_0000_0000_0000,
                                0xffff_7fff_ffff_ffff, 0x1234_5678_9abc_def0])
def test_non_canonical_is_general_protection(va):
    """SDM 4.5.1 / 6.15 (#GP): a non-canonical linear address raises #GP(0),
    not #PF; it is an MmuFault with vector 13 and error code 0."""
    mmu = build(P | W | U)
    with pytest.raises(ptemu.GeneralProtection) as ei:
        mmu.translate(va)
    assert not isinstance(ei.value, ptemu.PageFault)
    assert isinstance(ei.value, ptemu.MmuFault)
    assert ei.value.vector == 13
    assert ei.value.error_code == 0
    r = mmu.translate_many(np.array([va], dtype=np.uint64))
    assert (int(r.vector[0]), int(r.error_code[0])) == (13, 0)


def test_fault_cause_names():
    """PageFault.cause tells the three kinds of #PF apart (P=0; RSVD; rights)."""
    causes = {}
    for name, leaf, acc in (("np", None, "r"), ("rsvd", P | RSVD_BIT, "r"),
                            ("prot", P, "w")):
        with pytest.raises(ptemu.PageFault) as ei:
            build(leaf).translate(VA, acc)
        causes[name] = ei.value.cause
    assert causes == {"np": "not-present", "rsvd": "reserved-bit", "prot": "protection"}
