"""Issue 4 performance: guest workloads on the native machine and on VMs.

Two guest workloads (ptemu.workloads), each run by the guest kernel model
(ptemu.guest.Kernel) on:

  native    NativeMachine: guest tables walked directly (the baseline,
            measured in the same run)
  shadow    a shadow-paging VM (write-protected guest page tables)
  unsync    a shadow-paging VM with unsync leaf tables
  paravirt  a paravirtual VM (mmu_update / flush hypercalls)

Workloads: "context_switch" (8 processes, round-robin slices of 10,000
accesses) and "fork" (a parent forking children that break COW, munmap,
exec, exit and are reaped).  With PTEMU_BENCH_FULL=1 each runs 5,000,000
guest accesses; otherwise a small version (fast enough for CI, where the
benchmarks run as plain tests with --benchmark-disable).

Reported in benchmark.extra_info: accesses, seconds, accesses_per_s,
exits, exits_per_s (both end to end, guest kernel time included),
exits_by_reason, the shadow-MMU counters, the guest kernel's fault counts,
and for VMs seconds_over_native / exits_per_s_over_native (the time the VM
adds to the native run of the same workload, and the exits handled per
second of it).  Each benchmark is also a test: the run completes
without a guest kernel error or SIGSEGV, and every VM delivers to the guest
exactly the true faults the native machine delivers (same count per kind
and the same sequence, compared by digest).

The targets (5 M accesses/s, 200,000 exits/s) are also stated in units of
issue 2's minimal walk, measured in the same run (bigimage.calibrated): 20
and 500 minimal walks per access and per exit where a minimal walk costs
the 10 ns the issues assume.

test_per_exit_cost (issue 13): the time a VM adds over NativeMachine doing
the same vCPU operations, per exit, for hidden-fault fills (inside vcpu.run
and through load_u64), the kernel's remap pattern (PTE store through the
direct map, INVLPG, load) and CR3 switches between cached roots; with the
C fast paths (the default) and with the Python reference (fast_paths=False);
in µs and in minimal walks measured in the same test (target: 60).

    PTEMU_BENCH_FULL=1 OPENBLAS_NUM_THREADS=1 pytest benchmarks/bench_hypervisor.py \
        --benchmark-only -s
"""
import hashlib
import os
import time

import pytest

from ptemu.guest import NativeMachine, Kernel
from ptemu.workloads import ContextSwitchWorkload, ForkWorkload
from bigimage import calibrated, calibration, minimal_walk, random_mapped

try:
    from ptemu.hypervisor import Hypervisor
    _HV_ERROR = None
except Exception as exc:   # pragma: no cover - depends on the hypervisor being there
    Hypervisor = None
    _HV_ERROR = "%s: %s" % (type(exc).__name__, exc)

FULL = bool(os.environ.get("PTEMU_BENCH_FULL"))
TOTAL = 5_000_000 if FULL else 60_000
GUEST_MEM = 64 << 20
HOST_MEM = 256 << 20

_WORKLOADS = {}
_NATIVE = {}     # workload -> (fault counts, fault-log digest) of the native run
_CAL = {}        # the calibration walk of this run
TARGET_ACCESSES, TARGET_EXITS = 5e6, 200e3


def test_minimal_walk_calibration(benchmark, big_image):
    calibration(benchmark, big_image, _CAL)


def _workload(name):
    w = _WORKLOADS.get(name)
    if w is None:
        if name == "context_switch":
            w = ContextSwitchWorkload(total=TOTAL, seed=1) if FULL else \
                ContextSwitchWorkload(total=TOTAL, nproc=8, slice_len=2_000, heap_pages=64,
                                      stack_pages=8, text_pages=8, hot_pages=16, seed=1)
        else:
            w = ForkWorkload(total=TOTAL, seed=2) if FULL else \
                ForkWorkload(total=TOTAL, heap_pages=64, child_accesses=4_000,
                             parent_accesses=1_000, child_touch=16, seed=2)
        _WORKLOADS[name] = w
    return w


def _machine(mode):
    if mode == "native":
        return NativeMachine(GUEST_MEM)
    hv = Hypervisor(HOST_MEM)
    if mode == "shadow":
        return hv.create_vm(GUEST_MEM, paging="shadow")
    if mode == "unsync":
        return hv.create_vm(GUEST_MEM, paging="shadow", unsync=True)
    return hv.create_vm(GUEST_MEM, paging="paravirt")


