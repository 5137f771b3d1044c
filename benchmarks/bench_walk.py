"""Issues 2 and 12 performance: the full walker against a minimal walk, scalar
calls, and Volatility 3 as a peer -- on both images of bigimage.py.

On each image ("256mib": 200,000 scattered 4 KiB pages plus 2 MiB and 1 GiB
pages, tables a large L3 holds; "huge": 300,000 4 KiB pages each in a page
table of its own, tables far beyond any L3), translate 1,000,000 random
mapped addresses:
  - baseline: ptemu_minimal_walk_many, a C loop that only follows P and PS;
  - translate_many with every check and A/D updates on: target <= 1.5x.
Scalar translate from Python is measured against a baseline of the same run:
a Python method that calls a trivial C function (cffi's fixed cost on this
machine): target under 1 us and <= 2.5x that call; the 1 us is also stated in
minimal walks (100 where a minimal walk costs the 10 ns issue 2 assumes;
bigimage.calibrated).
Both scalar figures come from interleaved short windows (_best_per_call): on
a busy machine long windows are preempted, the longer call's more often.
Volatility 3's Intel32e layer (`_translate`, the 4-level walk a memory
forensics user would otherwise run) over the same image and the first 20,000
of the same addresses, after a warm-up pass (its table and page caches as a
session has them): the target is translate_many >= 2000x faster per
address.  The test also prints what that asks: Volatility's time / 2000 per
translation, against the minimal walk of the same run -- the bound on any
walker that reads the same entries.  Skipped, with the reason, when
volatility3 is not installed (`pip install volatility3`, part of the `test`
extra).

    pytest benchmarks/bench_walk.py --benchmark-only -s   (ratios in extra_info)
"""
import time
import timeit

import numpy as np
import pytest

import ptemu
from ptemu._native import ffi, lib
from bigimage import ImageResults, calibrated, random_mapped, record_ratio

N = 1_000_000
N_VOL = 20_000
RESULTS = {}        # (image name, what) -> mean seconds


def _vas(image):
    key = (image["name"], "vas")
    if key not in RESULTS:
        RESULTS[key] = random_mapped(image, N, np.random.default_rng(7))
    return RESULTS[key]


def _Results(image):
    return ImageResults(RESULTS, image)


def test_minimal_walk_baseline(benchmark, image):
    mem = image["memory"]
    vas = _vas(image)
    out = np.empty(N, dtype=np.uint64)

    def minimal():
        return lib.ptemu_minimal_walk_many(mem._c, image["cr3"], 4,
                                           ffi.from_buffer("uint64_t[]", vas), N,
                                           ffi.from_buffer("uint64_t[]", out))
    unmapped = benchmark(minimal)
    assert unmapped == 0
    record_ratio(benchmark, _Results(image), "minimal", "minimal")


def test_translate_many_full_checks(benchmark, image):
    mem = image["memory"]
    vas = _vas(image)
    mmu = ptemu.Mmu(mem, ptemu.CpuState.long_mode(cr3=image["cr3"]))
    res = benchmark(mmu.translate_many, vas, "w", user=True)
    assert (res.vector == 0).all()
    # Same answers as the baseline walk.
    ref = np.empty(N, dtype=np.uint64)
    lib.ptemu_minimal_walk_many(mem._c, image["cr3"], 4, ffi.from_buffer("uint64_t[]", vas),
                                N, ffi.from_buffer("uint64_t[]", ref))
    assert np.array_equal(res.pa, ref)
    r = _Results(image)
    ratio = record_ratio(benchmark, r, "translate_many", "minimal")
    if ratio is not None:
        benchmark.extra_info["ns_per_translation"] = round(r["translate_many"] / N * 1e9, 2)
        benchmark.extra_info["ns_per_minimal_walk"] = round(r["minimal"] / N * 1e9, 2)
        best = r["translate_many@min"] / r["minimal@min"]
        print("\n[%s] translate_many %.1f ns, minimal walk %.1f ns (means): %.2fx; best rounds "
              "%.1f / %.1f ns: %.2fx (target 1.5x) -- %s"
              % (image["name"], r["translate_many"] / N * 1e9, r["minimal"] / N * 1e9, ratio,
                 r["translate_many@min"] / N * 1e9, r["minimal@min"] / N * 1e9, best,
                 "met" if min(ratio, best) <= 1.5 else "NOT met"))


