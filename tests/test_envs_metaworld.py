"""Meta-World MT50 from pixels: real rendered frames, success flag, goals, exact restore.

Rendering runs headless through MuJoCo's EGL (or OSMesa) backend; every frame check
rejects black or constant frames, so a broken GL stack fails here instead of silently
training on blank images.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time

import gymnasium
import numpy as np
import pytest

import mow.envs
import mow.envs.metaworld as mw  # chooses MUJOCO_GL before mujoco is imported
from mow.envs import SUITES, VectorEnv, legal_action_mask, make_env
from mow.envs.metaworld import MT50_TASKS, MetaWorldEnv, bench_metaworld, mt50_goals

PROTOCOL = {"frame_skip": 2, "image_size": 64}
# metaworld's scripted policies warn about their own gain constants.
pytestmark = pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high:UserWarning")


def assert_real_frame(frame: np.ndarray) -> None:
    """64x64x3 uint8 with real image content: not black, not constant, many colours."""
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    assert frame.max() > 100, "frame is (nearly) black"
    assert int(frame.max()) - int(frame.min()) > 80, "frame is (nearly) constant"
    assert len(np.unique(frame.reshape(-1, 3), axis=0)) > 50, "frame has too few colours"


def test_the_real_frame_check_rejects_blank_frames():
    for blank in (np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 128, np.uint8)):
        with pytest.raises(AssertionError):
            assert_real_frame(blank)


def scripted_action(env: MetaWorldEnv) -> np.ndarray:
    """metaworld's own scripted policy for the task, reading the simulator state."""
    from metaworld.policies import ENV_POLICY_MAP

    policy = ENV_POLICY_MAP[env.task]()
    return policy.get_action(env.unwrapped_metaworld._get_obs())


def test_suite_is_registered_with_spaces_and_defaults():
    assert "metaworld" in SUITES
    assert mow.envs.MT50_TASKS is MT50_TASKS  # lazily re-exported
    env = make_env("metaworld", "reach-v3", PROTOCOL, seed=0, train=True)
    assert env.observation_space == gymnasium.spaces.Box(0, 255, (64, 64, 3), np.uint8)
    assert env.action_space == gymnasium.spaces.Box(-1.0, 1.0, (4,), np.float32)
    assert env.unwrapped_metaworld.max_path_length == mw.EPISODE_STEPS == 500
    model = env.unwrapped_metaworld.model
    assert np.allclose(model.cam_pos[model.camera("corner2").id], (0.75, 0.075, 0.7))
    assert model.vis.quality.shadowsize == 0 and model.vis.quality.offsamples == 0
    assert legal_action_mask("metaworld", "reach-v3", full_action_space=True) is None
    env.close()
    with pytest.raises(ValueError, match="frame_skip"):
        make_env("metaworld", "reach-v3", {"image_size": 64}, seed=0, train=True)


def test_frames_are_real_and_differ_between_steps_and_tasks():
    reach = make_env("metaworld", "reach-v3", PROTOCOL, seed=0, train=True)
    first, info = reach.reset(seed=0)
    assert info == {"life_loss": False, "success": False, "goal": info["goal"]}
    assert_real_frame(first)
    rng = np.random.default_rng(0)
    frames = [first]
    for _ in range(5):
        obs, reward, terminated, truncated, info = reach.step(rng.uniform(-1, 1, 4))
        assert_real_frame(obs)
        assert isinstance(reward, float) and not terminated and not truncated
        assert set(info) == {"life_loss", "success"} and info["life_loss"] is False
        assert isinstance(info["success"], bool)
        frames.append(obs)
    # The arm moves: consecutive frames differ, and the last clearly differs from the first.
    assert all(not np.array_equal(a, b) for a, b in zip(frames, frames[1:]))
    assert np.abs(frames[-1].astype(int) - first.astype(int)).mean() > 0.5
    door = make_env("metaworld", "door-open-v3", PROTOCOL, seed=0, train=True)
    door_frame, _ = door.reset(seed=0)
    assert_real_frame(door_frame)
    assert np.abs(door_frame.astype(int) - first.astype(int)).mean() > 5
    reach.close()
    door.close()


def test_moved_corner2_camera_is_metaworlds_corner4_view():
    """metaworld 3.1.1 ships `corner4` = corner2 moved to (0.75, 0.075, 0.7): same pixels."""
    env = MetaWorldEnv("reach-v3")
    ours, _ = env.reset(seed=0, options={"goal": 3})
    reference = mw.MT50_V3["reach-v3"](
        render_mode="rgb_array", camera_name="corner4", width=64, height=64
    )
    reference.model.vis.quality.shadowsize = 0
    reference.model.vis.quality.offsamples = 0
    reference.set_task(env._tasks[3])
    reference.reset()
    np.testing.assert_array_equal(ours, reference.render())
    reference.close()
    env.close()


