"""A ready MLflow SQLite store, created once per session and copied per test (creating one
runs MLflow's schema migrations, seconds each time)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the tables
    return path


@pytest.fixture
def store(store_template) -> Path:
    """This test's own store (the URI the autouse fixture set), ready to use."""
    path = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    shutil.copy(store_template, path)
    return path


def mlflow_run(name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.info.run_name == name]
    assert len(runs) == 1, f"{len(runs)} MLflow runs named {name}"
    return client, runs[0]
