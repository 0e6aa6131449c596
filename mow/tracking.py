"""MLflow tracking with a local mirror: one child run per (task, seed) under a parent per method.

Conventions (DESIGN.md): one experiment per suite (`mow-<suite>`), a parent run per
(method, variant, scale), a child run per (task, seed, protocol) with the deterministic
name `<method>/<task>/seed<k>` tagged `mlflow.parentRunId`. A rerun with the same
configuration reuses its run instead of creating a duplicate. Every metric is also
appended to `<run_dir>/metrics.jsonl`, the raw file learning curves are drawn from. The
default store is `sqlite:///mlflow.db` in the working directory (what a bare `mlflow ui`
opens); `MLFLOW_TRACKING_URI` overrides it.

A store that is down (server unreachable, SQLite locked for longer than the retry budget
`MOW_MLFLOW_RETRY_SECONDS`, default 60) never stops training: every MLflow call that could
not be made (run creation, metrics, tags, artifacts, the final status) is appended to
`<run_dir>/mlflow_spool.jsonl` and replayed in order once the store answers again, at most
every `MOW_MLFLOW_RECONNECT_SECONDS` (default 300) during the run and once more when the
run ends. `mow sync-mlflow` replays whatever is still spooled (e.g. the store came back
after the job ended).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from mow.config import REPO_ROOT

_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call
SPOOL_NAME = "mlflow_spool.jsonl"


class StoreUnavailable(RuntimeError):
    """The MLflow store did not answer within the retry budget."""


def _env_seconds(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


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
    """SQLite stores answer 'database is locked' under parallel writers: back off and retry,
    for at most `attempts` tries and MOW_MLFLOW_RETRY_SECONDS; then StoreUnavailable."""
    delay, deadline = 0.2, time.monotonic() + _env_seconds("MOW_MLFLOW_RETRY_SECONDS", 60.0)
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - any store error is retried, then re-raised
            if i == attempts - 1 or time.monotonic() + delay > deadline:
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                raise StoreUnavailable(f"MLflow store {tracking_uri()}: {what} failed: {first}") from exc
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class Tracker:
    """An MLflow child run plus `metrics.jsonl`; use `finish()` (or the context manager).

    Every MLflow call is an operation (a dict) applied at once while the store answers and
    appended to the spool (`mlflow_spool.jsonl`, first line: the run's identity) while it
    does not; spooled operations are replayed in order before any newer one."""

    def __init__(self, run_dir: Path, *, suite: str, method: str, variant: str, task: str, seed: int,
                 protocol: str, scale: str, params_tree: Mapping, params_hash: str,
                 resume_run_id: str | None = None, enabled: bool = True, warn: Callable[[str], None] | None = None,
                 connect: bool = True):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.spool_path = self.run_dir / SPOOL_NAME
        self.enabled = enabled
        self.run_id: str | None = None
        self._pending: list[tuple[str, float, int, int]] = []
        self.run_name = f"{method}/{task}/seed{seed}"
        self.identity = {"suite": suite, "method": method, "variant": variant, "task": task, "seed": seed,
                         "protocol": protocol, "scale": scale, "params_hash": params_hash}
        self.params_tree = params_tree
        self.client = None
        self._resume_run_id = resume_run_id
        self._warn = warn or (lambda message: print(message, file=sys.stderr))
        self._offline_since: float | None = None
        self._next_try = 0.0
        if not enabled or not connect:
            return
        try:
            self._open()
        except StoreUnavailable as exc:
            self._went_offline(exc)

    @classmethod
    def from_spool(cls, spool: Path, warn=None) -> "Tracker":
        """A tracker for the run a spool file belongs to (`mow sync-mlflow`), not yet connected."""
        header = _read_spool(spool)[0]
        return cls(Path(spool).parent, **header["identity"], params_tree=header["params"],
                   resume_run_id=header.get("run_id"), warn=warn, connect=False)

    # -- the store ---------------------------------------------------------------------
    def _open(self, mark_running: bool = True) -> None:
        """Find or create the experiment, the parent and this run (params logged once)."""
        from mlflow.tracking import MlflowClient

        if self.client is None:
            self.client = _retry(lambda: MlflowClient(tracking_uri()), "open the store")
        i = self.identity
        suite, method, variant, task, seed, protocol, scale = (i[k] for k in (
            "suite", "method", "variant", "task", "seed", "protocol", "scale"))
        exp_id = self._experiment(f"mow-{suite}")
        parent = self._find_or_create(exp_id, {"mow.parent_key": f"{method}/{variant}/{scale}"},
                                      run_name=f"{method}/{variant}", extra_tags={"mow.method": method,
                                      "mow.variant": variant, "mow.scale": scale})
        run_key = f"{method}/{variant}/{protocol}/{task}/seed{seed}/{scale}"
        tags = {"mow.run_key": run_key, "mow.params_hash": i["params_hash"]}
        if self._resume_run_id and self._exists(self._resume_run_id):
            run_id = self._resume_run_id
        else:
            run_id = self._find_or_create(exp_id, tags, run_name=self.run_name, extra_tags={
                "mlflow.parentRunId": parent, "mow.suite": suite, "mow.method": method, "mow.variant": variant,
                "mow.task": task, "mow.seed": str(seed), "mow.protocol": protocol, "mow.scale": scale,
                "mlflow.source.git.commit": git_commit()})
            flat = flatten(self.params_tree)
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in sorted(flat.items())]
            for j in range(0, len(items), 90):
                _retry(lambda chunk=items[j:j + 90]: self.client.log_batch(run_id, params=chunk), "log params")
            _retry(lambda: self.client.log_dict(run_id, dict(self.params_tree), "config.json"), "log config")
        if mark_running:
            _retry(lambda: self.client.update_run(run_id, status="RUNNING"), "mark run RUNNING")
        self.run_id = run_id

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

    # -- operations: applied now, or spooled and replayed in order -------------------------
    def _apply(self, op: dict) -> None:
        from mlflow.entities import Metric

        if self.run_id is None:
            self._open()
        kind = op["op"]
        if kind == "metrics":
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in op["metrics"]]
            for j in range(0, len(metrics), _BATCH):
                _retry(lambda chunk=metrics[j:j + _BATCH]: self.client.log_batch(self.run_id, metrics=chunk),
                       "log metrics")
        elif kind == "tags":
            for k, v in op["tags"].items():
                _retry(lambda k=k, v=v: self.client.set_tag(self.run_id, k, v), f"set tag {k}")
        elif kind == "artifact":
            _retry(lambda: self.client.log_artifact(self.run_id, op["path"], op["dir"]), f"log artifact {op['path']}")
        elif kind == "task_result":
            self._apply_task_result(op)
        elif kind == "end":
            _retry(lambda: self.client.set_terminated(self.run_id, status=op["status"]), f"end run as {op['status']}")
        else:
            raise ValueError(f"{self.spool_path}: unknown spooled operation {kind!r}")

    def _submit(self, op: dict, *, force: bool = False) -> None:
        if not self.enabled:
            return
        if not self.spool_path.exists():
            try:
                self._apply(op)
                return
            except StoreUnavailable as exc:
                self._spool(op)
                self._went_offline(exc)
                return
        self._spool(op)  # behind what is already waiting: the store sees every call in order
        if force or time.monotonic() >= self._next_try:
            try:
                self.sync()
            except StoreUnavailable as exc:
                self._went_offline(exc)

    def _spool(self, op: dict) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lines = []
        if not self.spool_path.exists():
            lines.append({"op": "header", "identity": self.identity, "params": self.params_tree,
                          "run_id": self.run_id or self._resume_run_id, "tracking_uri": tracking_uri()})
        lines.append(op)
        with open(self.spool_path, "a") as fh:
            fh.write("".join(json.dumps(line) + "\n" for line in lines))

    def _went_offline(self, exc: Exception) -> None:
        self._next_try = time.monotonic() + _env_seconds("MOW_MLFLOW_RECONNECT_SECONDS", 300.0)
        if self._offline_since is None:
            self._offline_since = time.monotonic()
            self._warn(f"warning: {exc}; training goes on, MLflow calls are kept in {self.spool_path} and sent "
                       f"when the store answers (or run `mow sync-mlflow {self.run_dir}`)")

    def sync(self) -> int:
        """Replay the spool in order; returns how many operations reached the store. On
        StoreUnavailable the operations not yet sent stay spooled (none is sent twice)."""
        if not self.spool_path.exists():
            return 0
        header, *ops = _read_spool(self.spool_path)
        if self._resume_run_id is None:
            self._resume_run_id = header.get("run_id")
        for done, op in enumerate(ops):
            try:
                self._apply(op)
            except StoreUnavailable:
                from mow.checkpoint import atomic_write_text

                atomic_write_text(self.spool_path, "".join(json.dumps(x) + "\n" for x in [header, *ops[done:]]))
                raise
        self.spool_path.unlink()
        if self._offline_since is not None:
            self._warn(f"MLflow store {tracking_uri()} answers again: sent {len(ops)} spooled calls")
            self._offline_since = None
        return len(ops)

    # -- metrics -----------------------------------------------------------------------
    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue metrics at env step `step`; written on `flush()`."""
        now = int(time.time() * 1000)
        values = {k: float(v) for k, v in metrics.items()}
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        self._pending.extend((k, v, now, step) for k, v in values.items())

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        if self.enabled and pending:
            self._submit({"op": "metrics", "metrics": [list(m) for m in pending]})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._submit({"op": "tags", "tags": dict(tags)})

    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None:
        self._submit({"op": "artifact", "path": str(Path(path).resolve()), "dir": artifact_dir})

    def log_task_result(self, task: str, metrics: Mapping[str, float], step: int, artifact: Path | None = None) -> None:
        """A multi-task run's per-task results as a nested child run `<run name>/<task>`."""
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps({"step": step, **{f"{k}/{task}": float(v) for k, v in metrics.items()}}) + "\n")
        self._submit({"op": "task_result", "task": task, "step": step, "time": int(time.time() * 1000),
                      "metrics": {k: float(v) for k, v in metrics.items()},
                      "artifact": str(Path(artifact).resolve()) if artifact is not None else None})

    def _apply_task_result(self, op: dict) -> None:
        from mlflow.entities import Metric

        task, step, now = op["task"], op["step"], op["time"]
        run = _retry(lambda: self.client.get_run(self.run_id), "read run")
        exp_id = run.info.experiment_id
        child = self._find_or_create(exp_id, {"mow.task_of": self.run_id, "mow.task": task},
                                     run_name=f"{self.run_name.split('/')[0]}/{task}/{self.run_name.split('/')[-1]}",
                                     extra_tags={"mlflow.parentRunId": self.run_id, **{
                                         k: v for k, v in run.data.tags.items()
                                         if k.startswith("mow.") and k not in ("mow.run_key", "mow.task")}})
        _retry(lambda: self.client.log_batch(child, metrics=[Metric(k, v, now, step) for k, v in op["metrics"].items()]),
               "log task metrics")
        if op["artifact"] is not None:
            _retry(lambda: self.client.log_artifact(child, op["artifact"], "eval"), f"log artifact {op['artifact']}")
        _retry(lambda: self.client.set_terminated(child, status="FINISHED"), "end task run")

    def finish(self, status: str = "FINISHED") -> None:
        """End the run as `status`; never raises for a store that is down (the call is spooled)."""
        self.flush()
        self._submit({"op": "end", "status": status}, force=True)
        if self.enabled and self.spool_path.exists():
            self._warn(f"warning: MLflow store {tracking_uri()} still unavailable; the run's remaining calls are "
                       f"in {self.spool_path}: run `mow sync-mlflow {self.run_dir}` once it is back")

    def truncate_after(self, step: int) -> None:
        """On resume, forget mirrored and spooled metrics logged after the checkpoint (they will be redone)."""
        from mow.checkpoint import atomic_write_text

        if self.metrics_path.exists():
            kept = [line for line in self.metrics_path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= step]
            atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))
        if self.spool_path.exists():
            records = _read_spool(self.spool_path)
            for op in records[1:]:
                if op["op"] == "metrics":
                    op["metrics"] = [m for m in op["metrics"] if m[3] <= step]
            records = [op for op in records if op["op"] != "metrics" or op["metrics"]]
            atomic_write_text(self.spool_path, "".join(json.dumps(op) + "\n" for op in records))


def _read_spool(path: Path) -> list[dict]:
    """The spool's records (header first). A torn last line (the writer was killed while
    appending) is dropped: its metrics are still in metrics.jsonl if they were complete there."""
    lines = Path(path).read_text().splitlines()
    records = []
    for n, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {n + 1} is not JSON (corrupted spool)") from None
    if not records or records[0].get("op") != "header":
        raise ValueError(f"{path}: no header line (not a mow MLflow spool)")
    return records


def sync_spools(paths) -> list[tuple[Path, int]]:
    """Replay every spool found under `paths` (files or run folders); [(spool, calls sent)]."""
    spools = []
    for path in map(Path, paths):
        if path.is_file():
            spools.append(path)
        elif path.is_dir():
            spools.extend(sorted(path.rglob(SPOOL_NAME)))
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    done = []
    for spool in spools:
        tracker = Tracker.from_spool(spool)
        tracker._open(mark_running=False)
        done.append((spool, tracker.sync()))
    return done
