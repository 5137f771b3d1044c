#!/usr/bin/env python3
"""tools/walkcost.py -- what one translation costs, in instructions and cycles.

Two counts for each of the hot operations, on the benchmark images of
benchmarks/bigimage.py ("256mib", whose tables a large L3 holds, and "huge",
whose 300,000 page tables no cache holds):

  cycles        the time-stamp counter (rdtsc) around one C call over N
                items, best of --repeat, divided by N.  TSC ticks run at the
                nominal clock, whatever the core's actual one.
  instructions  Valgrind's callgrind, counting only inside the C entry point
                (--toggle-collect), divided by N; with --branch-sim the
                mispredicted conditional branches per item too.  Machine-
                independent: where the tables sit in cache, a walk is bound by
                its instructions.

Operations: minimal (ptemu_minimal_walk_many, the benchmarks' baseline),
many (translate_many, writes as user, all checks and A/D on), run99 and
run50 (mmu.run through Tlb.default() at 99% and 50% TLB hits), scalar (one
Mmu.translate; the C part only under callgrind).

    python tools/walkcost.py                     # cycles, both images
    python tools/walkcost.py --callgrind         # instructions (256mib, N=200,000)
    python tools/walkcost.py --ops many,run50 --images huge

perf counters are not available in these VMs (`perf stat -e cycles` says
"not supported"), hence rdtsc.
"""
import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

OPS = ("minimal", "many", "run99", "run50", "scalar")
ENTRY = {"minimal": "ptemu_minimal_walk_many", "many": "ptemu_translate_many",
         "run99": "ptemu_run", "run50": "ptemu_run", "scalar": "ptemu_mmu_translate_one"}
# With a cached walk context the batch calls may go through the Mmu entry points
# (and a scalar call with user or update_ad given through the four-argument one).
ENTRY_ALT = {"many": "ptemu_mmu_translate_many", "run99": "ptemu_mmu_run",
             "run50": "ptemu_mmu_run", "scalar": "ptemu_mmu_translate"}


def _rdtsc():
    """A compiled rdtsc() (cffi, built once into a temporary directory)."""
    from cffi import FFI
    ffi = FFI()
    ffi.cdef("uint64_t walkcost_rdtsc(void);")
    ffi.set_source("_walkcost_tsc", "#include <stdint.h>\n"
                   "uint64_t walkcost_rdtsc(void) { return __builtin_ia32_rdtsc(); }")
    d = pathlib.Path(tempfile.gettempdir()) / ("walkcost-tsc-%d" % os.getuid())
    d.mkdir(exist_ok=True)
    if not list(d.glob("_walkcost_tsc*.so")):
        ffi.compile(tmpdir=str(d), verbose=False)
    sys.path.insert(0, str(d))
    import _walkcost_tsc
    return _walkcost_tsc.lib.walkcost_rdtsc


def _setup(op, image, n):
    """(callable doing the operation once, items per call)."""
    import numpy as np
    import ptemu
    from ptemu._native import ffi, lib
    import bigimage
    cpu = ptemu.CpuState.long_mode(cr3=image["cr3"])
    if op in ("minimal", "many"):
        vas = bigimage.random_mapped(image, n, np.random.default_rng(7))
        if op == "minimal":
            out = np.empty(n, dtype=np.uint64)
            vp, op_ = ffi.from_buffer("uint64_t[]", vas), ffi.from_buffer("uint64_t[]", out)
            mem = image["memory"]._c
            return (lambda: lib.ptemu_minimal_walk_many(mem, image["cr3"], 4, vp, n, op_)), n
        mmu = ptemu.Mmu(image["memory"], cpu)
        return (lambda: mmu.translate_many(vas, "w", user=True)), n
    if op in ("run99", "run50"):
        trace = bigimage.tlb_trace(image, 0.99 if op == "run99" else 0.5, 1, n)
        state = {}

        def run():
            # A fresh TLB each time, as the benchmark has (construction is
            # outside the count only under callgrind's toggle).
            mmu = state["mmu"] = ptemu.Mmu(image["memory"], cpu, ptemu.Tlb.default())
            return mmu.run(trace)
        return run, n
    mmu = ptemu.Mmu(image["memory"], cpu)
    va = int(image["vas_4k"][12345]) + 0x10
    tr = mmu.translate

    def scalar():
        for _ in range(n):
            tr(va)
    return scalar, n


def cycles(ops, images, n, repeat):
    import bigimage
    tsc = _rdtsc()
    for kind in images:
        image = bigimage.build_big_image(kind)
        for op in ops:
            f, items = _setup(op, image, n if op != "scalar" else 100_000)
            best = None
            for _ in range(repeat):
                t0 = tsc()
                f()
                dt = tsc() - t0
                best = dt if best is None else min(best, dt)
            print("%-7s %-7s %10.1f TSC cycles per item" % (kind, op, best / items), flush=True)


def _one(op, kind, n):
    """The body callgrind runs: build, then the operation once."""
    import bigimage
    image = bigimage.build_big_image(kind)
    f, _ = _setup(op, image, n)
    f()


def callgrind(ops, images, n, branch_sim):
    for kind in images:
        for op in ops:
            items = n if op != "scalar" else 10_000
            with tempfile.TemporaryDirectory() as d:
                out = os.path.join(d, "cg.out")
                cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out,
                       "--toggle-collect=" + ENTRY[op]]
                if op in ENTRY_ALT:
                    cmd.append("--toggle-collect=" + ENTRY_ALT[op])
                if branch_sim:
                    cmd.append("--branch-sim=yes")
                cmd += [sys.executable, __file__, "--one", op, "--images", kind, "-n", str(items)]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
                text = pathlib.Path(out).read_text()
                events = re.search(r"^events:\s*(.*)$", text, re.M).group(1).split()
                totals = [int(x) for x in
                          re.search(r"^(?:totals|summary):\s*(.*)$", text, re.M).group(1).split()]
                got = dict(zip(events, totals))
                line = "%-7s %-7s %8.1f instructions per item" % (kind, op, got["Ir"] / items)
                if "Bcm" in got:
                    line += ", %.2f mispredicted conditional branches" % (got["Bcm"] / items)
                print(line, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--images", default=None)
    ap.add_argument("-n", type=int, default=None, help="items per call")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--callgrind", action="store_true")
    ap.add_argument("--branch-sim", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    ops = [o for o in a.ops.split(",") if o]
    for o in ops:
        if o not in OPS:
            ap.error("unknown operation %r (know %s)" % (o, ", ".join(OPS)))
    if a.one:
        _one(a.one, a.images, a.n)
        return 0
    if a.callgrind:
        callgrind(ops, (a.images or "256mib").split(","), a.n or 200_000, a.branch_sim)
    else:
        cycles(ops, (a.images or "256mib,huge").split(","), a.n or 1_000_000, a.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
