"""The real `mow train --method mow` entry point at tiny budgets: the warm-up chain, per-task
evaluation and MLflow runs, kill/resume, data-parallel ranks, and bad input (learning: tests/test_mow_learning.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mow import checkpoint
from mow.config import load_params
from mow.runtime import MOW_EAGER_NOTE

from conftest import kill_midway, run_mow

SANITY_RUN = "smoke/sanity/sanity/mow/full/all/seed{seed}"
TWO_TASKS = ["--set", "suites.sanity.tasks=[side, chase]"]
TINY = ["--suite", "sanity", "--method", "mow", "--no-progress", "--set", "train.env_steps=240",
        "--set", "train.warmup_steps=60", "--set", "train.checkpoint_every=40", "--set", "train.log_every=40",
        "--set", "train.threads=1", "--set", "warmup.collect_steps=60", "--set", "warmup.pretrain_steps=5",
        *TWO_TASKS]


def _weights_equal(a: dict, b: dict) -> None:
    for part in ("world_model", "actor_critic"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"


@pytest.mark.slow
def test_atari_smoke_chain_writes_every_output_and_an_mlflow_child_per_task(project):
    args = ["train", "--suite", "atari", "--method", "mow", "--seed", "1", "--no-progress",
            "--set", "train.env_steps=300", "--set", "train.warmup_steps=100", "--set", "warmup.collect_steps=100",
            "--set", "warmup.pretrain_steps=10", "--set", "protocols.storm_compat.eval_episodes=1",
            "--set", "protocols.storm_compat.eval_envs=1"]
    res = run_mow(args, cwd=project)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = project / "runs/smoke/atari/storm_compat/mow/full/all/seed1"
    for name in ("warmup/pretrain.ckpt", "warmup/clusters.json", "model.ckpt", "checkpoints/state.ckpt",
                 "routing.json", "imagination.npz", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    assert (project / "runs/smoke/atari/storm_compat/warmup_data/seed1/replay.ckpt").is_file()
    clusters = json.loads((run_dir / "warmup/clusters.json").read_text())
    assert clusters["tasks"] == ["Pong", "Breakout"] and clusters["num_clusters"] == 2
    for game, legal in (("Pong", 6), ("Breakout", 4)):
        raw = json.loads((project / f"results/raw/smoke/atari/storm_compat/mow/full/{game}/seed1.json").read_text())
        assert raw["method"] == "mow" and raw["task"] == game and len(raw["returns"]) == 1
        assert raw["checkpoint_sha256"] == checkpoint.file_sha256(run_dir / "model.ckpt")
    curves = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*curves)
    for key in ("wm/rec/Pong", "wm/sigma/Breakout", "wm/task/Pong", "wm/balance", "wm/temperature", "ac/total"):
        assert key in keys, key

    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("mow-atari").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert {"mow/full", "mow/all/seed1", "mow/Pong/seed1", "mow/Breakout/seed1"} <= set(by_name)
    joint = by_name["mow/all/seed1"]
    assert joint.data.tags["mlflow.parentRunId"] == by_name["mow/full"].info.run_id
    for game in ("Pong", "Breakout"):
        child = by_name[f"mow/{game}/seed1"]
        assert child.data.tags["mlflow.parentRunId"] == joint.info.run_id
        assert "eval/mean_return" in child.data.metrics and child.info.status == "FINISHED"

    # `mow evaluate --method mow` re-evaluates every task of the joint model in a new process
    # (resume and "nothing to redo" are covered by the kill/resume test and the pipeline test):
    # the same episodes as the evaluation right after training, since an evaluation is seeded
    # on its own (a cluster job and a local run must agree; the sampled policy used to draw
    # from whatever state torch's generator was in)
    raws = {g: project / f"results/raw/smoke/atari/storm_compat/mow/full/{g}/seed1.json" for g in ("Pong", "Breakout")}
    before = {g: (raw.stat().st_mtime_ns, json.loads(raw.read_text())) for g, raw in raws.items()}
    res = run_mow(["evaluate", "--method", "mow", "--seed", "1", "--episodes", "1"], cwd=project)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mow/Pong/seed1: mean return" in res.stdout and "mow/Breakout/seed1: mean return" in res.stdout
    for game, raw in raws.items():
        mtime, first = before[game]
        again = json.loads(raw.read_text())
        assert raw.stat().st_mtime_ns != mtime
        assert (again["returns"], again["lengths"]) == (first["returns"], first["lengths"]), game


@pytest.mark.slow
def test_sigkill_midway_then_rerun_ends_with_identical_weights(project):
    args = ["train", "--seed", "2", "--no-eval", "--no-track", *TINY]
    res = run_mow(args + ["--runs-root", "straight"], cwd=project)
    assert res.returncode == 0, res.stderr[-3000:]

    state = project / "killed" / SANITY_RUN.format(seed=2) / "checkpoints/state.ckpt"
    killed_at = kill_midway(args + ["--runs-root", "killed"], project, state, at_least=120)
    assert 120 <= killed_at < 240

    res = run_mow(args + ["--runs-root", "killed"], cwd=project)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"at env step {killed_at}" in res.stdout
    _weights_equal(checkpoint.load(project / "straight" / SANITY_RUN.format(seed=2) / "model.ckpt"),
                   checkpoint.load(project / "killed" / SANITY_RUN.format(seed=2) / "model.ckpt"))


@pytest.mark.slow
def test_two_gloo_ranks_end_with_identical_weights(project):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mow",
           "train", "--seed", "3", "--no-eval", "--no-track", *TINY, "--set", "train.nproc_per_node=2", "--set", "train.wm_batch=8",
           "--set", "train.imag_batch=64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    run_dir = project / "runs" / SANITY_RUN.format(seed=3)
    rank0, rank1 = checkpoint.load(run_dir / "checkpoints/state.ckpt"), checkpoint.load(
        run_dir / "checkpoints/state.rank1.ckpt")
    assert rank0["step"] == rank1["step"] == 120  # each rank stepped half of the 240 steps per task
    assert rank0["updates"] == rank1["updates"] > 0
    _weights_equal(rank0, rank1)
    # the ranks collected different experience (distinct env seeds)
    assert not torch.equal(rank0["replay"]["actions"], rank1["replay"]["actions"])
    assert (run_dir / "model.ckpt").is_file()

    # The ranks save one after another, so a kill between their saves leaves rank 1 a
    # checkpoint ahead: both must resume from the newest step both hold (rank 1 from its
    # `.prev`) and end as the uninterrupted run did.
    final = checkpoint.load(run_dir / "model.ckpt")
    ckpts = run_dir / "checkpoints"
    shutil.copy(checkpoint.previous_path(ckpts / "state.ckpt"), ckpts / "state.ckpt")
    behind = checkpoint.load(ckpts / "state.ckpt")["step"]
    assert behind < rank1["step"]
    (run_dir / "model.ckpt").unlink()
    res = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"at env step {behind}" in res.stdout + res.stderr
    _weights_equal(final, checkpoint.load(run_dir / "model.ckpt"))


def _nothing_written(project: Path) -> None:
    assert not (project / "runs").exists() or not any(p.is_file() for p in (project / "runs").rglob("*.ckpt"))
    assert not (project / "results").exists()


# Bad MoW input (duplicate tasks, top_k, N_m above the task count, --task, unknown variant)
# is in the in-process corpus tests/faults/test_bad_input.py.


def test_a_clusters_file_for_other_tasks_is_refused_before_anything_is_written(project):
    run_dir = project / "runs" / SANITY_RUN.format(seed=1)
    (run_dir / "warmup").mkdir(parents=True)
    doc = {"tasks": ["side", "chase"], "assignment": [0, 1], "num_clusters": 2,
           "similarity": [[1.0, 0.0], [0.0, 1.0]], "seed": 1, "method": "test"}
    (run_dir / "warmup/clusters.json").write_text(json.dumps(doc))
    res = run_mow(["train", "--suite", "sanity", "--method", "mow", "--no-track"], cwd=project)
    assert res.returncode == 2
    line = res.stderr.strip().splitlines()
    assert len(line) == 1 and "clusters.json" in line[0] and "side" in line[0], res.stderr
    _nothing_written(project)


def test_a_variant_differing_only_in_clustering_trains_from_the_owners_warmup_model(project):
    """`single_vae` (N_m = 1) shares the full variant's warm-up model: its chain pretrains once
    into full's run folder (with full's parameters) and clusters and trains in its own.
    Asked for train.compile (a runtime-only key: same warm-up model), MoW says it runs eager."""
    res = run_mow(["train", *TINY, "--seed", "1", "--variant", "single_vae", "--set", "train.env_steps=80",
                   "--set", "train.compile=true", "--no-eval", "--no-track"], cwd=project)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "variant single_vae trains from the warm-up model of variant full" in res.stdout
    assert res.stdout.count(MOW_EAGER_NOTE) == 2   # the warm-up and the training
    full = project / "runs" / SANITY_RUN.format(seed=1)
    own = project / "runs/smoke/sanity/sanity/mow/single_vae/all/seed1"
    warm = full / "warmup/pretrain.ckpt"
    overrides = [a for a in TINY[TINY.index("--set"):] if a != "--set"] + ["train.env_steps=80"]
    full_params = load_params(project / "params.yaml", scale="smoke", overrides=overrides, suite="sanity")
    assert checkpoint.load(warm)["params_hash"] == full_params.digest()
    assert not (own / "warmup/pretrain.ckpt").exists() and (own / "warmup/clusters.json").is_file()
    assert json.loads((own / "warmup/clusters.json").read_text())["num_clusters"] == 1
    # the full variant's own chain then finds its warm-up model and does not pretrain again
    written = warm.stat().st_mtime_ns
    res = run_mow(["train", *TINY, "--seed", "1", "--set", "train.env_steps=80", "--no-eval", "--no-track"],
                  cwd=project)
    assert res.returncode == 0, res.stderr[-3000:]
    assert warm.stat().st_mtime_ns == written and "trains from the warm-up model" not in res.stdout
    assert (full / "model.ckpt").is_file() and (own / "model.ckpt").is_file()
