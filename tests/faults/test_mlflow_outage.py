"""The MLflow store is down (nothing listens on the server's port) for a whole run: training
finishes, every call is spooled in the run folder, and `mow sync-mlflow` delivers every
metric, the tags and the final status once a store answers."""

from __future__ import annotations

import json
import os
import socket

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
