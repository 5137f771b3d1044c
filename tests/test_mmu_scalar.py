"""Mmu.translate's one-argument path (user=None, A/D on) against its general
path (the same access with user given as CPL says, or through translate_many):
the same Translation, the same fault, in every case the C entry point
distinguishes by its return value -- a physical address of 0, which is also
what it returns on a fault (docs/performance.md "Scalar translate").

Hand-built image (4-level paging, 64 KiB, A and D set where noted):

  root @0x1000 -> PDPT @0x2000 -> PD @0x3000 -> PT @0x4000
  PT [0] -> frame 0x0     (P W U A D): va 0 translates to pa 0 (SDM 4.5: any frame)
     [1] -> frame 0xa000  (P W U, A and D clear: the walk sets them, SDM 4.8)
     [2] -> not present   (#PF, error code per SDM 4.7)
"""
import numpy as np
import pytest

import ptemu

P, W, U, A, D = 1, 2, 4, 0x20, 0x40
T = P | W | U | A


def _mmu(**cpu):
    mem = ptemu.PhysicalMemory(0x10000)
    mem.write_u64(0x1000, 0x2000 | T)
    mem.write_u64(0x2000, 0x3000 | T)
    mem.write_u64(0x3000, 0x4000 | T)
    mem.write_u64(0x4000, 0x0 | P | W | U | A | D)
    mem.write_u64(0x4008, 0xa000 | P | W | U)
    return ptemu.Mmu(mem, ptemu.CpuState.long_mode(cr3=0x1000, **cpu)), mem


def _fields(t):
    return (t.va, t.pa, t.page_size, t.level, t.leaf, t.rights, t.writable, t.user,
            t.executable, t.mem_refs, t.tlb_hit, t.first_level, t.entries)


@pytest.mark.parametrize("access", ["r", "w", "x"])
def test_translation_to_pa_zero_after_a_fault(access):
    """A fault, then a translation to physical address 0: the second must
    not raise the first's fault again (C clears it, whole)."""
    mmu, _ = _mmu()
    with pytest.raises(ptemu.PageFault) as exc:
        mmu.translate(0x2010, access)
    assert exc.value.error_code == (2 if access == "w" else 0x10 if access == "x" else 0)
    t = mmu.translate(0x0, access)
    assert (t.pa, t.level, t.page_size) == (0x0, 1, 0x1000)
    assert _fields(t) == _fields(mmu.translate(0x0, access, user=False))


def test_paging_off_address_zero():
    """CR0.PG=0: linear = physical, so va 0 gives pa 0 and no fault."""
    mem = ptemu.PhysicalMemory(0x1000)
    mmu = ptemu.Mmu(mem, ptemu.CpuState())
    t = mmu.translate(0)
    assert (t.pa, t.level, t.entries) == (0, 0, [])
    assert mmu.translate((1 << 64) - 1).pa == (1 << 64) - 1


@pytest.mark.parametrize("access", ["r", "w", "x"])
def test_ad_bits_set_through_the_full_walk(access):
    """A and D clear in the leaf: the read-only quick walk in C hands the
    access to the full one, which sets A (and D on a write) -- SDM 4.8 -- and
    reports the entries as memory now holds them."""
    mmu, mem = _mmu()
    t = mmu.translate(0x1010, access)
    leaf = mem.read_u64(0x4008)
    assert leaf & A and bool(leaf & D) == (access == "w")
    assert t.leaf == leaf and t.entries[-1] == (0x4008, leaf)
    assert t.pa == 0xa010


def test_both_paths_agree_on_every_field():
    mmu, _ = _mmu()
    for va in (0x10, 0x1010, 0xfff):
        for access in "rwx":
            fast = mmu.translate(va, access)
            general = mmu.translate(va, access, user=False)
            assert _fields(fast) == _fields(general)
            assert fast == general and hash(fast) == hash(general)
            batch = mmu.translate_many(np.array([va], dtype=np.uint64), access)
            assert int(batch.pa[0]) == fast.pa


def test_cpl3_user_mode_on_the_fast_path():
    """user=None means CPL 3 is a user-mode access (API.md): the supervisor
    leaf below faults with P|U (SDM 4.6.1, 4.7) only once CPL is 3."""
    mmu, mem = _mmu()
    mem.write_u64(0x4000, 0x0 | P | W | A | D)      # supervisor page
    assert mmu.translate(0x10).pa == 0x10
    mmu.cpu.cpl = 3
    with pytest.raises(ptemu.PageFault) as exc:
        mmu.translate(0x10)
    assert exc.value.error_code == P | U


@pytest.mark.parametrize("va, message", [
    (-1, "must not be negative"), (1 << 64, "does not fit"), (1.5, "must be an integer")])
def test_bad_address_on_the_fast_path(va, message):
    mmu, _ = _mmu()
    with pytest.raises(ptemu.InvalidInput, match=message):
        mmu.translate(va)


def test_output_words_are_64_bits_and_take_every_address():
    # The scalar path stores va into the output array, whose typecode is
    # chosen for speed ("L" where it is 8 bytes): it must be 8 bytes and
    # carry the whole 64-bit range into C (a non-canonical address at the
    # top: #GP, SDM Vol. 3A 4.1.4 / 6.15; the highest canonical one: #PF).
    mmu, _ = _mmu()
    assert mmu._outbuf.itemsize == 8
    with pytest.raises(ptemu.GeneralProtection):
        mmu.translate(0x8000_0000_0000_0000)
    with pytest.raises(ptemu.PageFault) as e:
        mmu.translate((1 << 64) - 8)
    assert e.value.cr2 == (1 << 64) - 8


def test_numpy_address():
    mmu, _ = _mmu()
    assert mmu.translate(np.uint64(0x1010)).pa == 0xa010
    assert type(mmu.translate(np.uint64(0x1010)).va) is int


def test_translation_is_read_only():
    mmu, _ = _mmu()
    t = mmu.translate(0x10)
    with pytest.raises(AttributeError):
        t.pa = 5


def test_flags_read_for_their_truth_on_both_paths():
    """The one-argument path takes update_ad and implicit by truth, as the
    general path reads them, and an access kind equal to 'r' however it was
    made (a numpy str): 1/0 and numpy bools behave as True/False.  A probe (update_ad
    false) leaves A and D clear; a write with update_ad true sets both
    (SDM 4.8)."""
    mmu, mem = _mmu()
    before = mem.read_u64(0x4008)
    t = mmu.translate(0x1010, "w", update_ad=0)
    assert mem.read_u64(0x4008) == before and not t.leaf & A
    t = mmu.translate(0x1010, "w", update_ad=np.False_, implicit=0)
    assert mem.read_u64(0x4008) == before
    t = mmu.translate(0x1010, "".join(["w"]), update_ad=np.True_, implicit=np.False_)
    leaf = mem.read_u64(0x4008)
    assert leaf & A and leaf & D and t.leaf == leaf
    r = np.str_("r")
    for kw in ({}, {"update_ad": 1}, {"implicit": 0}, {"update_ad": np.True_}):
        assert mmu.translate(0x10, r, **kw) == mmu.translate(0x10, "r", user=False)
    with pytest.raises(ptemu.InvalidInput, match="access must be"):
        mmu.translate(0x10, b"r")
