"""A pipeline job killed mid-run (a cluster preemption or the OOM killer SIGKILLs the job's
process): rerunning the same `snakemake` command finishes the DAG without redoing the job
that had finished, and the killed training resumes from its last checkpoint instead of
starting over. Real Snakemake, real `mow train` jobs, a real SIGKILL, in a copy of the
project at a budget where each training takes a few updates."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mow.checkpoint import previous_path

from conftest import step_of
from test_pipeline import job_stats, make_copy

GAMES = ("Pong", "Breakout")


def _model(game: str) -> str:
    return f"runs/smoke/atari/storm_compat/storm/full/{game}/seed1/model.ckpt"


def _train_job(session: int) -> int | None:
    """The pid of the `mow train` process running under the Snakemake session `session`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if os.getsid(int(entry.name)) == session and b"mow" in argv and b"train" in argv:
                return int(entry.name)
        except (OSError, ProcessLookupError):  # it ended while we looked
            continue
    return None


@pytest.mark.slow
def test_sigkill_of_a_training_job_then_the_same_snakemake_command_resumes_it_and_keeps_the_finished_one(tmp_path):
    work = make_copy(tmp_path)
    params = yaml.safe_load((work / "params.yaml").read_text())
    # random until step 60, checkpoints at 40 and 80: the killed job has updates left to do
    params["scales"]["smoke"]["train"].update(env_steps=120, warmup_steps=60, checkpoint_every=40, log_every=40,
                                              wm_batch=4, imag_batch=16, update_ratio=0.125,
                                              buffer_capacity=200)  # small checkpoints
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    command = [sys.executable, "-m", "snakemake", "--cores", "1", *map(_model, GAMES)]

    first = subprocess.Popen(command, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # its own session: its jobs are found by session id
    killed = None
    deadline = time.monotonic() + 900
    while killed is None and first.poll() is None and time.monotonic() < deadline:
        done = [g for g in GAMES if (work / _model(g)).exists()]
        running = [g for g in GAMES if g not in done]
        if len(done) == 1 and step_of(work / Path(_model(running[0])).parent / "checkpoints/state.ckpt") >= 40:
            pid = _train_job(first.pid)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed = running[0]
        time.sleep(0.1)
    out = first.communicate(timeout=300)[0]
    assert killed is not None, f"no job was killed (the budget may be too small):\n{out[-3000:]}"
    assert first.returncode != 0 and "Error in rule train_storm" in out, out[-3000:]
    finished = work / _model(next(g for g in GAMES if g != killed))
    state = work / Path(_model(killed)).parent / "checkpoints/state.ckpt"
    # what the rerun must resume from: state.ckpt, or .prev if the kill fell between its two renames
    resume_at = step_of(state) if step_of(state) >= 0 else step_of(previous_path(state))
    assert 40 <= resume_at < 120 and not (work / _model(killed)).exists()
    before = (finished.stat().st_mtime_ns, hashlib.sha256(finished.read_bytes()).hexdigest())

    again = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=900)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert job_stats(out) == {"train_storm": 1, "total": 1}, out[-3000:]  # only the killed job runs again
    assert (finished.stat().st_mtime_ns, hashlib.sha256(finished.read_bytes()).hexdigest()) == before
    log = (work / f"logs/smoke/train_storm/storm_compat/{killed}/seed1.log").read_text()
    assert f"resumed storm/{killed}/seed1 from " in log and f"at env step {resume_at}" in log, log[-2000:]
    assert step_of(state) == 120 and (work / _model(killed)).is_file()
