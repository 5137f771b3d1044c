"""Synthetic guest workloads and address-trace readers.

Workloads drive a `ptemu.guest.Kernel` on any machine of the machine
contract (NativeMachine or a hypervisor VM).  Their traces are generated
with numpy from a seed, all before the run starts, so a run is
deterministic and its timing measures the machine and the kernel, not the
generator:

* `ContextSwitchWorkload`: N processes, each with the same address-space
  layout (text, heap, stack: the same virtual addresses in every process,
  so only CR3 keeps them apart), run round-robin in time slices; each
  slice is a stream of fetches, reads and writes with spatial locality
  (runs of consecutive words on one page) and temporal locality (a hot
  set of pages per process).
* `ForkWorkload`: a parent with a written heap forks children again and
  again; a child reads and writes part of the inherited heap (COW breaks),
  sometimes unmaps part of it or execs into a fresh image, exits and is
  reaped; the parent then writes its heap again (COW reuse faults).

* `MmapChurnWorkload`: processes that mmap a small region, touch it
  (demand faults), run on it and munmap it again, round after round at the
  same address: page-table updates and INVLPGs (munmap invalidates every
  present page of the region) in every round.
* `TlbMissWorkload`: a working set larger than the TLB's reach, touched at
  random with no locality; after the first touch of each page there are no
  page-table updates at all, so the cost is the walks.

All report guest accesses, faults and the kernel's and machine's counters.
`WORKLOADS` names them for the study (``context-switch``, ``fork``,
``mmap-churn``, ``tlb-miss``; ``trace:PATH`` is a recorded trace) and
`make_workload(name, accesses=, seed=, processes=, working_set=, ...)`
builds one by name with checked parameters.

Recorded programs and trace files (ptemu.traces, re-exported here):
`TraceWorkload` replays real programs' traces through the guest kernel;
`read_trace(path)` / `iter_trace(path, chunk=...)` read every supported
format (ptemu's compressed trace files, .npy, .npz, text and lackey logs),
whole or streamed; `write_trace` writes one.
"""
import inspect
import numbers
import time

import numpy as np

from ptemu._native import InvalidInput
from ptemu.mmu import TRACE_DTYPE

__all__ = ["synth_trace", "ContextSwitchWorkload", "ForkWorkload", "MmapChurnWorkload",
           "TlbMissWorkload", "read_trace", "iter_trace", "write_trace", "TraceWorkload",
           "WorkloadResult", "WORKLOADS", "make_workload", "check_workload",
           "parse_workload_name", "guest_memory_hint"]

PAGE = 4096
ACC_READ, ACC_WRITE, ACC_FETCH = 0, 1, 2


