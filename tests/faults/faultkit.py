"""Helpers of the fault-injection suite: tiny configurations, the `mow` CLI called in-process
(one torch import for the whole suite), a forked child as the process that gets SIGKILLed,
and weight comparison. Faults are injected for real; nothing here fakes a component."""

from __future__ import annotations

import contextlib
import io
import os
import signal
from pathlib import Path

import pytest
import torch

from mow import checkpoint

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"

# The smallest model and budget that still runs every part of a training step: 60 agent
# steps, random until step 20, checkpoints at 20, 40, 60 (the last one at the end).
TINY = ["train.env_steps=60", "train.warmup_steps=20", "train.checkpoint_every=20", "train.log_every=20",
        "train.threads=1", "train.buffer_capacity=100", "train.wm_batch=2", "train.wm_seq_len=8",
        "train.imag_batch=4", "train.imag_context=2", "train.imag_horizon=4", "train.act_context=4",
        "train.update_ratio=0.25", "model.world_model.encoder_channels=[4,4,4,4]", "model.world_model.d_model=16",
        "model.world_model.ffn=32", "model.world_model.stoch=4", "model.world_model.classes=4",
        "model.world_model.head_hidden=16", "model.world_model.reward_bins=15", "model.agent.hidden=16",
        "model.agent.value_bins=15", "protocols.sanity.eval_episodes=2", "protocols.sanity.eval_envs=1"]
TINY_MOW = TINY + ["suites.sanity.tasks=[side, chase]", "model.mow.task_embed_dim=4", "model.mow.router_hidden=8",
                   "model.mow.expert_d_model=16", "model.mow.expert_ffn=32", "model.mow.shared_d_model=16",
                   "model.mow.shared_ffn=32", "warmup.collect_steps=20", "warmup.pretrain_steps=2",
                   "warmup.pretrain_batch=2", "warmup.cluster_batches=1", "warmup.cluster_batch=2"]


def sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def storm_args(task: str = "chase", seed: int = 1, extra: list[str] = ()) -> list[str]:
    return ["train", "--params", str(PARAMS), "--suite", "sanity", "--task", task, "--seed", str(seed), "--no-progress",
            *sets(TINY), *extra]


def mow_args(seed: int = 1, extra: list[str] = ()) -> list[str]:
    return ["train", "--params", str(PARAMS), "--suite", "sanity", "--method", "mow", "--seed", str(seed),
            "--no-progress", *sets(TINY_MOW), *extra]


def storm_run(root: Path, task: str = "chase", seed: int = 1) -> Path:
    return Path(root) / f"smoke/sanity/sanity/storm/full/{task}/seed{seed}"


def mow_run(root: Path, seed: int = 1) -> Path:
    return Path(root) / f"smoke/sanity/sanity/mow/full/all/seed{seed}"


def mow_cli(argv: list[str]) -> tuple[int, str, str]:
    """`mow ARGV` in this process: (exit code, stdout, stderr). Restores torch's thread count,
    which a run sets from train.threads, so the rest of the test session is unaffected."""
    from mow.cli import main

    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse rejects unknown options/choices this way
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


def mow_forked(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> int:
    """`mow ARGV` in a forked child (no second torch import); the exit code, or minus the
    signal that ended it (-9 for SIGKILL)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            os.environ.update(env or {})
            os.chdir(cwd)
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            from mow.cli import main

            checkpoint._saves.clear()  # the hook counts this process's saves, not the parent's
            code = main(argv)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def assert_same_weights(a: Path, b: Path) -> None:
    """Two model/state checkpoints hold bit-identical world-model and actor-critic weights."""
    left, right = checkpoint.load(a), checkpoint.load(b)
    for part in ("world_model", "actor_critic"):
        assert left[part].keys() == right[part].keys()
        for key in left[part]:
            assert torch.equal(left[part][key], right[part][key]), f"{part}.{key} differs: {a} vs {b}"


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


SIGKILL = -signal.SIGKILL


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Every fault test runs in its own folder (relative run roots, mlartifacts/ land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
