"""`ptemu study` (issue 9): the grid, the counts, the cost model, the outputs,
the executors and bad input.

The counts a row carries must be the machine's own (its public counters,
read the same way a user would), exits_by_reason must add up, and the
guest must not see the mode: the true faults its kernel handles are the
same under every mode (issue 4's invisibility, seen through the study).
Refs per walk are checked against the 2-D walk arithmetic of Bhargava et
al. (ASPLOS'08) and SDM Vol. 3C 29.3: an n-level guest walk on an m-level
EPT reads at most (n+1)(m+1)-1 entries, and the same TLB misses on a
5-level EPT cost one more reference per EPT walk than on a 4-level one.
"""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ptemu import Hypervisor, Tlb
from ptemu.cli import main
from ptemu.guest import NativeMachine, Kernel
from ptemu import study
from ptemu.study import (CostModel, StudyError, run_study, run_cell, grid, load_config,
                         write_atomic, MODES, ROW_FIELDS, COMPONENTS)
from ptemu.workloads import (make_workload, check_workload, parse_workload_name,
                             guest_memory_hint, MmapChurnWorkload, TlbMissWorkload, WORKLOADS)
from ptemu import InvalidInput

SMALL = {"context-switch": {"processes": 2, "working_set": 16, "slice_len": 500,
                            "hot_pages": 4},
         "fork": {"working_set": 16, "child_accesses": 500, "parent_accesses": 200,
                  "child_touch": 4},
         "mmap-churn": {"processes": 2, "working_set": 8, "round_accesses": 300},
         "tlb-miss": {"working_set": 512, "slice_len": 1000}}
ACC = 3000


def small_config(**study_kw):
    st = {"workloads": list(SMALL), "accesses": ACC, "seeds": [7]}
    st.update(study_kw)
    return {"study": st, "workload": {k: dict(v) for k, v in SMALL.items()}}


@pytest.fixture(scope="module")
def serial():
    return run_study(small_config(), jobs=1, progress=False)


def strip(rows):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


# ---------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------
def test_registry_names_and_parameters():
    assert set(WORKLOADS) == {"context-switch", "fork", "mmap-churn", "tlb-miss"}
    w = make_workload("context-switch", accesses=2000, seed=1, processes=3, working_set=20)
    assert (w.total, w.nproc) == (2000, 3) and w.layout[1][1] == 20 * 4096
    with pytest.raises(InvalidInput, match="unknown parameter 'bogus'"):
        check_workload("tlb-miss", bogus=1)
    with pytest.raises(InvalidInput, match="must not be negative"):
        check_workload("mmap-churn", working_set=-1)
    with pytest.raises(InvalidInput, match="integer"):
        check_workload("tlb-miss", working_set=1.5)
    with pytest.raises(InvalidInput, match="unknown parameter 'processes'"):
        check_workload("fork", processes=2)         # fork has no process count
    with pytest.raises(InvalidInput, match="unknown workload 'nope'"):
        check_workload("nope")


def test_trace_names_parse():
    assert parse_workload_name("trace:/tmp/a b.npz") == ("trace", "/tmp/a b.npz")
    assert parse_workload_name("trace:rel/x.txt") == ("trace", "rel/x.txt")
    assert parse_workload_name("tlb-miss") == ("builtin", "tlb-miss")
    with pytest.raises(InvalidInput, match="needs a path"):
        parse_workload_name("trace:")
    check_workload("trace:/nonexistent/x.ptrace", accesses=10, seed=3)   # names only
    with pytest.raises(InvalidInput, match="unknown parameter 'working_set'"):
        check_workload("trace:/nonexistent/x.ptrace", working_set=3)


