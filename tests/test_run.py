"""mmu.run(trace): an access stream through TLB and walker, stopping at the
first fault (API.md "TLB and address streams").

Fault vectors and error codes are those of SDM 4.7 (#PF) and 3.3.7.1 /
4.5.1 (#GP(0) for a non-canonical address, CR2 untouched); A/D per SDM 4.8.
"""
import numpy as np
import pytest

from ptemu import (CpuState, Mmu, PhysicalMemory, Tlb, InvalidInput, TRACE_DTYPE, PageFault,
                   GeneralProtection, PTE_P, PTE_W, PTE_U, PTE_A, PTE_D, PTE_NX,
                   PF_P, PF_W, PF_U, PF_I)
from ptemu.pagetable import PageTableBuilder

MiB = 1 << 20
BASE = 0x0000_7F00_0000_0000
RWU = PTE_P | PTE_W | PTE_U

# page index -> (frame, flags); page 4 is left unmapped
PAGES = {
    0: (0x200000, RWU),                        # user RW
    1: (0x201000, RWU),
    2: (0x202000, PTE_P | PTE_U),              # user read-only
    3: (0x203000, PTE_P | PTE_W),              # supervisor RW
    5: (0x205000, RWU | PTE_NX),               # user RW, no execute
}


def va_of(page, off=0):
    return BASE + page * 4096 + off


def setup(tlb=True):
    mem = PhysicalMemory(4 * MiB)
    pt = PageTableBuilder(mem, table_start=0x1000, table_end=MiB)
    for page, (frame, flags) in PAGES.items():
        pt.map(va_of(page), frame, 4096, flags)
    cpu = CpuState.long_mode(cr3=pt.cr3)
    return mem, pt, Mmu(mem, cpu, Tlb.simple() if tlb else None)


def trace_of(recs):
    """recs: (va, access 'r'/'w'/'x', user)"""
    t = np.zeros(len(recs), dtype=TRACE_DTYPE)
    for i, (va, acc, user) in enumerate(recs):
        t[i] = (va, "rwx".index(acc), user)
    return t


def pa_of(page, off=0):
    return PAGES[page][0] + off


@pytest.mark.parametrize("tlb", [True, False])
def test_runs_to_the_end(tlb):
    mem, pt, mmu = setup(tlb)
    recs = [(va_of(0, 8), "r", True), (va_of(1, 16), "w", True), (va_of(2, 24), "r", True),
            (va_of(3, 32), "w", False), (va_of(5, 40), "r", True), (va_of(0, 48), "x", True)]
    trace = trace_of(recs)
    pa = np.zeros(len(trace), dtype=np.uint64)
    r = mmu.run(trace, pa=pa)
    assert r.index == len(trace) and r.vector == 0 and r.completed and r.fault is None
    assert pa.tolist() == [pa_of(0, 8), pa_of(1, 16), pa_of(2, 24), pa_of(3, 32),
                           pa_of(5, 40), pa_of(0, 48)]


def test_empty_trace_and_start_at_end():
    mem, pt, mmu = setup()
    r = mmu.run(np.zeros(0, dtype=TRACE_DTYPE))
    assert (r.index, r.vector) == (0, 0)
    trace = trace_of([(va_of(4), "r", False)])             # would fault
    r = mmu.run(trace, start=1)
    assert (r.index, r.vector) == (1, 0)


def test_stops_at_first_fault_and_resumes():
    """SDM 4.7: not-present user read: error code U (P=0), CR2 = address.
    Accesses after the faulting one are not made; after the caller maps the
    page, run(start=index) finishes the trace."""
    mem, pt, mmu = setup()
    recs = [(va_of(0), "r", True), (va_of(1, 0x10), "w", True),
            (va_of(4, 0x123), "r", True),                  # unmapped
            (va_of(1, 0x20), "w", True), (va_of(4, 0x456), "w", True)]
    trace = trace_of(recs)
    pa = np.full(len(trace), 0xDEAD, dtype=np.uint64)
    r = mmu.run(trace, pa=pa)
    assert r.index == 2 and r.vector == 14
    assert r.error_code == PF_U and r.cr2 == va_of(4, 0x123)
    assert r.cause == "not-present" and not r.completed
    assert isinstance(r.fault, PageFault) and r.fault.error_code == PF_U
    assert pa.tolist() == [pa_of(0), pa_of(1, 0x10), 0xDEAD, 0xDEAD, 0xDEAD]
    pt.map(va_of(4), 0x204000, 4096, RWU)                  # the "fault handler"
    r = mmu.run(trace, start=r.index, pa=pa)
    assert r.index == len(trace) and r.vector == 0
    assert pa.tolist() == [pa_of(0), pa_of(1, 0x10), 0x204123, pa_of(1, 0x20), 0x204456]


