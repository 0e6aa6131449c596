"""The real `mow train` entry point at tiny budgets: outputs, MLflow, kill/resume, learning."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from mow import checkpoint
from mow.config import load_params
from mow.envs import SANITY_REFERENCE

from conftest import PARAMS, kill_midway, run_mow

PONG_RUN = Path("runs/smoke/atari/storm_compat/storm/full/Pong/seed1")
PONG_RAW = Path("results/raw/smoke/atari/storm_compat/storm/full/Pong/seed1.json")


def _mlflow_runs(project: Path, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    return client, client.search_runs([exp.experiment_id])


@pytest.mark.slow
def test_smoke_pong_writes_checkpoint_evaluation_and_mlflow_run(project):
    started = time.perf_counter()
    res = run_mow(["train", "--game", "Pong", "--seed", "1", "--no-progress"], cwd=project)
    elapsed = time.perf_counter() - started
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = project / PONG_RUN
    for name in ("model.ckpt", "checkpoints/state.ckpt", "config.yaml", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    raw = json.loads((project / PONG_RAW).read_text())
    assert raw["task"] == "Pong" and raw["protocol"] == "storm_compat" and raw["scale"] == "smoke"
    assert len(raw["returns"]) == raw["protocol_config"]["eval_episodes"] == len(raw["episodes"])
    assert all(-21 <= r <= 21 for r in raw["returns"]) and raw["policy"] == "sample"
    assert raw["checkpoint_sha256"] == checkpoint.file_sha256(run_dir / "model.ckpt")
    smoke = load_params(PARAMS, scale="smoke")["train"]
    assert raw["git_commit"] and raw["env_steps_trained"] == smoke["env_steps"]

    client, runs = _mlflow_runs(project, "mow-atari")
    child = [r for r in runs if r.info.run_name == "storm/Pong/seed1"]
    parent = [r for r in runs if r.info.run_name == "storm/full"]
    assert len(child) == 1 and len(parent) == 1
    child = child[0]
    assert child.info.status == "FINISHED" and child.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
    assert child.info.run_id == raw["mlflow_run_id"]
    assert child.data.params["train.env_steps"] == str(smoke["env_steps"])
    # logged every log_every env steps once updates start (after the warm-up steps)
    logs = (smoke["env_steps"] - smoke["warmup_steps"]) // smoke["log_every"]
    assert logs >= 2 and len(client.get_metric_history(child.info.run_id, "wm/total")) >= logs
    assert "eval/mean_return" in child.data.metrics and "perf/env_steps_per_s" in child.data.metrics
    print(f"smoke Pong train + eval wall time: {elapsed:.1f} s")

    # the same command again: finished work is not redone and the MLflow run is reused
    res = run_mow(["train", "--game", "Pong", "--seed", "1", "--no-progress"], cwd=project)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed storm/Pong/seed1" in res.stdout and f"at env step {smoke['env_steps']}" in res.stdout
    assert "already evaluated" in res.stdout
    assert checkpoint.file_sha256(run_dir / "model.ckpt") == raw["checkpoint_sha256"]
    _, runs = _mlflow_runs(project, "mow-atari")
    assert len(runs) == 2


SANITY_ARGS = ["train", "--suite", "sanity", "--task", "chase", "--seed", "3", "--no-eval", "--no-progress",
               "--set", "train.env_steps=400", "--set", "train.warmup_steps=100", "--set", "train.checkpoint_every=100",
               "--set", "train.log_every=50", "--set", "train.threads=1"]


@pytest.mark.slow
def test_sigkill_midway_then_rerun_ends_with_identical_weights(project):
    res = run_mow(SANITY_ARGS + ["--runs-root", "straight"], cwd=project)
    assert res.returncode == 0, res.stderr[-3000:]

    state = project / "killed/smoke/sanity/sanity/storm/full/chase/seed3/checkpoints/state.ckpt"
    killed_at = kill_midway(SANITY_ARGS + ["--runs-root", "killed"], project, state, at_least=200)
    assert 200 <= killed_at < 400

    res = run_mow(SANITY_ARGS + ["--runs-root", "killed"], cwd=project)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"at env step {killed_at}" in res.stdout

    a = checkpoint.load(project / "straight/smoke/sanity/sanity/storm/full/chase/seed3/model.ckpt")
    b = checkpoint.load(project / "killed/smoke/sanity/sanity/storm/full/chase/seed3/model.ckpt")
    for part in ("world_model", "actor_critic"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    # one MLflow run for the killed-and-resumed job, not two
    _, runs = _mlflow_runs(project, "mow-sanity")
    assert sorted(r.info.run_name for r in runs) == ["storm/chase/seed3", "storm/full"]


# One thread: `make test` runs a second xdist worker beside it on 2 cores. Measured at this
# budget on seed 1: 0.77 of the way from random to optimal (the bar is 0.4).
LEARN_ARGS = ["train", "--suite", "sanity", "--task", "chase", "--seed", "1", "--no-progress", "--no-track",
              "--set", "train.env_steps=3000", "--set", "train.warmup_steps=300", "--set", "train.update_ratio=0.5",
              "--set", "train.threads=1", "--set", "protocols.sanity.eval_episodes=40"]


@pytest.mark.slow
def test_agent_learns_the_sanity_task_clearly_better_than_random(project):
    res = run_mow(LEARN_ARGS, cwd=project)
    assert res.returncode == 0, res.stderr[-3000:]
    raw = json.loads((project / "results/raw/smoke/sanity/sanity/storm/full/chase/seed1.json").read_text())
    random_return, optimal_return = SANITY_REFERENCE["chase"]
    print(f"sanity chase: eval mean {raw['mean_return']:.2f} (random {random_return}, optimal {optimal_return})")
    assert raw["mean_return"] > random_return + 0.4 * (optimal_return - random_return)