def test_new_workloads_deterministic_and_shaped():
    a = MmapChurnWorkload(total=5000, nproc=2, region_pages=8, round_accesses=500, seed=3)
    b = MmapChurnWorkload(total=5000, nproc=2, region_pages=8, round_accesses=500, seed=3)
    assert len(a.rounds) == 10 and all((x == y).all() for x, y in zip(a.rounds, b.rounds))
    m = NativeMachine(guest_memory_hint(a))
    k = Kernel(m)
    r = a.run(k)
    assert r.accesses == 5000
    assert k.stats["mmap"] == k.stats["munmap"] == 10
    # munmap of a region of <= 33 present pages: one INVLPG per present page.
    assert k.stats["invlpg"] >= 10 and k.stats["tlb_flush"] == 0
    t = TlbMissWorkload(total=4000, working_set=256, seed=1)
    first = t.traces[0][:256]
    assert (first["access"] == 1).all() and len(np.unique(first["va"] >> 12)) == 256
    rest = t.traces[0][256:]
    # no locality: consecutive accesses rarely share a page
    same = np.mean((rest["va"][1:] >> 12) == (rest["va"][:-1] >> 12))
    assert same < 0.05
    m = NativeMachine(guest_memory_hint(t))
    k = Kernel(m)
    t.run(k)
    # the first touch of each heap page, and at most one per text page
    assert 256 <= k.stats["page_fault"] <= 256 + 4
    assert k.stats["pte_write"] <= k.stats["page_fault"] + 8       # and the tables it built


# ---------------------------------------------------------------------------
# Rows: the machine's own counters
# ---------------------------------------------------------------------------
def test_rows_have_the_contract_fields(serial):
    assert len(serial.rows) == len(SMALL) * len(MODES)
    for r in serial.rows:
        assert tuple(r) == ROW_FIELDS
        assert sum(r["exits_by_reason"].values()) == r["exits"]
        assert set(r["modelled_cycles_by_component"]) == set(COMPONENTS)
        assert r["modelled_cycles"] == pytest.approx(sum(
            r["modelled_cycles_by_component"].values()))
        assert r["tlb_misses"] <= r["tlb_lookups"] and r["walks"] >= r["tlb_misses"]
        assert r["refs_per_walk"] == pytest.approx(r["walk_refs"] / r["walks"])
        assert r["overhead_vs_native"] == pytest.approx(
            r["modelled_cycles"] / next(n["modelled_cycles"] for n in serial.rows
                                        if n["mode"] == "native"
                                        and n["workload"] == r["workload"]))


def test_modes_differ_where_they_must(serial):
    by = {(r["workload"], r["mode"]): r for r in serial.rows}
    for w in SMALL:
        faults = {by[w, m]["guest_page_faults"] for m in MODES}
        assert len(faults) == 1 and faults.pop() > 0      # the guest cannot tell
        assert by[w, "native"]["exits"] == 0 and by[w, "native"]["shadow_pages_peak"] == 0
        assert set(by[w, "nested"]["exits_by_reason"]) <= {"ept_violation", "ept_misconfig"}
        assert by[w, "nested"]["shadow_pages_peak"] == 0
        assert by[w, "shadow"]["shadow_pages_peak"] > 0
        assert by[w, "shadow"]["exits_by_reason"]["page_fault"] > 0
        assert by[w, "shadow"]["exits_by_reason"].get("hypercall", 0) == 0
        assert by[w, "paravirt"]["exits_by_reason"]["hypercall"] > 0
        # 4-level guest: at most 4 references per 1-D walk; at most 24 per 2-D walk
        for m in ("native", "shadow", "unsync", "paravirt"):
            assert 1 <= by[w, m]["refs_per_walk"] <= 4
        assert 4 < by[w, "nested"]["refs_per_walk"] <= 24
        assert by[w, "nested"]["modelled_cycles_by_component"]["hypercalls"] == 0


def test_row_counts_equal_a_direct_run():
    """The study reads what the machine says: the same machine built and run
    by hand through the public API gives the same numbers."""
    cell = grid(load_config(small_config(workloads=["mmap-churn"], modes=["shadow"])))[0]
    counts = run_cell(cell)
    w = make_workload("mmap-churn", accesses=ACC, seed=7, **SMALL["mmap-churn"])
    mem = guest_memory_hint(w)
    tlb = Tlb.default()
    vm = Hypervisor(2 * mem + (16 << 20)).create_vm(mem, paging="shadow", tlb=tlb)
    k = Kernel(vm)
    st0, pf0, t0 = dict(vm.stats), k.stats["page_fault"], tlb.stats
    r = w.run(k)
    st, t = vm.stats, tlb.stats
    assert counts["accesses"] == r.accesses == ACC
    assert counts["exits"] == st["exits"] - st0["exits"]
    assert counts["exits_by_reason"]["invlpg"] == st["exit_invlpg"] - st0["exit_invlpg"] > 0
    assert counts["guest_page_faults"] == k.stats["page_fault"] - pf0
    assert counts["walks"] == t.walks - t0.walks
    assert counts["walk_refs"] == t.walk_refs - t0.walk_refs
    assert counts["tlb_lookups"] == t.lookups - t0.lookups
    assert counts["shadow_pages_peak"] == st["shadow_pages_peak"]