class _Floor:
    """What any scalar call costs here: a Python method calling C."""

    def call(self, va, access="r", user=None):
        return lib.ptemu_abi_version()


def test_scalar_call_floor(benchmark):
    floor = _Floor()
    benchmark(floor.call, 0x7123)
    record_ratio(benchmark, RESULTS, "scalar_floor", "scalar_floor")


def _best_per_call(calls, va, number=1_000, rounds=60, budget_s=3.0):
    """The best time per call of each f(va) in `calls`, from many short
    windows taken in turn.  On a busy shared machine a long window is nearly
    always preempted, the longer call's more often, which biases a ratio of
    long best-of windows; short windows find quiet moments for every call
    alike.  At least `rounds` rounds, more while the budget lasts."""
    best = dict.fromkeys(calls, 1.0)
    stop = time.perf_counter() + budget_s
    done = 0
    while done < rounds or time.perf_counter() < stop:
        for name, f in calls.items():
            best[name] = min(best[name], timeit.timeit(lambda: f(va), number=number) / number)
        done += 1
        if done >= 20 * rounds:
            break
    return best


def test_scalar_translate(benchmark, image):
    mmu = ptemu.Mmu(image["memory"], ptemu.CpuState.long_mode(cr3=image["cr3"]))
    va = int(image["vas_4k"][12345]) + 0x10
    t = benchmark(mmu.translate, va)
    assert t.pa == int(image["pas_4k"][12345]) + 0x10
    r = _Results(image)
    stats = getattr(benchmark, "stats", None)
    if stats is None or not getattr(stats, "stats", None):
        return
    r["scalar"] = stats.stats.mean
    # The ratio from interleaved best-of timings of both calls, here and now
    # (a busy shared machine moves the means of separate benchmarks apart).
    tr = mmu.translate

    def translate_pa(v):
        return tr(v).pa
    best = _best_per_call({"translate": tr, "floor": _Floor().call, "translate_pa": translate_pa},
                          va)
    ratio = best["translate"] / best["floor"]
    benchmark.extra_info["ratio_vs_scalar_floor"] = round(ratio, 3)
    benchmark.extra_info["ns_per_call"] = round(r["scalar"] * 1e9, 1)
    benchmark.extra_info["best_ns_per_call"] = round(best["translate"] * 1e9, 1)
    benchmark.extra_info["best_ns_floor"] = round(best["floor"] * 1e9, 1)
    benchmark.extra_info["best_ns_translate_pa"] = round(best["translate_pa"] * 1e9, 1)
    print("\n[%s] scalar translate: mean %.0f ns, best %.0f ns (target < 1000); %.2fx a bare "
          "C call from a Python method (best %.0f ns; target 2.5x) -- %s"
          % (image["name"], r["scalar"] * 1e9, best["translate"] * 1e9, ratio,
             best["floor"] * 1e9, "met" if ratio <= 2.5 and r["scalar"] < 1e-6 else "NOT met"))
    print("    with .pa read from a function: best %.0f ns (%.2fx the floor)"
          % (best["translate_pa"] * 1e9, best["translate_pa"] / best["floor"]))
    if "minimal" in r:
        # The 1 us target, where a minimal walk costs the 10 ns issue 2 assumes:
        # 100 minimal walks.
        cost, target, rate10 = calibrated(r["scalar"], r["minimal"] / N, 1e6)
        benchmark.extra_info["minimal_walks_per_call"] = round(cost, 1)
        print("    %.0f minimal walks per call (target %.0f): %.0f ns where a minimal walk "
              "is 10 ns -- %s" % (cost, target, 1e9 / rate10,
                                  "met" if cost <= target else "NOT met"))
    r["scalar_best"] = best["translate"]


