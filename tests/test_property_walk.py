"""Property tests: ptemu's walker against the independent oracle tests/refwalk.py.

Each example builds a small physical memory (16-64 pages, sometimes with a
partial last page), fills it with noise (zeros, random words, or sparse
plausible entries), and then writes 1-4 planned walk paths from CR3 down:
at every level the entry is drawn with random flags (P W U PWT PCD A D G PS
XD, pkey bits 62:59, ignored bits), and sometimes made not present, made to
point outside memory, given a reserved bit (51:MAXPHYADDR, PS in a
PML4E/PML5E, XD without NXE, 20:13 / 29:13 of a large leaf).  Paths end in
4 KiB, 2 MiB or 1 GiB leaves.  The CPU state draws CR0.WP, CR4.{SMEP, SMAP,
PKE, PKS, LA57, PGE, PCIDE}, EFER.NXE, CPL 0/3, RFLAGS.AC, PKRU, PKRS and
MAXPHYADDR 32..52; accesses draw r/w/x, user None/True/False, implicit,
update_ad.  Virtual addresses are mostly the planned paths (so walks reach
the leaves), some perturbed by one bit, some random, a few non-canonical.

Compared (SDM 4.5 walk, 4.6 rights, 4.7 error code, 4.8 A/D):
outcome kind, pa, page size, leaf level, the entries read, the combined
rights, the #PF error code, CR2, the fault's cause and level, and the whole
memory after every access (A/D exactly; nothing written on a fault).
translate_many is compared with scalar translate and with the oracle.

Run longer with HYPOTHESIS_PROFILE=long (tests/conftest.py).
"""
import random

import numpy as np
import pytest
from hypothesis import event, given, note, settings, strategies as st

import ptemu
import refwalk as R

PAGE = 4096


def scaled(factor):
    """Examples for this test: a multiple of the profile's max_examples."""
    return max(5, int(settings.default.max_examples * factor))


def mask_between(high, low):
    return R.bits_between(high, low)


# ---------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------
def pk_registers():
    one_key = st.builds(lambda k, v: v << (2 * k), st.integers(0, 15), st.integers(1, 3))
    return st.one_of(st.just(0), one_key, st.integers(0, 2**32 - 1), st.just(0xFFFFFFFF),
                     st.just(0x55555554), st.just(0xAAAAAAAA))


def entry_flags(r, level, leaf):
    """Flags of an entry from one random 40-bit word (disjoint bit fields),
    biased so that most entries grant W and U (walks then get as far as
    their rights checks)."""
    def field(low, width):
        return (r >> low) & ((1 << width) - 1)
    v = 1 << R.BIT_P
    if field(0, 3):
        v |= 1 << R.BIT_RW                 # 7/8
    if field(32, 3):
        v |= 1 << R.BIT_US                 # 7/8
    v |= field(4, 1) << R.BIT_A
    v |= field(5, 1) << R.BIT_D            # ignored above the leaf
    v |= field(6, 1) << R.BIT_G            # ignored above the leaf
    if field(7, 2) == 3:
        v |= 1 << R.BIT_PWT
    if field(9, 2) == 3:
        v |= 1 << R.BIT_PCD
    if field(11, 3 if leaf else 4) == 0:
        v |= 1 << R.BIT_XD                 # XD (reserved if NXE=0): 1/8 leaf, 1/16 table
    if level == 1 and field(15, 1):
        v |= 1 << R.BIT_PS                 # PAT in a PTE, not PS
    if field(16, 1):
        v |= field(17, 3) << 9             # ignored bits 11:9
    if leaf or field(24, 1):
        v |= field(20, 4) << R.PKEY_LOW    # protection key (ignored if not a leaf)
    if field(25, 1):
        v |= field(26, 6) << 52            # ignored bits 57:52
    return v


