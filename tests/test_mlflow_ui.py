"""`mlflow server` (what `mlflow ui` runs) serves what the pipeline's Tracker wrote.

A small SQLite store is filled through mow.tracking.Tracker exactly as a training job fills
it (a parent run per method/variant, one child run per task/seed with metric histories);
then the venv's `mlflow server` is started on a free localhost port against that store and
its REST API is asked for the experiment, the parent and child runs and the histories.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

MLFLOW = Path(sys.executable).parent / "mlflow"
STEPS = (100, 200, 300, 400)
TASKS = ("side", "chase")
READY_TIMEOUT = 90.0  # seconds: the server imports MLflow and checks the store's schema first


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fill_store(work: Path) -> dict[str, str]:
    """One parent (storm/full) and two child runs with histories, as `mow train` writes them."""
    from mow.tracking import Tracker

    run_ids = {}
    for seed, task in enumerate(TASKS, start=1):
        run_dir = work / "runs" / task / f"seed{seed}"
        run_dir.mkdir(parents=True)
        tracker = Tracker(run_dir, suite="sanity", method="storm", variant="full", task=task, seed=seed,
                          protocol="sanity", scale="smoke", params_tree={"train": {"env_steps": 400, "wm_lr": 1e-4},
                                                                         "seeds": [seed]}, params_hash="x")
        for step in STEPS:
            tracker.log({"loss/world_model": 1.0 / step + seed, "return/train": step * 0.01 * seed}, step=step)
        tracker.flush()
        tracker.finish()
        run_ids[task] = tracker.run_id
    return run_ids


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path):
        self.url, self.proc, self.log = url, proc, log

    def get(self, endpoint: str, **query) -> dict:
        with urllib.request.urlopen(f"{self.url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}",
                                    timeout=30) as resp:
            return json.load(resp)

    def post(self, endpoint: str, body: dict) -> dict:
        req = urllib.request.Request(f"{self.url}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.load(resp)


@pytest.fixture
def served_store(tmp_path, monkeypatch):
    """The filled store behind a running `mlflow server`; the server is always stopped."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the Tracker puts a SQLite store's artifacts under ./mlartifacts
    db = work / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    run_ids = _fill_store(work)

    port = _free_port()
    log = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{db}",
                                 "--default-artifact-root", str(tmp_path / "artifacts"),
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                cwd=work, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{server.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not ready after {READY_TIMEOUT:.0f} s: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield server, run_ids
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its workers
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.mark.slow  # ~30 s on 2 busy cores: filling the store and starting the server
def test_server_serves_experiment_runs_and_metric_histories(served_store):
    server, run_ids = served_store
    exp = server.get("experiments/get-by-name", experiment_name="mow-sanity")["experiment"]
    assert exp["name"] == "mow-sanity" and exp["lifecycle_stage"] == "active"

    runs = server.post("runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
    parents = [rid for rid, t in tags.items() if t.get("mow.parent_key") == "storm/full/smoke"]
    assert len(parents) == 1 and len(runs) == 1 + len(TASKS), tags  # one parent, created once
    parent = parents[0]
    assert tags[parent]["mlflow.runName"] == "storm/full"
    children = {rid: t for rid, t in tags.items() if t.get("mlflow.parentRunId") == parent}
    assert set(children) == set(run_ids.values())
    by_id = {r["info"]["run_id"]: r for r in runs}
    for seed, task in enumerate(TASKS, start=1):
        rid = run_ids[task]
        run = by_id[rid]
        assert run["info"]["run_name"] == f"storm/{task}/seed{seed}" and run["info"]["status"] == "FINISHED"
        assert children[rid]["mow.task"] == task and children[rid]["mow.params_hash"] == "x"
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["train.env_steps"] == "400" and params["seeds"] == f"[{seed}]"
        latest = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert latest["return/train"] == pytest.approx(STEPS[-1] * 0.01 * seed)

        history = server.get("metrics/get-history", run_id=rid, metric_key="return/train")["metrics"]
        assert sorted((m["step"], m["value"]) for m in history) == \
            [(s, pytest.approx(s * 0.01 * seed)) for s in STEPS]
        loss = server.get("metrics/get-history", run_id=rid, metric_key="loss/world_model")["metrics"]
        assert sorted(m["step"] for m in loss) == list(STEPS)

    # an unknown experiment is a 404 with MLflow's error code, not a crash
    with pytest.raises(urllib.error.HTTPError) as err:
        server.get("experiments/get-by-name", experiment_name="mow-nope")
    assert err.value.code == 404