def _mode(mode):
    if mode != "native" and Hypervisor is None:
        return pytest.param(mode, marks=pytest.mark.xfail(
            strict=False, run=False, reason="ptemu.hypervisor.Hypervisor is not importable "
            "yet (%s)" % _HV_ERROR))
    return mode


def _exits(stats):
    if hasattr(stats, "exits_by_reason"):
        by = dict(stats.exits_by_reason())
    else:
        by = {k[5:]: v for k, v in dict(stats).items() if k.startswith("exit_")}
    total = stats.get("exits", sum(by.values())) if hasattr(stats, "get") else sum(by.values())
    return total, by


_SHADOW_COUNTERS = ("pf_fixed", "pf_guest", "pf_emulate", "pf_spurious", "mmu_pte_write",
                    "mmu_flooded", "mmu_unsync", "mmu_sync", "mmu_cache_miss",
                    "mmu_shadow_zapped", "mmu_recycled", "prev_root_hit", "cr3_write",
                    "invlpg", "hypercall", "mmu_update_entries", "shadow_pages_peak")


@pytest.mark.parametrize("mode", [_mode(m) for m in ("native", "shadow", "unsync", "paravirt")])
@pytest.mark.parametrize("workload", ["context_switch", "fork"])
def test_guest_workload(benchmark, workload, mode):
    w = _workload(workload)
    state = {}

    def setup():
        machine = _machine(mode)
        kernel = Kernel(machine, record_faults=True)
        w.setup(kernel)
        state["kernel"] = kernel
        return (kernel,), {}

    def run(kernel):
        t0 = time.perf_counter()
        res = w.run(kernel)
        res["wall"] = time.perf_counter() - t0
        return res

    res = benchmark.pedantic(run, setup=setup, rounds=1, iterations=1)
    kernel = state["kernel"]
    ks = kernel.stats
    assert res.accesses >= TOTAL
    assert ks["segv"] == 0
    assert ks["user_accesses"] == res.accesses
    faults = {k: v for k, v in ks.items() if k.startswith("pf_")}
    digest = hashlib.sha1(repr(kernel.fault_log).encode()).hexdigest()
    assert res.faults == ks["page_fault"] == len(kernel.fault_log) > 0
    secs = res["wall"]
    if mode == "native":
        _NATIVE[workload] = (faults, digest, secs)
    elif workload in _NATIVE:
        # invisible to the guest: the same true faults, in the same order
        assert faults == _NATIVE[workload][0]
        assert digest == _NATIVE[workload][1]
    exits, by_reason = _exits(kernel.machine.stats)
    ms = kernel.machine.stats
    info = benchmark.extra_info
    info.update(workload=workload, mode=mode, accesses=res.accesses, seconds=round(secs, 3),
                accesses_per_s=round(res.accesses / secs), exits=exits,
                exits_per_s=round(exits / secs), exits_by_reason=by_reason,
                guest_faults=res.faults, guest_fault_kinds=faults,
                context_switches=ks["context_switch"], forks=ks["fork"],
                guest_pte_writes=ks["pte_write"])
    extra = ""
    if mode != "native":
        info["hv"] = {k: ms.get(k, 0) for k in _SHADOW_COUNTERS}
        if workload in _NATIVE and secs > _NATIVE[workload][2]:
            # The guest kernel does the same work on every machine; what the
            # VM adds over the native run is (mostly) exit handling.
            over = secs - _NATIVE[workload][2]
            info["seconds_over_native"] = round(over, 3)
            info["exits_per_s_over_native"] = round(exits / over)
            extra = "  (%.2f s over native: %.0f exits/s)" % (over, exits / over)
        if workload in _NATIVE:
            ratio = secs / _NATIVE[workload][2]
            info["ratio_vs_native"] = round(ratio, 3)
            extra += "\n    %.2fx native's time (target 1.3x) -- %s" % (
                ratio, "met" if ratio <= 1.3 else "NOT met")
    print("\n%-15s %-8s %9d accesses %7.2f s  %9.0f accesses/s  %8d exits %8.0f exits/s%s\n"
          "    exits by reason: %s" % (
              workload, mode, res.accesses, secs, res.accesses / secs, exits, exits / secs,
              extra, " ".join("%s=%d" % kv for kv in by_reason.items() if kv[1]) or "-"))
    if "minimal_per_walk" in _CAL:
        walk = _CAL["minimal_per_walk"]
        cost, target, rate10 = calibrated(secs / res.accesses, walk, TARGET_ACCESSES)
        info["minimal_walks_per_access"] = round(cost, 2)
        line = "    calibrated (minimal walk %.1f ns): %.1f minimal walks per access (target %.0f): " \
               "%.2f M accesses/s at 10 ns -- %s" % (walk * 1e9, cost, target, rate10 / 1e6,
                                                    "met" if cost <= target else "NOT met")
        if exits:
            cost, target, rate10 = calibrated(secs / exits, walk, TARGET_EXITS)
            info["minimal_walks_per_exit"] = round(cost, 1)
            line += "\n    %.0f minimal walks per exit end to end (target %.0f): %.0f exits/s " \
                    "at 10 ns -- %s" % (cost, target, rate10, "met" if cost <= target else
                                        "NOT met")
        print(line)


