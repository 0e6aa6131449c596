"""One MoW agent learns several sanity tasks at once through the real `mow train` entry point.

Its own module so that pytest-xdist (`--dist loadscope`) can run it beside the other MoW
entry-point tests (tests/test_mow_train.py) instead of after them: it is the longest test."""

from __future__ import annotations

import json
import time

import pytest

from mow.envs import SANITY_REFERENCE

from conftest import run_mow
from test_mow_train import SANITY_RUN


# Three tasks with different dynamics (a lit half, a moving block, a colour cue). The agent
# acts on the current frame's posterior (the first frame of an episode draws the cue, which
# STORM's prior acting cannot see); learning rates above STORM's fit the tiny budget, and an
# entropy bonus 10x STORM's keeps a task's actor from collapsing onto one action before the
# reward head has learned that task's cue x action (at 1e-3, `side` collapsed on seed 3).
LEARN = ["train", "--suite", "sanity", "--method", "mow", "--seed", "1", "--no-progress", "--no-track",
         "--set", "suites.sanity.tasks=[side, chase, color]", "--set", "train.env_steps=1200",
         "--set", "train.warmup_steps=200", "--set", "train.update_ratio=0.34", "--set", "train.act_latent=posterior",
         "--set", "train.wm_lr=1.0e-3", "--set", "train.ac_lr=3.0e-4", "--set", "model.agent.entropy=3.0e-3",
         "--set", "train.threads=1", "--set", "warmup.pretrain_steps=100", "--set", "protocols.sanity.eval_episodes=20"]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # one thread: `make test` runs another xdist worker beside it
def test_one_mow_agent_learns_several_sanity_tasks_at_once(project):
    """At this CPU budget (~1,000 updates shared by 3 tasks) the joint agent beats random on
    every task. Measured, normalised (0 random, 1 optimal) side / chase / color: seed 1
    0.94 / 0.73 / 0.93, seed 2 0.95 / 0.79 / 0.89, seed 3 0.90 / 0.72 / 0.74; the bar is 0.3."""
    started = time.perf_counter()
    res = run_mow(LEARN, cwd=project, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    normalised = {}
    for task in ("side", "chase", "color"):
        raw = json.loads((project / f"results/raw/smoke/sanity/sanity/mow/full/{task}/seed1.json").read_text())
        random_return, optimal_return = SANITY_REFERENCE[task]
        normalised[task] = (raw["mean_return"] - random_return) / (optimal_return - random_return)
    print(f"MoW sanity eval, normalised (0 random, 1 optimal): {normalised} in {time.perf_counter() - started:.0f} s")
    assert all(value > 0.3 for value in normalised.values()), normalised
    clusters = json.loads((project / "runs" / SANITY_RUN.format(seed=1) / "warmup/clusters.json").read_text())
    labels = dict(zip(clusters["tasks"], clusters["assignment"]))
    # the lit-half task and the moving-block task have different dynamics: different VAEs
    assert labels["side"] != labels["chase"]