def synth_trace(rng, n, code_vas, data_vas, hot_vas=None, fetch_frac=0.25, write_frac=0.3,
                mean_run=16, hot_prob=0.9):
    """n user accesses (TRACE_DTYPE) with locality, vectorized.

    The stream is cut into runs (geometric length, mean `mean_run`); a run
    stays on one page and walks consecutive 8-byte words from a random
    offset.  A run is a code run (fetches on a page of `code_vas`) with
    probability fetch_frac, else a data run on a page of `data_vas`: from
    `hot_vas` with probability hot_prob, else uniform; each data access is
    a write with probability write_frac.
    """
    n = int(n)
    if n < 0:
        raise InvalidInput("trace length must not be negative")
    out = np.zeros(n, dtype=TRACE_DTYPE)
    if n == 0:
        return out
    code_vas = np.asarray(code_vas, dtype=np.uint64)
    data_vas = np.asarray(data_vas, dtype=np.uint64)
    hot_vas = data_vas if hot_vas is None else np.asarray(hot_vas, dtype=np.uint64)
    if not len(data_vas) or (fetch_frac > 0 and not len(code_vas)):
        raise InvalidInput("synth_trace needs data pages (and code pages when fetch_frac > 0)")
    starts = rng.random(n) < 1.0 / mean_run
    starts[0] = True
    run_id = np.cumsum(starts) - 1
    nr = int(run_id[-1]) + 1
    first = np.flatnonzero(starts)
    is_code = rng.random(nr) < fetch_frac
    use_hot = rng.random(nr) < hot_prob
    page = np.where(use_hot, hot_vas[rng.integers(0, len(hot_vas), nr)],
                    data_vas[rng.integers(0, len(data_vas), nr)])
    if len(code_vas):
        # Code: a skewed choice (low pages hottest), as a program's hot loop.
        ci = np.minimum(rng.geometric(4.0 / max(len(code_vas), 4), nr) - 1, len(code_vas) - 1)
        page = np.where(is_code, code_vas[ci], page)
    off0 = rng.integers(0, PAGE // 8, nr, dtype=np.uint64) * np.uint64(8)
    pos = np.arange(n, dtype=np.uint64) - first[run_id].astype(np.uint64)
    off = (off0[run_id] + pos * np.uint64(8)) % np.uint64(PAGE)
    out["va"] = page[run_id] + off
    acc = np.where(rng.random(n) < write_frac, ACC_WRITE, ACC_READ).astype(np.uint8)
    acc[is_code[run_id]] = ACC_FETCH
    out["access"] = acc
    out["user"] = True
    return out


def _pages(base, npages):
    return np.uint64(base) + np.arange(npages, dtype=np.uint64) * np.uint64(PAGE)


class Record(dict):
    """A plain dict whose keys read as attributes too: what a workload, a
    replay, a trace summary or a recording reports (it pickles and goes to
    JSON as the dict it is)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class WorkloadResult(Record):
    """accesses (guest user accesses run), faults (true faults handled by
    the guest kernel), seconds, kernel (its counters), machine (the
    machine's counters, e.g. exits by reason on a VM)."""


def _snapshot(stats):
    out = {}
    for k, v in dict(stats).items():
        out[k] = dict(v) if isinstance(v, dict) else v
    return out


class ContextSwitchWorkload:
    """nproc processes, round-robin time slices of slice_len accesses,
    `total` accesses in all.

    Every process has text (text_pages, r-x) at 0x400000, a heap
    (heap_pages, rw-) at 0x10000000 and a stack (stack_pages, rw-) below
    0x7ffffff00000; its hot set is hot_pages pages of heap and stack.
    """

    TEXT = 0x400000
    HEAP = 0x10000000
    STACK_TOP = 0x7ffffff00000

    def __init__(self, total=5_000_000, nproc=8, slice_len=10_000, text_pages=32,
                 heap_pages=512, stack_pages=32, hot_pages=48, fetch_frac=0.25,
                 write_frac=0.3, seed=0):
        if nproc < 1 or slice_len < 1 or total < 1:
            raise InvalidInput("nproc, slice_len and total must be positive")
        self.nproc, self.slice_len, self.total = nproc, slice_len, int(total)
        self.layout = ((self.TEXT, text_pages * PAGE, "rx"),
                       (self.HEAP, heap_pages * PAGE, "rw"),
                       (self.STACK_TOP - stack_pages * PAGE, stack_pages * PAGE, "rw"))
        code = _pages(self.TEXT, text_pages)
        data = np.concatenate([_pages(self.HEAP, heap_pages),
                               _pages(self.STACK_TOP - stack_pages * PAGE, stack_pages)])
        root = np.random.default_rng(seed)
        per = -(-self.total // nproc)
        self.traces = []
        for _ in range(nproc):
            rng = np.random.default_rng(root.integers(1 << 63))
            hot = rng.choice(data, size=min(hot_pages, len(data)), replace=False)
            self.traces.append(synth_trace(rng, per, code, data, hot, fetch_frac, write_frac))
        self.pids = None

    def setup(self, kernel):
        self.pids = [kernel.spawn(self.layout) for _ in range(self.nproc)]

    def run(self, kernel):
        """Run all slices; a WorkloadResult."""
        return _run_slices(self, kernel)


def _run_slices(w, kernel):
    """Run w.traces (one per process of w.pids, spawned by w.setup) in
    round-robin slices of w.slice_len accesses until w.total have run."""
    if w.pids is None:
        w.setup(kernel)
    t0 = time.perf_counter()
    done = faults = pos = 0
    L = w.slice_len
    per = len(w.traces[0])
    while done < w.total and pos < per:
        for pid, tr in zip(w.pids, w.traces):
            k = min(L, w.total - done, per - pos)
            if k <= 0:
                break
            faults += kernel.run(pid, tr[pos:pos + k])
            done += k
        pos += L
    return _result(kernel, t0, done, faults)


def _result(kernel, t0, done, faults):
    return WorkloadResult(accesses=done, faults=faults, seconds=time.perf_counter() - t0,
                          kernel=_snapshot(kernel.stats), machine=_snapshot(kernel.machine.stats))


class ForkWorkload:
    """A parent with a written heap forks, again and again, until `total`
    accesses have run.  Each child runs child_accesses accesses over
    child_touch pages of the inherited heap (reads, and writes that break
    COW); every munmap_every-th child first unmaps 8 heap pages (and then
    touches only the rest); every exec_every-th child execs into a fresh
    image (demand paging from nothing).  The child exits and is reaped;
    the parent runs parent_accesses accesses over its whole heap.
    """

    TEXT = 0x400000
    HEAP = 0x10000000
    STACK_TOP = 0x7ffffff00000

    def __init__(self, total=5_000_000, heap_pages=256, child_accesses=15_000,
                 parent_accesses=5_000, child_touch=64, exec_every=4, munmap_every=3,
                 write_frac=0.3, seed=0):
        if total < 1 or heap_pages < 16 or child_touch < 1:
            raise InvalidInput("total must be positive, heap_pages >= 16, child_touch >= 1")
        self.total = int(total)
        self.heap_pages = heap_pages
        self.exec_every, self.munmap_every = exec_every, munmap_every
        stack_pages = 16
        self.layout = ((self.TEXT, 16 * PAGE, "rx"), (self.HEAP, heap_pages * PAGE, "rw"),
                       (self.STACK_TOP - stack_pages * PAGE, stack_pages * PAGE, "rw"))
        code = _pages(self.TEXT, 16)
        heap = _pages(self.HEAP, heap_pages)
        stack = _pages(self.STACK_TOP - stack_pages * PAGE, stack_pages)
        rng = np.random.default_rng(seed)
        # The parent first writes every heap page once.
        init = np.zeros(heap_pages, dtype=TRACE_DTYPE)
        init["va"] = heap
        init["access"] = ACC_WRITE
        init["user"] = True
        self.init_trace = init
        self.rounds = []
        done = len(init)
        i = 0
        while done < self.total:
            exec_child = exec_every and i % exec_every == exec_every - 1
            unmap = None
            if exec_child:
                ctr = synth_trace(rng, child_accesses, code, np.concatenate([heap[:32], stack]),
                                  write_frac=write_frac)
            else:
                avail = heap
                if munmap_every and i % munmap_every == munmap_every - 1:
                    j = int(rng.integers(0, heap_pages - 8))
                    unmap = (int(heap[j]), 8 * PAGE)
                    avail = np.concatenate([heap[:j], heap[j + 8:]])
                touch = rng.choice(avail, size=min(child_touch, len(avail)), replace=False)
                ctr = synth_trace(rng, child_accesses, code, np.concatenate([touch, stack]),
                                  hot_vas=touch, write_frac=write_frac)
            ptr = synth_trace(rng, parent_accesses, code, np.concatenate([heap, stack]),
                              write_frac=write_frac)
            self.rounds.append((bool(exec_child), unmap, ctr, ptr))
            done += len(ctr) + len(ptr)
            i += 1
        self.parent = None

    def setup(self, kernel):
        self.parent = kernel.spawn(self.layout)

    def run(self, kernel):
        if self.parent is None:
            self.setup(kernel)
        t0 = time.perf_counter()
        parent = self.parent
        faults = kernel.run(parent, self.init_trace)
        done = len(self.init_trace)
        for exec_child, unmap, ctr, ptr in self.rounds:
            child = kernel.fork(parent)
            if exec_child:
                kernel.exec(child, self.layout[:1] + ((self.HEAP, 32 * PAGE, "rw"),)
                            + self.layout[2:])
            elif unmap is not None:
                kernel.munmap(child, *unmap)
            faults += kernel.run(child, ctr)
            kernel.exit(child)
            kernel.wait(child)
            faults += kernel.run(parent, ptr)
            done += len(ctr) + len(ptr)
        return WorkloadResult(accesses=done, faults=faults, seconds=time.perf_counter() - t0,
                              kernel=_snapshot(kernel.stats),
                              machine=_snapshot(kernel.machine.stats))


def _positive(**values):
    for name, v in values.items():
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
            raise InvalidInput("%s must be a positive integer, not %r" % (name, v))


class MmapChurnWorkload:
    """nproc processes take turns; in each round one of them mmaps
    region_pages pages at the same address (MMAP_AT), runs round_accesses
    accesses on them (and on its stack and text), and munmaps them: the
    first touch of each page is a demand fault (a page-table write), and
    munmap clears every entry and INVLPGs each present page (Linux flushes
    page by page up to 33 pages, the kernel's flush_ceiling).  `total`
    accesses in all.
    """

    TEXT = 0x400000
    MMAP_AT = 0x7f0000000000
    STACK_TOP = 0x7ffffff00000

    def __init__(self, total=1_000_000, nproc=2, region_pages=16, round_accesses=2_000,
                 write_frac=0.4, seed=0):
        _positive(total=total, nproc=nproc, region_pages=region_pages,
                  round_accesses=round_accesses)
        self.total, self.nproc, self.region_pages = int(total), nproc, region_pages
        stack_pages = text_pages = 8
        self.layout = ((self.TEXT, text_pages * PAGE, "rx"),
                       (self.STACK_TOP - stack_pages * PAGE, stack_pages * PAGE, "rw"))
        code = _pages(self.TEXT, text_pages)
        region = _pages(self.MMAP_AT, region_pages)
        data = np.concatenate([region, _pages(self.STACK_TOP - stack_pages * PAGE, stack_pages)])
        rng = np.random.default_rng(seed)
        self.rounds = []
        done = 0
        while done < self.total:
            k = min(round_accesses, self.total - done)
            self.rounds.append(synth_trace(rng, k, code, data, region, fetch_frac=0.2,
                                           write_frac=write_frac, hot_prob=0.8))
            done += k
        self.guest_memory_bytes = (nproc * (16 + region_pages) * PAGE) + (32 << 20)
        self.pids = None

    def setup(self, kernel):
        self.pids = [kernel.spawn(self.layout) for _ in range(self.nproc)]

    def run(self, kernel):
        if self.pids is None:
            self.setup(kernel)
        t0 = time.perf_counter()
        done = faults = 0
        length = self.region_pages * PAGE
        for i, tr in enumerate(self.rounds):
            pid = self.pids[i % self.nproc]
            addr = kernel.mmap(pid, length, "rw", addr=self.MMAP_AT)
            faults += kernel.run(pid, tr)
            kernel.munmap(pid, addr, length)
            done += len(tr)
        return _result(kernel, t0, done, faults)


class TlbMissWorkload:
    """nproc processes, each with a heap of working_set pages touched at
    random (every access on a uniformly chosen page: no spatial or temporal
    locality), in round-robin slices of slice_len accesses, `total` accesses
    in all.  Each process first writes every heap page once (its only
    demand faults); after that the page tables do not change.
    """

    TEXT = 0x400000
    HEAP = 0x10000000
    STACK_TOP = 0x7ffffff00000

    def __init__(self, total=1_000_000, nproc=1, working_set=8192, slice_len=50_000,
                 write_frac=0.3, seed=0):
        _positive(total=total, nproc=nproc, working_set=working_set, slice_len=slice_len)
        self.total, self.nproc, self.slice_len = int(total), nproc, slice_len
        text_pages, stack_pages = 4, 4
        self.layout = ((self.TEXT, text_pages * PAGE, "rx"),
                       (self.HEAP, working_set * PAGE, "rw"),
                       (self.STACK_TOP - stack_pages * PAGE, stack_pages * PAGE, "rw"))
        code = _pages(self.TEXT, text_pages)
        heap = _pages(self.HEAP, working_set)
        root = np.random.default_rng(seed)
        per = -(-self.total // nproc)
        self.traces = []
        for _ in range(nproc):
            rng = np.random.default_rng(root.integers(1 << 63))
            first = np.zeros(min(working_set, per), dtype=TRACE_DTYPE)
            first["va"] = heap[:len(first)]
            first["access"] = ACC_WRITE
            first["user"] = True
            rest = synth_trace(rng, per - len(first), code, heap, fetch_frac=0.02,
                               write_frac=write_frac, mean_run=1, hot_prob=0.0)
            self.traces.append(np.concatenate([first, rest]))
        self.guest_memory_bytes = nproc * (working_set + 64) * PAGE + (32 << 20)
        self.pids = None

    def setup(self, kernel):
        self.pids = [kernel.spawn(self.layout) for _ in range(self.nproc)]

    def run(self, kernel):
        return _run_slices(self, kernel)


# ---------------------------------------------------------------------------
# The registry: workloads by name, for `ptemu study`
# ---------------------------------------------------------------------------
#: name -> (class, {study parameter: constructor argument}).  The study
#: parameters every workload understands where it has the notion: accesses,
#: processes, working_set (pages), seed; any other constructor argument may
#: be given by its own name.
WORKLOADS = {
    "context-switch": (ContextSwitchWorkload, {"accesses": "total", "processes": "nproc",
                                               "working_set": "heap_pages", "seed": "seed"}),
    "fork": (ForkWorkload, {"accesses": "total", "working_set": "heap_pages", "seed": "seed"}),
    "mmap-churn": (MmapChurnWorkload, {"accesses": "total", "processes": "nproc",
                                       "working_set": "region_pages", "seed": "seed"}),
    "tlb-miss": (TlbMissWorkload, {"accesses": "total", "processes": "nproc",
                                   "working_set": "working_set", "seed": "seed"}),
}
TRACE_PREFIX = "trace:"


def parse_workload_name(name):
    """("builtin", name) or ("trace", path) for a study workload name; InvalidInput
    for anything else."""
    if not isinstance(name, str) or not name:
        raise InvalidInput("a workload name must be a non-empty string, not %r" % (name,))
    if name.startswith(TRACE_PREFIX):
        path = name[len(TRACE_PREFIX):]
        if not path:
            raise InvalidInput("workload %r: trace: needs a path (trace:PATH)" % name)
        return "trace", path
    if name not in WORKLOADS:
        raise InvalidInput("unknown workload %r (known: %s, trace:PATH)"
                           % (name, ", ".join(WORKLOADS)))
    return "builtin", name


def _trace_class():
    from ptemu.traces import TraceWorkload     # on first use: traces builds on this module
    return TraceWorkload


def _signature(cls):
    params = inspect.signature(cls.__init__).parameters
    return {k: p.default for k, p in params.items()
            if k != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _kwargs(name, params):
    """(class, constructor kwargs, positional args) for workload `name` with
    study parameters `params`, every name and value checked."""
    kind, what = parse_workload_name(name)
    if kind == "trace":
        cls = _trace_class()
        accepted = _signature(cls)
        # A recording has its own accesses and processes: the study's count caps
        # the replay (TraceWorkload's total), a seed has nothing to choose.
        generic = {"accesses": "total", "seed": None, "processes": None}
        args = (what,)
    else:
        cls, generic = WORKLOADS[what]
        accepted = _signature(cls)
        args = ()
    kwargs = {}
    for key, value in params.items():
        if value is None:
            continue
        target = generic.get(key, key if key in accepted and key not in generic.values()
                             else None)
        if target is None:
            if key in generic:
                continue            # a study parameter this workload has no notion of
            known = sorted(set(k for k, v in generic.items() if v) |
                           (set(accepted) - set(generic.values())))
            raise InvalidInput("workload %s: unknown parameter %r (known: %s)"
                               % (name, key, ", ".join(known)))
        default = accepted.get(target)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            if not (isinstance(default, bool) and isinstance(value, bool)):
                raise InvalidInput("workload %s: parameter %s must be a number, not %r"
                                   % (name, key, value))
        elif value < 0:
            raise InvalidInput("workload %s: parameter %s must not be negative (%r)"
                               % (name, key, value))
        elif isinstance(default, numbers.Integral) and not isinstance(default, bool) \
                and value != int(value):
            raise InvalidInput("workload %s: parameter %s must be an integer, not %r"
                               % (name, key, value))
        elif isinstance(default, numbers.Integral) and not isinstance(default, bool):
            value = int(value)
        kwargs[target] = value
    return cls, args, kwargs


def check_workload(name, **params):
    """Check a workload name and its parameters without building it (no trace
    is generated); InvalidInput names the first problem."""
    _kwargs(name, params)


def make_workload(name, **params):
    """The workload `name` (a WORKLOADS key or trace:PATH) built with study
    parameters (accesses, processes, working_set, seed) and any constructor
    argument by its own name; every name and value is checked first."""
    cls, args, kwargs = _kwargs(name, params)
    return cls(*args, **kwargs)


def guest_memory_hint(workload, floor=64 << 20):
    """Guest-physical bytes a machine should have for `workload`: its own
    `guest_memory_bytes` when it says, else what its layout needs (every
    process's whole layout, twice over for copy-on-write), at least `floor`;
    rounded up to 2 MiB."""
    need = getattr(workload, "guest_memory_bytes", None)
    if need is None:
        layout = getattr(workload, "layout", ())
        per = sum(length for _, length, _ in layout) if layout else 0
        need = 2 * per * getattr(workload, "nproc", 1) + (32 << 20)
    need = max(int(need), floor)
    return -(-need // (2 << 20)) * (2 << 20)


# ---------------------------------------------------------------------------
# Trace files and recorded programs live in ptemu.traces (one reader for every
# format); they are ptemu.workloads names too.  Resolved on first use, because
# ptemu.traces builds on this module's WorkloadResult.
# ---------------------------------------------------------------------------
_FROM_TRACES = ("read_trace", "iter_trace", "write_trace", "TraceWorkload")


def __getattr__(name):
    if name in _FROM_TRACES:
        from ptemu import traces
        return getattr(traces, name)
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
