"""Issues 3 and 12 performance: mmu.run over 10,000,000-access traces through
Tlb.default(), on both images of bigimage.py ("256mib" and the larger-than-
cache "huge").

  - 99% TLB hits (target >= 50 M accesses/s)
  - half the accesses missing (target >= 20 M accesses/s)
Baselines measured in the same run: translate_many without a TLB over the
same addresses (a page walk per access), and the minimal walk of issue 2
(bigimage.minimal_walk), in whose units the targets are also stated: the
targets assume a minimal walk of about 10 ns, so 50 M/s is 2 minimal walks
per access and 20 M/s is 5 (bigimage.calibrated).  Issue 12 restates the
second where a minimal walk costs 15 ns: at most 3.3 minimal walks per access.

    pytest benchmarks/bench_tlb.py --benchmark-only
"""
import numpy as np
import pytest

import ptemu
from bigimage import FULL, ImageResults, calibrated, calibration, record_ratio, tlb_trace

N = 10_000_000
RESULTS = {}
TRACES = {}


def _traces(image):
    if TRACES.get("name") != image["name"]:
        TRACES.clear()      # one image's traces at a time (160 MB each)
        TRACES.update(name=image["name"], hit99=tlb_trace(image, 0.99, 1, N),
                      miss50=tlb_trace(image, 0.5, 2, N))
    return TRACES


def _Results(image):
    return ImageResults(RESULTS, image)


TARGETS = {"hit99": 50e6, "miss50": 20e6}
# Issue 12: the same targets where a minimal walk costs 15 ns.
TARGET_WALKS = {"hit99": 1 / 50e6 / 15e-9, "miss50": 3.3}


def test_minimal_walk_calibration(benchmark, image):
    calibration(benchmark, image, _Results(image))


def _run_once(image, trace):
    tlb = ptemu.Tlb.default()
    mmu = ptemu.Mmu(image["memory"], ptemu.CpuState.long_mode(cr3=image["cr3"]), tlb)
    res = mmu.run(trace)
    return res, tlb


def test_walk_per_access_baseline(benchmark, image):
    mmu = ptemu.Mmu(image["memory"], ptemu.CpuState.long_mode(cr3=image["cr3"]))
    vas = np.ascontiguousarray(_traces(image)["miss50"]["va"])
    res = benchmark.pedantic(mmu.translate_many, args=(vas, "r"), kwargs={"user": True},
                             rounds=3 if FULL else 1, iterations=1)
    assert (res.vector == 0).all()
    record_ratio(benchmark, _Results(image), "walk_each", "walk_each")


@pytest.mark.parametrize("kind", ["hit99", "miss50"])
def test_run_through_tlb(benchmark, image, kind):
    trace = _traces(image)[kind]
    res, tlb = benchmark.pedantic(_run_once, args=(image, trace), rounds=3 if FULL else 1,
                                  iterations=1)
    assert res.index == N and res.fault is None
    st = tlb.stats
    assert st.lookups == N
    hit_rate = st.hit_rate
    if kind == "hit99":
        assert hit_rate > 0.985
    else:
        assert 0.45 < hit_rate < 0.6
    benchmark.extra_info["tlb_hit_rate"] = round(hit_rate, 4)
    benchmark.extra_info["walk_refs_per_walk"] = round(st.refs_per_walk, 3)
    results = _Results(image)
    ratio = record_ratio(benchmark, results, kind, "walk_each")
    if ratio is not None:
        rate = N / results[kind]
        benchmark.extra_info["accesses_per_s"] = round(rate)
        print("\n[%s] run %s: %.1f M accesses/s, hit rate %.4f, %.2f refs/walk, %.2fx the "
              "walk-per-access time" % (image["name"], kind, rate / 1e6, hit_rate,
                                        st.refs_per_walk, ratio))
        if "minimal_per_walk" in results:
            cost, target, rate10 = calibrated(1.0 / rate, results["minimal_per_walk"],
                                              TARGETS[kind])
            benchmark.extra_info["minimal_walks_per_access"] = round(cost, 3)
            benchmark.extra_info["target_minimal_walks_per_access"] = round(TARGET_WALKS[kind], 3)
            print("    %.2f minimal walks per access (minimal walk %.1f ns here); target %.2f "
                  "(%.0f M/s where it is 15 ns): %.0f M/s there -- %s"
                  % (cost, results["minimal_per_walk"] * 1e9, TARGET_WALKS[kind],
                     TARGETS[kind] / 1e6, rate10 / 1.5 / 1e6,
                     "met" if cost <= TARGET_WALKS[kind] else "NOT met"))