def test_two_d_walk_arithmetic_and_psc():
    """Bhargava et al. / SDM 29.3: without paging-structure caches a 4-level
    guest walk on a 4-level EPT reads at most 24 entries; on a 5-level EPT
    the same TLB misses (identical walk counts) each read one more entry
    per EPT walk, at most 29; the caches cut the references per walk."""
    cfg = small_config(workloads=["tlb-miss"], modes=["nested"])
    cfg["knobs"] = {"ept_levels": [4, 5], "tlb": ["nopsc", "default"]}
    cfg["tlb"] = {"nopsc": {"arrays": [{"name": "tlb", "tier": 1, "kind": "unified",
                                        "sizes": ["4K", "2M", "1G"], "entries": 64,
                                        "ways": 4}]}}
    res = run_study(cfg, jobs=1, progress=False)
    by = {(r["ept_levels"], r["tlb"]): r for r in res.rows}
    e4, e5 = by[4, "nopsc"], by[5, "nopsc"]
    assert e4["walks"] == e5["walks"] and e4["tlb_lookups"] == e5["tlb_lookups"]
    assert 19 <= e4["refs_per_walk"] <= 24       # 2 MiB direct-map leaves: 3 + 3*4 + 4 = 19
    assert e4["refs_per_walk"] > 20               # mostly cold 4 KiB user walks
    assert e5["refs_per_walk"] <= 29
    # one more EPT reference for each of the (guest entries + 1) EPT walks
    # of a walk: between 1 and 5 more per walk
    extra = (e5["walk_refs"] - e4["walk_refs"]) / e4["walks"]
    assert 4 <= extra <= 5
    assert by[4, "default"]["refs_per_walk"] < e4["refs_per_walk"] / 1.5   # PSCs cut it


# ---------------------------------------------------------------------------
# Determinism and executors
# ---------------------------------------------------------------------------
def test_same_rows_whatever_the_jobs(serial):
    par = run_study(small_config(), jobs=2, progress=False)
    assert strip(par.rows) == strip(serial.rows)
    again = run_study(small_config(), jobs=1, progress=False)
    assert strip(again.rows) == strip(serial.rows)
    other_seed = run_study(small_config(seeds=[8]), jobs=1, progress=False)
    assert strip(other_seed.rows) != strip(serial.rows)


def test_cells_are_plain_data():
    import pickle
    for cell in grid(load_config(small_config())):
        assert json.loads(json.dumps(cell)) == cell
        pickle.dumps(cell)
    c = run_cell(grid(load_config(small_config(workloads=["fork"], modes=["nested"])))[0])
    assert json.loads(json.dumps(c)) == c


def test_grid_order_and_dedup():
    cfg = small_config(workloads=["fork"], seeds=[1, 2])
    cfg["knobs"] = {"ept_levels": [4, 5]}
    cells = grid(load_config(cfg))
    # nested twice (EPT 4 and 5) and every other mode once, per seed
    assert len(cells) == 2 * (len(MODES) + 1)
    assert [c["mode"] for c in cells[:5]] == list(MODES)
    assert {c["ept_levels"] for c in cells if c["mode"] != "nested"} == {None}


# ---------------------------------------------------------------------------
# The cost model
# ---------------------------------------------------------------------------
def test_cost_model_arithmetic():
    cm = CostModel({"tlb_hit": 2, "walk_ref": 10, "exit": 100, "guest_fault": 50,
                    "hypercall": 300, "exit_handling": {"page_fault": 20, "invlpg": 5}})
    counts = {"tlb_lookups": 1000, "walk_refs": 40, "guest_page_faults": 3,
              "exits_by_reason": {"page_fault": 4, "invlpg": 2, "cr3_write": 1,
                                  "hypercall": 5}}
    total, by = cm.price(counts)
    cr3 = study.DEFAULT_COSTS["exit_handling"]["cr3_write"]
    assert by == {"tlb": 2000, "walks": 400, "exits": 4 * 120 + 2 * 105 + (100 + cr3),
                  "guest_faults": 150, "hypercalls": 1500}
    assert total == sum(by.values())


