"""cffi releases the GIL on every call and the C core keeps no global state
(DESIGN.md "Rules of the C core"), so two threads, each with its own
PhysicalMemory and Mmu, may run translate_many at the same time and must get
exactly what they get one after the other -- pa, vector, error code and the
A/D bits left in memory.  Correctness is the assertion; nothing is timed.

The images are regular enough that every expected answer is computed by
hand-derived formulas (SDM 4.5 address formation, 4.6.1 user-mode rights,
4.7 error codes) independently of ptemu:

  PML4 @0x1000 [0] -> PDPT @0x2000 [0] -> PD @0x3000
  PD[0..7]   -> PT @0x4000 + 0x1000*k, 512 PTEs each: PTE number i maps frame
               frame4k(i); R/W=0 when i % 5 == 0, XD=1 when i % 7 == 0
  PD[8..15]  -> 2 MiB leaves, frame2m(j), P W U
  PD[16..]   not present
"""
import threading

import numpy as np

import ptemu

P, W, U, PS, NX = 1, 2, 4, 0x80, 1 << 63
EC_P, EC_W, EC_U, EC_I = 1, 2, 4, 16
N = 400_000


def frame4k(i, salt):
    return ((i * 2654435761 + salt * 977) % (1 << 24)) << 12


def frame2m(j, salt):
    return ((j * 40503 + salt) % (1 << 15)) << 21


def build(salt):
    mem = ptemu.PhysicalMemory(0x10000 + 0x1000)
    mem.write_u64(0x1000, 0x2000 | P | W | U)
    mem.write_u64(0x2000, 0x3000 | P | W | U)
    for k in range(8):
        pt = 0x4000 + 0x1000 * k
        mem.write_u64(0x3000 + 8 * k, pt | P | W | U)
        for e in range(512):
            i = k * 512 + e
            v = frame4k(i, salt) | P | U | (0 if i % 5 == 0 else W) | (NX if i % 7 == 0 else 0)
            mem.write_u64(pt + 8 * e, v)
    for j in range(8, 16):
        mem.write_u64(0x3000 + 8 * j, frame2m(j, salt) | P | W | U | PS)
    cpu = ptemu.CpuState.long_mode(cr3=0x1000, cpl=3)
    return mem, ptemu.Mmu(mem, cpu)


def workload(seed):
    rng = np.random.default_rng(seed)
    vas = rng.integers(0, 32 << 21, size=N, dtype=np.uint64)     # PD[0..31]
    bad = rng.random(N) < 0.02
    vas[bad] |= np.uint64(1 << 47)                                # non-canonical
    acc = rng.integers(0, 3, size=N, dtype=np.uint8)
    return vas, acc


def expected(vas, acc, salt):
    """SDM 4.5 / 4.6.1 / 4.7 for a user-mode access, CR0.WP=1, EFER.NXE=1."""
    pa = np.zeros(N, dtype=np.uint64)
    vec = np.zeros(N, dtype=np.uint8)
    ec = np.zeros(N, dtype=np.uint32)
    access_bits = np.where(acc == 1, EC_W, 0) | EC_U | np.where(acc == 2, EC_I, 0)
    noncanon = (vas >> np.uint64(47)) != 0
    pd = ((vas >> np.uint64(21)) & np.uint64(511)).astype(np.int64)
    i = ((vas >> np.uint64(12)) & np.uint64(4095)).astype(np.int64)   # PTE number
    small, large = pd < 8, (pd >= 8) & (pd < 16)
    absent = ~noncanon & ~small & ~large
    vec[noncanon] = 13
    vec[absent] = 14
    ec[absent] = access_bits[absent]
    ro = small & (i % 5 == 0) & (acc == 1)
    nx = small & (i % 7 == 0) & (acc == 2)
    prot = ~noncanon & (ro | nx)
    vec[prot] = 14
    ec[prot] = (EC_P | access_bits)[prot]
    ok4 = ~noncanon & small & ~prot
    ok2 = ~noncanon & large
    f4 = np.array([frame4k(int(x), salt) for x in range(4096)], dtype=np.uint64)
    f2 = np.array([frame2m(int(x), salt) for x in range(16)], dtype=np.uint64)
    pa[ok4] = f4[i[ok4]] | (vas[ok4] & np.uint64(0xFFF))
    pa[ok2] = f2[pd[ok2]] | (vas[ok2] & np.uint64((1 << 21) - 1))
    return pa, vec, ec


def run_both(jobs):
    """Each job: (mmu, vas, acc) -> BatchResult; run all at once."""
    results = [None] * len(jobs)
    errors = []
    barrier = threading.Barrier(len(jobs))

    def worker(k):
        mmu, vas, acc = jobs[k]
        try:
            barrier.wait()
            results[k] = mmu.translate_many(vas, acc)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_two_threads_equal_sequential():
    salts = (1, 2)
    loads = [workload(s) for s in salts]
    want = [expected(vas, acc, s) for (vas, acc), s in zip(loads, salts)]

    seq_mem = []
    for (vas, acc), s, w in zip(loads, salts, want):
        mem, mmu = build(s)
        res = mmu.translate_many(vas, acc)
        for got, exp in zip((res.pa, res.vector, res.error_code), w):
            assert np.array_equal(got, exp)
        seq_mem.append(mem.array.copy())

    for _ in range(3):
        built = [build(s) for s in salts]
        results = run_both([(mmu, vas, acc) for (_, mmu), (vas, acc) in zip(built, loads)])
        for res, w in zip(results, want):
            assert np.array_equal(res.pa, w[0])
            assert np.array_equal(res.vector, w[1])
            assert np.array_equal(res.error_code, w[2])
        for (mem, _), m in zip(built, seq_mem):
            assert np.array_equal(mem.array, m)           # same A/D bits (SDM 4.8)


def test_two_threads_share_one_memory_read_only():
    """Two Mmus over one PhysicalMemory, update_ad=False (nothing written):
    concurrent walks read the same tables and agree with the formulas."""
    mem, mmu_a = build(3)
    mmu_b = ptemu.Mmu(mem, ptemu.CpuState.long_mode(cr3=0x1000, cpl=3))
    before = mem.array.copy()
    loads = [workload(7), workload(8)]
    results = [None, None]
    barrier = threading.Barrier(2)

    def worker(k, mmu):
        barrier.wait()
        vas, acc = loads[k]
        results[k] = mmu.translate_many(vas, acc, update_ad=False)

    threads = [threading.Thread(target=worker, args=(k, m)) for k, m in ((0, mmu_a), (1, mmu_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for res, (vas, acc) in zip(results, loads):
        pa, vec, ec = expected(vas, acc, 3)
        assert np.array_equal(res.pa, pa)
        assert np.array_equal(res.vector, vec)
        assert np.array_equal(res.error_code, ec)
    assert np.array_equal(mem.array, before)
