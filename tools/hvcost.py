#!/usr/bin/env python3
"""tools/hvcost.py -- instructions per guest access of a hypervisor workload (callgrind).

Runs benchmarks/bench_hypervisor.py's full-size workloads ("fork",
"context_switch") on each machine (native, shadow, unsync, paravirt), at two
lengths, under callgrind collecting only inside the workload's run (a cffi
callback around it, as tools/pycost.py does: building the traces and setup
are not counted), and prints the instructions per guest access of the
difference (the guest's first steps cancel out) and each mode's ratio to
native.  Machine-independent, unlike timings on a
shared host; the wall-clock figures stay with the benchmark.

    python tools/hvcost.py [--workload fork|context_switch|both]
                           [--modes native,shadow,unsync,paravirt]
                           [--accesses N]            (default 200000; 2N is the second length)
    python tools/hvcost.py --wall ...                (no valgrind: seconds and accesses/s)

Needs valgrind, except with --wall.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

MODES = ("native", "shadow", "unsync", "paravirt")


def _machine(mode):
    """The benchmark's own machine for `mode` (benchmarks/bench_hypervisor.py)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                    "benchmarks"))
    import bench_hypervisor
    return bench_hypervisor._machine(mode)


def _workload(name, total):
    from ptemu.workloads import ContextSwitchWorkload, ForkWorkload
    if name == "context_switch":
        return ContextSwitchWorkload(total=total, seed=1)
    return ForkWorkload(total=total, seed=2)


def _child(workload, mode, total):
    """Run one workload on one machine; print accesses and seconds."""
    from ptemu.guest import Kernel
    w = _workload(workload, total)
    kernel = Kernel(_machine(mode))
    w.setup(kernel)
    out = {}

    def run():
        t0 = time.perf_counter()
        out["res"] = w.run(kernel)
        out["secs"] = time.perf_counter() - t0
    import cffi
    ffi = cffi.FFI()
    cb = ffi.callback("void(void)", run)     # callgrind collects inside it only
    ffi.cast("void(*)(void)", cb)()
    res, secs = out["res"], out["secs"]
    print("ACCESSES %d SECONDS %.6f" % (res.accesses, secs))


def _run(workload, mode, total, callgrind):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", workload, mode, str(total)]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    if not callgrind:
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        m = re.search(r"ACCESSES (\d+) SECONDS ([\d.]+)", out)
        return int(m.group(1)), float(m.group(2))
    with tempfile.TemporaryDirectory() as d:
        vg = ["valgrind", "--tool=callgrind", "--collect-atstart=no",
              "--toggle-collect=invoke_callback",
              "--callgrind-out-file=" + os.path.join(d, "cg.out")]
        p = subprocess.run(vg + cmd, env=env, capture_output=True, text=True)
        if p.returncode:
            sys.exit("hvcost: %s %s failed:\n%s" % (workload, mode, p.stderr[-2000:]))
        accesses = int(re.search(r"ACCESSES (\d+)", p.stdout).group(1))
        return accesses, int(re.search(r"Collected : (\d+)", p.stderr).group(1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="both", choices=("fork", "context_switch", "both"))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--accesses", type=int, default=200_000)
    ap.add_argument("--wall", action="store_true", help="time without valgrind")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _child(a.child[0], a.child[1], int(a.child[2]))
        return 0
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error("unknown mode %s (choose from %s)" % (", ".join(bad), ", ".join(MODES)))
    workloads = ("fork", "context_switch") if a.workload == "both" else (a.workload,)
    for wl in workloads:
        base = None
        for mode in modes:
            if a.wall:
                acc, secs = _run(wl, mode, a.accesses, False)
                per, unit = secs / acc * 1e9, "ns/access (%.2f M accesses/s)" % (acc / secs / 1e6)
            else:
                acc1, i1 = _run(wl, mode, a.accesses, True)
                acc2, i2 = _run(wl, mode, 2 * a.accesses, True)
                per, unit = (i2 - i1) / (acc2 - acc1), "instructions/access"
            if mode == "native":
                base = per
            ratio = " %.3fx native" % (per / base) if base else ""
            print("%-15s %-9s %10.1f %s%s" % (wl, mode, per, unit, ratio), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