def test_cost_model_defaults_and_overrides(tmp_path):
    assert CostModel().to_dict() == study.DEFAULT_COSTS
    f = tmp_path / "c.toml"
    f.write_text("exit = 500\n[exit_handling]\nept_violation = 7\n")
    cm = CostModel.load(str(f))
    assert cm.costs["exit"] == 500 and cm.exit_handling["ept_violation"] == 7
    assert cm.costs["walk_ref"] == study.DEFAULT_COSTS["walk_ref"]
    for text, msg in (("exitt = 1\n", "unknown name 'exitt'"),
                      ("[exit_handling]\nhypercall = 1\n", "unknown exit reason"),
                      ("exit = -1\n", "must not be negative"),
                      ("exit = 'x'\n", "must be a number"),
                      ("exit = \n", "malformed TOML")):
        f.write_text(text)
        with pytest.raises(StudyError, match=msg):
            CostModel.load(str(f))


def test_cost_model_changes_cycles_not_counts(serial):
    cheap = run_study(small_config(), jobs=1, progress=False, cost_model={"exit": 0})
    for a, b in zip(serial.rows, cheap.rows):
        for k in ("exits", "walks", "walk_refs", "guest_page_faults", "tlb_lookups"):
            assert a[k] == b[k]
        if a["exits"]:
            assert b["modelled_cycles"] < a["modelled_cycles"]
    assert cheap.to_dict()["cost_model"]["exit"] == 0


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------
def test_json_csv_table(serial, tmp_path):
    d = json.loads(serial.to_json(tmp_path / "r.json"))
    assert set(d) == {"ptemu_version", "config", "cost_model", "rows"}
    assert d["rows"] == serial.rows and json.loads((tmp_path / "r.json").read_text()) == d
    assert d["config"]["accesses"] == ACC and d["config"]["seeds"] == [7]
    text = serial.to_csv(tmp_path / "r.csv")
    lines = text.splitlines()
    assert len(lines) == 1 + len(serial.rows)
    head = lines[0].split(",")
    assert head[:3] == ["workload", "mode", "accesses"] and "exits_page_fault" in head
    assert "cycles_walks" in head and (tmp_path / "r.csv").read_text() == text
    table = serial.table()
    assert table.splitlines()[0].split()[:3] == ["workload", "mode", "accesses"]
    assert len(table.splitlines()) == 1 + len(serial.rows)


def test_plot_png(serial, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image
    p = tmp_path / "s.png"
    serial.plot(p)
    img = matplotlib.image.imread(str(p))
    assert img.shape[0] > 1000 and img.shape[1] > 1500     # four workloads, three panels
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".part")]


def test_plot_panels_sit_under_the_legend_at_any_height(serial):
    """The figure's header (component legend, title) is a fixed strip: the
    panels' titles start within an inch of the top for one workload as for
    four (a one-workload figure had 1.2 in of blank between them)."""
    pytest.importorskip("matplotlib")
    one = study.StudyResult([r for r in serial.rows if r["workload"] == "fork"],
                            serial.config, serial.cost_model)
    for res in (one, serial):
        fig = study._figure(res)
        renderer = fig.canvas.get_renderer()
        height = fig.get_figheight()
        titles_top = max(ax.get_tightbbox(renderer).y1 for ax in fig.axes) / fig.dpi
        header = min(t.get_window_extent(renderer).y0 for t in
                     [fig._suptitle] + list(fig.legends)) / fig.dpi
        assert 0 < header - titles_top and height - titles_top < 1.0, (height, titles_top)


def test_write_atomic_leaves_no_partial_file(tmp_path):
    p = tmp_path / "out.json"
    write_atomic(p, "old")

    def boom(fh):
        fh.write(b"half a file")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_atomic(p, boom)
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]


def test_progress_only_when_asked(capsys):
    pytest.importorskip("tqdm")
    run_study(small_config(workloads=["fork"], modes=["native"]), jobs=1, progress=False)
    assert capsys.readouterr().err == ""
    run_study(small_config(workloads=["fork"], modes=["native"]), jobs=1, progress=True)
    err = capsys.readouterr()
    assert "study" in err.err and "1/1" in err.err and err.out == ""


