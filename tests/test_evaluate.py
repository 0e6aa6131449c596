"""Evaluation: exact episode quotas per env, and returns that include the final reward."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from mow.config import load_params
from mow.envs import make_env
from mow.envs.vector import VectorEnv
from mow.evaluate import episode_quotas, run_episodes
from mow.runtime import make_runtime, seeded

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


@pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high:UserWarning")  # metaworld's scripted policy
def test_metaworld_success_flag_reaches_the_evaluation_episodes_and_goals_are_walked():
    """metaworld's own scripted reach policy succeeds, standing still does not: each
    episode records whether the flag was set at any step, and the goals it played."""
    import mow.envs.metaworld  # noqa: F401  (chooses the headless GL backend before mujoco loads)
    from metaworld.policies import ENV_POLICY_MAP

    protocol = {"frame_skip": 2, "image_size": 64, "episode_steps": 60}  # 30 agent steps
    envs = VectorEnv([partial(make_env, "metaworld", "reach-v3", protocol, seed=i, train=False) for i in range(2)])
    envs.envs[0].set_goal_sequence([0, 1])
    envs.envs[1].set_goal_sequence([2, 3])
    expert = ENV_POLICY_MAP["reach-v3"]()

    def expert_or_still(context, obs, *, greedy):
        moving = expert.get_action(envs.envs[0].unwrapped_metaworld._get_obs())
        return torch.from_numpy(np.stack([moving, np.zeros(4)]).astype(np.float32))

    runtime = make_runtime({"threads": 0, "deterministic": False, "device": "cpu", "precision": "fp32"})
    episodes = run_episodes(expert_or_still, envs, episode_quotas(4, 2), greedy=True, seed=0, act_context=4,
                            runtime=runtime, success=True)
    envs.close()
    assert [(e["env"], e["goal"], e["success"]) for e in sorted(episodes, key=lambda e: (e["env"], e["goal"]))] == [
        (0, 0, True), (0, 1, True), (1, 2, False), (1, 3, False)]
    assert all(e["length"] == 30 for e in episodes)


def test_seeded_block_is_reproducible_and_leaves_the_outer_streams_as_they_were():
    def draw():
        return torch.rand(3), np.random.rand()

    torch.manual_seed(123)
    np.random.seed(5)
    untouched = draw()
    torch.manual_seed(123)
    np.random.seed(5)
    with seeded(7):
        first = draw()
    with seeded(7):
        again = draw()
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    outer = draw()   # the outer streams continue as if no seeded block had run
    assert torch.equal(outer[0], untouched[0]) and outer[1] == untouched[1]
