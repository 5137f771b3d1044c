"""`ptemu study --scheduler` (issue 9): cells sent to a real Dask cluster
(distributed.LocalCluster with two worker processes) come back as the same
rows a local run gives -- the cells travel as plain dicts, each worker builds
its own machines, and only wall_s may differ."""
import pytest

distributed = pytest.importorskip("distributed")

from ptemu.study import run_study  # noqa: E402

CONFIG = {"study": {"workloads": ["context-switch", "mmap-churn"], "accesses": 2000,
                    "seeds": [11], "modes": ["native", "shadow", "paravirt", "nested"]},
          "workload": {"context-switch": {"processes": 2, "working_set": 8, "slice_len": 400,
                                          "hot_pages": 4},
                       "mmap-churn": {"working_set": 4, "round_accesses": 200}}}


def strip(rows):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def test_dask_rows_equal_local_rows():
    local = run_study(CONFIG, jobs=1, progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, silence_logs=50) as cluster:
        remote = run_study(CONFIG, scheduler=cluster.scheduler_address, progress=False)
        with distributed.Client(cluster) as client:
            # the cluster ran with its two worker processes
            assert len(client.scheduler_info()["workers"]) == 2
    assert strip(remote.rows) == strip(local.rows)
    assert [r["mode"] for r in remote.rows[:4]] == ["native", "shadow", "paravirt", "nested"]