def test_progress_inside_cells_run_by_worker_processes(monkeypatch):
    """Long cells run in worker processes report their accesses to the parent,
    whose second bar ("accesses") counts every one of them."""
    import multiprocessing
    if multiprocessing.get_start_method() != "fork":
        pytest.skip("needs forked workers to inherit the patched threshold")
    bars = []

    class Bar:
        def __init__(self, show=True, **kw):
            self.show, self.kw, self.n, self.closed = show, kw, 0, False
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def set_postfix_str(self, s):
            pass

        def close(self):
            self.closed = True

    monkeypatch.setattr(study, "_LONG_CELL", 1000)
    monkeypatch.setattr(study, "progress_bar", Bar)
    cfg = small_config(workloads=["fork"], modes=["native", "shadow"])
    res = run_study(cfg, jobs=2, progress=True)
    by_desc = {b.kw.get("desc"): b for b in bars if b.show}
    total = sum(r["accesses"] for r in res.rows)
    assert by_desc["study"].n == 2
    assert by_desc["accesses"].kw["total"] == 2 * ACC
    assert by_desc["accesses"].n == total and by_desc["accesses"].closed
    # Progress changes no count.
    assert [r["exits"] for r in res.rows] == \
        [r["exits"] for r in run_study(cfg, jobs=1, progress=False).rows]


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------
def _has(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


def run_cli(*args):
    out, err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        rc = main(list(args))
    finally:
        sys.stdout, sys.stderr = old
    return rc, out.getvalue(), err.getvalue()


def test_cli_study_writes_everything(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text('[study]\nworkloads = ["mmap-churn"]\naccesses = 2000\n'
                   '[workload.mmap-churn]\nworking_set = 4\nround_accesses = 250\n')
    plot = ["--plot", str(tmp_path / "r.png")] if _has("matplotlib") else []
    rc, out, err = run_cli("study", str(cfg), "--modes", "native,nested", "--jobs", "1",
                           "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv"),
                           *plot)
    assert rc == 0 and err == ""        # stderr is no terminal here: no progress
    assert out.splitlines()[0].startswith("workload") and len(out.splitlines()) == 3
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["native", "nested"]
    assert rows[0]["params"] == {"working_set": 4, "round_accesses": 250}
    if plot:
        assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the command line overrides the file
    rc, out, _ = run_cli("study", str(cfg), "--modes", "shadow", "--accesses", "1000",
                         "--seed", "3", "--quiet", "--jobs", "1")
    assert rc == 0 and "shadow" in out and " 1000 " in out


@pytest.mark.parametrize("args, msg", [
    (["--workload", "nope"], "unknown workload 'nope'"),
    (["--modes", "native,bogus"], "unknown mode 'bogus'"),
    (["--accesses", "-1"], "must not be negative"),
    (["--seed", "-3"], "must not be negative"),
    (["--accesses", "0"], "accesses must be at least 1"),
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--scheduler", "localhost:1"], "not of the form tcp://HOST:PORT"),
    (["/nonexistent/study.toml"], "no such file"),
    (["--json", "/nonexistent/dir/r.json"], "no directory"),
    (["--csv", "/"], "is a directory"),
])
def test_cli_bad_input(args, msg):
    rc, out, err = run_cli("study", "--quiet", *args)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("ptemu: error:") and msg in err


@pytest.mark.parametrize("config, msg", [
    ("[study\n", "malformed TOML"),
    ("[study]\nbogus = 1\n", "unknown key study.bogus"),
    ("[study]\naccesses = -5\n", "must not be negative"),
    ("[study]\nmodes = ['native', 'turbo']\n", "unknown mode 'turbo'"),
    ("[study]\nworkloads = ['tlb-miss']\n[workload.tlb-miss]\nwset = 3\n",
     "unknown parameter 'wset'"),
    ("[study]\nworkloads = ['tlb-miss']\n[workload.tlb-miss]\nworking_set = -3\n",
     "must not be negative"),
    ("[knobs]\nept_levels = [6]\n", "ept_levels: 6 is not 4 or 5"),
    ("[knobs]\ntlb = ['huge']\n", "unknown TLB 'huge'"),
    ("[tlb.t]\narrays = [{name='a', tier=1, kind='data', sizes=['4K'], entries=3, ways=2}]\n"
     "[knobs]\ntlb = ['t']\n", "tlb.t"),
    ("[cost_model]\nwalk_reff = 3\n", "unknown name 'walk_reff'"),
    ("[cost_model]\n[cost_model.exit_handling]\nteleport = 3\n", "unknown exit reason"),
    ("[study]\ncost_model = 'missing.toml'\n", "no such file"),
    ("[oops]\n", "unknown table 'oops'"),
])
def test_cli_bad_config(tmp_path, config, msg):
    f = tmp_path / "s.toml"
    f.write_text(config)
    rc, out, err = run_cli("study", str(f), "--quiet")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and msg in err, err


def test_cli_no_traceback_in_a_subprocess(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("exit = [\n")
    p = subprocess.run([sys.executable, "-m", "ptemu.cli", "study", "--cost-model", str(f),
                        "--workload", "fork", "--accesses", "100"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and "malformed TOML" in p.stderr


@pytest.mark.parametrize("module, option, extra", [("matplotlib", "--plot", "plot"),
                                                   ("distributed", "--scheduler", "dask")])
def test_cli_missing_extra_is_one_line(monkeypatch, tmp_path, module, option, extra):
    monkeypatch.setitem(sys.modules, module, None)       # import fails as if not installed
    value = str(tmp_path / "x.png") if option == "--plot" else "tcp://127.0.0.1:1"
    rc, out, err = run_cli("study", "--workload", "fork", "--accesses", "10", "--quiet",
                           option, value)
    assert rc == 1 and out == "" and err.count("\n") == 1
    assert 'pip install "ptemu[%s]"' % extra in err
    assert not list(tmp_path.iterdir())


def test_guest_levels_5_runs_a_5_level_guest_in_every_mode():
    """knobs.guest_levels = [4, 5]: the same workload on a 4-level and a
    5-level guest kernel (CR4.LA57, SDM 4.5), every mode, with no
    paging-structure caches.  The guest cannot tell: the same accesses and
    guest page faults at either depth and in every mode.  A 1-D walk reads
    at most one more entry (the PML5E: at most 5); a 2-D walk of a 5-level
    guest reads at most (5+1)(m+1)-1 = 29 on a 4-level EPT and 35 on a
    5-level one, and the fifth guest level costs up to m+1 more references
    per walk (the entry and its EPT walk)."""
    cfg = small_config(workloads=["tlb-miss"])
    cfg["knobs"] = {"guest_levels": [4, 5], "ept_levels": [4, 5], "tlb": ["nopsc"]}
    cfg["tlb"] = {"nopsc": {"arrays": [{"name": "tlb", "tier": 1, "kind": "unified",
                                        "sizes": ["4K", "2M", "1G"], "entries": 64,
                                        "ways": 4}]}}
    res = run_study(cfg, jobs=1, progress=False)
    by = {(r["mode"], r["guest_levels"], r["ept_levels"]): r for r in res.rows}
    assert len(by) == len(res.rows) == 2 * (len(MODES) + 1)
    assert res.config.guest_levels == [4, 5]
    seen = {(r["accesses"], r["guest_page_faults"]) for r in res.rows}
    assert len(seen) == 1 and seen.pop()[1] > 0
    for mode in ("native", "shadow", "unsync", "paravirt"):
        r4, r5 = by[mode, 4, None], by[mode, 5, None]
        assert 1 <= r5["refs_per_walk"] <= 5 and r4["refs_per_walk"] <= 4
        assert abs(r5["walks"] - r4["walks"]) <= 0.01 * r4["walks"]
    n4, n5 = by["native", 4, None], by["native", 5, None]
    assert n4["walks"] == n5["walks"]
    # native: each walk reads the PML5E first, then what the 4-level one reads
    assert 0.99 * n5["walks"] <= n5["walk_refs"] - n4["walk_refs"] <= n5["walks"]
    for el, top in ((4, 29), (5, 35)):
        r4, r5 = by["nested", 4, el], by["nested", 5, el]
        assert r4["refs_per_walk"] <= (4 + 1) * (el + 1) - 1 < r5["refs_per_walk"] <= top
        extra = r5["refs_per_walk"] - r4["refs_per_walk"]
        assert 0.9 * (el + 1) <= extra <= el + 1


def test_guest_levels_must_be_4_or_5():
    cfg = small_config(workloads=["fork"])
    cfg["knobs"] = {"guest_levels": [3]}
    with pytest.raises(StudyError, match="guest_levels: 3 is not 4 or 5"):
        load_config(cfg)


def test_progress_on_a_terminal_and_not_with_quiet(tmp_path):
    """tqdm on stderr when stderr is a terminal (a pty here); --quiet turns
    it off; stdout carries the table either way."""
    pytest.importorskip("tqdm")
    from ptyrun import run_on_a_pty
    for quiet in (False, True):
        p, err = run_on_a_pty([sys.executable, "-m", "ptemu.cli", "study", "--workload", "fork",
                               "--modes", "native,nested", "--accesses", "2000", "--jobs", "1"]
                              + (["--quiet"] if quiet else []))
        assert p.returncode == 0 and p.stdout.decode().startswith("workload")
        if quiet:
            assert err == b""
        else:
            assert b"study" in err and b"2/2" in err


def test_trace_workload_runs_in_every_mode(tmp_path):
    """trace:PATH through the study: every mode replays the same records and
    the guest sees the same faults."""
    import ptemu.workloads as wl
    rng = np.random.default_rng(5)
    t = np.zeros(3000, dtype=wl.TRACE_DTYPE)
    t["va"] = 0x10000000 + rng.integers(0, 64, 3000).astype(np.uint64) * 4096
    t["access"] = rng.integers(0, 2, 3000)
    t["user"] = True
    wl.write_trace(tmp_path / "t.npz", t)
    res = run_study({"study": {"workloads": ["trace:%s" % (tmp_path / "t.npz")],
                               "accesses": 3000, "modes": ["native", "shadow", "nested"]}},
                    jobs=1, progress=False)
    assert [r["accesses"] for r in res.rows] == [3000] * 3
    assert len({r["guest_page_faults"] for r in res.rows}) == 1


def test_example_cost_model_is_the_default():
    here = os.path.join(os.path.dirname(__file__), "..", "examples", "study-costs.toml")
    assert CostModel.load(here).to_dict() == study.DEFAULT_COSTS
    knobs = os.path.join(os.path.dirname(__file__), "..", "examples", "study-knobs.toml")
    cfg = load_config(knobs)
    assert cfg.ept_levels == [4, 5] and cfg.tlbs == ["default", "nopsc"]


def _die(cell, *args):
    os._exit(3)


def test_a_dead_worker_is_one_error(monkeypatch):
    import multiprocessing
    if multiprocessing.get_start_method() != "fork":
        pytest.skip("needs forked workers to inherit the patched run_cell")
    monkeypatch.setattr(study, "run_cell", _die)
    with pytest.raises(study.StudyRunError, match="worker process died"):
        run_study(small_config(workloads=["fork"], modes=["native", "nested"]), jobs=2,
                  progress=False)


# ---------------------------------------------------------------------------
# The docs show what the command prints
# ---------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table_block(path):
    text = open(os.path.join(ROOT, path)).read()
    at = text.index("```\nworkload ")
    return text[at + 4:text.index("\n```\n", at + 4)].splitlines()


def test_docs_study_table_is_the_command_s_table_of_the_saved_result(serial):
    """docs/study.md's real study and README's excerpt of it are what
    `ptemu study` prints for docs/study-results.json (every column, in the
    command's format), so a change of the table cannot leave the docs behind."""
    saved = json.load(open(os.path.join(ROOT, "docs", "study-results.json")))
    assert saved["config"]["accesses"] == 1_000_000 and saved["config"]["seeds"] == [0]
    printed = study.StudyResult(saved["rows"], saved["config"], saved["cost_model"]).table()
    printed = printed.splitlines()
    assert _table_block("docs/study.md") == printed
    excerpt, pos = _table_block("README.md"), 0
    assert excerpt[0] == printed[0] and len(excerpt) > 2
    for line in excerpt[1:]:
        pos = printed.index(line, pos) + 1          # ValueError: not printed, or not in order
    assert serial.table().split("\n")[0].split() == printed[0].split()   # a live run: same columns
