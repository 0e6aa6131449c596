"""A NaN loss stops training with the step, task and loss name; the MLflow run is FAILED,
the last good checkpoint is kept and no model is written. The NaN is real: one weight of the
reward head in a real checkpoint is poisoned (what a bit flip or an overflow would leave),
so the first world-model update computes a NaN reward loss."""

from __future__ import annotations

import math

import torch

from mow import checkpoint

from faultkit import in_tmp, mow_cli, storm_args, storm_run  # noqa: F401 - fixture
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
