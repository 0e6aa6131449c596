"""The MLflow store is unavailable: a server that is down (nothing listens on its port) for a
whole run, and a SQLite store that another process keeps exclusively locked for longer than
the retry budget. Training finishes either way, every call is spooled in the run folder,
and every metric, the tags and the final status reach the store once it answers (during
the run, or through `mow sync-mlflow`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from faultkit import in_tmp, mow_cli, storm_args, storm_run  # noqa: F401 - fixture
from stores import mlflow_run, store, store_template  # noqa: F401 - fixtures


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: connections are refused


def test_store_down_for_a_whole_run_loses_no_metric_and_sync_delivers_them(tmp_path, store, monkeypatch):
    sqlite_uri = os.environ["MLFLOW_TRACKING_URI"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_dead_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own HTTP retries: minutes
    monkeypatch.setenv("MOW_MLFLOW_RETRY_SECONDS", "0")
    code, out, err = mow_cli(storm_args(extra=["--runs-root", "runs"]))
    assert code == 0, err
    run = storm_run(tmp_path / "runs")
    assert "training goes on" in err and "mow sync-mlflow" in err
    assert (run / "mlflow_spool.jsonl").is_file() and (run / "model.ckpt").is_file()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)  # the store is back
    code, out, err = mow_cli(["sync-mlflow", "runs"])
    assert code == 0, err
    assert not (run / "mlflow_spool.jsonl").exists()
    client, mlrun = mlflow_run("storm/chase/seed1")
    assert mlrun.info.status == "FINISHED" and "mow.checkpoint_sha256" in mlrun.data.tags
    assert mlrun.data.params["train.env_steps"] == "60"
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        step = row.pop("step")
        for key, value in row.items():
            history = {(m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, key)}
            assert (step, value) in history, (key, step)
    assert mow_cli(["sync-mlflow", "runs"])[1].strip() == "no spooled MLflow calls"


# Another process takes SQLite's exclusive lock (readers are locked out too) and keeps it
# until the file named by argv[2] exists.
_LOCK_HOLDER = """
import pathlib, sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN EXCLUSIVE")
start = time.monotonic()
print("locked", flush=True)
while not pathlib.Path(sys.argv[2]).exists() and time.monotonic() - start < 900:
    time.sleep(0.05)
con.execute("ROLLBACK")
print(f"held {time.monotonic() - start:.2f}", flush=True)
"""


def test_sqlite_store_locked_beyond_the_retry_budget_training_goes_on_and_every_metric_arrives(
        tmp_path, store, monkeypatch):
    """The store is locked from the start until the run has spooled its calls; the run keeps
    training, and once the lock is gone the next metric flush replays the spool in order."""
    monkeypatch.setenv("MOW_MLFLOW_RETRY_SECONDS", "0.5")  # each attempt still waits out sqlite's own busy timeout
    monkeypatch.setenv("MOW_MLFLOW_RECONNECT_SECONDS", "0")  # try again at every flush
    run = storm_run(tmp_path / "runs")
    holder = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(store), str(run / "mlflow_spool.jsonl")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = mow_cli(storm_args(extra=["--runs-root", "runs", "--no-eval"]))
        held = float(holder.stdout.readline().split()[1])
    finally:
        holder.kill()
        holder.wait()
    assert code == 0, err
    assert held > 0.5  # the lock outlasted the retry budget: the calls were spooled, not waited for
    assert "database is locked" in err and "training goes on" in err, err
    assert "answers again" in err, err  # replayed during the run, not only by `mow sync-mlflow`
    assert (run / "model.ckpt").is_file() and not (run / "mlflow_spool.jsonl").exists()
    client, mlrun = mlflow_run("storm/chase/seed1")
    assert mlrun.info.status == "FINISHED" and mlrun.data.params["train.env_steps"] == "60"
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        step = row.pop("step")
        for key, value in row.items():
            history = [(m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, key)]
            assert history.count((step, value)) == 1, (key, step, history)  # once: nothing lost, nothing doubled
