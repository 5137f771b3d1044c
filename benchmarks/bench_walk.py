"""Issue 2 performance: the full walker against a minimal walk, and scalar calls.

On the 256 MiB image (200,000 scattered 4 KiB pages plus 2 MiB and 1 GiB
pages), translate 1,000,000 random mapped addresses:
  - baseline: ptemu_minimal_walk_many, a C loop that only follows P and PS;
  - translate_many with every check and A/D updates on: target <= 1.5x.
Scalar translate from Python is measured against a baseline of the same
run: a Python method that calls a trivial C function (cffi's fixed cost on
this machine); its 1 us target is also stated in minimal walks (100 where a
minimal walk costs the 10 ns issue 2 assumes; bigimage.calibrated).

    pytest benchmarks/bench_walk.py --benchmark-only   (ratios in extra_info)
"""
import numpy as np
import pytest

import ptemu
from ptemu._native import ffi, lib
from bigimage import calibrated, random_mapped, record_ratio

N = 1_000_000
RESULTS = {}


@pytest.fixture(scope="module")
def vas(big_image):
    return random_mapped(big_image, N, np.random.default_rng(7))


def test_minimal_walk_baseline(benchmark, big_image, vas):
    mem = big_image["memory"]
    out = np.empty(N, dtype=np.uint64)

    def minimal():
        return lib.ptemu_minimal_walk_many(mem._c, big_image["cr3"], 4,
                                           ffi.from_buffer("uint64_t[]", vas), N,
                                           ffi.from_buffer("uint64_t[]", out))
    unmapped = benchmark(minimal)
    assert unmapped == 0
    record_ratio(benchmark, RESULTS, "minimal", "minimal")


def test_translate_many_full_checks(benchmark, big_image, vas):
    mem = big_image["memory"]
    mmu = ptemu.Mmu(mem, ptemu.CpuState.long_mode(cr3=big_image["cr3"]))
    res = benchmark(mmu.translate_many, vas, "w", user=True)
    assert (res.vector == 0).all()
    # Same answers as the baseline walk.
    ref = np.empty(N, dtype=np.uint64)
    lib.ptemu_minimal_walk_many(mem._c, big_image["cr3"], 4, ffi.from_buffer("uint64_t[]", vas),
                                N, ffi.from_buffer("uint64_t[]", ref))
    assert np.array_equal(res.pa, ref)
    ratio = record_ratio(benchmark, RESULTS, "translate_many", "minimal")
    if ratio is not None:
        benchmark.extra_info["ns_per_translation"] = round(RESULTS["translate_many"] / N * 1e9, 2)
        print("\ntranslate_many / minimal walk = %.2f" % ratio)


class _Floor:
    """What any scalar call costs here: a Python method calling C."""

    def call(self, va, access="r", user=None):
        return lib.ptemu_abi_version()


def test_scalar_call_floor(benchmark):
    floor = _Floor()
    benchmark(floor.call, 0x7123)
    record_ratio(benchmark, RESULTS, "scalar_floor", "scalar_floor")


def test_scalar_translate(benchmark, big_image):
    mmu = ptemu.Mmu(big_image["memory"], ptemu.CpuState.long_mode(cr3=big_image["cr3"]))
    va = int(big_image["vas_4k"][12345]) + 0x10
    t = benchmark(mmu.translate, va)
    assert t.pa == int(big_image["pas_4k"][12345]) + 0x10
    ratio = record_ratio(benchmark, RESULTS, "scalar", "scalar_floor")
    if ratio is not None:
        benchmark.extra_info["ns_per_call"] = round(RESULTS["scalar"] * 1e9, 1)
        print("\nscalar translate: %.0f ns, %.2fx a bare C call" % (RESULTS["scalar"] * 1e9, ratio))
        if "minimal" in RESULTS:
            # The 1 us target, where a minimal walk costs the 10 ns issue 2 assumes:
            # 100 minimal walks.
            cost, target, rate10 = calibrated(RESULTS["scalar"], RESULTS["minimal"] / N, 1e6)
            benchmark.extra_info["minimal_walks_per_call"] = round(cost, 1)
            print("    %.0f minimal walks per call (target %.0f): %.0f ns where a minimal walk "
                  "is 10 ns -- %s" % (cost, target, 1e9 / rate10,
                                      "met" if cost <= target else "NOT met"))
