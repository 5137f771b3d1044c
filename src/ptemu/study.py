"""`ptemu study`: the same workloads under native, shadow, unsync, paravirtual
and nested paging, side by side (docs/study.md).

    config (TOML or dict) ──> grid of cells ──> executor ──> counts ──> rows
      workloads x modes x       plain dicts      local processes,  plain     + cost model
      knobs x seeds                              or Dask workers   dicts     (parent side)

A *cell* is one (workload, mode, knobs, seed): a plain dict that travels to a
worker process (or a Dask worker), which builds its own machine, guest kernel
and workload from it (cffi objects do not pickle) and sends back a plain dict
of counts.  The parent turns counts into rows with the cost model, so that
the counts never depend on the cost model, the executor or the number of
jobs: everything but `wall_s` is a function of the config and the seed.

Counts come from the public machine contract only: the machine's `stats`
(exit_<reason> counters, `hypercall`, `shadow_pages_peak`), the vCPU's Tlb
(`stats`: lookups, misses, walks, walk_refs), and the guest kernel's
counters (`page_fault`: true faults delivered to the guest).

The cost model is a model: a handful of per-event cycle costs, multiplied by
the counts and added up (see CostModel and docs/study.md).  It orders the
modes for a workload; it does not predict a real machine's run time.
"""
import csv
import io
import itertools
import json
import math
import os
import time
from collections import OrderedDict

from ptemu._files import open_input, progress_bar, show_progress, write_atomic
from ptemu._native import InvalidInput, PtemuError

__all__ = ["MODES", "COMPONENTS", "ROW_FIELDS", "EXIT_HANDLING_REASONS", "DEFAULT_COSTS",
           "StudyError", "CostModel", "StudyConfig", "StudyResult", "load_config",
           "grid", "run_cell", "run_study", "write_atomic"]

#: The paging modes, in the order tables and plots show them.
MODES = ("native", "shadow", "unsync", "paravirt", "nested")
#: Components of the modelled cycles.
COMPONENTS = ("tlb", "walks", "exits", "guest_faults", "hypercalls")
#: Exit reasons the cost model may price separately ([exit_handling]); a
#: hypercall is priced by `hypercall` instead (component "hypercalls").
EXIT_HANDLING_REASONS = ("page_fault", "cr3_write", "cr_write", "invlpg", "ept_violation",
                         "ept_misconfig")

#: The built-in cost model, in cycles.  Sources and reasoning: docs/study.md.
DEFAULT_COSTS = {
    "tlb_hit": 1.0,        # an L1 DTLB hit, overlapped with the L1D access
    "walk_ref": 30.0,      # one page-walk memory reference, mostly L2/L3 hits
    "exit": 1200.0,        # VM exit + VM entry round trip with a minimal handler
    "guest_fault": 1000.0,  # #PF delivery to the guest kernel and its return
    "hypercall": 1500.0,   # VMCALL round trip plus an mmu_update-class handler
    "exit_handling": {     # the hypervisor's work for each exit, on top of `exit`
        "page_fault": 2000.0,    # walk the guest tables, fill/emulate, resume
        "cr3_write": 800.0,      # prev_roots / hash lookup of the new shadow root
        "cr_write": 4000.0,      # a new paging mode: roots rebuilt
        "invlpg": 400.0,         # drop one shadow entry (resync when unsync)
        "ept_violation": 1500.0,  # back a guest frame, map it in the EPT
        "ept_misconfig": 1000.0,
    },
}

#: Row fields in the order of shared/API.md, then the cell's own description.
ROW_FIELDS = ("workload", "mode", "accesses", "exits", "exits_by_reason", "guest_page_faults",
              "tlb_lookups", "tlb_misses", "tlb_miss_rate", "walks", "walk_refs",
              "refs_per_walk", "refs_per_access", "shadow_pages_peak", "modelled_cycles",
              "modelled_cycles_by_component", "modelled_cycles_per_access",
              "overhead_vs_native", "wall_s", "seed", "guest_levels", "ept_levels", "tlb",
              "params")

#: The built-in workloads, the default of a study.
DEFAULT_WORKLOADS = ("context-switch", "fork", "mmap-churn", "tlb-miss")
_KNOBS = ("guest_levels", "ept_levels", "tlb")
_STUDY_KEYS = ("workloads", "modes", "accesses", "seeds", "seed", "cost_model", "jobs",
               "guest_memory_mib")
_LONG_CELL = 200_000           # accesses above which a cell gets its own progress bar


class StudyError(InvalidInput):
    """Bad study input (config, cost model, workload, mode, parameter): the
    command prints it as one line and exits with status 2."""


class StudyRunError(PtemuError):
    """A worker process or a Dask worker died or failed outside ptemu (the
    command prints it as one line, exit status 1)."""

    exit_status = 1


class MissingExtra(PtemuError):
    """An optional dependency is not installed; the message names the pip
    install that brings it (the command: one line, exit status 1)."""

    exit_status = 1


