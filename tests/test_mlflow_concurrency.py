"""Parallel jobs writing to one SQLite MLflow store lose nothing.

As in the pipeline, the store, the experiment and the parent run are created once before
the jobs start (mow.tracking_init, the Snakefile's `onstart:`); then 8 processes (separate
interpreters, like Snakemake jobs) start writing at once, each opening its own child run
through mow.tracking.Tracker and logging 500 metric values in batches (Tracker.log +
flush), and every one of the 8 x 500 values must be there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

PROCESSES = 8
METRICS = 500        # values per process: 5 keys x 100 steps
KEYS = ("loss/world_model", "loss/actor", "loss/critic", "return/train", "perf/env_steps_per_s")
STEPS = METRICS // len(KEYS)
FLUSH_EVERY = 25     # steps between flushes: 4 log_batch calls of 125 values per process


def _value(worker: int, key: int, step: int) -> float:
    return worker * 1_000_000 + key * 1_000 + step + 0.5


# One pipeline job's logging, run as its own interpreter (like a Snakemake job). It imports
# only mow.tracking (and MLflow), signals it is ready, and waits for the common start signal.
WORKER = """
import os, sys, time
from pathlib import Path
from mow.tracking import Tracker
import mlflow.tracking, mlflow.entities  # import before the start signal, not during the race

worker, work = int(sys.argv[1]), Path(sys.argv[2])
keys, steps, flush_every = {keys!r}, {steps}, {flush_every}
(work / f"ready{{worker}}").touch()
deadline = time.monotonic() + 180
while not (work / "go").exists():
    if time.monotonic() > deadline:
        sys.exit("no start signal")
    time.sleep(0.02)
run_dir = work / "runs" / f"seed{{worker}}"
run_dir.mkdir(parents=True)
tracker = Tracker(run_dir, suite="atari", method="storm", variant="full", task="Pong", seed=worker,
                  protocol="storm_compat", scale="smoke", params_tree={{"seed": worker}}, params_hash="x")
for step in range(steps):
    tracker.log({{key: worker * 1_000_000 + k * 1_000 + step + 0.5 for k, key in enumerate(keys)}}, step=step)
    if (step + 1) % flush_every == 0:
        tracker.flush()
tracker.finish()
""".format(keys=KEYS, steps=STEPS, flush_every=FLUSH_EVERY)


@pytest.mark.slow  # ~60 s on 2 busy cores, half of it starting 8 interpreters that import MLflow
def test_eight_processes_log_500_metrics_each_into_one_sqlite_store(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from mow.tracking_init import init_tracking

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (parent,) = init_tracking("atari", "smoke", [("storm", "full")]).values()  # once, before the jobs

    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), str(work)], cwd=work, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(PROCESSES)]
    outputs = {}
    try:
        deadline = time.monotonic() + 180
        while not all((work / f"ready{i}").exists() for i in range(PROCESSES)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "workers did not start"
            time.sleep(0.05)
        t0 = time.monotonic()
        (work / "go").touch()  # all 8 write at once from here
        for i, p in enumerate(procs):
            outputs[i] = p.communicate(timeout=240)[0]
        print(f"{PROCESSES} processes x {METRICS} metrics logged in {time.monotonic() - t0:.1f} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert all(p.returncode == 0 for p in procs), {i: out[-2000:] for i, out in outputs.items()}

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mow-atari")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    children = {int(r.data.tags["mow.seed"]): r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}
    assert sorted(children) == list(range(PROCESSES)) and len(runs) == PROCESSES + 1  # no duplicate parent
    total = 0
    for worker, run in children.items():
        assert run.info.status == "FINISHED"
        for k, key in enumerate(KEYS):
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted((m.step, m.value) for m in history) == [(s, _value(worker, k, s)) for s in range(STEPS)], \
                (worker, key)
            total += len(history)
        mirrored = (work / "runs" / f"seed{worker}" / "metrics.jsonl").read_text().splitlines()
        assert len(mirrored) == STEPS
    assert total == PROCESSES * METRICS
