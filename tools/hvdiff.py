#!/usr/bin/env python3
"""tools/hvdiff.py -- a differential run of the hypervisor against another build.

Records, for benchmarks/bench_hypervisor.py's full-size fork and
context_switch workloads on every virtualized mode (shadow, unsync,
paravirt) with fast paths on and off (12 cases), everything a change that
claims "same decisions" must leave alone: every vm.stats and guest-kernel
counter, the run's result, the real TLB's statistics, and digests of host
memory (every spte), of the shadow pages in hash order (key, frame, unsync,
parents, children, snapshot), of the rmap in its dict and set order, of
gfn_sps, the write-protected set, the unsync list, the roots and the fill
cache.  Then compares two such records.

    python tools/hvdiff.py record OUT.json [--cases fork/shadow,unsync/slow]
    python tools/hvdiff.py compare BASE.json NEW.json     (exit status 1 on a difference)

Record the baseline with the other build's Python (e.g. a venv made in a
worktree of the old commit: OLD/.venv/bin/python tools/hvdiff.py record
base.json, run from this tree so that both use the same workloads).
"""
import argparse
import hashlib
import json
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _digest(obj):
    return hashlib.sha1(repr(obj).encode()).hexdigest()


def _state(vm, kernel, result):
    sh = vm.shadow
    return {
        "vm_stats": {k: int(v) for k, v in dict(vm.stats).items()},
        "kernel": {k: (int(v) if isinstance(v, int) else repr(v))
                   for k, v in dict(kernel.stats).items()},
        "result": repr(sorted(dict(result).items())) if hasattr(result, "items") else repr(result),
        "host": hashlib.sha1(bytes(vm.hypervisor.words)).hexdigest(),
        "pages": _digest([(sp.key, sp.hpa, sp.unsync, sorted(sp.parents),
                           None if sp.children is None
                           else sorted((i, c.hpa) for i, c in sp.children.items()),
                           None if sp.gsnap is None else sp.gsnap.tobytes())
                          for sp in sh.hash.values()]),
        "npages": len(sh.hash),
        "rmap": _digest([(g, list(s)) for g, s in sh.rmap.items()]),
        "rmap_n": sum(len(s) for s in sh.rmap.values()),
        "gfn_sps": _digest([(g, [sp.key for sp in sps]) for g, sps in sh.gfn_sps.items()]),
        "wp": _digest(sorted(sh.wp)),
        "unsync_sps": [sp.key for sp in sh.unsync_sps],
        "roots": [None if sh.root is None else sh.root.key] + [sp.key for sp in sh.prev_roots],
        "pcache": _digest(sorted((k, [p.key for p in v]) for k, v in sh._pcache.items())),
        "tlb": repr(vm.vcpu.tlb.stats),
    }


def record(out, cases=None):
    os.environ["PTEMU_BENCH_FULL"] = "1"
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_hypervisor as bench
    from ptemu.guest import Kernel
    from ptemu.hypervisor import Hypervisor
    res = {}
    for wl in ("fork", "context_switch"):
        for mode in ("shadow", "unsync", "paravirt"):
            for fast in (True, False):
                name = "%s/%s/%s" % (wl, mode, "fast" if fast else "slow")
                if cases and not any(c in name for c in cases):
                    continue
                bench._WORKLOADS.clear()
                w = bench._workload(wl)
                vm = Hypervisor(bench.HOST_MEM).create_vm(
                    bench.GUEST_MEM, paging="paravirt" if mode == "paravirt" else "shadow",
                    unsync=(mode == "unsync"), fast_paths=fast)
                kernel = Kernel(vm, record_faults=True)
                w.setup(kernel)
                res[name] = _state(vm, kernel, w.run(kernel))
                print(name, "recorded", file=sys.stderr)
    with open(out, "w") as f:
        json.dump(res, f, indent=1, sort_keys=True, default=str)


def compare(a_path, b_path):
    with open(a_path) as f:
        a = json.load(f)
    with open(b_path) as f:
        b = json.load(f)
    bad = 0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            print("only in one record:", name)
            bad += 1
            continue
        for key in sorted(set(a[name]) | set(b[name])):
            x, y = a[name].get(key), b[name].get(key)
            if key == "result" and isinstance(x, str):     # wall time is not compared
                import re
                x, y = (re.sub(r"\('(seconds|wall)', [0-9.e-]+\)", "", v) for v in (x, y))
            if x == y:
                continue
            bad += 1
            if isinstance(x, dict) and isinstance(y, dict):
                for k in sorted(set(x) | set(y)):
                    if x.get(k) != y.get(k):
                        print(name, key, k, x.get(k), y.get(k))
            else:
                print(name, key, str(x)[:200], str(y)[:200])
    print("cases %d, differences %d" % (len(a), bad))
    return 1 if bad else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("out")
    r.add_argument("--cases", help="comma-separated substrings of case names")
    c = sub.add_parser("compare")
    c.add_argument("base")
    c.add_argument("new")
    args = ap.parse_args(argv)
    if args.cmd == "record":
        record(args.out, args.cases.split(",") if args.cases else None)
        return 0
    return compare(args.base, args.new)


if __name__ == "__main__":
    sys.exit(main())
