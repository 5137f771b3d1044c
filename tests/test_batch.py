"""translate_many (API.md "CPU state and MMU"): arrays pa (uint64), vector
(uint8: 0 translated, 13 #GP, 14 #PF), error_code (uint32); access is one
of "r"/"w"/"x" for all, or a per-element array (uint8 0/1/2 or 'S1'
b"r"/b"w"/b"x") of the same length.  Each element must be exactly what a
scalar translate gives, in order (A/D bits included, SDM 4.8); bad arrays
raise ptemu.InvalidInput.

The image is hand-built (4-level paging, MAXPHYADDR 46, CR0.WP=1, NXE=1):

  PML4 @0x1000: [0] -> PDPT @0x2000 (P W U)            [1] not present
  PDPT @0x2000: [0] -> PD @0x3000 (P W U)              [1] 1 GiB leaf -> 0x1c0000000
                                                           (P W, supervisor)
  PD   @0x3000: [0] -> PT @0x4000 (P W U)              [1] 2 MiB leaf -> 0x600000 (P U, read-only)
  PT   @0x4000: [0] not present   [1] 0x9000 (P W U XD)   [2] 0xa000 (P U)
               [3] 0xb000 (P W U) with bit 51 set: reserved for MAXPHYADDR 46

Every expected pa and error code below is derived by hand from SDM 4.5
(address formation), 4.6.1 (rights), 4.7 (error code: P=1, W/R=2, U/S=4,
RSVD=8, I/D=16).
"""
import numpy as np
import pytest

import ptemu

P, W, U, PS, A, D, NX = 1, 2, 4, 0x80, 0x20, 0x40, 1 << 63
EC_P, EC_W, EC_U, EC_RSVD, EC_I = 1, 2, 4, 8, 16

PML4, PDPT, PD, PT = 0x1000, 0x2000, 0x3000, 0x4000
GIB_FRAME = 0x1C0000000
MIB2_FRAME = 0x600000


def build():
    mem = ptemu.PhysicalMemory(0x10000)
    mem.write_u64(PML4 + 0 * 8, PDPT | P | W | U)
    mem.write_u64(PDPT + 0 * 8, PD | P | W | U)
    mem.write_u64(PDPT + 1 * 8, GIB_FRAME | P | W | PS)
    mem.write_u64(PD + 0 * 8, PT | P | W | U)
    mem.write_u64(PD + 1 * 8, MIB2_FRAME | P | U | PS)
    mem.write_u64(PT + 1 * 8, 0x9000 | P | W | U | NX)
    mem.write_u64(PT + 2 * 8, 0xA000 | P | U)
    mem.write_u64(PT + 3 * 8, 0xB000 | P | W | U | (1 << 51))
    cpu = ptemu.CpuState.long_mode(cr3=PML4, maxphyaddr=46, cpl=3)
    return mem, ptemu.Mmu(mem, cpu)


# (va, access, vector, pa, error code) for a user-mode access (CPL 3)
USER_CASES = [
    (0x1123, "r", 0, 0x9123, 0),                          # 4.5: PT[1] frame | offset
    (0x1123, "w", 0, 0x9123, 0),                          # W=1 at every level
    (0x1123, "x", 14, 0, EC_P | EC_U | EC_I),             # 4.6.1: XD=1 in the PTE
    (0x2008, "r", 0, 0xA008, 0),
    (0x2008, "w", 14, 0, EC_P | EC_W | EC_U),             # R/W=0 in the PTE
    (0x0FF8, "r", 14, 0, EC_U),                           # PT[0] P=0: P bit clear
    (0x3010, "r", 14, 0, EC_P | EC_RSVD | EC_U),          # 4.5.4: bit 51 >= MAXPHYADDR
    (0x201234, "r", 0, MIB2_FRAME | 0x1234, 0),           # 2 MiB leaf: bits 20:0 offset
    (0x3FFFFF, "x", 0, MIB2_FRAME | 0x1FFFFF, 0),         # XD=0 everywhere
    (0x201234, "w", 14, 0, EC_P | EC_W | EC_U),           # 2 MiB leaf read-only
    (0x40012345, "r", 14, 0, EC_P | EC_U),                # 1 GiB leaf is supervisor
    (0x0000800000000000, "r", 13, 0, 0),                  # 4.5.1: not canonical -> #GP
    (0xFFFF000000000000, "w", 13, 0, 0),                  # bit 47 differs from 63:48
    (0x8000000000, "x", 14, 0, EC_U | EC_I),              # PML4[1] not present, fetch
    (0xFFFFFFFFFFFFF000, "r", 14, 0, EC_U),               # canonical; PML4[511] P=0
]