class _ReadOnlyBytes:
    """The image's memory as Volatility's BufferDataLayer reads a buffer:
    slices come back as bytes (without copying the whole image)."""

    def __init__(self, arr):
        self._a = arr

    def __len__(self):
        return len(self._a)

    def __getitem__(self, s):
        return self._a[s].tobytes()


def volatility_layer(image):
    """A Volatility 3 Intel32e layer over the image with its CR3, or
    pytest.skip when volatility3 is not installed."""
    try:
        from volatility3.framework import contexts
        from volatility3.framework.layers import intel, physical
    except ImportError as exc:
        pytest.skip("volatility3 is not installed (pip install volatility3, or ptemu[test]): "
                    "%s" % exc)
    ctx = contexts.Context()
    ctx.add_layer(physical.BufferDataLayer(ctx, "layers.phys", "phys",
                                           _ReadOnlyBytes(image["memory"].array)))
    ctx.config["layers.virt.memory_layer"] = "phys"
    ctx.config["layers.virt.page_map_offset"] = int(image["cr3"])
    layer = intel.Intel32e(ctx, "layers.virt", "virt")
    ctx.add_layer(layer)
    return layer


def test_volatility3_intel32e_peer(benchmark, image):
    layer = volatility_layer(image)
    vas = [int(v) for v in _vas(image)[:N_VOL]]
    tr = layer._translate

    def walk_all():
        return [tr(v)[0] for v in vas]
    # A warm-up pass first: Volatility keeps its tables (lru_cache, 1025) and
    # translated pages (1024) cached, as a user's session would have them.
    pas = benchmark.pedantic(walk_all, rounds=3, iterations=1, warmup_rounds=1)
    # The peer agrees with ptemu on every address.
    mmu = ptemu.Mmu(image["memory"], ptemu.CpuState.long_mode(cr3=image["cr3"]))
    assert pas == mmu.translate_many(np.array(vas, dtype=np.uint64)).pa.tolist()
    r = _Results(image)
    stats = getattr(benchmark, "stats", None)
    if stats is None or not getattr(stats, "stats", None):
        return
    r["volatility"] = stats.stats.mean
    per = r["volatility"] / N_VOL
    benchmark.extra_info["ns_per_translation"] = round(per * 1e9, 1)
    benchmark.extra_info["best_ns_per_translation"] = round(stats.stats.min / N_VOL * 1e9, 1)
    line = ("\n[%s] Volatility 3 Intel32e._translate: %.0f ns per address (mean of 3 passes "
            "after a warm-up one; best %.0f)" % (image["name"], per * 1e9,
                                                 stats.stats.min / N_VOL * 1e9))
    if "translate_many" in r:
        speedup = per / (r["translate_many"] / N)
        benchmark.extra_info["translate_many_speedup"] = round(speedup, 1)
        line += "; translate_many is %.0fx faster (target 2000x) -- %s" % (
            speedup, "met" if speedup >= 2000 else "NOT met")
    if "scalar_best" in r:
        line += "\n    scalar translate (best %.0f ns) is %.0fx faster" % (
            r["scalar_best"] * 1e9, per / r["scalar_best"])
    if "minimal" in r:
        # What 2000x asks of the walk, against the cheapest walk there is:
        # ptemu_minimal_walk_many reads the same entries and tests only P and
        # PS, so no walker that reads them goes faster on this image.
        minimal = r["minimal"] / N
        need = per / 2000
        bound = per / minimal
        benchmark.extra_info["minimal_walks_per_translation"] = round(bound)
        benchmark.extra_info["ns_per_translation_for_2000x"] = round(need * 1e9, 2)
        line += ("\n    2000x needs <= %.1f ns per translation; the minimal walk takes %.1f ns "
                 "here (this run), so any walk of these addresses is at most %.0fx faster "
                 "than Volatility on this image%s"
                 % (need * 1e9, minimal * 1e9, bound,
                    "" if bound >= 2000 else
                    " -- 2000x is out of reach: it would take a walk %.1fx faster than the "
                    "minimal one" % (minimal / need)))
    print(line)
