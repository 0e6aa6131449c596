"""Divergence stops training with one line naming the env step, the task(s) and what went
non-finite; the MLflow run is FAILED, the last good checkpoint is kept and no model is
written. Each NaN is real: a poisoned weight in a real checkpoint (what a bit flip or an
overflow would leave; for MoW in one cluster's head, so only its task is named), a reward
function that returns NaN (a sanity env subclass put in the registry), and a learning rate
of 1e30 whose first Adam step blows the actor's weights up."""

from __future__ import annotations

import json
import math

import torch

from mow import checkpoint
from mow.envs import sanity

from faultkit import (PARAMS, TINY_MOW, in_tmp, mow_args, mow_cli, mow_run, sets, storm_args,  # noqa: F401 - fixture
                      storm_run)
from stores import mlflow_run, store, store_template  # noqa: F401 - fixtures


def test_nan_loss_stops_with_step_task_and_loss_name_marks_failed_and_keeps_the_checkpoint(tmp_path, store):
    args = storm_args(extra=["--runs-root", "runs", "--no-eval", "--set", "train.env_steps=20",
                             "--set", "train.warmup_steps=19"])
    code, _, err = mow_cli(args)  # 20 random steps, no update yet: a good checkpoint
    assert code == 0, err
    state_file = storm_run(tmp_path / "runs") / "checkpoints/state.ckpt"
    good = checkpoint.load(state_file)
    assert good["step"] == 20
    # resume the same run for longer: allowed only with the same parameters, so rewrite the
    # checkpoint's parameters to the longer budget and poison one reward-head weight
    longer = storm_args(extra=["--runs-root", "runs", "--no-eval", "--set", "train.warmup_steps=19"])
    from mow.config import load_params

    params = load_params(longer[2], overrides=[longer[i + 1] for i, a in enumerate(longer) if a == "--set"])
    good["params"], good["params_hash"] = params.to_dict(), params.digest()
    good["world_model"]["reward_head.out.bias"][0] = float("nan")
    checkpoint.save(state_file, good)
    before = state_file.read_bytes()
    model = storm_run(tmp_path / "runs") / "model.ckpt"
    model_before = model.read_bytes()  # the 20-step run's model

    code, _, err = mow_cli(longer)
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("mow: error:")]
    assert len(lines) == 1, err
    line = lines[0]
    assert "training diverged at env step 23 (task chase)" in line, line  # the first update (ratio 0.25)
    assert "wm/reward" in line and "wm/total" in line, line
    assert f"{state_file.relative_to(tmp_path)} (env step 20) is kept" in line, line
    assert state_file.read_bytes() == before  # the last good checkpoint is untouched
    assert model.read_bytes() == model_before  # no model from the diverged weights
    assert torch.isfinite(checkpoint.load(state_file)["actor_critic"]["actor.out.weight"]
                          if "actor.out.weight" in good["actor_critic"] else torch.zeros(1)).all()
    _, run = mlflow_run("storm/chase/seed1")
    assert run.info.status == "FAILED"
    assert all(math.isfinite(v) for v in run.data.metrics.values())


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("mow: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _nan_reward_chase(at: int) -> type:
    """`chase` with a broken reward function: its `at`-th step (over episodes) returns NaN."""

    class NaNRewardChase(sanity._ENVS["chase"]):
        def step(self, action):
            obs, reward, terminated, truncated, info = super().step(action)
            self.steps_taken = getattr(self, "steps_taken", 0) + 1
            return obs, float("nan") if self.steps_taken == at else reward, terminated, truncated, info

    return NaNRewardChase


def test_nan_reward_from_the_env_stops_at_that_step_naming_task_and_reward(tmp_path, store, monkeypatch):
    """Before the guard the NaN reached the replay and crashed the next reward loss with an
    IndexError inside the symlog two-hot encoding."""
    monkeypatch.setitem(sanity._ENVS, "chase", _nan_reward_chase(30))
    code, _, err = mow_cli(storm_args(extra=["--runs-root", "runs", "--no-eval"]))
    assert code == 1, err
    line = _one_error_line(err)
    run = storm_run(tmp_path / "runs")
    assert "training diverged at env step 30 (task chase): non-finite env/reward/chase returned by the environment " \
           "(env 0: nan)" in line, line
    assert f"{(run / 'checkpoints/state.ckpt').relative_to(tmp_path)} (env step 20) is kept" in line, line
    assert checkpoint.load(run / "checkpoints/state.ckpt")["step"] == 20 and not (run / "model.ckpt").exists()
    _, mlrun = mlflow_run("storm/chase/seed1")
    assert mlrun.info.status == "FAILED"


def test_nan_reward_during_mow_warmup_collection_names_the_task_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sanity._ENVS, "chase", _nan_reward_chase(12))
    code, _, err = mow_cli(["collect", "--params", str(PARAMS), "--suite", "sanity", "--seed", "1", "--no-progress",
                            "--runs-root", "runs", *sets(TINY_MOW)])
    assert code == 1, err
    assert "collect sanity/seed1: the environment returned a non-finite reward at step 12 (task chase: nan); " \
           "nothing was written" in _one_error_line(err)
    assert not (tmp_path / "runs").exists()