# supervisor-mode (user=False) accesses, CR0.WP=1
SUPERVISOR_CASES = [
    (0x40012345, "r", 0, GIB_FRAME | 0x12345, 0),         # 1 GiB leaf: bits 29:0 offset
    (0x7FFFFFFF, "w", 0, GIB_FRAME | 0x3FFFFFFF, 0),      # W=1 everywhere
    (0x201000, "w", 14, 0, EC_P | EC_W),                  # 4.6.1: WP=1, R/W=0
    (0x1000, "x", 14, 0, EC_P | EC_I),                    # XD
    (0x2000, "x", 0, 0xA000, 0),                          # SMEP off: user page executes
]

CODES = {"r": 0, "w": 1, "x": 2}


def columns(cases):
    vas = np.array([c[0] for c in cases], dtype=np.uint64)
    acc = np.array([CODES[c[1]] for c in cases], dtype=np.uint8)
    return vas, acc


def expect(res, cases):
    assert res.vector.tolist() == [c[2] for c in cases]
    assert res.pa.tolist() == [c[3] for c in cases]
    assert res.error_code.tolist() == [c[4] for c in cases]


def scalar(mmu, va, access, user=None, update_ad=True):
    try:
        return (0, mmu.translate(va, access, user=user, update_ad=update_ad).pa, 0)
    except ptemu.PageFault as exc:
        assert exc.cr2 == va                      # SDM 4.7: CR2 = faulting address
        return (14, 0, exc.error_code)
    except ptemu.GeneralProtection:
        return (13, 0, 0)


@pytest.mark.parametrize("form", ["u8", "S1"])
def test_per_element_access_user(form):
    """API.md: a per-element access array; SDM 4.5-4.7 expectations."""
    _, mmu = build()
    vas, acc = columns(USER_CASES)
    if form == "S1":
        acc = np.array([c[1].encode() for c in USER_CASES], dtype="S1")
    res = mmu.translate_many(vas, acc)                 # user=None: CPL 3 -> user mode
    expect(res, USER_CASES)
    assert res.pa.dtype == np.uint64 and res.vector.dtype == np.uint8
    assert res.error_code.dtype == np.uint32
    assert res.ok.tolist() == [c[2] == 0 for c in USER_CASES]


def test_per_element_access_supervisor():
    _, mmu = build()
    vas, acc = columns(SUPERVISOR_CASES)
    expect(mmu.translate_many(vas, acc, user=False), SUPERVISOR_CASES)


@pytest.mark.parametrize("access", ["r", "w", "x"])
def test_single_access_for_all_equals_scalar(access):
    """access given once applies to every element; each element equals the
    scalar translate of the same access (on its own memory copy)."""
    mem_b, batch = build()
    mem_s, one = build()
    vas = [c[0] for c in USER_CASES + SUPERVISOR_CASES]
    for user in (None, True, False):
        res = batch.translate_many(vas, access, user=user)
        got = list(zip(res.vector.tolist(), res.pa.tolist(), res.error_code.tolist()))
        assert got == [scalar(one, va, access, user) for va in vas]
    assert np.array_equal(mem_b.array, mem_s.array)        # same A/D bits


def test_matches_table_by_hand_for_single_access():
    _, mmu = build()
    cases = [c for c in USER_CASES if c[1] == "r"]
    res = mmu.translate_many([c[0] for c in cases], "r")
    expect(res, cases)


def test_accessed_dirty_in_order():
    """SDM 4.8: A in every entry of a successful walk, D in the leaf of a
    successful write; faulting accesses set nothing."""
    mem, mmu = build()
    vas = np.array([0x1123, 0x1123, 0x2008, 0x201234], dtype=np.uint64)
    acc = np.array([0, 1, 1, 1], dtype=np.uint8)           # r, w, w (faults), w (faults)
    res = mmu.translate_many(vas, acc)
    assert res.vector.tolist() == [0, 0, 14, 14]
    assert mem.read_u64(PML4) == PDPT | P | W | U | A
    assert mem.read_u64(PDPT) == PD | P | W | U | A
    assert mem.read_u64(PD) == PT | P | W | U | A
    assert mem.read_u64(PT + 8) == 0x9000 | P | W | U | NX | A | D
    assert mem.read_u64(PT + 16) == 0xA000 | P | U                 # write faulted
    assert mem.read_u64(PD + 8) == MIB2_FRAME | P | U | PS          # write faulted


def test_update_ad_false_writes_nothing():
    mem, mmu = build()
    before = mem.array.copy()
    vas, acc = columns(USER_CASES)
    res = mmu.translate_many(vas, acc, update_ad=False)
    expect(res, USER_CASES)
    assert np.array_equal(mem.array, before)


