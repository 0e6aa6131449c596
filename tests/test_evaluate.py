"""Evaluation: exact episode quotas per env, and returns that include the final reward."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from mow.config import load_params
from mow.envs import make_env
from mow.envs.vector import VectorEnv
from mow.evaluate import episode_quotas, run_episodes
from mow.runtime import make_runtime

from conftest import PARAMS


def test_episode_quotas_split_evenly():
    assert episode_quotas(20, 5).tolist() == [4, 4, 4, 4, 4]
    assert episode_quotas(7, 3).tolist() == [3, 2, 2]
    assert episode_quotas(2, 5).tolist() == [1, 1]


def test_evaluation_returns_include_the_last_steps_reward():
    """`side` pays +1 on each of its 10 steps to the optimal policy, so each return must be
    exactly 10; the official STORM logger, which drops the final reward, would report 9."""
    protocol = dict(load_params(PARAMS).protocol("sanity"))
    envs = VectorEnv([partial(make_env, "sanity", "side", protocol, seed=i, train=False) for i in range(3)])

    def optimal(context, obs, *, greedy):
        return torch.tensor([env.optimal_action() for env in envs.envs])

    runtime = make_runtime({"threads": 0, "deterministic": False, "device": "cpu", "precision": "fp32"})
    episodes = run_episodes(optimal, envs, episode_quotas(7, 3), greedy=True, seed=0, act_context=4, runtime=runtime)
    assert len(episodes) == 7
    assert np.bincount([e["env"] for e in episodes]).tolist() == [3, 2, 2]
    assert all(e["return"] == 10.0 and e["length"] == 10 for e in episodes)
