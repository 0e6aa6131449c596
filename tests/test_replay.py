"""Replay: FIFO ring per env stream, sequences are contiguous in time, state round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mow.replay import ReplayBuffer


def _fill(buf: ReplayBuffer, steps: int, num_envs: int) -> None:
    for t in range(steps):
        # each frame carries its (time, env) id so sampled sequences can be checked
        obs = np.zeros((num_envs, 4, 4, 3), np.uint8)
        obs[:, 0, 0, 0] = t % 256
        obs[:, 0, 0, 1] = np.arange(num_envs)
        buf.add(obs, np.full(num_envs, t), np.full(num_envs, float(t)), np.zeros(num_envs))


def test_sequences_are_contiguous_single_stream_and_respect_the_ring():
    buf = ReplayBuffer(capacity=20, num_envs=2, obs_shape=(4, 4, 3), seed=0)
    _fill(buf, 25, 2)          # 10 rows per stream: steps 15..24 remain
    assert len(buf) == 20
    b = buf.sample(64, 5)
    assert b.obs.shape == (64, 5, 4, 4, 3) and b.obs.dtype == torch.uint8
    t = b.actions
    assert torch.all(t[:, 1:] - t[:, :-1] == 1), "a sequence must be consecutive steps"
    assert t.min() >= 15 and t.max() <= 24, "overwritten steps must not be sampled"
    envs = b.obs[:, :, 0, 0, 1]
    assert torch.all(envs == envs[:, :1]), "a sequence must come from one env stream"
    assert torch.equal(b.rewards, t.float())


def test_sampling_is_seeded_and_state_round_trips():
    a, b = (ReplayBuffer(16, 1, (4, 4, 3), seed=3) for _ in range(2))
    _fill(a, 12, 1)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.sample(8, 4).actions, b.sample(8, 4).actions)
    with pytest.raises(ValueError, match="fewer than a sequence"):
        ReplayBuffer(16, 1, (4, 4, 3)).sample(2, 4)