# ---------------------------------------------------------------------------
# Per-exit cost (issue 13): the time a VM adds over NativeMachine doing the same
# vCPU operations, per exit, in µs and in same-run minimal walks.  Patterns:
#   fresh       touch fresh pages whose guest level-1 table is shadowed already
#               (one hidden-fault fill per page); "run" inside vcpu.run, "load"
#               through vcpu.load_u64
#   remap       the kernel's remap: a PTE store through the direct map, INVLPG,
#               then a load of the page (a protected-table store, an INVLPG, a fill)
#   cr3         MOV CR3 between two address spaces whose roots are cached, and
#               one load after each
# Modes: native, shadow (fast paths, the default), shadow_ref (fast_paths=False).
# Two sizes: PAGES_SMALL pages (cache resident) and PAGES_LARGE (beyond L2).
# ---------------------------------------------------------------------------
import numpy as np  # noqa: E402

from ptemu.mmu import TRACE_DTYPE  # noqa: E402
from ptemu.guest import DIRECT_MAP  # noqa: E402

PAGES_SMALL, PAGES_LARGE = 512, 4096
_PER_EXIT = {}          # (pattern, size) -> {mode: (seconds, exits)}
TARGET_WALKS_PER_EXIT = 60


def _exit_machine(mode):
    if mode == "native":
        return NativeMachine(GUEST_MEM)
    return Hypervisor(HOST_MEM).create_vm(GUEST_MEM, paging="shadow",
                                          fast_paths=(mode == "shadow"))


def _map_pages(kernel, pid, base, n, start_frame):
    """n user pages at base -> guest frames from start_frame, present, A clear
    (the guest walk of the first access sets A), through the kernel's own
    page-table stores; the frames hold data (backed)."""
    top = kernel.procs[pid].cr3
    epas = []
    for i in range(n):
        frame = (start_frame + i) * 4096
        kernel.phys.write_u64(frame, i)
        epa = kernel._pte_addr(top, base + i * 4096, create=True)
        kernel._write(epa, frame | 0x7)             # P W U (bits.PTE_*), A and D clear
        epas.append(epa)
    kernel._sync()
    return epas


