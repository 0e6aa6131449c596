"""MLflow tracking with a local mirror: one child run per (task, seed) under a parent per method.

Conventions (DESIGN.md): one experiment per suite (`mow-<suite>`), a parent run per
(method, variant, scale), a child run per (task, seed, protocol) with the deterministic
name `<method>/<task>/seed<k>` tagged `mlflow.parentRunId`. A rerun with the same
configuration reuses its run instead of creating a duplicate. Every metric is also
appended to `<run_dir>/metrics.jsonl`, the raw file learning curves are drawn from, so a
store that is down loses nothing. The default store is `sqlite:///mlflow.db` in the
working directory (what a bare `mlflow ui` opens); `MLFLOW_TRACKING_URI` overrides it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from mow.config import REPO_ROOT

_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty and commit != "unknown" else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(tree: Mapping, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def _retry(fn: Callable[[], Any], what: str, attempts: int = 8) -> Any:
    """SQLite stores answer 'database is locked' under parallel writers: back off and retry."""
    delay = 0.2
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - any store error is retried, then re-raised
            if i == attempts - 1:
                raise RuntimeError(f"MLflow store {tracking_uri()}: {what} failed: {exc}") from exc
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class Tracker:
    """An MLflow child run plus `metrics.jsonl`; use `finish()` (or the context manager)."""

    def __init__(self, run_dir: Path, *, suite: str, method: str, variant: str, task: str, seed: int,
                 protocol: str, scale: str, params_tree: Mapping, params_hash: str,
                 resume_run_id: str | None = None, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.run_id: str | None = None
        self._pending: list[tuple[str, float, int, int]] = []
        self.run_name = f"{method}/{task}/seed{seed}"
        if not enabled:
            return
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri())
        exp_id = self._experiment(f"mow-{suite}")
        parent = self._find_or_create(exp_id, {"mow.parent_key": f"{method}/{variant}/{scale}"},
                                      run_name=f"{method}/{variant}", extra_tags={"mow.method": method,
                                      "mow.variant": variant, "mow.scale": scale})
        run_key = f"{method}/{variant}/{protocol}/{task}/seed{seed}/{scale}"
        tags = {"mow.run_key": run_key, "mow.params_hash": params_hash}
        if resume_run_id and self._exists(resume_run_id):
            self.run_id = resume_run_id
        else:
            self.run_id = self._find_or_create(exp_id, tags, run_name=self.run_name, extra_tags={
                "mlflow.parentRunId": parent, "mow.suite": suite, "mow.method": method, "mow.variant": variant,
                "mow.task": task, "mow.seed": str(seed), "mow.protocol": protocol, "mow.scale": scale,
                "mlflow.source.git.commit": git_commit()})
            flat = flatten(params_tree)
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in sorted(flat.items())]
            for i in range(0, len(items), 90):
                _retry(lambda chunk=items[i:i + 90]: self.client.log_batch(self.run_id, params=chunk), "log params")
            _retry(lambda: self.client.log_dict(self.run_id, dict(params_tree), "config.json"), "log config")
        _retry(lambda: self.client.update_run(self.run_id, status="RUNNING"), "mark run RUNNING")

    @classmethod
    def reopen(cls, run_id: str, run_dir: Path, *, run_name: str) -> "Tracker":
        """The existing run `run_id` (e.g. to add an evaluation after training), status unchanged."""
        self = cls.__new__(cls)
        self.run_dir, self.metrics_path = Path(run_dir), Path(run_dir) / "metrics.jsonl"
        self.enabled, self.run_id, self._pending, self.run_name = True, run_id, [], run_name
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri())
        return self

    def _experiment(self, name: str) -> str:
        def get_or_create():
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            location = None
            if tracking_uri().startswith("sqlite:"):
                location = (Path.cwd() / "mlartifacts").as_uri()
            return self.client.create_experiment(name, artifact_location=location,
                                                 tags={"mlflow.experimentKind": "custom_model_development"})
        return _retry(get_or_create, f"create experiment {name}")

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:  # noqa: BLE001 - a run id from another store simply is not there
            return False

    def _find_or_create(self, exp_id: str, key_tags: Mapping[str, str], *, run_name: str, extra_tags: Mapping[str, str]) -> str:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in key_tags.items())
        found = _retry(lambda: self.client.search_runs([exp_id], filter_string=query, max_results=1,
                                                       order_by=["attributes.start_time ASC"]), "search runs")
        if found:
            return found[0].info.run_id
        run = _retry(lambda: self.client.create_run(exp_id, run_name=run_name, tags={**key_tags, **extra_tags}), "create run")
        return run.info.run_id

    # -- metrics -----------------------------------------------------------------------
    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue metrics at env step `step`; written on `flush()`."""
        now = int(time.time() * 1000)
        values = {k: float(v) for k, v in metrics.items()}
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        self._pending.extend((k, v, now, step) for k, v in values.items())

    def flush(self) -> None:
        if not self.enabled or not self._pending:
            self._pending.clear()
            return
        from mlflow.entities import Metric

        metrics = [Metric(k, v, ts, step) for k, v, ts, step in self._pending]
        for i in range(0, len(metrics), _BATCH):
            _retry(lambda chunk=metrics[i:i + _BATCH]: self.client.log_batch(self.run_id, metrics=chunk), "log metrics")
        self._pending.clear()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.enabled:
            for k, v in tags.items():
                _retry(lambda k=k, v=v: self.client.set_tag(self.run_id, k, v), f"set tag {k}")

    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None:
        if self.enabled:
            _retry(lambda: self.client.log_artifact(self.run_id, str(path), artifact_dir), f"log artifact {path}")

    def log_task_result(self, task: str, metrics: Mapping[str, float], step: int, artifact: Path | None = None) -> None:
        """A multi-task run's per-task results as a nested child run `<run name>/<task>`."""
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps({"step": step, **{f"{k}/{task}": float(v) for k, v in metrics.items()}}) + "\n")
        if not self.enabled:
            return
        from mlflow.entities import Metric

        run = _retry(lambda: self.client.get_run(self.run_id), "read run")
        exp_id = run.info.experiment_id
        child = self._find_or_create(exp_id, {"mow.task_of": self.run_id, "mow.task": task},
                                     run_name=f"{self.run_name.split('/')[0]}/{task}/{self.run_name.split('/')[-1]}",
                                     extra_tags={"mlflow.parentRunId": self.run_id, **{
                                         k: v for k, v in run.data.tags.items()
                                         if k.startswith("mow.") and k not in ("mow.run_key", "mow.task")}})
        now = int(time.time() * 1000)
        _retry(lambda: self.client.log_batch(child, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]),
               "log task metrics")
        if artifact is not None:
            _retry(lambda: self.client.log_artifact(child, str(artifact), "eval"), f"log artifact {artifact}")
        _retry(lambda: self.client.set_terminated(child, status="FINISHED"), "end task run")

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        if self.enabled:
            _retry(lambda: self.client.set_terminated(self.run_id, status=status), f"end run as {status}")

    def truncate_after(self, step: int) -> None:
        """On resume, forget mirrored metrics logged after the checkpoint (they will be redone)."""
        if not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        from mow.checkpoint import atomic_write_text

        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))
