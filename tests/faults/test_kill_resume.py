"""SIGKILL at several points of a run, including inside the checkpoint writer; the rerun of
the same command resumes from the last complete checkpoint and ends with exactly the
weights of an uninterrupted run (CPU). Killing *between* checkpoints at the default smoke
model is proven by tests/test_train.py and tests/test_mow_train.py
(`test_sigkill_midway_then_rerun_ends_with_identical_weights`), not repeated here.

The kill inside the writer is made deterministic by the test hook MOW_TEST_KILL_DURING_SAVE
(mow/checkpoint.py): the process SIGKILLs itself half-way through writing the n-th
state.ckpt, or between moving the old file to `.prev` and renaming the new one."""

from __future__ import annotations

import json
import shutil

import pytest

from mow import checkpoint
from mow.checkpoint import previous_path

from faultkit import (SIGKILL, in_tmp,  # noqa: F401 - fixture
                       assert_same_weights, mow_cli, mow_forked, mow_run, mow_args, storm_args,
                      storm_run)
from stores import mlflow_run, store, store_template  # noqa: F401 - fixtures

NO_EVAL = ["--no-eval"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted tiny STORM run (the weights every resumed run must end with)."""
    root = tmp_path_factory.mktemp("reference")
    code, _, err = mow_cli(storm_args(extra=["--runs-root", str(root), "--no-track", *NO_EVAL]))
    assert code == 0, err
    return storm_run(root)


def test_same_seed_and_config_give_identical_weights_and_losses_on_cpu(reference, tmp_path):
    code, _, err = mow_cli(storm_args(extra=["--runs-root", str(tmp_path), "--no-track", *NO_EVAL]))
    assert code == 0, err
    again = storm_run(tmp_path)
    assert_same_weights(reference / "model.ckpt", again / "model.ckpt")
    losses = [[{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")}
               for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (reference, again)]
    assert losses[0] == losses[1] and any("wm/total" in row for row in losses[0])


@pytest.mark.parametrize("point, resumes_at", [
    ("state.ckpt:1:write", None),    # the first checkpoint half-written: no complete one yet
    ("state.ckpt:2:write", 20),      # the second half-written: state.ckpt (step 20) untouched
    ("state.ckpt:3:rotate", 40),     # the final save between its two renames: only .prev is left
])
def test_sigkill_inside_the_checkpoint_writer_then_rerun_matches_an_uninterrupted_run(
        reference, tmp_path, point, resumes_at):
    args = storm_args(extra=["--runs-root", "runs", "--no-track", *NO_EVAL])
    assert mow_forked(args, tmp_path, {"MOW_TEST_KILL_DURING_SAVE": point}) == SIGKILL
    run = storm_run(tmp_path / "runs")
    state = run / "checkpoints/state.ckpt"
    assert list(state.parent.glob(".state.ckpt.*.tmp")), "the kill did not land inside the writer"
    complete = state if state.exists() else previous_path(state)
    if resumes_at is None:
        assert not state.exists() and not previous_path(state).exists()
    else:  # whatever is there is complete and checksummed, never the half-written file
        assert checkpoint.load(complete)["step"] == resumes_at
    assert not (run / "model.ckpt").exists()

    code, out, err = mow_cli(args)  # the same command again (here in-process)
    assert code == 0, err
    if resumes_at is None:
        assert "resumed" not in out
    else:
        assert f"from {complete.relative_to(tmp_path)} at env step {resumes_at}" in out
    assert not list(state.parent.glob(".*.tmp")), "the killed writer's temporary was not cleaned up"
    assert_same_weights(reference / "model.ckpt", run / "model.ckpt")
    assert_same_weights(reference / "checkpoints/state.ckpt", state)


def test_sigkill_mid_write_keeps_one_mlflow_run_that_ends_finished(reference, tmp_path, store):
    """The resumed run continues the killed run's MLflow run and metric curve: one run,
    FINISHED, every step present. (MLflow cannot delete single metric points, so a step
    logged after the last checkpoint and before the kill appears twice, with the same
    value on CPU; metrics.jsonl is truncated on resume and holds it once.)"""
    args = storm_args(extra=["--runs-root", "runs", *NO_EVAL])
    assert mow_forked(args, tmp_path, {"MOW_TEST_KILL_DURING_SAVE": "state.ckpt:2:write"}) == SIGKILL
    _, killed = mlflow_run("storm/chase/seed1")
    assert killed.info.status == "RUNNING"  # SIGKILL cannot be caught: the rerun must pick it up
    code, _, err = mow_cli(args)
    assert code == 0, err
    client, run = mlflow_run("storm/chase/seed1")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "replay/size")]
    assert set(steps) == {20, 40, 60}
    mirror = [json.loads(line)["step"] for line in (storm_run(tmp_path / "runs") / "metrics.jsonl").read_text().splitlines()]
    assert mirror == [20, 40, 60]
    assert_same_weights(reference / "model.ckpt", storm_run(tmp_path / "runs") / "model.ckpt")


def test_mow_sigkill_mid_write_then_rerun_matches_an_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    code, _, err = mow_cli(mow_args(extra=["--runs-root", str(straight), "--no-track", *NO_EVAL]))
    assert code == 0, err
    # the warm-up outputs are shared, so the killed run only repeats the joint training
    shutil.copytree(straight / "smoke/sanity/sanity/warmup_data", tmp_path / "runs/smoke/sanity/sanity/warmup_data")
    shutil.copytree(mow_run(straight) / "warmup", mow_run(tmp_path / "runs") / "warmup")
    args = mow_args(extra=["--runs-root", "runs", "--no-track", *NO_EVAL])
    assert mow_forked(args, tmp_path, {"MOW_TEST_KILL_DURING_SAVE": "state.ckpt:2:write"}) == SIGKILL
    state = mow_run(tmp_path / "runs") / "checkpoints/state.ckpt"
    assert checkpoint.load(state)["step"] == 20
    code, out, err = mow_cli(args)
    assert code == 0, err
    assert "at env step 20" in out
    assert_same_weights(mow_run(straight) / "model.ckpt", mow_run(tmp_path / "runs") / "model.ckpt")
