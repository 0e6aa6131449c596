"""Shared fixtures: every test runs with its own MLflow store and never touches the repo's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"

# `make test` runs the suite in 2 pytest-xdist workers (`-n 2`): then each worker, and every
# process a test starts (they inherit the environment), computes on one thread, so the two
# workers share a 2-core machine instead of oversubscribing it. Run alone, a test uses 2.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)

# `--dist loadscope` hands whole modules to the two workers in collection order. These are the
# longest (each several minutes in CI's --durations): started first, they end beside each other, and the
# many short modules fill the gaps, instead of one worker finishing a long module alone at
# the end. A module missing here keeps its place after them.
LONGEST_FIRST = ("test_mow_learning.py", "test_train.py", "test_mow_train.py", "test_pipeline.py", "test_cluster.py")


def pytest_collection_modifyitems(items: list) -> None:
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: a module's tests keep their order


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield


def run_mow(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the real entry point (`python -m mow ...`) as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mow", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def step_of(path: Path) -> int:
    """The env step of a state checkpoint, or -1 while none is complete."""
    from mow import checkpoint

    try:
        return checkpoint.load(path)["step"]
    except checkpoint.CheckpointError:
        return -1


def kill_midway(args: list[str], cwd: Path, state: Path, at_least: int) -> int:
    """Start `mow ARGS`, SIGKILL it once `state` holds step >= `at_least` (plus a moment, to
    land between two checkpoints) and return the step of the checkpoint it left."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "mow", *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and step_of(state) >= at_least:
            break
        time.sleep(0.2)
    time.sleep(0.5)
    assert proc.poll() is None, "the run finished before it could be killed; raise env_steps"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return step_of(state)


@pytest.fixture
def project(tmp_path) -> Path:
    """A scratch working directory holding a copy of params.yaml (runs and results land here)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(PARAMS.read_text())
    return work