def test_success_flag_is_reported_and_propagates_through_the_vector_env():
    protocol = {**PROTOCOL, "episode_steps": 120}  # 60 agent steps per episode

    def make_vector() -> VectorEnv:
        return VectorEnv([lambda: make_env("metaworld", "reach-v3", protocol, seed=0, train=False)])

    envs = make_vector()
    envs.reset(seed=3)
    env = envs.envs[0]
    step_success = []
    for _ in range(30):  # metaworld's scripted reach policy succeeds within these steps
        out = envs.step(np.stack([scripted_action(env)]))
        assert out.reward.dtype == np.float32 and out.obs.shape == (1, 64, 64, 3)
        assert out.finished == [] and out.finished_success == []
        step_success.append(bool(out.success[0]))
    assert any(step_success), "metaworld's scripted reach policy should succeed"
    state = envs.get_state()
    away = np.array([[1.0, -1.0, 1.0, 0.0]], np.float32)  # leave the goal for good

    def finish(vector: VectorEnv) -> tuple[list, list, list]:
        finished, finished_success, success = [], [], []
        for _ in range(30):
            out = vector.step(away)
            finished += out.finished
            finished_success += out.finished_success
            success.append(bool(out.success[0]))
        return finished, finished_success, success

    finished, finished_success, late_success = finish(envs)
    assert not any(late_success[-5:])  # the episode ends unsuccessful ...
    assert len(finished) == 1 and finished[0][0] == 0 and finished[0][2] == 60
    assert finished_success == [True]  # ... but succeeded at some step: a success
    restored = make_vector()
    restored.reset(seed=100)
    restored.set_state(state)
    assert finish(restored) == (finished, finished_success, late_success)
    envs.close()
    restored.close()


def test_episode_is_truncated_at_the_env_step_limit_with_action_repeat():
    env = make_env("metaworld", "reach-v3", {**PROTOCOL, "episode_steps": 7}, seed=0, train=True)
    ends = [env.step(np.zeros(4, np.float32))[2:4] for _ in range(4)]
    # 7 env steps at repeat 2: agent steps of 2, 2, 2, 1 env steps; truncated at the 4th.
    assert ends == [(False, False)] * 3 + [(False, True)]
    assert env.unwrapped_metaworld.curr_path_length == 7
    with pytest.raises(ValueError, match="4 finite floats"):
        env.step(np.zeros(3))
    env.close()


def test_goals_are_the_mt50_benchmarks_and_sampled_with_the_env_rng():
    import metaworld

    goals = mt50_goals("reach-v3")
    assert goals.shape == (50, 6) and len(np.unique(goals, axis=0)) == 50
    assert all(mt50_goals(task).shape[0] == 50 for task in MT50_TASKS)
    # The first MT50 task's goals depend only on the seed: regenerate them cheaply with
    # the call metaworld.MT50(seed=0) makes for it, and compare with the bundled file.
    first = MT50_TASKS[0]
    tasks = metaworld._make_tasks(
        {first: mw.MT50_V3[first]},
        {first: metaworld._env_dict.MT50_V3_ARGS_KWARGS[first]},
        metaworld._MT_OVERRIDE,
        seed=mw.GOAL_SEED,
    )
    regenerated = np.array([pickle.loads(t.data)["rand_vec"] for t in tasks])
    np.testing.assert_array_equal(regenerated, mt50_goals(first))

    env = MetaWorldEnv("reach-v3")
    drawn = [env.reset(seed=s)[1]["goal"] for s in range(8)]
    assert drawn == [env.reset(seed=s)[1]["goal"] for s in range(8)]  # seeded
    assert len(set(drawn)) > 1
    _, info = env.reset(options={"goal": 17})
    assert info["goal"] == 17 and env.goal == 17
    np.testing.assert_array_equal(env.unwrapped_metaworld._last_rand_vec, goals[17])
    with pytest.raises(ValueError, match="goal must be in 0..49"):
        env.reset(options={"goal": 50})
    env.close()