class Plan:
    """A drawn image: memory size, noise, CPU state, the entries written
    (path order) and the virtual address each path was planned for."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def __repr__(self):
        lines = ["Plan(size=%#x, noise=%s/%d, path_seed=%d, cr0=%#x, cr3=%#x, cr4=%#x, "
                 "efer=%#x, cpl=%d, ac=%d, pkru=%#x, pkrs=%#x, M=%d)" % (
                     self.size, self.noise, self.seed, self.path_seed, self.cr0, self.cr3,
                     self.cr4, self.efer, self.cpl, self.ac, self.pkru, self.pkrs,
                     self.maxphyaddr)]
        for va, writes in zip(self.vas, self.paths):
            lines.append("  va %#018x: %s" % (va, ", ".join(
                "[%#x]=%#x" % w for w in writes)))
        return "\n".join(lines)

    def image(self):
        """The memory as a numpy uint8 array (noise, then the path writes)."""
        rng = np.random.default_rng(self.seed)
        words = np.zeros(self.size // 8, dtype=np.uint64)
        if self.noise == "garbage":
            words[:] = rng.integers(0, 2**64, size=len(words), dtype=np.uint64,
                                    endpoint=False)
        elif self.noise == "sparse":
            # plausible entries: present or not, pointing into memory
            sel = rng.random(len(words)) < 0.15
            pages = rng.integers(0, self.npages + 2, size=len(words), dtype=np.uint64)
            low = rng.integers(0, 0x1000, size=len(words), dtype=np.uint64)
            words[sel] = (pages[sel] << np.uint64(12)) | low[sel]
        for writes in self.paths:
            for pa, value in writes:
                words[pa // 8] = value
        return words.view(np.uint8).copy()

    def cpu(self):
        return ptemu.CpuState(cr0=self.cr0, cr3=self.cr3, cr4=self.cr4, efer=self.efer,
                              cpl=self.cpl, ac=self.ac, pkru=self.pkru, pkrs=self.pkrs,
                              maxphyaddr=self.maxphyaddr)


def canonical(va_bits, width):
    va_bits &= (1 << width) - 1
    if va_bits >> (width - 1):
        va_bits |= ((1 << 64) - 1) & ~((1 << width) - 1)
    return va_bits


_CONFIG = st.tuples(
    st.integers(16, 64),                                            # pages
    st.sampled_from([0, 0, 0, 0, 0, 8, 1024, 2048, 4088]),          # partial last page
    st.one_of(st.sampled_from([32, 36, 39, 46, 52]), st.integers(32, 52)),  # MAXPHYADDR
    st.booleans(),                                                  # LA57
    st.integers(0, 39).map(lambda i: i != 29),                      # CR0.PG (1/40 off)
    st.integers(0, 2**9 - 1),                                       # WP NXE SMEP ... AC
    st.sampled_from([0, 3]),                                        # CPL
    pk_registers(), pk_registers(),                                 # PKRU, PKRS
    st.sampled_from(["zero", "garbage", "sparse", "sparse"]),       # noise
    st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),           # seeds
    st.integers(1, 4))                                              # paths


@st.composite
def plans(draw):
    # Hypothesis draws the configuration; the paths come from a seeded
    # generator (drawing every index and flag word through hypothesis cost
    # ten times the walks themselves).
    npages, trim, maxphy, la57, paging, b, cpl, pkru, pkrs, noise, seed, path_seed, npaths = \
        draw(_CONFIG)
    size = npages * PAGE - trim
    levels = 5 if la57 else 4
    wp, nxe, smep, smap, pke, pks, pge, pcide, ac = [bool(b >> i & 1) for i in range(9)]
    cr0 = R.CR0_PE | (R.CR0_PG if paging else 0) | (R.CR0_WP if wp else 0)
    cr4 = (R.CR4_PAE | (R.CR4_LA57 if la57 else 0) | (R.CR4_SMEP if smep else 0)
           | (R.CR4_SMAP if smap else 0) | (R.CR4_PKE if pke else 0)
           | (R.CR4_PKS if pks else 0) | (R.CR4_PGE if pge else 0)
           | (R.CR4_PCIDE if pcide and paging else 0))
    efer = R.EFER_LME | (R.EFER_NXE if nxe else 0)
    rnd = random.Random(path_seed)
    last_full = (size // PAGE) - 1           # last page wholly inside memory

    # CR3: the root table, rarely outside memory; bits 11:0 are PCID/PWT/PCD.
    if rnd.randint(0, 39) == 0:
        root = (npages + rnd.randint(0, 3)) * PAGE
    else:
        root = rnd.randint(0, last_full) * PAGE
    cr3 = root | rnd.getrandbits(12)
    root = cr3 & mask_between(maxphy - 1, 12)

    paths, vas = [], []
    for _ in range(npaths):
        writes = []
        table = root
        va = 0
        level = levels
        while True:
            shift = 12 + 9 * (level - 1)
            index = rnd.randint(0, 511) if rnd.randint(0, 3) else rnd.choice([0, 1, 255, 256, 511])
            va |= index << shift
            entry_pa = table + 8 * index
            if entry_pa + 8 > size:
                break                        # the walk stops here (outside memory)
            kind = rnd.randint(0, 99)
            r = rnd.getrandbits(40)
            if kind < 4:                     # not present: other bits are garbage
                writes.append((entry_pa, ((r << 24) ^ r) & ~1))
                break
            is_leaf = level == 1 or kind < {3: 24, 2: 44}.get(level, 0)
            value = entry_flags(r, level, is_leaf)
            if is_leaf:
                if level > 1:
                    value |= 1 << R.BIT_PS
                psize = R.PAGE_SIZE_OF_LEAF[level]
                frame = rnd.getrandbits(52) & mask_between(maxphy - 1, 12) & ~(psize - 1)
                if level > 1 and rnd.randint(0, 9) == 0:
                    frame |= 1 << R.BIT_PAT_LARGE    # PAT: not reserved
                value |= frame
            else:
                if level >= 4 and kind >= 97:
                    value |= 1 << R.BIT_PS           # reserved in PML4E/PML5E
                if kind in (86, 87, 88, 89):         # a recursive slot (self-map)
                    target = table // PAGE
                elif kind in (90, 91):               # a table outside memory
                    target = npages + rnd.randint(0, 3)
                elif trim and kind in (93, 94):      # the partial last page
                    target = npages - 1
                else:
                    target = rnd.randint(0, last_full)
                value |= target * PAGE
            if rnd.randint(0, 29) == 0:
                # a bit reserved for this MAXPHYADDR (or address for a larger
                # one), or one of a large leaf's 20:13 / 29:13
                hi = 29 if level == 3 else 20
                if rnd.randint(0, 1):
                    pos = rnd.randint(maxphy if maxphy < 52 else 32, 51)
                else:
                    pos = rnd.randint(13, hi)
                value |= 1 << pos
            writes.append((entry_pa, value))
            if is_leaf or level == 1:
                break
            if not is_leaf and 86 <= kind <= 89 and rnd.randint(0, 1):
                # the same index below: this very entry serves at every
                # lower level, the last time as the PTE (A and D in one word)
                while level > 1:
                    level -= 1
                    va |= index << (12 + 9 * (level - 1))
                break
            table = value & mask_between(maxphy - 1, 12)
            level -= 1
        # the bits below the last planned index: the page offset, or the
        # indices of levels the walk does not reach as planned
        va |= rnd.getrandbits(12 + 9 * (level - 1))
        width = 9 * levels + 12
        va = canonical(va, width)
        if rnd.randint(0, 24) == 0:
            va ^= 1 << rnd.randint(width, 63)  # non-canonical
        if not paging:
            va &= 0xFFFFFFFF                     # linear addresses are 32 bits there
        paths.append(writes)
        vas.append(va)
    return Plan(npages=npages, size=size, maxphyaddr=maxphy, levels=levels, cr0=cr0, cr3=cr3,
                cr4=cr4, efer=efer, cpl=cpl, ac=ac, pkru=pkru, pkrs=pkrs, noise=noise,
                seed=seed, path_seed=path_seed, paths=paths, vas=vas, paging=paging)


_PLANS = plans()
_OPS = st.tuples(st.integers(1, 6), st.integers(0, 2**32 - 1))
_BATCH = st.tuples(st.integers(0, 64), st.integers(0, 2**32 - 1))


def random_address(plan, rnd):
    """A VA: mostly a planned one, else one with a flipped bit, or a random
    canonical one."""
    width = 9 * plan.levels + 12
    if not plan.paging:
        return rnd.choice([rnd.choice(plan.vas), rnd.getrandbits(32)])
    k = rnd.randint(0, 9)
    va = rnd.choice(plan.vas)
    if k < 6:
        return va
    if k < 9:
        return canonical(va ^ (1 << rnd.randint(0, width - 1)), width)
    return canonical(rnd.getrandbits(64), width)


@st.composite
def plan_and_ops(draw):
    plan = draw(_PLANS)
    n, seed = draw(_OPS)
    rnd = random.Random(seed)
    ops = []
    for _ in range(n):
        ops.append((random_address(plan, rnd), rnd.choice("rwx"),
                    rnd.choice([None, None, True, False]),
                    rnd.randint(0, 6) == 0,          # implicit
                    rnd.randint(0, 6) != 0))         # update_ad
    return plan, ops


# ---------------------------------------------------------------------------
# Running both sides
# ---------------------------------------------------------------------------
def ptemu_side(mmu, va, access, user, implicit, update_ad):
    try:
        t = mmu.translate(va, access, user=user, update_ad=update_ad, implicit=implicit)
    except ptemu.PageFault as exc:
        return ("pf", exc.error_code, exc.cr2, exc.cause, exc.level)
    except ptemu.GeneralProtection:
        return ("gp",)
    if t.level == 0:
        return ("ok", t.pa, t.page_size, 0, t.entries, t.writable, t.user, t.executable)
    return ("ok", t.pa, t.page_size, t.level, t.entries, t.writable, t.user, t.executable,
            t.leaf)


def ref_side(mem, cpu, va, access, user, implicit, update_ad):
    out, mem = R.walk_cpu(mem, cpu, va, access, user=user, implicit=implicit,
                          update_ad=update_ad, inplace=True)
    if out.kind == "pf":
        return ("pf", out.error_code, out.cr2, out.cause, out.fault_level)
    if out.kind == "gp":
        return ("gp",)
    if out.level == 0:
        return ("ok", out.pa, out.page_size, 0, out.entries, out.writable, out.user,
                out.executable)
    return ("ok", out.pa, out.page_size, out.level, out.entries, out.writable, out.user,
            out.executable, out.leaf)


def same_memory(mem, ref):
    return np.array_equal(mem.array, np.frombuffer(ref, dtype=np.uint8))


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------
@settings(max_examples=scaled(12))
@given(plan_and_ops())
def test_translate_matches_reference(case):
    """SDM 4.5-4.8: every scalar translation agrees with the oracle, and the
    memory agrees after every access (A/D set exactly, nothing on a fault)."""
    plan, ops = case
    image = plan.image()
    mem = ptemu.PhysicalMemory(plan.size)
    mem.array[:] = image
    cpu = plan.cpu()
    mmu = ptemu.Mmu(mem, cpu)
    ref = bytearray(image.tobytes())
    for i, (va, access, user, implicit, update_ad) in enumerate(ops):
        before = mem.array.copy()
        got = ptemu_side(mmu, va, access, user, implicit, update_ad)
        want = ref_side(ref, cpu, va, access, user, implicit, update_ad)
        note("op %d: va=%#x %s user=%s implicit=%s update_ad=%s -> %r" % (
            i, va, access, user, implicit, update_ad, want))
        assert got == want
        event("outcome: %s" % (want[0] if want[0] == "gp" else
                               "%s %s" % (want[0], want[3] if want[0] == "pf" else
                                          "level %d" % want[3])))
        if got[0] != "ok" or not update_ad:
            assert np.array_equal(mem.array, before), "memory written by a faulting walk/probe"
        assert same_memory(mem, ref), "A/D bits differ from SDM 4.8 after op %d" % i


@st.composite
def plan_and_batch(draw):
    plan = draw(_PLANS)
    n, seed = draw(_BATCH)
    rnd = random.Random(seed)
    vas = [random_address(plan, rnd) for _ in range(n)]
    kind = rnd.choice(["str", "u8", "S1"])
    if kind == "str":
        access = rnd.choice("rwx")
    else:
        codes = [rnd.randint(0, 2) for _ in range(n)]
        access = np.array(codes, dtype=np.uint8)
        if kind == "S1":
            access = np.array([b"rwx"[c:c + 1] for c in codes], dtype="S1")
    user = rnd.choice([None, True, False])
    update_ad = rnd.randint(0, 4) != 0
    return plan, np.array(vas, dtype=np.uint64), access, user, update_ad


def _access_of(access, i):
    if isinstance(access, str):
        return access
    a = access[i]
    if isinstance(a, bytes):
        return a.decode()
    return "rwx"[int(a)]


@settings(max_examples=scaled(4))
@given(plan_and_batch())
def test_translate_many_matches_scalar_and_reference(case):
    """API.md translate_many: vector 0/13/14, pa of each translated element
    (0 otherwise), error_code of each #PF, A/D as the same accesses done one
    by one in order (SDM 4.8) -- equal to scalar translate and to the oracle."""
    plan, vas, access, user, update_ad = case
    image = plan.image()

    mem_b = ptemu.PhysicalMemory(plan.size)
    mem_b.array[:] = image
    batch = ptemu.Mmu(mem_b, plan.cpu()).translate_many(vas, access, user=user,
                                                        update_ad=update_ad)
    assert batch.pa.dtype == np.uint64 and batch.vector.dtype == np.uint8
    assert batch.error_code.dtype == np.uint32
    assert len(batch.pa) == len(batch.vector) == len(batch.error_code) == len(vas)

    mem_s = ptemu.PhysicalMemory(plan.size)
    mem_s.array[:] = image
    cpu = plan.cpu()
    scalar = ptemu.Mmu(mem_s, cpu)
    ref = bytearray(image.tobytes())
    for i, va in enumerate(vas.tolist()):
        acc = _access_of(access, i)
        got = (int(batch.vector[i]), int(batch.pa[i]), int(batch.error_code[i]))
        try:
            t = scalar.translate(va, acc, user=user, update_ad=update_ad)
            one = (0, t.pa, 0)
        except ptemu.PageFault as exc:
            one = (14, 0, exc.error_code)
        except ptemu.GeneralProtection:
            one = (13, 0, 0)
        out, ref = R.walk_cpu(ref, cpu, va, acc, user=user, update_ad=update_ad, inplace=True)
        want = {"ok": (0, out.pa, 0), "gp": (13, 0, 0), "pf": (14, 0, out.error_code)}[out.kind]
        note("element %d: va=%#x %s -> %r" % (i, va, acc, out))
        assert got == one == want
    assert np.array_equal(mem_b.array, mem_s.array)
    assert same_memory(mem_b, ref)


# ---------------------------------------------------------------------------
# Hand-derived corner cases: the oracle and ptemu must both give these.
# ---------------------------------------------------------------------------
# Tables P|W|U all the way down to PT @0x4000; the leaf PT[1] maps va 0x1000
# to 0x9000 with the flags of each case.  CR0.WP=1, NXE=1 unless changed.
TW = 1 | 2 | 4
BASE_CPU = dict(cr0=R.CR0_PE | R.CR0_PG | R.CR0_WP, cr4=R.CR4_PAE,
                efer=R.EFER_LME | R.EFER_NXE, cpl=0, ac=False, pkru=0, pkrs=0, maxphyaddr=40)
K5 = 5 << R.PKEY_LOW
HAND_CASES = [
    # (why, leaf flags, cpu changes, access, user, implicit, expected)
    ("4.6.1 SMAP, AC=0: supervisor read of a user page", TW, dict(cr4=R.CR4_PAE | R.CR4_SMAP),
     "r", False, False, ("pf", R.EC_P)),
    ("4.6.1 SMAP, AC=1, explicit: allowed", TW, dict(cr4=R.CR4_PAE | R.CR4_SMAP, ac=True),
     "w", False, False, ("ok", 0x9000)),
    ("4.6.1 SMAP, AC=1, implicit: faults anyway", TW, dict(cr4=R.CR4_PAE | R.CR4_SMAP, ac=True),
     "r", None, True, ("pf", R.EC_P)),
    ("4.6.1 SMAP does not cover fetches", TW, dict(cr4=R.CR4_PAE | R.CR4_SMAP),
     "x", False, False, ("ok", 0x9000)),
    ("4.6.1 SMEP: supervisor fetch from a user page; 4.7 I/D set by SMEP even with NXE=0",
     TW, dict(cr4=R.CR4_PAE | R.CR4_SMEP, efer=R.EFER_LME), "x", False, False,
     ("pf", R.EC_P | R.EC_ID)),
    ("4.7 I/D clear when NXE=0 and SMEP=0", TW, dict(efer=R.EFER_LME), "x", True, False,
     ("ok", 0x9000)),
    ("4.6.1 WP=0: supervisor writes a read-only page", 1 | 4, dict(cr0=R.CR0_PE | R.CR0_PG),
     "w", False, False, ("ok", 0x9000)),
    ("4.6.1 WP=1: it does not", 1 | 4, {}, "w", False, False, ("pf", R.EC_P | R.EC_WR)),
    ("4.6.1 user writes need R/W whatever WP", 1 | 4, dict(cr0=R.CR0_PE | R.CR0_PG),
     "w", True, False, ("pf", R.EC_P | R.EC_WR | R.EC_US)),
    ("4.6.2 PKRU AD: user read faults, PK set", TW | K5, dict(cr4=R.CR4_PAE | R.CR4_PKE,
                                                         pkru=1 << 10),
     "r", True, False, ("pf", R.EC_P | R.EC_US | R.EC_PK)),
    ("4.6.2 PKRU AD: supervisor read of a user page too", TW | K5,
     dict(cr4=R.CR4_PAE | R.CR4_PKE, pkru=1 << 10), "r", False, False,
     ("pf", R.EC_P | R.EC_PK)),
    ("4.6.2 keys never block fetches", TW | K5,
     dict(cr4=R.CR4_PAE | R.CR4_PKE, pkru=0xFFFFFFFF),
     "x", True, False, ("ok", 0x9000)),
    ("4.6.2 PKRU WD: supervisor write allowed with WP=0", TW | K5,
     dict(cr0=R.CR0_PE | R.CR0_PG, cr4=R.CR4_PAE | R.CR4_PKE, pkru=2 << 10), "w", False, False,
     ("ok", 0x9000)),
    ("4.6.2 PKRU WD: supervisor write faults with WP=1", TW | K5,
     dict(cr4=R.CR4_PAE | R.CR4_PKE, pkru=2 << 10), "w", False, False,
     ("pf", R.EC_P | R.EC_WR | R.EC_PK)),
    ("4.6.2 PKRU WD: user write faults with WP=0", TW | K5,
     dict(cr0=R.CR0_PE | R.CR0_PG, cr4=R.CR4_PAE | R.CR4_PKE, pkru=2 << 10), "w", True, False,
     ("pf", R.EC_P | R.EC_WR | R.EC_US | R.EC_PK)),
    ("4.7 PK reported together with a failing R/W", 1 | 4 | K5,
     dict(cr4=R.CR4_PAE | R.CR4_PKE, pkru=2 << 10), "w", True, False,
     ("pf", R.EC_P | R.EC_WR | R.EC_US | R.EC_PK)),
    ("4.6.2 PKRU does not cover supervisor pages", 1 | 2 | K5,
     dict(cr4=R.CR4_PAE | R.CR4_PKE, pkru=1 << 10), "r", False, False, ("ok", 0x9000)),
    ("4.6.2 PKS AD: supervisor read of a supervisor page", 1 | 2 | K5,
     dict(cr4=R.CR4_PAE | R.CR4_PKS, pkrs=1 << 10), "r", False, False,
     ("pf", R.EC_P | R.EC_PK)),
    ("4.7 PKS AD with a user access to a supervisor page: U/S and PK", 1 | 2 | K5,
     dict(cr4=R.CR4_PAE | R.CR4_PKS, pkrs=1 << 10), "r", True, False,
     ("pf", R.EC_P | R.EC_US | R.EC_PK)),
    ("4.6.2 PKS does not cover user pages", TW | K5,
     dict(cr4=R.CR4_PAE | R.CR4_PKS, pkrs=0xFFFFFFFF), "w", True, False, ("ok", 0x9000)),
    ("4.5.4 bit MAXPHYADDR of a present PTE is reserved", TW | (1 << 40), {}, "r", False, False,
     ("pf", R.EC_P | R.EC_RSVD)),
    ("4.5.4 ... but bit MAXPHYADDR-1 is address", TW | (1 << 39), {}, "r", False, False,
     ("ok", (1 << 39) | 0x9000)),
    ("4.7 reserved bits of a P=0 entry are not checked", 2 | 4 | (1 << 40), {}, "w", True, False,
     ("pf", R.EC_WR | R.EC_US)),
    ("4.5.4 XD is reserved when NXE=0", TW | (1 << 63), dict(efer=R.EFER_LME), "r", True, False,
     ("pf", R.EC_P | R.EC_RSVD | R.EC_US)),
    ("4.6.1 XD forbids a user fetch (NXE=1)", TW | (1 << 63), {}, "x", True, False,
     ("pf", R.EC_P | R.EC_US | R.EC_ID)),
    ("ptemu: CR3 outside memory reads as all ones -> RSVD", TW, dict(cr3=0x100000), "w", True,
     False, ("pf", R.EC_P | R.EC_RSVD | R.EC_WR | R.EC_US)),
]


def hand_image(leaf):
    mem = ptemu.PhysicalMemory(0x8000)
    mem.write_u64(0x1000, 0x2000 | TW)
    mem.write_u64(0x2000, 0x3000 | TW)
    mem.write_u64(0x3000, 0x4000 | TW)
    mem.write_u64(0x4008, 0x9000 | leaf)
    return mem


@pytest.mark.parametrize("case", HAND_CASES, ids=[c[0] for c in HAND_CASES])
def test_hand_cases(case):
    why, leaf, changes, access, user, implicit, want = case
    regs = dict(BASE_CPU, cr3=0x1000)
    regs.update(changes)
    mem = hand_image(leaf)
    image = bytearray(mem.array.tobytes())
    out, after = R.walk(image, va=0x1000, access=access, user=user, implicit=implicit, **regs)
    got_ref = ("ok", out.pa) if out.kind == "ok" else ("pf", out.error_code)
    assert got_ref == want, "oracle: " + why
    mmu = ptemu.Mmu(mem, ptemu.CpuState(**regs))
    try:
        got = ("ok", mmu.translate(0x1000, access, user=user, implicit=implicit).pa)
    except ptemu.PageFault as exc:
        got = ("pf", exc.error_code)
    assert got == want, "ptemu: " + why
    assert same_memory(mem, after)


def test_recursive_slot_accessed_dirty():
    """SDM 4.8 with a self-referencing PML4 slot: PML4[0] points at the PML4,
    so the walk of va 0x123 reads that one entry at all four levels, the
    last time as a PTE mapping frame 0x1000.  A write sets A (every level)
    and D (the leaf) in the same word: nothing may be lost by one level's
    update overwriting another's."""
    mem = ptemu.PhysicalMemory(0x2000)
    mem.write_u64(0x1000, 0x1000 | TW)
    regs = dict(BASE_CPU, cr3=0x1000)
    image = bytearray(mem.array.tobytes())
    out, after = R.walk(image, va=0x123, access="w", **regs)
    final = 0x1000 | TW | (1 << R.BIT_A) | (1 << R.BIT_D)
    assert out.as_tuple() == ("ok", 0x1123, 0x1000, 1, [(0x1000, final)] * 4)
    t = ptemu.Mmu(mem, ptemu.CpuState(**regs)).translate(0x123, "w")
    assert (t.pa, t.page_size, t.level, t.entries) == (0x1123, 0x1000, 1, [(0x1000, final)] * 4)
    assert mem.read_u64(0x1000) == final
    assert same_memory(mem, after)