def _pattern_run(pattern, mode, n, how):
    """One timed round on a fresh machine: (seconds, exits of the timed part)."""
    m = _exit_machine(mode)
    k = Kernel(m)
    a = k.spawn(layout=[(0x10000000, 2 * n * 4096, "rw")])
    b = k.spawn(layout=[(0x10000000, 2 * n * 4096, "rw")])
    k.switch_to(a)
    vc = m.vcpu
    base = 0x10000000
    first = k.nframes // 4          # data frames well above the kernel's allocations
    epas = _map_pages(k, a, base, n, first)
    if pattern == "fresh":
        # The path to every level-1 table exists: touch page 0 of each table.
        for i in range(0, n, 512):
            vc.load_u64(base + i * 4096)
        vas = [base + i * 4096 for i in range(n) if i % 512]
        tr = np.zeros(len(vas), dtype=TRACE_DTYPE)
        tr["va"] = vas
    elif pattern == "remap":
        for i in range(n):
            vc.load_u64(base + i * 4096)
        vas = [base + i * 4096 for i in range(n)]
        news = [((first + n + i) * 4096) | 0x7 for i in range(n)]
        for i in range(n):
            m.phys.write_u64((first + n + i) * 4096, i)
    else:
        _map_pages(k, b, base, 1, first + n)
        k.switch_to(b)
        vc.load_u64(base)
        k.switch_to(a)
        vc.load_u64(base)
        cr3a, cr3b = k.procs[a].cr3, k.procs[b].cr3
    stats = m.stats
    e0 = _exits(stats)[0]
    t0 = time.perf_counter()
    if pattern == "fresh":
        if how == "run":
            vc.run(tr)
        else:
            load = vc.load_u64
            for va in vas:
                load(va)
    elif pattern == "remap":
        store, invlpg, load = vc.store_u64, vc.invlpg, vc.load_u64
        for va, epa, new in zip(vas, epas, news):
            store(DIRECT_MAP + epa, new)
            invlpg(va)
            load(va)
    else:
        w3, load = vc.write_cr3, vc.load_u64
        for _ in range(n // 2):
            w3(cr3b)
            load(base)
            w3(cr3a)
            load(base)
    secs = time.perf_counter() - t0
    return secs, _exits(m.stats)[0] - e0, _exits(m.stats)[1]


def _minimal_walk_now(image, _vas=[]):
    """The minimal walk's time per walk measured right now: the addresses of the
    module's calibration (1,000,000 random mapped ones, so the same mix of cache
    misses), best of 3 passes: the unit at this test's machine load."""
    if not _vas:
        _vas.append(random_mapped(image, 1_000_000, np.random.default_rng(7)))
    vas = _vas[0]
    best = None
    for _ in range(3):
        t0 = time.perf_counter()
        minimal_walk(image, vas)
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return best / len(vas)


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("pattern", ["fresh-run", "fresh-load", "remap", "cr3"])
def test_per_exit_cost(benchmark, big_image, pattern, size):
    """Per exit over native, best of five rounds per mode (all modes in this test,
    so that they share one machine load); the unit is the minimal walk measured
    in this test, before and after (the better of the two)."""
    if Hypervisor is None:
        pytest.skip(_HV_ERROR)
    quick = getattr(benchmark, "disabled", False)     # a plain test run (CI): one round
    if quick and size == "large":
        pytest.skip("the large case is a measurement only")
    n = PAGES_SMALL if size == "small" else PAGES_LARGE
    pat, _, how = pattern.partition("-")
    best = {}
    by_reason = {}

    walk0 = _minimal_walk_now(big_image)

    def measure():
        for mode in ("native", "shadow", "shadow_ref"):
            for _ in range(1 if quick else 5):
                secs, exits, reasons = _pattern_run(pat, mode, n, how)
                if mode not in best or secs < best[mode][0]:
                    best[mode] = (secs, exits)
                    by_reason[mode] = reasons
    benchmark.pedantic(measure, rounds=1, iterations=1)
    nat = best["native"][0]
    info = benchmark.extra_info
    # The unit: the module's calibration (the mean of its rounds, as every other
    # figure of this file and the issue use) when it ran; the best pass measured
    # here (warmer caches, so a smaller unit and larger counts) is recorded too.
    here = min(walk0, _minimal_walk_now(big_image))
    walk = _CAL.get("minimal_per_walk") or here
    info["minimal_walk_ns"] = round(walk * 1e9, 2)
    info["minimal_walk_ns_best_here"] = round(here * 1e9, 2)
    lines = []
    for mode in ("shadow", "shadow_ref"):
        secs, exits = best[mode]
        assert exits > 0
        per = (secs - nat) / exits
        info[mode] = {"seconds": round(secs, 5), "exits": exits, "us_per_exit_over_native":
                      round(per * 1e6, 3)}
        unit = ""
        if walk:
            info[mode]["walks_per_exit_over_native"] = round(per / walk, 1)
            unit = " = %.0f minimal walks (%.1f ns each; target %d: %s)" % (
                per / walk, walk * 1e9, TARGET_WALKS_PER_EXIT,
                "met" if per / walk <= TARGET_WALKS_PER_EXIT else "NOT met")
        lines.append("    %-10s %6d exits %8.4f s: %.3f us/exit over native%s"
                     % (mode, exits, secs, per * 1e6, unit))
    info["native_seconds"] = round(nat, 5)
    print("\nper-exit %-10s %-5s (%d pages) native %.4f s\n%s\n    exits by reason (shadow): %s"
          % (pattern, size, n, nat, "\n".join(lines),
             " ".join("%s=%d" % kv for kv in by_reason["shadow"].items() if kv[1])))