@pytest.mark.parametrize("rec,ec", [
    ((va_of(2), "w", True), PF_P | PF_W | PF_U),           # user write, read-only page
    ((va_of(2), "w", False), PF_P | PF_W),                 # supervisor write, WP=1
    ((va_of(3), "r", True), PF_P | PF_U),                  # user read, supervisor page
    ((va_of(5), "x", True), PF_P | PF_U | PF_I),           # user fetch, XD page (NXE=1)
    ((va_of(4), "x", False), PF_I),                        # not present, fetch
])
def test_fault_error_codes(rec, ec):
    """SDM 4.6, 4.7: the error code of the first faulting access."""
    mem, pt, mmu = setup()
    trace = trace_of([(va_of(0), "r", True), rec, (va_of(0), "r", True)])
    r = mmu.run(trace)
    assert (r.index, r.vector, r.error_code, r.cr2) == (1, 14, ec, rec[0])


def test_user_flag_is_per_access():
    """The same supervisor page: fine for a supervisor access, #PF for the
    user access that follows (SDM 4.6.1)."""
    mem, pt, mmu = setup()
    trace = trace_of([(va_of(3), "r", False), (va_of(3), "w", False), (va_of(3), "r", True)])
    r = mmu.run(trace)
    assert (r.index, r.error_code) == (2, PF_P | PF_U)


def test_non_canonical_is_gp():
    """SDM 4.5.1 / 3.3.7.1: a non-canonical address is #GP(0): vector 13,
    error code 0, no CR2."""
    mem, pt, mmu = setup()
    bad = 0x0000_8000_0000_0000
    trace = trace_of([(va_of(0), "r", False), (bad, "r", False)])
    r = mmu.run(trace)
    assert (r.index, r.vector, r.error_code, r.cr2) == (1, 13, 0, 0)
    assert isinstance(r.fault, GeneralProtection)
    assert mmu.tlb.stats.walks == 1                        # no walk for the #GP


def test_sets_accessed_and_dirty():
    """SDM 4.8: A in every entry used, D in the leaf of pages written,
    including a write after a read of the same page (the TLB entry is clean)."""
    mem, pt, mmu = setup()
    for page in PAGES:
        e = pt.entry_pa(va_of(page), 1)
        mem.write_u64(e, mem.read_u64(e) & ~(PTE_A | PTE_D))
    trace = trace_of([(va_of(0), "r", True), (va_of(0), "r", True), (va_of(0), "w", True),
                      (va_of(1), "r", True), (va_of(5), "r", True)])
    assert mmu.run(trace).index == len(trace)
    leaf = {p: mem.read_u64(pt.entry_pa(va_of(p), 1)) for p in PAGES}
    assert leaf[0] & (PTE_A | PTE_D) == PTE_A | PTE_D
    assert leaf[1] & (PTE_A | PTE_D) == PTE_A
    assert leaf[2] & PTE_A == 0 and leaf[3] & PTE_A == 0
    assert leaf[5] & (PTE_A | PTE_D) == PTE_A
    for level in (4, 3, 2):
        assert mem.read_u64(pt.entry_pa(va_of(0), level)) & PTE_A


def test_goes_through_the_tlb():
    """One walk per page (plus the D-bit re-walk), every other access a hit."""
    mem, pt, mmu = setup()
    rng = np.random.default_rng(3)
    pages = rng.choice([0, 1], 200)
    trace = np.zeros(200, dtype=TRACE_DTYPE)
    trace["va"] = [va_of(int(p), int(o)) for p, o in zip(pages, rng.integers(0, 4096, 200))]
    trace["access"] = 0
    trace["user"] = True
    trace["access"][150] = 1
    r = mmu.run(trace)
    assert r.index == 200
    s = mmu.tlb.stats
    assert s.lookups == 200 and s.walks == 2 + 1 and s.dirty_rewalks == 1
    assert s.walk_refs == 4 + 1 + 1      # cold; PDE-cache hit; D re-walk with PDE-cache hit


