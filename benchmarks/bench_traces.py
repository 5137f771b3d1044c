"""Issue 10 performance: recording real programs, trace size, replay speed
and replay memory.

Programs recorded (Valgrind lackey, `ptemu.traces.record`):

  walk-small  a C program (compiled here with cc) that reads and writes a
              256 KiB array again and again: the cache- and TLB-resident case
  walk-large  the same program over a 96 MiB array (24,576 pages, larger than
              L3 and than the TLB's reach): the larger-than-cache case
  ls          /bin/ls -l /usr/bin, a real utility (dynamic loading, libc)

Measured, each against a baseline of the same run:

* recording: wall time under `record` vs the program run bare (slowdown),
  and accesses recorded per second;
* size: bytes per access of the trace file vs a .npy of TRACE_DTYPE (16
  bytes per access) and vs zlib level 6 in the same format;
* replay: TraceWorkload on a NativeMachine through the guest kernel,
  decompression included, in accesses/s and in same-run minimal walks per
  access (bigimage.calibration; targets: 5 M accesses/s, <= 3 minimal walks);
* memory: a long trace (the walk-large recording repeated to 100 M accesses
  with PTEMU_BENCH_FULL=1, else 5 M) replayed in a fresh process, its peak
  RSS (VmHWM; target 200 MiB for 100 M accesses).

    PTEMU_BENCH_FULL=1 python -m pytest benchmarks/bench_traces.py --benchmark-only -s
"""
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from ptemu import traces
from ptemu.guest import NativeMachine, Kernel
from ptemu.traces import TraceWorkload, TraceWriter, iter_trace, trace_summary
from bigimage import calibrated, calibration

FULL = bool(os.environ.get("PTEMU_BENCH_FULL"))
MAX = 60_000_000            # a safety net: every program below runs to its end
LONG = 100_000_000 if FULL else 5_000_000
TARGET_RATE, TARGET_WALKS, TARGET_RSS = 5e6, 3.0, 200 << 20
_CAL = {}
_HAVE = shutil.which("valgrind") and shutil.which("cc")

WALK_C = r"""
#include <stdlib.h>
#include <string.h>
/* walk BYTES PASSES STRIDE: read-modify-write every STRIDE-th byte of a
   BYTES array, PASSES times. */
int main(int argc, char **argv) {
    size_t n = strtoul(argv[1], 0, 0), passes = strtoul(argv[2], 0, 0);
    size_t stride = strtoul(argv[3], 0, 0);
    volatile unsigned char *a = malloc(n);
    for (size_t p = 0; p < passes; p++)
        for (size_t i = 0; i < n; i += stride)
            a[i] += (unsigned char)p;
    return a[0] == 255;
}
"""

# About 1.2 M accesses each (13 M with PTEMU_BENCH_FULL=1), whole runs.
PROGRAMS = {
    "walk-small": lambda exe: [exe, str(256 << 10), "400" if FULL else "35", "64"],
    "walk-large": lambda exe: [exe, str(96 << 20), "60" if FULL else "5", "4096"],
    "ls": lambda exe: ["/bin/ls", "-l", "/usr/bin"] if FULL else ["/bin/ls", "-l", "/"],
}


def test_minimal_walk_calibration(benchmark, big_image):
    calibration(benchmark, big_image, _CAL)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    if not _HAVE:
        pytest.skip("needs valgrind and a C compiler")
    d = tmp_path_factory.mktemp("traces")
    exe = str(d / "walk")
    (d / "walk.c").write_text(WALK_C)
    subprocess.run(["cc", "-O1", "-o", exe, str(d / "walk.c")], check=True)
    out = {}
    for name, argv in PROGRAMS.items():
        cmd = argv(exe)
        with open(os.devnull, "w") as null:
            t0 = time.perf_counter()
            r = traces.record(cmd, d / (name + ".ptrace"), max_accesses=MAX, stdout=null,
                              progress=False)
            rec_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            subprocess.run(cmd, stdout=null, check=False)
            bare_s = time.perf_counter() - t0
        out[name] = dict(record=r, record_s=rec_s, bare_s=bare_s, cmd=cmd)
    return out


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_record_slowdown_and_size(benchmark, recorded, name, tmp_path):
    rec = recorded[name]
    r = rec["record"]
    s = trace_summary(r.path)
    # zlib level 6, the same format and chunks, for the codec comparison
    zpath = tmp_path / "z.ptrace"
    with TraceWriter(zpath, codec="zlib", level=6) as w:
        for tr, sz in iter_trace(r.path, chunk=1 << 18, with_size=True):
            w.append(tr, sz)

    def read_all():
        return sum(len(x) for x in iter_trace(r.path, chunk=1 << 16))
    n = benchmark.pedantic(read_all, rounds=3, iterations=1)
    assert n == r.records == s.records
    bpa = s.file_bytes / s.records
    assert bpa <= 3.0, "goal: at most 3 bytes per access"
    slow = rec["record_s"] / rec["bare_s"]
    info = benchmark.extra_info
    info.update(program=" ".join(rec["cmd"]), accesses=r.records, stopped=r.stopped,
                bytes_per_access=round(bpa, 4), npy_bytes_per_access=16,
                zlib6_bytes_per_access=round(os.path.getsize(zpath) / s.records, 4),
                footprint_pages=len(s.pages), record_s=round(rec["record_s"], 2),
                bare_s=round(rec["bare_s"], 4), record_accesses_per_s=round(
                    r.records / rec["record_s"]))
    if r.stopped is None:
        info["record_slowdown"] = round(slow, 1)
    print("\n%-10s %10d accesses (%s)  %.3f bytes/access (zlib-6 %.3f, .npy 16: %.0fx "
          "smaller)  footprint %d pages\n    recording %.2f s = %.0f accesses/s; bare run "
          "%.4f s%s" % (
              name, r.records, "cut by --max" if r.stopped else "whole run", bpa,
              info["zlib6_bytes_per_access"], 16 / bpa, len(s.pages), rec["record_s"],
              r.records / rec["record_s"], rec["bare_s"],
              "; slowdown %.0fx" % slow if r.stopped is None else
              " (the whole program; recording cut at %d accesses, slowdown not comparable)"
              % MAX))