def test_huge_learning_rate_stops_with_the_divergence_line_not_a_sampling_traceback(tmp_path, store):
    """`1e30` (no dot, no exponent sign) is a number on the command line, as a user types it.
    One Adam step at that rate blows the actor's weights up; acting with it used to end in
    torch.multinomial's raw 'probability tensor contains either inf, nan' traceback."""
    code, _, err = mow_cli(storm_args(extra=["--runs-root", "runs", "--no-eval", "--set", "train.ac_lr=1e30"]))
    assert code == 1, err
    line = _one_error_line(err)
    assert "storm/chase/seed1: training diverged at env step" in line and "(task chase)" in line, line
    assert "actor/logits" in line and "is a learning rate too high?" in line, line
    assert "(env step 20) is kept" in line, line
    assert not (storm_run(tmp_path / "runs") / "model.ckpt").exists()
    _, mlrun = mlflow_run("storm/chase/seed1")
    assert mlrun.info.status == "FAILED"


def test_mow_nan_in_one_clusters_head_names_only_that_task(tmp_path, store):
    """MoW: a NaN weight in the reward head of the cluster that holds `chase` (and only
    chase): the stop names task chase, not side, nor 'a batch mixing tasks'."""
    short = mow_args(extra=["--runs-root", "runs", "--no-eval", "--set", "train.env_steps=20",
                            "--set", "train.warmup_steps=19"])
    code, _, err = mow_cli(short)  # warm-up + 20 random steps per task, no update yet
    assert code == 0, err
    run = mow_run(tmp_path / "runs")
    state_file = run / "checkpoints/state.ckpt"
    state = checkpoint.load(state_file)
    longer = mow_args(extra=["--runs-root", "runs", "--no-eval", "--set", "train.warmup_steps=19"])
    from mow.config import load_params

    params = load_params(longer[2], overrides=[longer[i + 1] for i, a in enumerate(longer) if a == "--set"])
    state["params"], state["params_hash"] = params.to_dict(), params.digest()
    clusters = json.loads((run / "warmup/clusters.json").read_text())
    chase = dict(zip(clusters["tasks"], clusters["assignment"]))["chase"]
    assert chase != dict(zip(clusters["tasks"], clusters["assignment"]))["side"]
    bias = f"heads.{chase}.reward.out.bias"
    assert bias in state["world_model"], sorted(state["world_model"])
    state["world_model"][bias][0] = float("nan")
    checkpoint.save(state_file, state)

    code, _, err = mow_cli(longer)
    assert code == 1, err
    line = _one_error_line(err)
    assert "mow/all/seed1: training diverged at env step" in line and "(task chase)" in line, line
    assert "wm/reward/chase" in line and "/side" not in line, line
    assert "(env step 20) is kept" in line, line
    _, mlrun = mlflow_run("mow/all/seed1")
    assert mlrun.info.status == "FAILED"