def test_agrees_with_translate_many():
    mem, pt, mmu = setup()
    rng = np.random.default_rng(5)
    pages = rng.choice([0, 1, 5], 100)
    trace = np.zeros(100, dtype=TRACE_DTYPE)
    trace["va"] = [va_of(int(p), int(o)) for p, o in zip(pages, rng.integers(0, 4096, 100))]
    trace["access"] = rng.integers(0, 2, 100)
    trace["user"] = True
    pa = np.zeros(100, dtype=np.uint64)
    assert mmu.run(trace, pa=pa).index == 100
    b = mmu.translate_many(trace["va"].copy(), trace["access"].copy(), user=True)
    assert np.array_equal(b.pa, pa) and not b.vector.any()


def test_stale_tlb_entry_is_used_by_run_until_invlpg():
    """SDM 4.10.2.3, 4.10.4.1: run() uses the same TLB as translate()."""
    mem, pt, mmu = setup()
    trace = trace_of([(va_of(0, 4), "r", True)])
    pa = np.zeros(1, dtype=np.uint64)
    mmu.run(trace, pa=pa)
    pt.map(va_of(0), 0x300000, 4096, RWU)
    mmu.run(trace, pa=pa)
    assert pa[0] == pa_of(0, 4)
    mmu.invlpg(va_of(0))
    mmu.run(trace, pa=pa)
    assert pa[0] == 0x300004


# ---------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------

def test_wrong_dtype():
    mem, pt, mmu = setup()
    with pytest.raises(InvalidInput, match="dtype"):
        mmu.run(np.zeros(4, dtype=np.uint64))
    packed = np.dtype([("va", "<u8"), ("access", "u1"), ("user", "?")])   # not aligned
    with pytest.raises(InvalidInput, match="dtype"):
        mmu.run(np.zeros(4, dtype=packed))
    with pytest.raises(InvalidInput):
        mmu.run([(va_of(0), 0, False)])
    with pytest.raises(InvalidInput):
        mmu.run(np.zeros((2, 2), dtype=TRACE_DTYPE))
    with pytest.raises(InvalidInput, match="contiguous"):
        mmu.run(np.zeros(8, dtype=TRACE_DTYPE)[::2])


@pytest.mark.parametrize("start", [3, 100, -1, 1 << 64, 1.0, None])
def test_bad_start(start):
    mem, pt, mmu = setup()
    trace = trace_of([(va_of(0), "r", True), (va_of(1), "r", True)])
    with pytest.raises(InvalidInput):
        mmu.run(trace, start=start)


def test_access_code_3_is_invalid():
    mem, pt, mmu = setup()
    trace = trace_of([(va_of(0), "r", True), (va_of(1), "r", True)])
    trace["access"][1] = 3
    with pytest.raises(InvalidInput, match="access"):
        mmu.run(trace)
    assert mmu.tlb.stats.lookups == 0                     # nothing ran


@pytest.mark.parametrize("pa", [
    np.zeros(1, dtype=np.uint64),
    np.zeros(3, dtype=np.uint64),
    np.zeros(2, dtype=np.int64),
    np.zeros(2, dtype=np.uint32),
    np.zeros(4, dtype=np.uint64)[::2],
])
def test_bad_pa_array(pa):
    mem, pt, mmu = setup()
    trace = trace_of([(va_of(0), "r", True), (va_of(1), "r", True)])
    with pytest.raises(InvalidInput):
        mmu.run(trace, pa=pa)


def test_read_only_pa_array():
    mem, pt, mmu = setup()
    trace = trace_of([(va_of(0), "r", True)])
    pa = np.zeros(1, dtype=np.uint64)
    pa.flags.writeable = False
    with pytest.raises(InvalidInput, match="writable"):
        mmu.run(trace, pa=pa)
