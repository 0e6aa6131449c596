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

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield


def run_mow(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the real entry point (`python -m mow ...`) as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mow", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def project(tmp_path) -> Path:
    """A scratch working directory holding a copy of params.yaml (runs and results land here)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(PARAMS.read_text())
    return work