def test_unknown_task_lists_the_valid_names():
    for build in (
        lambda: MetaWorldEnv("reach-v2"),
        lambda: make_env("metaworld", "reach-v2", PROTOCOL, seed=0, train=True),
        lambda: legal_action_mask("metaworld", "reach-v2", False),
    ):
        with pytest.raises(ValueError, match="unknown Meta-World task 'reach-v2'") as err:
            build()
        message = str(err.value)
        assert "\n" not in message and all(task in message for task in MT50_TASKS)


@pytest.mark.parametrize("task", ["reach-v3", "pick-place-v3"])
def test_state_round_trip_gives_identical_next_frames(task):
    rng = np.random.default_rng(4)
    env = MetaWorldEnv(task, action_repeat=2)
    env.reset(seed=1)
    for _ in range(8):
        env.step(rng.uniform(-1, 1, 4))
    state = pickle.loads(pickle.dumps(env.get_state()))  # checkpoints pickle it
    actions = rng.uniform(-1, 1, (10, 4))
    expected = [env.step(a) for a in actions]
    expected_reset = env.reset()
    fresh = MetaWorldEnv(task, action_repeat=2)
    fresh.reset(seed=99)  # another goal and pose, overwritten by set_state
    for restored in (env, fresh):
        restored.set_state(state)
        for (obs, reward, term, trunc, info), action in zip(expected, actions):
            obs2, reward2, term2, trunc2, info2 = restored.step(action)
            np.testing.assert_array_equal(obs, obs2)
            assert (reward, term, trunc, info) == (reward2, term2, trunc2, info2)
        # The goal RNG is restored too: the next episode draws the same goal.
        obs, info = restored.reset()
        np.testing.assert_array_equal(obs, expected_reset[0])
        assert info == expected_reset[1]
    with pytest.raises(ValueError, match="state is for task"):
        MetaWorldEnv("door-open-v3").set_state(state)
    env.close()
    fresh.close()


def test_gl_backend_is_chosen_before_mujoco_and_missing_libraries_are_named():
    code = "import mow.envs.metaworld as m, os; print(m.GL_BACKEND, os.environ['MUJOCO_GL'])"
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() in (["egl", "egl"], ["osmesa", "osmesa"])
    # A user's MUJOCO_GL is respected; one whose library is missing fails clearly.
    for backend in ("egl", "osmesa"):
        out = subprocess.run([sys.executable, "-c", code], env={**env, "MUJOCO_GL": backend},
                             capture_output=True, text=True)
        if out.returncode == 0:
            assert out.stdout.split() == [backend, backend]
        else:
            last = out.stderr.strip().splitlines()[-1]
            assert f"importing mujoco with MUJOCO_GL='{backend}' failed" in last
            assert "libegl1" in last and "libosmesa6" in last
    # Neither library: a one-line error naming both and what to install.
    code = (
        "import ctypes.util; ctypes.util.find_library = lambda name: None\n"
        "from mow.envs.metaworld import MetaWorldEnv\n"
        "try:\n    MetaWorldEnv('reach-v3')\nexcept RuntimeError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    message = out.stdout.strip()
    assert "\n" not in message and "libEGL or libOSMesa" in message
    assert "libegl1" in message and "libosmesa6" in message


def test_bench_reports_env_steps_per_second():
    result = bench_metaworld(seconds=0.5)
    assert result["metaworld_env_steps_per_s"] > 0
    assert result["metaworld_gl"] in ("egl", "osmesa")


@pytest.mark.slow
def test_all_fifty_mt50_tasks_construct_and_render():
    """Every task builds, resets to its MT50 goals and steps; every 5th also renders (a
    first frame costs ~1.2 s on llvmpipe, mostly uploading the scene's textures)."""
    assert len(MT50_TASKS) == len(set(MT50_TASKS)) == 50
    assert all(task.endswith("-v3") for task in MT50_TASKS)
    started = time.perf_counter()
    for index, task in enumerate(MT50_TASKS):
        env = MetaWorldEnv(task)
        if index % 5 == 0:
            obs, _ = env.reset(seed=0)
            assert_real_frame(obs)
            obs, _, _, _, info = env.step(np.zeros(4, np.float32))
            assert_real_frame(obs)
        else:  # the simulator alone: the same goal setting and physics step, no frame
            sim = env.unwrapped_metaworld
            sim.set_task(env._tasks[index])
            sim.reset()
            info = sim.step(np.zeros(4, np.float32))[-1]
            np.testing.assert_array_equal(sim._last_rand_vec, mt50_goals(task)[index])
        assert "success" in info
        env.close()
    print(f"50 MT50 tasks built, 10 rendered, in {time.perf_counter() - started:.1f} s")
