"""VectorEnv: seeding, auto-reset, episode accounting that keeps the final reward, state."""

from __future__ import annotations

import functools
import pickle

import numpy as np

from mow.envs import VectorEnv, make_env

SANITY = {"image_size": 64}
PONG_SHORT = dict(sticky_prob=0.25, noop_max=0, frame_skip=4, max_frames=2000, image_size=64)


def sanity_vector(tasks) -> VectorEnv:
    return VectorEnv(
        [functools.partial(make_env, "sanity", t, SANITY, seed=0, train=True) for t in tasks]
    )


def test_reset_seeds_env_i_with_seed_plus_i_and_auto_resets_from_the_own_stream():
    vec = sanity_vector(["chase", "chase", "color"])
    obs = vec.reset(seed=10)
    assert obs.shape == (3, 64, 64, 3) and obs.dtype == np.uint8
    tasks = ["chase", "chase", "color"]
    singles = [make_env("sanity", t, SANITY, seed=10 + i, train=True) for i, t in enumerate(tasks)]
    for i, env in enumerate(singles):
        np.testing.assert_array_equal(obs[i], env.reset(seed=10 + i)[0])
    assert not np.array_equal(obs[0], obs[1])

    actions = np.random.default_rng(0).integers(2, size=(45, 3))
    for row in actions:
        step = vec.step(row)
        for i, env in enumerate(singles):
            single_obs, reward, terminated, truncated, _ = env.step(int(row[i]))
            if terminated or truncated:
                single_obs, _ = env.reset()  # seed=None: the env's own stream
            np.testing.assert_array_equal(step.obs[i], single_obs)
            assert step.reward[i] == np.float32(reward)
            assert (step.terminated[i], step.truncated[i]) == (terminated, truncated)
    assert step.reward.dtype == np.float32 and step.life_loss.dtype == bool


def test_finished_episode_return_includes_the_final_reward():
    vec = sanity_vector(["side", "color"])
    vec.reset(seed=0)
    finished = []
    for _ in range(25):  # the optimal policy earns +1 on every step, the last one included
        actions = np.array([env.optimal_action() for env in vec.envs])
        finished += vec.step(actions).finished
    assert finished == [(0, 10.0, 10), (1, 10.0, 10), (0, 10.0, 10), (1, 10.0, 10)]


def collect_returns(vec: VectorEnv, actions) -> tuple[list, list]:
    """Finished episodes, and each episode's return summed independently of VectorEnv."""
    running = [0.0] * vec.num_envs
    summed, finished = [], []
    for row in actions:
        step = vec.step(row)
        for i in range(vec.num_envs):
            running[i] += float(step.reward[i])
            if step.terminated[i] or step.truncated[i]:
                summed.append((i, running[i]))
                running[i] = 0.0
        finished += step.finished
    return finished, summed


def test_random_play_returns_match_the_summed_rewards():
    vec = sanity_vector(["chase", "opposite"])
    vec.reset(seed=3)
    finished, summed = collect_returns(vec, np.random.default_rng(1).integers(2, size=(100, 2)))
    assert len(finished) == 5 + 10
    assert sorted((i, round(r, 6)) for i, r, _ in finished) == sorted(
        (i, round(r, 6)) for i, r in summed
    )
    assert sorted(n for _, _, n in finished) == [10] * 10 + [20] * 5


def test_pong_episode_return_and_length_over_a_capped_episode():
    vec = VectorEnv([functools.partial(make_env, "atari", "Pong", PONG_SHORT, seed=0, train=True)])
    vec.reset(seed=0)
    finished, summed = collect_returns(vec, np.random.default_rng(0).integers(6, size=(500, 1)))
    assert [(i, r) for i, r, _ in finished] == summed
    assert finished[0][2] == 500 and finished[0][1] != 0  # 2000 frames / 4; the opponent scored


def test_state_restores_an_exact_continuation_including_running_returns():
    tasks = ["chase", "side", "color"]
    vec = sanity_vector(tasks)
    vec.reset(seed=7)
    rng = np.random.default_rng(0)
    for row in rng.integers(2, size=(13, 3)):
        vec.step(row)
    state = pickle.loads(pickle.dumps(vec.get_state()))
    actions = rng.integers(2, size=(40, 3))

    def run(v):
        out = []
        for row in actions:
            s = v.step(row)
            out.append((s.obs.tobytes(), s.reward.tolist(), s.truncated.tolist(), s.finished))
        return out

    expected = run(vec)
    restored = sanity_vector(tasks)
    restored.reset(seed=999)
    restored.set_state(state)
    np.testing.assert_array_equal(restored.obs, state["obs"])
    assert run(restored) == expected
    assert any(
        step[3] and step[3][0][2] == 20 for step in expected
    )  # a chase episode spanning the save
