"""The built-in sanity tasks: learnable signal, determinism, exact state restore."""

from __future__ import annotations

import itertools
import pickle

import gymnasium
import numpy as np
import pytest

from mow.envs import SANITY_REFERENCE, SANITY_TASKS, legal_action_mask, make_env

PROTOCOL = {"image_size": 64}


def episode_return(env, policy) -> float:
    """Play one episode from the env's current reset state."""
    total, done = 0.0, False
    while not done:
        _, reward, terminated, truncated, info = env.step(policy(env))
        assert not info["life_loss"]
        total += reward
        done = terminated or truncated
    env.reset()
    return total


def test_tasks_have_the_documented_spaces_and_episode_end():
    assert SANITY_TASKS == ("side", "opposite", "chase", "color")
    for task in SANITY_TASKS:
        env = make_env("sanity", task, PROTOCOL, seed=0, train=True)
        assert env.observation_space == gymnasium.spaces.Box(0, 255, (64, 64, 3), np.uint8)
        assert env.action_space.n in (2, 3, 4)
        obs, info = env.reset(seed=0)
        assert obs.dtype == np.uint8 and obs.shape == (64, 64, 3) and obs.max() == 255
        assert info == {"life_loss": False}
        for step in range(1, env.episode_length + 1):
            obs, reward, terminated, truncated, info = env.step(0)
            assert isinstance(reward, float) and reward != 0
            assert not terminated and truncated == (step == env.episode_length)
            assert info == {"life_loss": False}
        small = make_env("sanity", task, {"image_size": 32}, seed=0, train=True)
        assert small.reset(seed=0)[0].shape == (32, 32, 3)


@pytest.mark.parametrize("task", SANITY_TASKS)
def test_random_policy_scores_the_reference_and_the_optimal_policy_clearly_more(task):
    random_ref, optimal_ref = SANITY_REFERENCE[task]
    env = make_env("sanity", task, PROTOCOL, seed=1, train=True)
    rng = np.random.default_rng(2)
    random_returns = [
        episode_return(env, lambda e: int(rng.integers(e.action_space.n))) for _ in range(200)
    ]
    optimal_returns = [episode_return(env, lambda e: e.optimal_action()) for _ in range(200)]
    # 200 episodes: the mean lies within 4 standard errors of the expectation.
    for returns, reference in ((random_returns, random_ref), (optimal_returns, optimal_ref)):
        stderr = np.std(returns) / np.sqrt(len(returns))
        assert abs(np.mean(returns) - reference) <= 4 * stderr + 1e-9, (
            task,
            np.mean(returns),
            reference,
        )
    assert abs(random_ref) < 0.5 and optimal_ref - random_ref > 5
    assert np.mean(optimal_returns) - np.mean(random_returns) > 4


def test_same_seed_same_episode_and_seeds_change_it():
    def trajectory(task, seed, episodes=3):
        env = make_env("sanity", task, PROTOCOL, seed=seed, train=True)
        actions = np.random.default_rng(0).integers(env.action_space.n, size=episodes * 20)
        out, obs = [], env.reset(seed=seed)[0]
        for action in actions:
            out.append(obs.tobytes())
            obs, reward, terminated, truncated, _ = env.step(int(action))
            out.append(reward)
            if terminated or truncated:  # the next episode continues the RNG stream
                obs, _ = env.reset()
        return out

    for task in SANITY_TASKS:
        assert trajectory(task, 5) == trajectory(task, 5)
        assert trajectory(task, 5) != trajectory(task, 6)


def test_tasks_look_different():
    firsts = {
        task: make_env("sanity", task, PROTOCOL, seed=0, train=True).reset(seed=0)[0]
        for task in SANITY_TASKS
    }
    for a, b in itertools.combinations(SANITY_TASKS, 2):
        assert not np.array_equal(firsts[a], firsts[b]), (a, b)


def test_opposite_rewards_the_other_side_of_the_same_picture():
    side = make_env("sanity", "side", PROTOCOL, seed=3, train=True)
    opposite = make_env("sanity", "opposite", PROTOCOL, seed=3, train=True)
    side_obs, opposite_obs = side.reset(seed=3)[0], opposite.reset(seed=3)[0]
    np.testing.assert_array_equal(side_obs[8:], opposite_obs[8:])  # only the marker bar differs
    for _ in range(10):
        assert side.step(0)[1] == -opposite.step(0)[1]


def test_state_restores_an_exact_continuation():
    for task in SANITY_TASKS:
        env = make_env("sanity", task, PROTOCOL, seed=4, train=True)
        rng = np.random.default_rng(5)
        for action in rng.integers(env.action_space.n, size=7):
            env.step(int(action))
        state = pickle.loads(pickle.dumps(env.get_state()))
        actions = rng.integers(env.action_space.n, size=60)  # crosses several episode ends

        def run(e, actions):
            out = []
            for action in actions:
                obs, reward, terminated, truncated, _ = e.step(int(action))
                out.append((obs.tobytes(), reward, truncated))
                if terminated or truncated:
                    out.append(e.reset()[0].tobytes())
            return out

        expected = run(env, actions)
        restored = make_env("sanity", task, PROTOCOL, seed=123, train=True)
        restored.set_state(state)
        assert run(restored, actions) == expected, task
        other = make_env(
            "sanity", "side" if task != "side" else "color", PROTOCOL, seed=0, train=True
        )
        with pytest.raises(ValueError, match=task):
            other.set_state(state)


def test_full_action_space_pads_the_mask_and_never_rewards_extra_actions():
    for task in SANITY_TASKS:
        env = make_env("sanity", task, PROTOCOL, seed=0, train=True, full_action_space=True)
        n = make_env("sanity", task, PROTOCOL, seed=0, train=True).action_space.n
        assert env.action_space.n == 18
        assert legal_action_mask("sanity", task, full_action_space=True).tolist() == [True] * n + [
            False
        ] * (18 - n)
        assert legal_action_mask("sanity", task, full_action_space=False).tolist() == [True] * n
        assert all(env.step(17)[1] < 0 for _ in range(env.episode_length))
        with pytest.raises(ValueError, match="18"):
            env.step(18)


def test_unknown_task_and_suite_are_one_line_value_errors():
    with pytest.raises(ValueError, match="'sidee'.*side, opposite, chase, color") as err:
        make_env("sanity", "sidee", PROTOCOL, seed=0, train=True)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="'sidee'"):
        legal_action_mask("sanity", "sidee", full_action_space=False)
    with pytest.raises(ValueError, match="'procgen'.*atari, sanity, metaworld"):
        make_env("procgen", "coinrun", PROTOCOL, seed=0, train=True)
    with pytest.raises(ValueError, match="'procgen'"):
        legal_action_mask("procgen", "coinrun", full_action_space=True)