def test_mixed_array_equals_scalar_element_by_element():
    """Every (va, access) pair of the hand-built image, in a shuffled order,
    with A/D updates: batch == scalar, element by element and in memory."""
    rng = np.random.default_rng(1)
    base = [c[0] for c in USER_CASES + SUPERVISOR_CASES]
    vas = np.array([va + off for va in base for off in (0, 8, 0xFF0)] * 3, dtype=np.uint64)
    acc = rng.integers(0, 3, size=len(vas), dtype=np.uint8)
    perm = rng.permutation(len(vas))
    vas, acc = vas[perm].copy(), acc[perm].copy()
    for user in (None, True, False):
        mem_b, batch = build()
        mem_s, one = build()
        res = batch.translate_many(vas, acc, user=user)
        for i, va in enumerate(vas.tolist()):
            want = scalar(one, va, "rwx"[acc[i]], user)
            assert (res.vector[i], res.pa[i], res.error_code[i]) == want, i
        assert np.array_equal(mem_b.array, mem_s.array)


def test_read_only_and_list_inputs():
    """A read-only uint64 array and a list of ints (or numpy ints) give the
    same answer as a writable array."""
    _, mmu = build()
    vas, acc = columns(USER_CASES)
    ro = vas.copy()
    ro.setflags(write=False)
    ro_acc = acc.copy()
    ro_acc.setflags(write=False)
    expect(mmu.translate_many(ro, ro_acc, update_ad=False), USER_CASES)
    expect(mmu.translate_many([int(v) for v in vas], acc, update_ad=False), USER_CASES)
    expect(mmu.translate_many([np.uint64(v) for v in vas], acc, update_ad=False), USER_CASES)
    expect(mmu.translate_many(tuple(int(v) for v in vas), acc, update_ad=False), USER_CASES)


@pytest.mark.parametrize("vas", [np.array([], dtype=np.uint64), [], ()])
def test_empty(vas):
    _, mmu = build()
    for access in ("r", np.array([], dtype=np.uint8), np.array([], dtype="S1")):
        res = mmu.translate_many(vas, access)
        assert len(res.pa) == len(res.vector) == len(res.error_code) == 0
        assert res.pa.dtype == np.uint64 and res.vector.dtype == np.uint8
        assert res.error_code.dtype == np.uint32


def test_non_canonical_5_level():
    """SDM 4.5.1: with LA57 the canonical width is 57 bits, so 0x0000800000000000
    is canonical (a walk; PML5E not present) and 0x0100000000000000 is not."""
    mem = ptemu.PhysicalMemory(0x4000)
    cpu = ptemu.CpuState.long_mode(cr3=0x1000, la57=True)
    mmu = ptemu.Mmu(mem, cpu)
    res = mmu.translate_many([0x0000800000000000, 0x0100000000000000,
                              0xFF00000000000000], "r", user=False)
    assert res.vector.tolist() == [14, 13, 14]
    assert res.error_code.tolist() == [0, 0, 0]


# -- bad input: ptemu.InvalidInput (a ValueError), never a crash -----------------
BAD_VAS = {
    "int64": np.array([0x1000], dtype=np.int64),
    "uint32": np.array([0x1000], dtype=np.uint32),
    "float": np.array([4096.0]),
    "big-endian": np.array([0x1000], dtype=">u8"),
    "2-D": np.zeros((2, 2), dtype=np.uint64),
    "non-contiguous": np.arange(8, dtype=np.uint64)[::2],
    "negative in list": [0x1000, -1],
    "too big in list": [1 << 64],
    "float in list": [4096.0],
    "string in list": ["0x1000"],
    "not a sequence": 0x1000,
}


@pytest.mark.parametrize("name", sorted(BAD_VAS))
def test_bad_vas(name):
    _, mmu = build()
    with pytest.raises(ptemu.InvalidInput):
        mmu.translate_many(BAD_VAS[name], "r")


def _bad_access(n):
    return {
        "wrong length": np.zeros(n + 1, dtype=np.uint8),
        "too short": np.zeros(n - 1, dtype=np.uint8),
        "code 3": np.array([0] * (n - 1) + [3], dtype=np.uint8),
        "code 255": np.full(n, 255, dtype=np.uint8),
        "int64 codes": np.zeros(n, dtype=np.int64),
        "2-D": np.zeros((n, 1), dtype=np.uint8),
        "non-contiguous": np.zeros(2 * n, dtype=np.uint8)[::2],
        "S1 b'q'": np.array([b"r"] * (n - 1) + [b"q"], dtype="S1"),
        "S1 wrong length": np.array([b"r"] * (n + 1), dtype="S1"),
        "letter": "q",
        "upper case": "R",
        "None": None,
    }


@pytest.mark.parametrize("name", sorted(_bad_access(4)))
def test_bad_access(name):
    mem, mmu = build()
    before = mem.array.copy()
    vas = np.array([0x1000, 0x1008, 0x2000, 0x201000], dtype=np.uint64)
    with pytest.raises(ptemu.InvalidInput):
        mmu.translate_many(vas, _bad_access(len(vas))[name])
    assert np.array_equal(mem.array, before)       # refused before any walk
    assert isinstance(ptemu.InvalidInput("x"), ValueError)
