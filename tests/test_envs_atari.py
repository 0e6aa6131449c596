"""Atari env protocol (SPEC 3.1) checked against the real ALE."""

from __future__ import annotations

import pickle

import ale_py
import cv2
import gymnasium
import numpy as np
import pytest

from mow.envs import ATARI_GAMES, ATARI_MINIMAL_ACTIONS, legal_action_mask, make_env

gymnasium.register_envs(ale_py)

STORM = dict(sticky_prob=0.25, noop_max=0, frame_skip=4, max_frames=108000, image_size=64)
DETERMINISTIC = dict(STORM, sticky_prob=0.0)


def rollout(env, actions) -> list[tuple]:
    """Step `actions`, resetting (seed=None) at episode ends; one comparable tuple per step."""
    steps = []
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        steps.append((obs.tobytes(), reward, terminated, truncated, info["life_loss"]))
        if terminated or truncated:
            env.reset()
    return steps


def assert_plain(value) -> None:
    """Env states may only hold checkpoint-friendly types."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str)
            assert_plain(item)
    elif isinstance(value, list):
        for item in value:
            assert_plain(item)
    else:
        assert isinstance(value, (int, float, bool, str, bytes, np.ndarray)), type(value)


def test_frame_skip_sums_rewards_and_max_pools_the_last_two_raw_frames():
    env = make_env("atari", "Pong", DETERMINISTIC, seed=7, train=True)
    raw = gymnasium.make("ALE/Pong-v5", frameskip=1, repeat_action_probability=0.0)
    raw_obs, _ = raw.reset(seed=7)
    obs, _ = env.reset(seed=7)
    resize = lambda frame: cv2.resize(frame, (64, 64), interpolation=cv2.INTER_AREA)  # noqa: E731
    np.testing.assert_array_equal(obs, resize(raw_obs))

    rng = np.random.default_rng(0)
    rewards, pooling_mattered = [], False
    for _ in range(300):
        action = int(rng.integers(6))
        frames, raw_reward = [raw_obs], 0.0
        for _ in range(4):
            raw_obs, r, terminated, truncated, _ = raw.step(action)
            frames.append(raw_obs)
            raw_reward += r
        obs, reward, *_ = env.step(action)
        assert reward == raw_reward
        np.testing.assert_array_equal(obs, resize(np.maximum(frames[-1], frames[-2])))
        pooling_mattered |= not np.array_equal(obs, resize(frames[-1]))
        rewards.append(reward)
    assert any(r != 0 for r in rewards), "no reward in 300 steps: the reward check was vacuous"
    assert pooling_mattered


def test_life_loss_is_flagged_for_training_only_and_does_not_reset():
    envs = {
        train: make_env("atari", "Breakout", DETERMINISTIC, seed=1, train=train)
        for train in (True, False)
    }
    # lives[train][i] is the count before step i, lives[train][i + 1] the count after it
    lives = {train: [env.ale.lives()] for train, env in envs.items()}
    flags = {True: [], False: []}
    frame_numbers = []
    for action in np.random.default_rng(0).integers(4, size=2000):
        for train, env in envs.items():
            _, _, terminated, truncated, info = env.step(int(action))
            assert not (terminated or truncated)
            lives[train].append(env.ale.lives())
            flags[train].append(info["life_loss"])
        frame_numbers.append(envs[True].ale.getEpisodeFrameNumber())
        if lives[True][-1] == lives[True][0] - 2:
            break
    assert lives[True] == lives[False]
    drops = [i for i in range(len(flags[True])) if lives[True][i + 1] < lives[True][i]]
    assert len(drops) == 2, "random play did not lose two lives"
    assert [i for i, flag in enumerate(flags[True]) if flag] == drops
    assert not any(flags[False])
    assert np.all(np.diff(frame_numbers) > 0), "the episode restarted"


def test_sticky_probability_reaches_the_ale():
    ale = make_env("atari", "Pong", STORM, seed=0, train=True).ale
    assert ale.getFloat("repeat_action_probability") == 0.25
    # With p=1 the ALE always repeats the previous action (NOOP after reset), so random
    # actions have no effect; with p=0 they do.
    actions = np.random.default_rng(1).integers(6, size=100)
    for prob, same in ((1.0, True), (0.0, False)):
        protocol = dict(STORM, sticky_prob=prob)
        acting = rollout(make_env("atari", "Pong", protocol, seed=1, train=True), actions)
        idle = rollout(make_env("atari", "Pong", protocol, seed=1, train=True), np.zeros(100, int))
        assert (acting == idle) is same


def test_noop_starts_vary_with_the_seed_and_are_off_at_zero():
    for noop_max in (30, 0):
        env = make_env(
            "atari", "MsPacman", dict(DETERMINISTIC, noop_max=noop_max), seed=0, train=True
        )
        starts = []
        for seed in range(6):
            obs, _ = env.reset(seed=seed)
            starts.append((env.ale.getEpisodeFrameNumber(), obs.tobytes()))
        frames = [frame for frame, _ in starts]
        if noop_max:
            assert all(1 <= f <= 30 for f in frames) and len(set(frames)) > 2
            assert len({obs for _, obs in starts}) > 2
        else:
            assert len(set(starts)) == 1 and frames[0] == 0


def test_frame_cap_truncates_the_episode():
    ale = make_env("atari", "Pong", STORM, seed=0, train=True).ale
    assert ale.getInt("max_num_frames_per_episode") == 108000
    env = make_env("atari", "Pong", dict(STORM, max_frames=400), seed=0, train=True)
    for step in range(1, 101):
        _, _, terminated, truncated, _ = env.step(0)
        assert not terminated and truncated == (step == 100)


def test_all_games_construct_with_minimal_and_full_action_sets():
    for game in ATARI_GAMES:
        env = make_env("atari", game, STORM, seed=0, train=True, full_action_space=True)
        assert env.action_space == gymnasium.spaces.Discrete(18)
        assert env.observation_space == gymnasium.spaces.Box(0, 255, (64, 64, 3), np.uint8)
        minimal = [action.value for action in env.ale.getMinimalActionSet()]
        assert len(minimal) == ATARI_MINIMAL_ACTIONS[game], game
        mask = legal_action_mask("atari", game, full_action_space=True)
        assert mask.dtype == bool and mask.shape == (18,)
        assert np.flatnonzero(mask).tolist() == minimal
        own_mask = legal_action_mask("atari", game, full_action_space=False)
        assert own_mask.all() and own_mask.shape == (len(minimal),)
        obs, reward, *_, info = env.step(minimal[-1])
        assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8 and obs.max() > 0
        assert isinstance(reward, float) and isinstance(info["life_loss"], bool)
        env.close()
    assert len(ATARI_GAMES) == 26 and set(ATARI_GAMES) == set(ATARI_MINIMAL_ACTIONS)


def test_full_action_ids_act_like_the_minimal_indices():
    minimal = make_env("atari", "Pong", DETERMINISTIC, seed=2, train=True)
    full = make_env("atari", "Pong", DETERMINISTIC, seed=2, train=True, full_action_space=True)
    assert minimal.action_space.n == ATARI_MINIMAL_ACTIONS["Pong"]
    ids = np.flatnonzero(legal_action_mask("atari", "Pong", full_action_space=True))
    indices = np.random.default_rng(3).integers(len(ids), size=150)
    assert rollout(minimal, indices) == rollout(full, ids[indices])


def test_image_size_is_respected():
    env = make_env("atari", "Breakout", dict(STORM, image_size=32), seed=0, train=False)
    assert env.step(0)[0].shape == (32, 32, 3)


def test_state_restores_an_exact_continuation_with_sticky_actions():
    # Short capped episodes make the continuation cross resets, which draw no-op counts.
    protocol = dict(STORM, noop_max=30, max_frames=400)
    env = make_env("atari", "Breakout", protocol, seed=3, train=True)
    rng = np.random.default_rng(0)
    full_lives = env.ale.lives()
    for _ in range(400):  # save mid-episode with a life already lost
        rollout(env, [int(rng.integers(4))])
        if env.ale.lives() < full_lives:
            break
    assert env.ale.lives() < full_lives
    state = pickle.loads(pickle.dumps(env.get_state()))
    assert_plain(state)
    actions = rng.integers(4, size=250)
    expected = rollout(env, actions)
    truncations, rewards, life_losses = (sum(s[i] for s in expected) for i in (3, 1, 4))
    assert truncations >= 2 and rewards > 0 and life_losses > 0  # the comparison covers them

    restored = make_env("atari", "Breakout", protocol, seed=99, train=True)
    restored.set_state(state)
    assert rollout(restored, actions) == expected
    unrestored = make_env("atari", "Breakout", protocol, seed=99, train=True)
    assert rollout(unrestored, actions) != expected


def test_unknown_game_is_a_one_line_value_error():
    with pytest.raises(ValueError, match="'Pongg'.*Alien, Amidar") as err:
        make_env("atari", "Pongg", STORM, seed=0, train=True)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="'Pongg'"):
        legal_action_mask("atari", "Pongg", full_action_space=True)
    with pytest.raises(ValueError, match="frame_skip"):
        make_env("atari", "Pong", {"sticky_prob": 0.25}, seed=0, train=True)