def require(module, extra, what):
    """Import `module`, or MissingExtra naming `pip install "ptemu[extra]"`."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra('%s needs %s: pip install "ptemu[%s]"' % (what, module.split(".")[0],
                                                                      extra)) from None


# ---------------------------------------------------------------------------
# TOML
# ---------------------------------------------------------------------------
def _toml():
    try:
        import tomllib
        return tomllib
    except ModuleNotFoundError:          # Python < 3.11
        try:
            import tomli
            return tomli
        except ModuleNotFoundError:
            raise StudyError('reading TOML on Python < 3.11 needs tomli: pip install tomli') \
                from None


def _read_toml(path, what):
    path = os.fspath(path)
    toml = _toml()
    try:
        with open_input(path, what, StudyError) as fh:
            return toml.load(fh)
    except toml.TOMLDecodeError as exc:
        raise StudyError("%s %s: malformed TOML: %s" % (what, path, exc)) from None
    except UnicodeDecodeError as exc:
        raise StudyError("%s %s: not UTF-8 text: %s" % (what, path, exc)) from None


def _number(value, where, minimum=0):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise StudyError("%s must be a number, not %r" % (where, value))
    if value < minimum:
        raise StudyError("%s must not be negative (%r)" % (where, value))
    return value


def _count(value, where, minimum=0):
    if isinstance(value, bool) or not isinstance(value, int):
        raise StudyError("%s must be an integer, not %r" % (where, value))
    if value < 0:
        raise StudyError("%s must not be negative (%d)" % (where, value))
    if value < minimum:
        raise StudyError("%s must be at least %d, not %d" % (where, minimum, value))
    return value


# ---------------------------------------------------------------------------
# The cost model
# ---------------------------------------------------------------------------
class CostModel:
    """Cycles per event.  Fixed names (docs/study.md): tlb_hit, walk_ref, exit,
    guest_fault, hypercall, and exit_handling.<reason>; an override names any
    of them and leaves the rest at their documented default.

    Modelled cycles of a row, by component:
      tlb          tlb_lookups * tlb_hit  (every lookup; a miss adds its walk)
      walks        walk_refs * walk_ref   (the hardware walker's references)
      exits        sum over exit reasons r other than hypercall of
                   exits_by_reason[r] * (exit + exit_handling[r])
      guest_faults guest_page_faults * guest_fault
      hypercalls   exits_by_reason["hypercall"] * hypercall
    """

    def __init__(self, overrides=None, source="built-in defaults"):
        costs = {k: v for k, v in DEFAULT_COSTS.items() if k != "exit_handling"}
        handling = dict(DEFAULT_COSTS["exit_handling"])
        overrides = {} if overrides is None else overrides
        if not isinstance(overrides, dict):
            raise StudyError("a cost model is a table of names, not %r" % (overrides,))
        for name, value in overrides.items():
            if name == "exit_handling":
                if not isinstance(value, dict):
                    raise StudyError("cost model (%s): exit_handling must be a table keyed by "
                                     "exit reason" % source)
                for reason, v in value.items():
                    if reason not in handling:
                        raise StudyError("cost model (%s): unknown exit reason "
                                         "exit_handling.%s (known: %s; a hypercall is priced "
                                         "by `hypercall`)" % (source, reason,
                                                              ", ".join(handling)))
                    handling[reason] = float(_number(v, "cost model (%s): exit_handling.%s"
                                                     % (source, reason)))
            elif name in costs:
                costs[name] = float(_number(value, "cost model (%s): %s" % (source, name)))
            else:
                raise StudyError("cost model (%s): unknown name %r (known: %s, "
                                 "exit_handling.<reason>)" % (source, name, ", ".join(costs)))
        self.costs = costs
        self.exit_handling = handling
        self.source = source

    @classmethod
    def load(cls, source=None):
        """A CostModel from None (defaults), a CostModel, a dict of overrides
        or a TOML file path."""
        if source is None:
            return cls()
        if isinstance(source, CostModel):
            return source
        if isinstance(source, dict):
            return cls(source, "given table")
        if isinstance(source, (str, os.PathLike)):
            return cls(_read_toml(source, "cost model"), os.fspath(source))
        raise StudyError("a cost model is a TOML file or a table, not %r" % (source,))

    def to_dict(self):
        d = dict(self.costs)
        d["exit_handling"] = dict(self.exit_handling)
        return d

    def price(self, counts):
        """(total cycles, {component: cycles}) for a row's counts."""
        c = self.costs
        exits = 0.0
        hyper = 0
        for reason, n in counts["exits_by_reason"].items():
            if reason == "hypercall":
                hyper += n
            else:
                exits += n * (c["exit"] + self.exit_handling.get(reason, 0.0))
        by = OrderedDict((
            ("tlb", counts["tlb_lookups"] * c["tlb_hit"]),
            ("walks", counts["walk_refs"] * c["walk_ref"]),
            ("exits", exits),
            ("guest_faults", counts["guest_page_faults"] * c["guest_fault"]),
            ("hypercalls", hyper * c["hypercall"]),
        ))
        return sum(by.values()), by


# ---------------------------------------------------------------------------
# The config: a grid of workloads x modes x knobs x seeds
# ---------------------------------------------------------------------------
def _as_list(value, where):
    if isinstance(value, (list, tuple)):
        if not value:
            raise StudyError("%s must not be empty" % where)
        return list(value)
    return [value]


def _tlb_spec(name, table):
    """A TLB geometry from a [tlb.NAME] table: arrays = [{name, tier, kind,
    sizes, entries, ways}, ...], psc = {"2" = [entries, ways], ...}."""
    where = "tlb.%s" % name
    if not isinstance(table, dict):
        raise StudyError("%s must be a table" % where)
    unknown = set(table) - {"arrays", "psc"}
    if unknown:
        raise StudyError("%s: unknown key %r (known: arrays, psc)" % (where, sorted(unknown)[0]))
    arrays = table.get("arrays")
    if not isinstance(arrays, list) or not arrays:
        raise StudyError("%s: arrays must be a non-empty list of tables" % where)
    out_arrays = []
    fields = ("name", "tier", "kind", "sizes", "entries", "ways")
    for i, a in enumerate(arrays):
        if not isinstance(a, dict):
            raise StudyError("%s.arrays[%d] must be a table" % (where, i))
        bad = set(a) - set(fields)
        if bad:
            raise StudyError("%s.arrays[%d]: unknown key %r (known: %s)"
                             % (where, i, sorted(bad)[0], ", ".join(fields)))
        missing = [f for f in fields if f not in a]
        if missing:
            raise StudyError("%s.arrays[%d]: missing %s" % (where, i, missing[0]))
        for f in ("tier", "entries", "ways"):
            _count(a[f], "%s.arrays[%d].%s" % (where, i, f), 1)
        out_arrays.append({f: (list(a[f]) if f == "sizes" else a[f]) for f in fields})
    psc = {}
    for level, geom in (table.get("psc") or {}).items():
        try:
            lv = int(level)
        except (TypeError, ValueError):
            raise StudyError("%s.psc: level %r is not 2..5" % (where, level)) from None
        if not isinstance(geom, list) or len(geom) != 2:
            raise StudyError("%s.psc.%s must be [entries, ways]" % (where, level))
        psc[str(lv)] = [_count(geom[0], "%s.psc.%s entries" % (where, level), 1),
                        _count(geom[1], "%s.psc.%s ways" % (where, level), 1)]
    spec = {"arrays": out_arrays, "psc": psc}
    try:
        build_tlb(spec)         # the Tlb's own checks: sets a power of two, ...
    except InvalidInput as exc:
        raise StudyError("%s: %s" % (where, exc)) from None
    return spec


def build_tlb(spec):
    """A fresh Tlb from a cell's TLB spec ("default", "simple" or a geometry dict)."""
    from ptemu.tlb import Tlb, TlbArray
    if spec == "default":
        return Tlb.default()
    if spec == "simple":
        return Tlb.simple()
    arrays = [TlbArray(a["name"], a["tier"], a["kind"], tuple(a["sizes"]), a["entries"],
                       a["ways"]) for a in spec["arrays"]]
    return Tlb(arrays, psc={int(k): tuple(v) for k, v in spec["psc"].items()})


class StudyConfig:
    """A checked study config.

    workloads: [(name, {parameter: value})]; modes; accesses; seeds;
    guest_levels, ept_levels, tlbs (knob value lists; tlbs names, with
    tlb_specs[name] the geometry); cost_model (a CostModel); jobs (None:
    all cores); guest_memory_mib (None: from the workload).
    """

    def __init__(self, workloads, modes=MODES, accesses=100_000, seeds=(0,),
                 guest_levels=(4,), ept_levels=(4,), tlbs=("default",), tlb_specs=None,
                 cost_model=None, jobs=None, guest_memory_mib=None):
        from ptemu.workloads import check_workload
        self.workloads = []
        for name, params in workloads:
            if not isinstance(params, dict):
                raise StudyError("workload %s: its parameters must be a table" % name)
            if "accesses" in params or "seed" in params:
                raise StudyError("workload %s: accesses and seed are set for the whole study "
                                 "(study.accesses, study.seeds)" % name)
            try:
                check_workload(name, accesses=1, seed=0, **params)
            except InvalidInput as exc:
                raise StudyError(str(exc)) from None
            self.workloads.append((name, dict(params)))
        if not self.workloads:
            raise StudyError("the study names no workload")
        self.modes = []
        for m in modes:
            if m not in MODES:
                raise StudyError("unknown mode %r (known: %s)" % (m, ", ".join(MODES)))
            if m not in self.modes:
                self.modes.append(m)
        if not self.modes:
            raise StudyError("the study names no mode")
        self.accesses = _count(accesses, "accesses", 1)
        self.seeds = [_count(s, "seed") for s in seeds]
        if not self.seeds:
            raise StudyError("the study names no seed")
        self.guest_levels = [_count(v, "knobs.guest_levels") for v in guest_levels]
        for v in self.guest_levels:
            if v not in (4, 5):
                raise StudyError("knobs.guest_levels: %d is not 4 or 5" % v)
        self.ept_levels = [_count(v, "knobs.ept_levels") for v in ept_levels]
        for v in self.ept_levels:
            if v not in (4, 5):
                raise StudyError("knobs.ept_levels: %d is not 4 or 5" % v)
        self.tlb_specs = {"default": "default", "simple": "simple"}
        self.tlb_specs.update(tlb_specs or {})
        self.tlbs = list(tlbs)
        for t in self.tlbs:
            if t not in self.tlb_specs:
                raise StudyError("knobs.tlb: unknown TLB %r (default, simple, or a [tlb.NAME] "
                                 "table)" % (t,))
        self.cost_model = CostModel.load(cost_model)
        self.jobs = None if jobs is None else _count(jobs, "jobs", 1)
        self.guest_memory_mib = None if guest_memory_mib is None else \
            _count(guest_memory_mib, "guest_memory_mib", 2)

    def to_dict(self):
        """The config as plain data (the JSON's "config")."""
        return {"workloads": [{"name": n, "params": p} for n, p in self.workloads],
                "modes": list(self.modes), "accesses": self.accesses, "seeds": list(self.seeds),
                "knobs": {"guest_levels": list(self.guest_levels),
                          "ept_levels": list(self.ept_levels), "tlb": list(self.tlbs)},
                "tlb_specs": {k: v for k, v in self.tlb_specs.items() if k in self.tlbs},
                "guest_memory_mib": self.guest_memory_mib}


def load_config(source=None, **overrides):
    """A StudyConfig from a TOML file path, a dict of the same shape or None,
    with keyword overrides (workloads, modes, accesses, seeds, cost_model,
    jobs) taking precedence over the file.

    The TOML shape (docs/study.md)::

        [study]
        workloads = ["context-switch", "tlb-miss"]
        modes = ["native", "shadow", "unsync", "paravirt", "nested"]
        accesses = 200000
        seeds = [0]
        cost_model = "costs.toml"        # or a [cost_model] table
        [knobs]
        guest_levels = [4]
        ept_levels = [4, 5]
        tlb = ["default", "small"]
        [tlb.small]
        arrays = [{name = "tlb", tier = 1, kind = "unified", sizes = ["4K", "2M", "1G"],
                   entries = 64, ways = 4}]
        psc = {"2" = [16, 4]}
        [workload.tlb-miss]              # parameters of one workload
        working_set = 4096
    """
    if source is None:
        data = {}
        base = None
    elif isinstance(source, dict):
        data = source
        base = None
    else:
        data = _read_toml(source, "study config")
        base = os.path.dirname(os.path.abspath(os.fspath(source)))
    unknown = set(data) - {"study", "knobs", "tlb", "workload", "cost_model"}
    if unknown:
        raise StudyError("study config: unknown table %r (known: study, knobs, tlb, workload, "
                         "cost_model)" % sorted(unknown)[0])
    study = data.get("study", {})
    knobs = data.get("knobs", {})
    for where, table, known in (("study", study, _STUDY_KEYS), ("knobs", knobs, _KNOBS)):
        if not isinstance(table, dict):
            raise StudyError("study config: [%s] must be a table" % where)
        bad = set(table) - set(known)
        if bad:
            raise StudyError("study config: unknown key %s.%s (known: %s)"
                             % (where, sorted(bad)[0], ", ".join(known)))
    wparams = data.get("workload", {})
    if not isinstance(wparams, dict):
        raise StudyError("study config: [workload.NAME] tables hold workload parameters")
    names = overrides.pop("workloads", None)
    from_command_line = names is not None
    if names is not None:
        names = _as_list(names, "workloads")
        wparams = dict(wparams)
        for i, w in enumerate(names):
            if not isinstance(w, str):          # a (name, params) pair
                try:
                    w, params = w
                except (TypeError, ValueError):
                    raise StudyError("workloads: %r is not a name or a (name, parameters) "
                                     "pair" % (w,)) from None
                wparams[w] = dict(wparams.get(w, {}), **params)
                names[i] = w
    else:
        names = study.get("workloads")
        if names is None:
            names = list(wparams) or list(DEFAULT_WORKLOADS)
        names = _as_list(names, "study.workloads")
    from ptemu.workloads import parse_workload_name
    for n in wparams:          # a table for a workload not run now: a name it could run
        try:
            parse_workload_name(n)
        except InvalidInput as exc:
            raise StudyError("study config: [workload.%s]: %s" % (n, exc)) from None
    workloads = [(n, wparams.get(n, {})) for n in names]
    if base and not from_command_line:
        # A trace named in the file is found next to the file, as its cost model is.
        workloads = [(_trace_beside(n, base), p) for n, p in workloads]
    modes = overrides.pop("modes", None) or _as_list(study.get("modes", list(MODES)),
                                                      "study.modes")
    accesses = overrides.pop("accesses", None)
    if accesses is None:
        accesses = study.get("accesses", 100_000)
    seeds = overrides.pop("seeds", None)
    if seeds is None:
        if "seed" in study and "seeds" in study:
            raise StudyError("study config: give study.seed or study.seeds, not both")
        seeds = _as_list(study.get("seeds", study.get("seed", 0)), "study.seeds")
    cost = overrides.pop("cost_model", None)
    if cost is None:
        if "cost_model" in data and "cost_model" in study:
            raise StudyError("study config: give study.cost_model or a [cost_model] table, "
                             "not both")
        cost = data.get("cost_model", study.get("cost_model"))
        if isinstance(cost, str) and base and not os.path.isabs(cost):
            cost = os.path.join(base, cost)
    jobs = overrides.pop("jobs", None)
    if jobs is None:
        jobs = study.get("jobs")
    if overrides:
        raise StudyError("load_config: unknown override %r" % sorted(overrides)[0])
    tlb_tables = data.get("tlb", {})
    if not isinstance(tlb_tables, dict):
        raise StudyError("study config: [tlb.NAME] tables hold TLB geometries")
    specs = {}
    for name, table in tlb_tables.items():
        if name in ("default", "simple"):
            raise StudyError("tlb.%s: %s is a built-in TLB name" % (name, name))
        specs[name] = _tlb_spec(name, table)
    return StudyConfig(workloads, modes=modes, accesses=accesses, seeds=seeds,
                       guest_levels=_as_list(knobs.get("guest_levels", [4]), "knobs.guest_levels"),
                       ept_levels=_as_list(knobs.get("ept_levels", [4]), "knobs.ept_levels"),
                       tlbs=_as_list(knobs.get("tlb", ["default"]), "knobs.tlb"),
                       tlb_specs=specs, cost_model=cost, jobs=jobs,
                       guest_memory_mib=study.get("guest_memory_mib"))


def _trace_beside(name, base):
    """trace:PATH with a relative PATH taken from the directory `base`."""
    from ptemu.workloads import TRACE_PREFIX
    if name.startswith(TRACE_PREFIX):
        path = name[len(TRACE_PREFIX):]
        if path and not os.path.isabs(path):
            return TRACE_PREFIX + os.path.join(base, path)
    return name


def grid(config):
    """The cells of a study, in row order: workload, then knobs, then seed, then
    mode.  A knob that does not apply to a mode (EPT levels outside nested
    paging) is None there, and the duplicate cells it would make are dropped."""
    cells, seen = [], set()
    for (name, params), gl, el, tlb, seed, mode in itertools.product(
            config.workloads, config.guest_levels, config.ept_levels, config.tlbs,
            config.seeds, config.modes):
        cell = {"workload": name, "params": dict(params), "mode": mode,
                "accesses": config.accesses, "seed": seed, "guest_levels": gl,
                "ept_levels": el if mode == "nested" else None, "tlb": tlb,
                "tlb_spec": config.tlb_specs[tlb],
                "guest_memory": None if config.guest_memory_mib is None
                else config.guest_memory_mib << 20}
        key = json.dumps(cell, sort_keys=True)
        if key not in seen:
            seen.add(key)
            cells.append(cell)
    return cells


# ---------------------------------------------------------------------------
# One cell: build the machine, run the workload, read the counters
# ---------------------------------------------------------------------------
def _machine(mode, guest_bytes, tlb, ept_levels):
    """A machine of the machine contract for `mode`, built by the public API."""
    if mode == "native":
        from ptemu.guest import NativeMachine
        return NativeMachine(guest_bytes, tlb=tlb)
    from ptemu import Hypervisor
    # Host memory: the guest's, plus room for shadow pages or EPT tables.
    hv = Hypervisor(2 * guest_bytes + (16 << 20))
    if mode == "shadow":
        return hv.create_vm(guest_bytes, paging="shadow", tlb=tlb)
    if mode == "unsync":
        return hv.create_vm(guest_bytes, paging="shadow", unsync=True, tlb=tlb)
    if mode == "paravirt":
        return hv.create_vm(guest_bytes, paging="paravirt", tlb=tlb)
    if mode == "nested":
        return hv.create_vm(guest_bytes, paging="nested", tlb=tlb, ept_levels=ept_levels or 4)
    raise StudyError("unknown mode %r (known: %s)" % (mode, ", ".join(MODES)))


def _numbers(stats):
    return {k: v for k, v in dict(stats).items() if isinstance(v, int) and not isinstance(v, bool)}


def _counted_kernel_run(kernel, bar):
    """Make kernel.run advance `bar` by the accesses of each trace it runs."""
    run = kernel.run

    def counted(pid, trace, start=0):
        try:
            return run(pid, trace, start)
        finally:
            bar.update(len(trace) - start)
    kernel.run = counted


class _SinkBar:
    """The bar of a long cell in a worker process: its updates travel through
    a queue to the parent, which draws them (tqdm cannot draw from there)."""

    def __init__(self, sink):
        self.sink = sink

    def update(self, n=1):
        self.sink.put(n)

    def close(self):
        pass


def run_cell(cell, progress=False, sink=None):
    """Run one cell (a plain dict from grid()) on a machine of its own; a plain
    dict of counts (and wall_s).  Safe to call in any process.  Progress of a
    long cell: a bar of its own with `progress`, or accesses put to the queue
    `sink` (the local-process executor's)."""
    from ptemu.guest import Kernel
    from ptemu.workloads import make_workload, guest_memory_hint
    t0 = time.perf_counter()
    mode = cell["mode"]
    try:
        w = make_workload(cell["workload"], accesses=cell["accesses"], seed=cell["seed"],
                          **cell["params"])
    except InvalidInput as exc:
        raise StudyError(str(exc)) from None
    guest = cell.get("guest_memory") or guest_memory_hint(w)
    tlb = build_tlb(cell["tlb_spec"])
    machine = _machine(mode, guest, tlb, cell.get("ept_levels"))
    kernel = Kernel(machine, levels=cell.get("guest_levels", 4))
    # The counts are the workload's: the kernel's boot (the direct map, written
    # with paging off) is left out.
    m0, k0, t_0 = _numbers(machine.stats), _numbers(kernel.stats), tlb.stats
    bar = None
    if sink is not None and cell["accesses"] >= _LONG_CELL:
        bar = _SinkBar(sink)
    elif progress and cell["accesses"] >= _LONG_CELL:
        bar = progress_bar(total=cell["accesses"], desc="%s/%s" % (cell["workload"], mode),
                           unit="acc", leave=False, unit_scale=True)
    if bar is not None:
        _counted_kernel_run(kernel, bar)
    try:
        res = w.run(kernel)
    finally:
        if bar is not None:
            bar.close()
    m1, k1, t_1 = _numbers(machine.stats), _numbers(kernel.stats), tlb.stats

    def diff(after, before, key):
        return after.get(key, 0) - before.get(key, 0)
    by_reason = {}
    for key in sorted(m1):
        if key.startswith("exit_"):
            by_reason[key[5:]] = diff(m1, m0, key)
    exits = sum(by_reason.values())
    if "exits" in m1 and diff(m1, m0, "exits") != exits:
        raise StudyError("%s: the machine's exits (%d) are not the sum of its exit_<reason> "
                         "counters (%d)" % (mode, diff(m1, m0, "exits"), exits))
    walks = t_1.walks - t_0.walks
    refs = t_1.walk_refs - t_0.walk_refs
    lookups = t_1.lookups - t_0.lookups
    misses = t_1.misses - t_0.misses
    accesses = int(res["accesses"])
    return {
        "workload": cell["workload"], "mode": mode, "accesses": accesses,
        "exits": exits, "exits_by_reason": by_reason,
        "guest_page_faults": diff(k1, k0, "page_fault"),
        "tlb_lookups": lookups, "tlb_misses": misses,
        "walks": walks, "walk_refs": refs,
        "shadow_pages_peak": int(m1.get("shadow_pages_peak", 0)),
        "wall_s": time.perf_counter() - t0,
        "seed": cell["seed"], "guest_levels": cell.get("guest_levels", 4),
        "ept_levels": cell.get("ept_levels"), "tlb": cell["tlb"], "params": dict(cell["params"]),
    }


def _ratio(a, b):
    return a / b if b else 0.0


def _row(counts, cost):
    total, by = cost.price(counts)
    r = dict(counts)
    r["tlb_miss_rate"] = _ratio(counts["tlb_misses"], counts["tlb_lookups"])
    r["refs_per_walk"] = _ratio(counts["walk_refs"], counts["walks"])
    r["refs_per_access"] = _ratio(counts["walk_refs"], counts["accesses"])
    r["modelled_cycles"] = total
    r["modelled_cycles_by_component"] = dict(by)
    r["modelled_cycles_per_access"] = _ratio(total, counts["accesses"])
    r["overhead_vs_native"] = None
    return {k: r[k] for k in ROW_FIELDS}


def _native_key(row):
    return (row["workload"], json.dumps(row["params"], sort_keys=True), row["seed"],
            row["guest_levels"], row["tlb"])


def make_rows(counts, cost):
    """Rows (plain dicts, ROW_FIELDS order) from cells' counts, priced by
    `cost`, with overhead_vs_native where the study has the native row."""
    rows = [_row(c, cost) for c in counts]
    native = {_native_key(r): r["modelled_cycles"] for r in rows if r["mode"] == "native"}
    for r in rows:
        base = native.get(_native_key(r))
        if base:
            r["overhead_vs_native"] = r["modelled_cycles"] / base
    return rows


# ---------------------------------------------------------------------------
# Executors: in this process, local processes, or a Dask cluster
# ---------------------------------------------------------------------------
def _grid_bar(n, show):
    return progress_bar(show, total=n, desc="study", unit="cell")


def _run_serial(cells, bar, show):
    out = []
    for cell in cells:
        bar.set_postfix_str("%s/%s" % (cell["workload"], cell["mode"]))
        out.append(run_cell(cell, progress=show))
        bar.update(1)
    return out


def _drain(sink, bar):
    import queue
    while True:
        try:
            bar.update(sink.get_nowait())
        except queue.Empty:
            return


def _run_local(cells, jobs, bar, show=False):
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool
    out = [None] * len(cells)
    # With progress on, long cells report their accesses through a queue and
    # a second bar shows them: the work inside cells, not only whole cells.
    long_total = sum(c["accesses"] for c in cells if c["accesses"] >= _LONG_CELL)
    manager = multiprocessing.Manager() if show and long_total else None
    sink = manager.Queue() if manager is not None else None
    acc_bar = progress_bar(sink is not None, total=long_total, desc="accesses", unit="acc",
                           unit_scale=True, leave=False)
    try:
        with ProcessPoolExecutor(max_workers=min(jobs, len(cells))) as pool:
            futs = {pool.submit(run_cell, cell, False, sink): i for i, cell in enumerate(cells)}
            pending = set(futs)
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                    if sink is not None:
                        _drain(sink, acc_bar)
                    for fut in done:
                        out[futs[fut]] = fut.result()
                        bar.update(1)
            except BrokenProcessPool as exc:
                raise StudyRunError("a study worker process died (%s)" % (exc,)) from None
            except BaseException:
                for f in futs:
                    f.cancel()
                raise
    finally:
        acc_bar.close()
        if manager is not None:
            manager.shutdown()
    return out


def _run_dask(cells, address, bar):
    distributed = require("distributed", "dask", "a Dask scheduler")
    if not isinstance(address, str) or "://" not in address:
        raise StudyError("scheduler address %r is not of the form tcp://HOST:PORT" % (address,))
    try:
        client = distributed.Client(address, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise StudyError("cannot reach the Dask scheduler at %s: %s" % (address, exc)) from None
    try:
        futs = client.map(run_cell, cells, pure=False)
        index = {f.key: i for i, f in enumerate(futs)}
        out = [None] * len(cells)
        for fut in distributed.as_completed(futs):
            try:
                out[index[fut.key]] = fut.result()
            except (PtemuError, KeyboardInterrupt):
                raise
            except Exception as exc:     # a worker lost, a cell that cannot travel, ...
                raise StudyRunError("a Dask worker failed on a cell: %s: %s"
                                    % (type(exc).__name__, exc)) from None
            bar.update(1)
        return out
    finally:
        client.close()


def default_jobs():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def execute(cells, jobs=None, scheduler=None, progress=None):
    """Counts of every cell, in cell order, whatever ran them."""
    show = show_progress(progress)
    bar = _grid_bar(len(cells), show)
    try:
        if scheduler:
            return _run_dask(cells, scheduler, bar)
        jobs = default_jobs() if jobs is None else jobs
        if jobs <= 1 or len(cells) <= 1:
            return _run_serial(cells, bar, show)
        return _run_local(cells, jobs, bar, show)
    finally:
        bar.close()


# ---------------------------------------------------------------------------
# The result: rows, JSON, CSV, table, plot
# ---------------------------------------------------------------------------
def _flat(row, reasons):
    out = OrderedDict()
    for k in ROW_FIELDS:
        v = row[k]
        if k == "exits_by_reason":
            for r in reasons:
                out["exits_" + r] = v.get(r, 0)
        elif k == "modelled_cycles_by_component":
            for c in COMPONENTS:
                out["cycles_" + c] = v[c]
        elif k == "params":
            out["params"] = json.dumps(v, sort_keys=True) if v else ""
        else:
            out[k] = "" if v is None else v
    return out


class StudyResult:
    """rows (plain dicts, ROW_FIELDS order), config (a StudyConfig), cost_model
    (a CostModel); to_json(), to_csv(), table(), plot(path)."""

    def __init__(self, rows, config, cost_model):
        self.rows = rows
        self.config = config
        self.cost_model = cost_model

    def to_dict(self):
        from ptemu import __version__
        return {"ptemu_version": __version__, "config": self.config.to_dict(),
                "cost_model": self.cost_model.to_dict(), "rows": self.rows}

    def to_json(self, path=None):
        text = json.dumps(self.to_dict(), indent=1) + "\n"
        if path is not None:
            write_atomic(path, text)
        return text

    def _reasons(self):
        return sorted({r for row in self.rows for r in row["exits_by_reason"]})

    def to_csv(self, path=None):
        reasons = self._reasons()
        buf = io.StringIO()
        flat = [_flat(r, reasons) for r in self.rows]
        writer = csv.DictWriter(buf, fieldnames=list(flat[0]) if flat else list(ROW_FIELDS),
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(flat)
        text = buf.getvalue()
        if path is not None:
            write_atomic(path, text)
        return text

    def _variants(self):
        """The knob/seed label of each row: the knobs that take more than one
        value among the rows of its workload ("" where none does)."""
        keys = (("seed", "seed"), ("guest_levels", "gl"), ("ept_levels", "ept"), ("tlb", "tlb"))
        varying = {}
        for w in {r["workload"] for r in self.rows}:
            rows = [r for r in self.rows if r["workload"] == w]
            varying[w] = [(k, short) for k, short in keys
                          if len({r[k] for r in rows if r[k] is not None}) > 1]
        return [" ".join("%s=%s" % (short, r[k]) for k, short in varying[r["workload"]]
                         if r[k] is not None) for r in self.rows]

    def table(self):
        """The rows as a fixed-width text table (what the command prints)."""
        head = ("workload", "mode", "accesses", "exits", "guest_pf", "tlb_miss", "walks",
                "refs/walk", "refs/acc", "shadow_pk", "cycles/acc", "vs_native", "wall_s")
        variants = self._variants()
        lines = []
        for r, v in zip(self.rows, variants):
            mode = r["mode"] + (" " + v if v else "")
            lines.append((r["workload"], mode, "%d" % r["accesses"], "%d" % r["exits"],
                          "%d" % r["guest_page_faults"], "%.2f%%" % (100 * r["tlb_miss_rate"]),
                          "%d" % r["walks"], "%.2f" % r["refs_per_walk"],
                          "%.3f" % r["refs_per_access"], "%d" % r["shadow_pages_peak"],
                          "%.1f" % r["modelled_cycles_per_access"],
                          "-" if r["overhead_vs_native"] is None
                          else "%.2fx" % r["overhead_vs_native"], "%.2f" % r["wall_s"]))
        widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h)
                  for i, h in enumerate(head)]
        fmt = "  ".join("%%-%ds" % w if i < 2 else "%%%ds" % w for i, w in enumerate(widths))
        out = [fmt % head] + [fmt % l for l in lines]
        return "\n".join(s.rstrip() for s in out) + "\n"

    def plot(self, path):
        """A PNG: per workload, stacked bars of modelled cycles per access by
        component for each mode, refs per walk, and exits by reason (per 1,000
        accesses).  Needs matplotlib (pip install "ptemu[plot]")."""
        fig = _figure(self)
        write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
        return path


def run_study(config=None, *, workloads=None, modes=None, accesses=None, seed=None,
              seeds=None, cost_model=None, jobs=None, scheduler=None, progress=None):
    """Run a study and return its StudyResult.

    config: a TOML path, a dict of the TOML's shape, None (the four built-in
    workloads under every mode), or a StudyConfig (used as it is).  The
    keyword arguments override a path or dict: workloads (names, or (name,
    params) pairs), modes, accesses, seed (one) or seeds, cost_model (TOML
    path, dict, CostModel).  jobs: local processes (default: the config's,
    else all cores); scheduler: tcp://HOST:PORT of a Dask scheduler;
    progress: None for "when stderr is a terminal".
    """
    if seed is not None:
        if seeds is not None:
            raise StudyError("give seed or seeds, not both")
        seeds = [seed]
    overrides = dict(workloads=workloads, modes=modes, accesses=accesses, seeds=seeds,
                     cost_model=cost_model)
    if isinstance(config, StudyConfig):
        if any(v is not None for v in overrides.values()):
            raise StudyError("run_study: a StudyConfig is used as it is; pass overrides with "
                             "a config path or dict")
    else:
        config = load_config(config, **overrides)
    if jobs is not None:
        _count(jobs, "jobs", 1)
    jobs = jobs if jobs is not None else config.jobs
    counts = execute(grid(config), jobs=jobs, scheduler=scheduler, progress=progress)
    return StudyResult(make_rows(counts, config.cost_model), config, config.cost_model)


# ---------------------------------------------------------------------------
# The figure
# ---------------------------------------------------------------------------
_COMPONENT_COLORS = {"tlb": "#9ecae1", "walks": "#3182bd", "exits": "#e6550d",
                     "guest_faults": "#31a354", "hypercalls": "#756bb1"}
_COMPONENT_LABELS = {"tlb": "TLB lookups", "walks": "page walks", "exits": "VM exits",
                     "guest_faults": "guest #PF", "hypercalls": "hypercalls"}
# Exit reasons in shades of the "VM exits" orange, hypercalls in their purple.
_REASON_COLORS = {"page_fault": "#fd8d3c", "cr3_write": "#8c2d04", "invlpg": "#fdd0a2",
                  "cr_write": "#636363", "hypercall": "#756bb1", "ept_violation": "#c51b8a",
                  "ept_misconfig": "#7a0177"}
_OTHER_COLORS = ("#969696", "#bcbd22", "#17becf", "#8c564b")


def _groups(result):
    """[(workload, [(bar label, [rows of its seeds])...])...] in row order."""
    labels = result._variants()
    order = OrderedDict()
    for r, v in zip(result.rows, labels):
        v = "\n".join(p for p in v.split() if not p.startswith("seed="))
        bar = r["mode"] + ("\n" + v if v else "")
        order.setdefault(r["workload"], OrderedDict()).setdefault(bar, []).append(r)
    return [(w, list(bars.items())) for w, bars in order.items()]


def _mean(rows, get):
    return sum(get(r) for r in rows) / len(rows)


def _figure(result):
    require("matplotlib", "plot", "--plot")
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    groups = _groups(result)
    reasons = result._reasons()
    nseeds = len({r["seed"] for r in result.rows})
    nbars = max([len(bars) for _, bars in groups] or [1])
    lines = max([b.count("\n") for _, bars in groups for b, _ in bars] or [0])
    fig = Figure(figsize=(min(40, max(16, 2.0 * nbars + 6)),
                          1.2 + (3.3 + 0.25 * lines) * max(1, len(groups))))
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(1, len(groups)), 3, squeeze=False,
                        gridspec_kw={"width_ratios": [1.5, 1, 1.1]})
    for (workload, bars), (ax_c, ax_r, ax_e) in zip(groups, axes):
        names = [b for b, _ in bars]
        xs = list(range(len(bars)))
        # 1. modelled cycles per access, stacked by component
        bottom = [0.0] * len(bars)
        for comp in COMPONENTS:
            vals = [_mean(rows, lambda r: _ratio(r["modelled_cycles_by_component"][comp],
                                                 r["accesses"])) for _, rows in bars]
            ax_c.bar(xs, vals, bottom=bottom, color=_COMPONENT_COLORS[comp], width=0.7,
                     label=_COMPONENT_LABELS[comp])
            bottom = [b + v for b, v in zip(bottom, vals)]
        top = max(bottom) if bottom else 1.0
        for x, (_, rows), total in zip(xs, bars, bottom):
            ovh = [r["overhead_vs_native"] for r in rows if r["overhead_vs_native"]]
            text = "%.1f" % total + ("\n%.2fx" % (sum(ovh) / len(ovh)) if ovh else "")
            ax_c.text(x, total + top * 0.02, text, ha="center", va="bottom", fontsize=8)
        ax_c.set_ylim(0, top * 1.3 or 1)
        ax_c.set_ylabel("modelled cycles / access")
        ax_c.set_title("%s: modelled cost (x = vs native)" % workload, fontsize=10,
                       loc="left", fontweight="bold")
        # 2. memory references per page walk
        rpw = [_mean(rows, lambda r: r["refs_per_walk"]) for _, rows in bars]
        ax_r.bar(xs, rpw, color="#3182bd", width=0.7)
        for x, v in zip(xs, rpw):
            ax_r.text(x, v, "%.1f" % v, ha="center", va="bottom", fontsize=8)
        ax_r.axhline(24, color="#a50f15", lw=0.8, ls="--", label="24: a cold 4x4 2-D walk")
        ax_r.axhline(4, color="#636363", lw=0.8, ls=":", label="4: a cold 4-level walk")
        ax_r.legend(fontsize=7, loc="upper left", frameon=False, ncol=2)
        ax_r.set_ylim(0, max(33, max(rpw) * 1.2 if rpw else 33))
        ax_r.set_ylabel("memory refs / walk")
        ax_r.set_title("refs per TLB-miss walk", fontsize=10, loc="left")
        # 3. exits per 1,000 accesses, stacked by reason
        bottom = [0.0] * len(bars)
        for i, reason in enumerate(reasons):
            vals = [_mean(rows, lambda r: 1000 * _ratio(r["exits_by_reason"].get(reason, 0),
                                                        r["accesses"])) for _, rows in bars]
            if not any(vals):
                continue
            ax_e.bar(xs, vals, bottom=bottom, width=0.7, label=reason,
                     color=_REASON_COLORS.get(reason, _OTHER_COLORS[i % len(_OTHER_COLORS)]))
            bottom = [b + v for b, v in zip(bottom, vals)]
        etop = max(bottom) if bottom and max(bottom) > 0 else 1.0
        for x, v in zip(xs, bottom):
            ax_e.text(x, v + etop * 0.02, "%.1f" % v, ha="center", va="bottom", fontsize=8)
        ax_e.set_ylim(0, etop * 1.45)
        ax_e.set_ylabel("exits / 1,000 accesses")
        ax_e.set_title("VM exits by reason", fontsize=10, loc="left")
        if any(bottom):
            ax_e.legend(fontsize=7, loc="upper left", frameon=False, ncol=4)
        for ax in (ax_c, ax_r, ax_e):
            ax.set_xticks(xs)
            ax.set_xticklabels(names, fontsize=8)
            ax.spines["top"].set_visible(False)
            ax.spines["right"].set_visible(False)
            ax.set_xlim(-0.6, len(xs) - 0.4)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(COMPONENTS), frameon=False,
               fontsize=9, bbox_to_anchor=(0.5, 1.0))
    acc = sorted({r["accesses"] for r in result.rows})
    fig.suptitle("ptemu study: %s accesses per cell%s; modelled cycles are a model "
                 "(cost model: %s)" % ("/".join("{:,}".format(a) for a in acc),
                                       ", mean of %d seeds" % nseeds if nseeds > 1 else "",
                                       result.cost_model.source),
                 y=0.995 - 0.35 / fig.get_figheight(), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / fig.get_figheight()))
    # tight_layout leaves the panels 1.4 in below the top whatever the height,
    # a gap that splits a one-workload figure's legend from its panels: the
    # legend and the title need 0.95 in.
    fig.subplots_adjust(top=1 - 0.95 / fig.get_figheight())
    return fig
