#!/usr/bin/env python3
"""tools/diffbase.py -- differential run of this build against another ptemu build.

Random programs (random page-table memory, CPU state, TLB geometry, and a
sequence of translate / translate_many / run / MOV CR3 / INVLPG / INVPCID /
memory writes) run under two interpreters: this tree's and one with another
build of ptemu installed (e.g. the previous commit, built in its own venv).
For every step each side records the result (translation fields and entries,
or the fault's vector, error code and CR2; batch arrays; run index and fault),
a digest of physical memory, every TLB statistic, and the raw TLB and
paging-structure-cache arrays (keys, LRU stamps, data).  Any difference is
reported with the seed and the first step that differs.

    git archive BASE | tar -x -C /tmp/base && python3 -m venv /tmp/base/.venv &&
        /tmp/base/.venv/bin/pip install /tmp/base
    python tools/diffbase.py --other /tmp/base/.venv/bin/python --seeds 300

Only public API present in both builds is used.  Exit status 1 on a difference.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys

MEM = 2 << 20


def _memory(rng, np, ptemu):
    """Words that look like paging-structure entries: mostly present, tables
    inside memory, random rights, A/D, PS, XD, keys, a few reserved bits."""
    n = MEM // 8
    frames = rng.integers(0, MEM >> 12, size=n, dtype=np.uint64)
    far = rng.random(n) < 0.02     # a table or frame outside memory
    frames[far] = rng.integers(MEM >> 12, 1 << 30, size=int(far.sum()), dtype=np.uint64)
    w = frames << np.uint64(12)
    bit = lambda p, b: np.where(rng.random(n) < p, np.uint64(b), np.uint64(0))  # noqa: E731
    w |= bit(0.8, ptemu.PTE_P) | bit(0.8, ptemu.PTE_W) | bit(0.8, ptemu.PTE_U)
    w |= bit(0.6, ptemu.PTE_A) | bit(0.6, ptemu.PTE_D) | bit(0.12, ptemu.PTE_PS)
    w |= bit(0.3, ptemu.PTE_G) | bit(0.15, 1 << 63) | bit(0.03, 1 << 13) | bit(0.02, 1 << 51)
    w |= rng.integers(0, 16, size=n, dtype=np.uint64) << np.uint64(59) * (rng.random(n) < 0.2)
    return w


def _va(rng, la57):
    idx = [int(rng.integers(0, 8 if lvl > 2 else 512)) for lvl in range(5 if la57 else 4)]
    va = 0
    for i in idx:
        va = (va << 9) | i
    va = (va << 12) | int(rng.integers(0, 4096))
    width = 57 if la57 else 48
    if rng.random() < 0.3:                       # the upper half
        va |= ((1 << (64 - width + 1)) - 1) << (width - 1)
    if rng.random() < 0.02:                      # non-canonical
        va ^= 1 << 62
    return va & ((1 << 64) - 1)


def _program(seed, out):
    import numpy as np
    import ptemu
    import ptemu.pagetable
    rng = np.random.default_rng(seed)
    mem = ptemu.PhysicalMemory(MEM)
    la57 = rng.random() < 0.2
    if rng.random() < 0.25:
        # raw random words: walks into anything (faults of every kind)
        mem.array.view(np.uint64)[:] = _memory(rng, np, ptemu)
        root = int(rng.integers(0, MEM >> 12)) << 12
        pool = [_va(rng, la57) for _ in range(48)]
    else:
        # well-formed tables with random leaf rights, A/D, sizes and keys
        b = ptemu.pagetable.PageTableBuilder(mem, la57=la57, table_start=MEM // 2)
        pool = []
        for _ in range(int(rng.integers(8, 64))):
            size = int(rng.choice([4096, 4096, 4096, 2 << 20, 1 << 30]))
            va = _va(rng, la57) & ~(size - 1) & ((1 << (56 if la57 else 47)) - 1)
            fl = ptemu.PTE_P
            for bitv, p in ((ptemu.PTE_W, 0.8), (ptemu.PTE_U, 0.7), (ptemu.PTE_A, 0.7),
                            (ptemu.PTE_D, 0.6), (ptemu.PTE_G, 0.3), (1 << 63, 0.15)):
                if rng.random() < p:
                    fl |= bitv
            tfl = ptemu.PTE_P | ptemu.PTE_W | ptemu.PTE_U
            if rng.random() < 0.3:
                tfl |= ptemu.PTE_A
            if rng.random() < 0.1:
                tfl &= ~ptemu.PTE_W
            try:
                b.map(va, int(rng.integers(0, 1 << 20)) * size % (1 << 40), page_size=size,
                      flags=fl, table_flags=tfl,
                      pkey=int(rng.integers(0, 16)) if rng.random() < 0.3 else 0)
            except ptemu.InvalidInput:
                continue
            for _ in range(3):
                pool.append(va | int(rng.integers(0, size)) & ~7)
        root = b.cr3
    cr4 = ptemu.CR4_PAE | (ptemu.CR4_LA57 if la57 else 0)
    for bitv, p in ((ptemu.CR4_PGE, 0.5), (ptemu.CR4_SMEP, 0.3), (ptemu.CR4_SMAP, 0.3),
                    (ptemu.CR4_PKE, 0.2)):
        if rng.random() < p:
            cr4 |= bitv
    cr0 = ptemu.CR0_PG | ptemu.CR0_PE | (ptemu.CR0_WP if rng.random() < 0.7 else 0)
    efer = ptemu.EFER_LME | ptemu.EFER_LMA | (ptemu.EFER_NXE if rng.random() < 0.7 else 0)
    cpu = ptemu.CpuState(cr0=cr0, cr3=root, cr4=cr4,
                         efer=efer, cpl=int(rng.choice([0, 3])), ac=bool(rng.random() < 0.3),
                         pkru=int(rng.integers(0, 1 << 32)), maxphyaddr=int(rng.choice([46, 52])),
                         eager_accessed=bool(rng.random() < 0.15))
    kind = rng.integers(0, 3)
    tlb = (ptemu.Tlb.default() if kind == 0 else ptemu.Tlb.simple(entries=16, ways=4)
           if kind == 1 else None)
    mmu = ptemu.Mmu(mem, cpu, tlb)
    pool = pool or [_va(rng, la57)]

    def pick():
        return pool[int(rng.integers(0, len(pool)))] if rng.random() < 0.9 else _va(rng, la57)

    def state():
        h = hashlib.sha1(mem.array.tobytes())
        if tlb is not None:
            c = tlb._c
            for i in range(len(tlb.arrays)):
                a = c.arr[i]
                h.update(bytes(ptemu._native.ffi.buffer(a.slots, 24 * a.sets * a.ways)))
            for level in tlb.psc_geometry:
                a = c.psc[level]
                h.update(bytes(ptemu._native.ffi.buffer(a.slots, 24 * a.sets * a.ways)))
            st = tlb.stats
            h.update(repr((st.lookups, st.hits, st.l1_hits, st.l2_hits, st.misses, st.walks,
                           st.walk_refs, st.dirty_rewalks, st.fault_invalidations,
                           sorted(st.flushes_by_cause.items()), sorted(st.by_access.items()),
                           sorted(st.arrays.items()), sorted(st.psc.items()))).encode())
        return h.hexdigest()[:16]

    for step in range(60):
        op = rng.random()
        if op < 0.45:
            va = pick()
            acc = str(rng.choice(["r", "w", "x"]))
            user = [None, True, False][int(rng.integers(0, 3))]
            upd = bool(rng.random() < 0.85)
            try:
                t = mmu.translate(va, acc, user=user, update_ad=upd)
                res = ("ok", t.va, t.pa, t.page_size, t.level, t.writable, t.user, t.executable,
                       t.entries)
            except ptemu.MmuFault as exc:
                res = ("fault", type(exc).__name__, exc.error_code, getattr(exc, "cr2", None))
        elif op < 0.65:
            vas = np.array([pick() for _ in range(int(rng.integers(1, 40)))], dtype=np.uint64)
            if rng.random() < 0.5:
                acc = rng.integers(0, 3, size=len(vas), dtype=np.uint8)
            else:
                acc = str(rng.choice(["r", "w", "x"]))
            r = mmu.translate_many(vas, acc, user=[None, True, False][int(rng.integers(0, 3))],
                                   update_ad=bool(rng.random() < 0.85))
            res = ("many", r.pa.tolist(), r.vector.tolist(), r.error_code.tolist())
        elif op < 0.85:
            n = int(rng.integers(1, 200))
            tr = np.zeros(n, dtype=ptemu.TRACE_DTYPE)
            tr["va"] = [pick() for _ in range(n)]
            tr["access"] = rng.integers(0, 3, size=n)
            tr["user"] = rng.random(n) < 0.6
            pa = np.zeros(n, dtype=np.uint64)
            stops, start = [], 0
            while start < n:     # on past each fault, as a kernel handling it would
                r = mmu.run(tr, start=start, pa=pa)
                stops.append((r.index, r.vector, r.error_code, r.cr2, r.cause))
                start = r.index + 1
            res = ("run", stops, pa.tolist())
        elif op < 0.9:
            v = root if rng.random() < 0.7 else int(rng.integers(0, MEM >> 12)) << 12
            try:
                mmu.write_cr3(v)
                res = ("cr3", v)
            except ptemu.MmuFault as exc:
                res = ("cr3-fault", str(exc))
        elif op < 0.94:
            mmu.invlpg(pick())
            res = ("invlpg",)
        elif op < 0.97:
            try:
                mmu.invpcid(int(rng.integers(0, 4)), 0, pick())
                res = ("invpcid",)
            except ptemu.MmuFault as exc:
                res = ("invpcid-fault", str(exc))
        else:
            # the guest rewrites an entry (and the CPU state changes a bit)
            pa8 = int(rng.integers(0, MEM // 8)) * 8
            mem.write_u64(pa8, int(_memory(rng, np, ptemu)[0]))
            cpu.ac = not cpu.ac
            res = ("poke", pa8)
        out.append(repr((step, res, state())))


def worker(seeds):
    for seed in seeds:
        log = []
        try:
            _program(seed, log)
        except Exception as exc:   # a crash is a result too
            log.append("exception %s: %s" % (type(exc).__name__, exc))
        print(json.dumps({"seed": seed, "log": log}), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--other", required=True, help="python of the venv with the other build")
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    seeds = range(a.first, a.first + a.seeds)
    if a.worker:
        worker(seeds)
        return 0
    args = [os.path.abspath(__file__), "--worker", "--other", "-", "--seeds", str(a.seeds), "--first", str(a.first)]
    here = subprocess.run([sys.executable] + args, capture_output=True, text=True, check=True,
                          cwd="/")
    there = subprocess.run([a.other] + args, capture_output=True, text=True, check=True, cwd="/")
    mine = [json.loads(x) for x in here.stdout.splitlines()]
    theirs = [json.loads(x) for x in there.stdout.splitlines()]
    assert len(mine) == len(theirs) == a.seeds, (len(mine), len(theirs))
    bad = 0
    steps = 0
    for m, t in zip(mine, theirs):
        steps += len(m["log"])
        if m["log"] != t["log"]:
            bad += 1
            for i, (x, y) in enumerate(zip(m["log"], t["log"])):
                if x != y:
                    print("seed %d differs at step %d:\n  this:  %s\n  other: %s"
                          % (m["seed"], i, x[:400], y[:400]))
                    break
            else:
                print("seed %d: %d steps here, %d there" % (m["seed"], len(m["log"]),
                                                            len(t["log"])))
    print("%d programs, %d steps: %s" % (a.seeds, steps,
                                         "%d differ" % bad if bad else "identical results, "
                                         "memory, TLB arrays and statistics"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
