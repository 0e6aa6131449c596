"""Meta-World end to end through the real entry point, at the tiniest budget: MoW on the
smoke suite's tasks (warm-up, clustering, joint training, evaluation with success rates)
and STORM on one task. Learning is not asserted here (a few dozen steps), wiring is."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_mow

TINY = ["--set", "suites.metaworld.train.env_steps=40", "--set", "suites.metaworld.train.warmup_steps=20",
        "--set", "suites.metaworld.warmup.collect_steps=20", "--set", "warmup.pretrain_steps=2",
        "--set", "warmup.cluster_batches=1", "--set", "train.imag_batch=16",
        "--set", "protocols.metaworld_mt50.episode_steps=20", "--set", "protocols.metaworld_mt50.eval_episodes=1",
        "--set", "protocols.metaworld_mt50.eval_envs=1", "--no-progress"]
RAW = "results/raw/smoke/metaworld/metaworld_mt50"


def check_raw(path, method: str, task: str) -> None:
    record = json.loads(path.read_text())
    assert (record["suite"], record["method"], record["task"]) == ("metaworld", method, task)
    assert record["successes"] in ([0], [1]) and record["success_rate"] == record["successes"][0]
    assert record["episodes"][0]["goal"] == 0 and record["lengths"] == [10]  # 20 env steps at repeat 2
    assert np.isfinite(record["mean_return"]) and record["env_steps_trained"] == 40


@pytest.mark.slow
def test_metaworld_mow_and_storm_train_and_report_success_rates(project):
    from mow import checkpoint

    done = run_mow(["train", "--suite", "metaworld", "--method", "mow", *TINY], project)
    assert done.returncode == 0, done.stderr[-3000:]
    run = project / "runs/smoke/metaworld/metaworld_mt50/mow/full/all/seed1"
    for name in ("warmup/pretrain.ckpt", "warmup/clusters.json", "routing.json", "imagination.npz"):
        assert (run / name).is_file(), name
    tasks = json.loads((run / "warmup/clusters.json").read_text())["tasks"]
    assert tasks == ["reach-v3", "button-press-topdown-v3"]
    for task in tasks:
        check_raw(project / RAW / "mow/full" / task / "seed1.json", "mow", task)
        assert f"mow/{task}/seed1: mean return" in done.stdout and "success rate" in done.stdout
    model = checkpoint.load(run / "model.ckpt")
    assert model["continuous"] is True and model["num_actions"] == 4
    imagined = np.load(run / "imagination.npz")
    assert imagined["imagined"].shape[0] == 2 and imagined["imagined"].dtype == np.uint8

    done = run_mow(["train", "--suite", "metaworld", "--task", "reach-v3", *TINY], project)
    assert done.returncode == 0, done.stderr[-3000:]
    check_raw(project / RAW / "storm/full/reach-v3/seed1.json", "storm", "reach-v3")

    bad = run_mow(["train", "--suite", "metaworld", "--task", "reach-v2"], project)
    assert bad.returncode == 2 and "unknown metaworld task 'reach-v2'" in bad.stderr
    assert "window-close-v3" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
