"""Resource checks: no leak across many objects, and thread independence.

* Creating and dropping Mmu/Tlb/CpuState/PhysicalMemory objects and batch
  results leaves the process's resident size flat.  The loop count is
  PTEMU_RESOURCE_LOOPS (default 50000, seven seconds on a quiet 2-core box; the issue's full
  run is PTEMU_RESOURCE_LOOPS=1000000).  The bound is a few bytes per
  iteration: one leaked ptemu_tlb (~2 KiB) or walk-result buffer per loop
  would be hundreds of MiB.
* The C core keeps no global state and cffi releases the GIL on every call
  (shared/DESIGN.md, "Rules of the C core"): several threads running
  translate_many and run on separate Mmus at once must give exactly what one
  thread gives -- translations, faults, A/D bits written, TLB statistics.
"""
import gc
import os
import threading

import numpy as np
import pytest

import ptemu
from ptemu import CpuState, Mmu, PhysicalMemory, Tlb
from ptemu.pagetable import PageTableBuilder

P, W, U, A, D, NX = (ptemu.PTE_P, ptemu.PTE_W, ptemu.PTE_U, ptemu.PTE_A, ptemu.PTE_D,
                     ptemu.PTE_NX)
LOOPS = int(os.environ.get("PTEMU_RESOURCE_LOOPS", "50000"))
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes():
    """Resident set size from /proc/self/statm (field 2, in pages)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE_BYTES


def image():
    """4 MiB of memory: 256 4 KiB pages (some read-only, some user, some NX)
    and two 2 MiB pages, under one PML4 slot."""
    mem = PhysicalMemory(4 << 20)
    b = PageTableBuilder(mem, table_start=0x1000, table_end=0x40000)
    for i in range(256):
        flags = P | (W if i % 3 else 0) | (U if i % 5 else 0) | (NX if i % 7 == 0 else 0)
        b.map(0x0000_0010_0000_0000 + i * 4096, 0x100000 + i * 4096, flags=flags)
    b.map(0x0000_0020_0000_0000, 0x200000, page_size=1 << 21, flags=P | W | U)
    return mem, b.cr3


pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                                reason="needs /proc/self/statm (Linux)")
# Under tools/sanitize.sh, ASan's allocator keeps freed memory in quarantine
# (256 MiB by default) and pads every block: resident size says nothing there.
rss_meaningful = pytest.mark.skipif(os.environ.get("PTEMU_SANITIZED") == "1",
                                    reason="RSS is not meaningful under ASan (quarantine)")


@rss_meaningful
def test_many_objects_leave_rss_flat():
    mem, cr3 = image()
    vas = np.arange(0x0000_0010_0000_0000, 0x0000_0010_0000_0000 + 64 * 4096, 4096,
                    dtype=np.uint64)
    trace = np.zeros(16, dtype=ptemu.TRACE_DTYPE)
    trace["va"] = vas[:16]

    def once(i):
        cpu = CpuState.long_mode(cr3=cr3)
        tlb = Tlb.simple(entries=16, ways=4) if i % 16 else Tlb.default()
        mmu = Mmu(mem, cpu, tlb)
        t = mmu.translate(int(vas[i % 64]))
        res = mmu.translate_many(vas[:8], "r")
        run = mmu.run(trace)
        small = PhysicalMemory(4096)
        if i % 16 == 0:
            tlb.stats  # noqa: B018 - builds the statistics objects too
        return t.pa, int(res.pa[0]), run.index, small.size

    for i in range(min(2000, LOOPS)):       # warm-up: allocator pools, numpy caches
        once(i)
    gc.collect()
    before = rss_bytes()
    for i in range(LOOPS):
        pa, pa0, idx, size = once(i)
    gc.collect()
    growth = rss_bytes() - before
    assert (pa0, idx, size) == (0x100000, 16, 4096)
    # A leak of 64 bytes per iteration is 6 MiB at the default count; allow
    # 8 MiB of allocator noise plus 16 bytes per iteration.
    assert growth < 8 * 2**20 + 16 * LOOPS, "RSS grew by %d bytes over %d loops" % (growth, LOOPS)


@rss_meaningful
def test_dropped_memory_is_returned():
    # Big physical memories (numpy buffers) are freed when their Mmu goes.
    gc.collect()
    before = rss_bytes()
    for _ in range(20):
        mem = PhysicalMemory(32 << 20)
        mem.array[::4096] = 1                  # touch every page: 32 MiB resident
        mmu = Mmu(mem, CpuState.long_mode(cr3=0x1000), Tlb.default())
        mmu.translate_many(np.zeros(1000, np.uint64), "r")
        del mem, mmu
    gc.collect()
    assert rss_bytes() - before < 48 << 20     # at most ~one buffer's worth left


def _workload(seed):
    rng = np.random.default_rng(seed)
    base = np.uint64(0x0000_0010_0000_0000)
    # Mapped pages, unmapped ones past them, the 2 MiB page, non-canonical ones.
    n = 20000
    pages = rng.integers(0, 300, size=n).astype(np.uint64)
    vas = base + pages * np.uint64(4096) + rng.integers(0, 4096, size=n).astype(np.uint64)
    vas[::97] = 0x0000_0020_0000_0000 + rng.integers(0, 1 << 21, size=len(vas[::97]))
    vas[::101] = 0x0000_8000_0000_0000
    access = rng.integers(0, 3, size=n).astype(np.uint8)
    # The trace for run() faults rarely (each fault is a return to Python):
    # reads and writes of mapped pages, a few unmapped ones and a #GP.
    tpages = rng.integers(0, 256, size=n).astype(np.uint64)
    tpages[::499] = 290
    trace = np.zeros(n, dtype=ptemu.TRACE_DTYPE)
    trace["va"] = base + tpages * np.uint64(4096)
    trace["va"][::1009] = 0x0000_8000_0000_0000
    trace["access"] = rng.integers(0, 2, size=n).astype(np.uint8) * (tpages % 3 != 0)
    return vas, access, trace


def _job(mem_bytes, cr3, seed, user):
    """What one thread does, start to end, on its own memory, Mmu and TLB."""
    mem = PhysicalMemory.from_array(np.frombuffer(bytearray(mem_bytes), dtype=np.uint8))
    tlb = Tlb.default()
    mmu = Mmu(mem, CpuState.long_mode(cr3=cr3, cpl=3 if user else 0), tlb)
    vas, access, trace = _workload(seed)
    out = []
    for rep in range(3):
        r = mmu.translate_many(vas, access, user=None)
        out.append((r.pa.copy(), r.vector.copy(), r.error_code.copy()))
    pa = np.zeros(len(trace), np.uint64)
    start = 0
    stops = []
    while start < len(trace):
        res = mmu.run(trace, start, pa=pa)
        stops.append((res.index, res.vector, res.error_code))
        start = res.index + 1
    s = tlb.stats
    return out, pa, stops, mem.array.tobytes(), (s.lookups, s.hits, s.misses, s.walks,
                                                  s.walk_refs, s.flushes)


def test_threads_on_separate_mmus_match_one_thread():
    mem, cr3 = image()
    img = mem.array.tobytes()
    jobs = [(img, cr3, seed, seed % 2 == 1) for seed in range(4)]
    alone = [_job(*j) for j in jobs]
    results = [None] * len(jobs)
    errors = []

    def worker(i):
        try:
            results[i] = _job(*jobs[i])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, (got, want) in enumerate(zip(results, alone)):
        (g_out, g_pa, g_stops, g_mem, g_stats) = got
        (w_out, w_pa, w_stops, w_mem, w_stats) = want
        for (a, b) in zip(g_out, w_out):
            for x, y in zip(a, b):
                assert np.array_equal(x, y), "thread %d: translate_many differs" % i
        assert np.array_equal(g_pa, w_pa), "thread %d: run pa differs" % i
        assert g_stops == w_stops, "thread %d: run stops differ" % i
        assert g_mem == w_mem, "thread %d: A/D bits in memory differ" % i
        assert g_stats == w_stats, "thread %d: TLB statistics differ" % i
    # The workload is not trivial: translations, #PF and #GP all occur, and
    # the A/D bits were written.
    vec = alone[0][0][0][1]
    assert {0, 13, 14} <= set(vec.tolist())
    assert alone[0][3] != img


def test_threads_probing_one_shared_memory():
    # Probes (update_ad=False, no TLB) only read memory: many Mmus over ONE
    # PhysicalMemory, in threads, agree with a single thread.
    mem, cr3 = image()
    vas, access, _ = _workload(7)
    ref = Mmu(mem, CpuState.long_mode(cr3=cr3)).translate_many(vas, access, update_ad=False)
    img = mem.array.tobytes()
    results = []

    def worker():
        mmu = Mmu(mem, CpuState.long_mode(cr3=cr3))
        for _ in range(5):
            r = mmu.translate_many(vas, access, update_ad=False)
            results.append((r.pa.copy(), r.vector.copy(), r.error_code.copy()))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 20
    for pa, vector, ec in results:
        assert np.array_equal(pa, ref.pa)
        assert np.array_equal(vector, ref.vector)
        assert np.array_equal(ec, ref.error_code)
    assert mem.array.tobytes() == img
