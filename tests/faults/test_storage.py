"""Damaged, foreign and unwritable storage, injected for real: truncated checkpoints, a
checkpoint from another configuration or action space, a full file system (a small tmpfs)
and a read-only one (the tmpfs remounted read-only). Each is named by path in one line; the
previous good checkpoint is used or left exactly as it was."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from mow import checkpoint
from mow.checkpoint import previous_path

from faultkit import assert_same_weights, in_tmp, mow_cli, storm_args, storm_run  # noqa: F401 - fixture

ARGS = ["--no-track", "--no-eval"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run: state.ckpt (step 60), state.ckpt.prev (step 40), model.ckpt."""
    root = tmp_path_factory.mktemp("finished")
    code, _, err = mow_cli(storm_args(extra=["--runs-root", str(root), *ARGS]))
    assert code == 0, err
    return storm_run(root)


def _copy_at_step_40(finished, root):
    """The run as a kill at step 50 leaves it: state.ckpt at step 40, no model."""
    run = storm_run(root)
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(previous_path(finished / "checkpoints/state.ckpt"), run / "checkpoints/state.ckpt")
    return run


def test_truncated_checkpoint_falls_back_to_prev_and_still_ends_identical(finished, tmp_path):
    run = storm_run(tmp_path / "runs")
    shutil.copytree(finished, run)
    state = run / "checkpoints/state.ckpt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 3])
    code, out, err = mow_cli(storm_args(extra=["--runs-root", "runs", *ARGS]))
    assert code == 0, err
    assert f"{state.relative_to(tmp_path)}: checksum mismatch" in out and "at env step 40" in out
    assert_same_weights(finished / "model.ckpt", run / "model.ckpt")


def test_both_checkpoints_damaged_is_one_line_naming_both_and_nothing_is_overwritten(finished, tmp_path):
    run = storm_run(tmp_path / "runs")
    shutil.copytree(finished, run)
    state = run / "checkpoints/state.ckpt"
    state.write_bytes(state.read_bytes()[:100])
    previous_path(state).write_bytes(b"MOWCKPT1" + b"\x00" * 10)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, _, err = mow_cli(storm_args(extra=["--runs-root", "runs", *ARGS]))
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("mow: error:") and str(state.relative_to(tmp_path)) in line
    assert str(previous_path(state).relative_to(tmp_path)) in line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("change, named", [
    (["--set", "model.world_model.d_model=32"], "model.world_model.d_model: 16 -> 32"),  # other widths
    (["--set", "model.agent.hidden=8"], "model.agent.hidden: 16 -> 8"),
])
def test_checkpoint_of_another_configuration_is_one_line_naming_the_key(finished, tmp_path, change, named):
    _copy_at_step_40(finished, tmp_path / "runs")
    code, _, err = mow_cli(storm_args(extra=["--runs-root", "runs", *ARGS, *change]))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and named in lines[0], err


def test_checkpoint_of_another_task_and_action_space_is_one_line_naming_both(finished, tmp_path):
    run = storm_run(tmp_path / "runs", task="color")  # 3 actions; `chase` has 2
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(finished / "checkpoints/state.ckpt", run / "checkpoints/state.ckpt")
    code, _, err = mow_cli(storm_args(task="color", extra=["--runs-root", "runs", *ARGS]))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "task chase -> color" in lines[0] and "action space Discrete(2) -> Discrete(3)" in lines[0], err


def _mount_tmpfs(where, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_fs(tmp_path):
    where = tmp_path / "fs"
    if not _mount_tmpfs(where, "8m"):
        pytest.skip("needs root to mount a tmpfs (a full / read-only file system for real)")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_disk_full_while_saving_is_one_line_and_keeps_the_previous_checkpoint(finished, small_fs):
    run = _copy_at_step_40(finished, small_fs)
    state = run / "checkpoints/state.ckpt"
    before = state.read_bytes()
    # fill the file system up to less than one more checkpoint
    free = shutil.disk_usage(small_fs).free
    with open(small_fs / "filler", "wb") as fh:
        fh.write(b"\0" * (free - len(before) // 2))
    code, _, err = mow_cli(storm_args(extra=["--runs-root", str(small_fs), *ARGS]))
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "No space left on device" in lines[0], err
    assert str(state) in lines[0] and "unchanged" in lines[0]
    assert state.read_bytes() == before
    assert not list(state.parent.glob(".*.tmp")) and not (run / "model.ckpt").exists()


def test_read_only_output_folder_is_one_line_and_keeps_the_previous_checkpoint(finished, small_fs):
    run = _copy_at_step_40(finished, small_fs)
    state = run / "checkpoints/state.ckpt"
    before = state.read_bytes()
    assert subprocess.run(["mount", "-o", "remount,ro", str(small_fs)]).returncode == 0
    code, _, err = mow_cli(storm_args(extra=["--runs-root", str(small_fs), *ARGS]))
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Read-only file system" in lines[-1] and str(run) in lines[-1], err
    assert state.read_bytes() == before


def test_truncated_warmup_replay_file_is_named_and_nothing_is_pretrained(tmp_path):
    """The MoW warm-up replay (`mow collect`'s output, read by pretrain and cluster) is a
    checksummed file too: a truncated one is refused by path, never half-loaded."""
    from faultkit import PARAMS, TINY_MOW, sets

    common = ["--params", str(PARAMS), "--suite", "sanity", "--seed", "1", "--no-progress", *sets(TINY_MOW)]
    code, _, err = mow_cli(["collect", *common])
    assert code == 0, err
    (data,) = (tmp_path / "runs").rglob("warmup_data/seed1/replay.ckpt")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    code, _, err = mow_cli(["pretrain", *common])
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("mow: error:") and str(data.relative_to(tmp_path)) in line, err
    assert not list((tmp_path / "runs").rglob("pretrain*.ckpt"))