def _replay_once(path, mem):
    k = Kernel(NativeMachine(mem))
    w = TraceWorkload(path)
    w.setup(k)
    return w, k


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_replay_native(benchmark, recorded, name):
    r = recorded[name]["record"]
    w0 = TraceWorkload(r.path)
    mem = max(64 << 20, ((w0.guest_memory_bytes >> 21) + 1) << 21)
    state = {}

    def setup():
        w, k = _replay_once(r.path, mem)
        state["k"] = k
        return (w, k), {}

    def run(w, k):
        return w.run(k)

    res = benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    k = state["k"]
    assert res.accesses == r.records == k.stats["user_accesses"]
    assert sum(res.guest_faults.values()) == 0
    secs = benchmark.stats.stats.mean if getattr(benchmark, "stats", None) else res.seconds
    rate = res.accesses / secs
    info = benchmark.extra_info
    info.update(program=name, accesses=res.accesses, accesses_per_s=round(rate),
                faults=res.faults, protection_faults=res.protection_faults,
                footprint_pages=len(w0.summaries[0].pages))
    line = "\n%-10s replay %d accesses in %.3f s: %.2f M accesses/s (target 5), %d faults " \
           "(%d protection)" % (name, res.accesses, secs, rate / 1e6, res.faults,
                                res.protection_faults)
    if "minimal_per_walk" in _CAL:
        walk = _CAL["minimal_per_walk"]
        cost, target, rate10 = calibrated(secs / res.accesses, walk, TARGET_RATE)
        info["minimal_walks_per_access"] = round(cost, 3)
        line += "\n    minimal walk %.1f ns: %.2f minimal walks per access (target <= %.0f; " \
                "5 M/s at 10 ns is %.0f) -- %s" % (
                    walk * 1e9, cost, TARGET_WALKS, target,
                    "met" if cost <= TARGET_WALKS else "NOT met")
    print(line)


_CHILD = r"""
import sys, time
from ptemu.guest import NativeMachine, Kernel
from ptemu.traces import TraceWorkload
w = TraceWorkload(sys.argv[1])
k = Kernel(NativeMachine(int(sys.argv[2])))
t0 = time.perf_counter()
res = w.run(k)
secs = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(res.accesses, secs, int(hwm) * 1024)
"""


def test_replay_long_trace_memory(benchmark, recorded, tmp_path):
    """The walk-large recording repeated to LONG accesses, written chunk by
    chunk (never held whole), replayed in a fresh interpreter: its peak RSS."""
    src = recorded["walk-large"]["record"].path
    path = tmp_path / "long.ptrace"
    base = [(t.copy(), s.copy()) for t, s in iter_trace(src, chunk=1 << 18, with_size=True)]
    with TraceWriter(path, command=["repeat", src]) as w:
        n = 0
        while n < LONG:
            for t, s in base:
                k = min(len(t), LONG - n)
                w.append(t[:k], s[:k])
                n += k
                if n >= LONG:
                    break
    del base
    mem = max(256 << 20, ((TraceWorkload(path).guest_memory_bytes >> 21) + 1) << 21)

    def run():
        out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(mem)], check=True,
                             capture_output=True, text=True).stdout.split()
        return int(out[0]), float(out[1]), int(out[2])

    accesses, secs, rss = benchmark.pedantic(run, rounds=1, iterations=1)
    assert accesses == LONG
    size = os.path.getsize(path)
    benchmark.extra_info.update(accesses=accesses, seconds=round(secs, 2),
                                accesses_per_s=round(accesses / secs), peak_rss=rss,
                                file_bytes=size, guest_memory=mem)
    print("\nlong trace: %d accesses (%.1f MB file, %.3f bytes/access), replayed in %.1f s "
          "(%.2f M accesses/s), peak RSS %.1f MiB (target %d MiB for 100 M; guest memory "
          "%d MiB, touched pages only)" % (
              accesses, size / 1e6, size / accesses, secs, accesses / secs / 1e6,
              rss / 2 ** 20, TARGET_RSS >> 20, mem >> 20))
    if FULL:
        assert rss <= TARGET_RSS, "peak RSS %d > 200 MiB" % rss
