"""Meta-World MT50 tasks from pixels (SPEC 3.2), on metaworld v3 (3.1.1, MuJoCo 3.3.0).

One `MetaWorldEnv` plays one of the 50 MT50 tasks by its v3 name ("reach-v3", ...):

* observations are uint8 [S, S, 3] RGB frames (S = `image_size`, 64 by default) rendered
  offscreen from metaworld's `corner2` camera with its position moved to
  (0.75, 0.075, 0.7), the view used by earlier image-based Meta-World work; the
  proprioceptive/object state vector of metaworld is not exposed;
* actions are Box(-1, 1, (4,)) float32 (xyz end-effector delta and gripper); they are
  clipped to [-1, 1] and repeated `action_repeat` times with the rewards summed; only the
  last frame of a repeat is rendered;
* an episode is `episode_steps` (500) metaworld env steps, i.e. ceil(500 / action_repeat)
  agent steps; it ends with `truncated=True` (metaworld never terminates, and success does
  not end an episode); a repeat stops early at the limit;
* `info["success"]` is True when metaworld's success flag was set at any of the repeated
  env steps of this agent step; `info["life_loss"]` is always False;
* goals: the MT50 benchmark's 50 training goals of the task, i.e. the `rand_vec`s of
  `metaworld.MT50(seed=goal_seed).train_tasks` for that env name, set through metaworld's
  own `set_task`. `reset` picks one uniformly with the env's seeded RNG, as metaworld's
  `RandomTaskSelectWrapper` does; `reset(options={"goal": i})` picks goal i, and after
  `set_goal_sequence([i, j, ...])` successive resets play those goals in order (cycling):
  MT50 has no separate test goals, so evaluation (`mow.evaluate`) walks the same 50. Building `metaworld.MT50` takes
  ~1.5 min on 2 CPU cores, so the goals of `goal_seed=0` are bundled in
  `metaworld_mt50_goals.json` (written by `generate_mt50_goals`); other seeds are
  generated on first use and cached in-process.

Headless rendering: MuJoCo chooses its OpenGL backend when `mujoco` is first imported, so
this module sets `MUJOCO_GL` before importing it: a user's `MUJOCO_GL` is respected,
otherwise EGL is used if libEGL loads, else OSMesa if libOSMesa loads; if neither is
found, constructing an env raises a one-line RuntimeError naming what to install. Import
this module before anything that imports `mujoco`. Two visual settings measured in
DESIGN.md make a 64x64 frame ~6x cheaper on Mesa llvmpipe and are applied before the
first render: no shadow map (`vis.quality.shadowsize = 0`) and no multisampling
(`vis.quality.offsamples = 0`).

`get_state`/`set_state` restore an env bit-exactly (the next frames and rewards are
identical): MuJoCo's full integration state (`mj_getState(mjSTATE_INTEGRATION)`: time,
qpos, qvel, act, warm start, controls, mocap, ...), the model fields metaworld rewrites at
reset (body/site/geom positions and orientations), the plain (array/number) attributes of
metaworld's env object (goal, initial object positions, step counter, ...), the goal index
and the goal-sampling RNG. Limit: attributes of other types (none in metaworld 3.1.1's
MT50 envs hold per-episode data) would not be saved.
"""

from __future__ import annotations

import atexit
import copy
import ctypes
import ctypes.util
import functools
import json
import os
import pickle
import sys
import time
import weakref
from pathlib import Path
from typing import Any

_GL_LIBRARIES = {"egl": "EGL", "osmesa": "OSMesa"}
_GL_INSTALL = "install libegl1 (EGL) or libosmesa6 (OSMesa)"


def _library_loads(name: str) -> bool:
    path = ctypes.util.find_library(name)
    if path is None:
        return False
    try:
        ctypes.CDLL(path)
    except OSError:
        return False
    return True


def select_gl_backend() -> tuple[str | None, str | None]:
    """Set MUJOCO_GL for headless rendering; return (backend, problem).

    Respects a user's MUJOCO_GL. Otherwise (or with PYOPENGL_PLATFORM set to egl/osmesa,
    which then decides) picks EGL, then OSMesa, by whether their library loads, and sets
    MUJOCO_GL and PYOPENGL_PLATFORM. If mujoco was imported already, its choice (GLFW)
    stands and only works with a display. `problem` is a one-line reason rendering cannot
    work (None when a backend was chosen); it is raised when an env is constructed.
    """
    user = os.environ.get("MUJOCO_GL", "").strip().lower()
    if user:
        return user, None
    if "mujoco" in sys.modules or "OpenGL" in sys.modules:
        if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
            return "glfw", None  # what mujoco chose at its import; works with a display
        return None, (
            "mujoco (or PyOpenGL) was imported before mow.envs.metaworld could choose a "
            "headless OpenGL backend; set MUJOCO_GL=egl (or osmesa) or import "
            "mow.envs.metaworld first"
        )
    platform = os.environ.get("PYOPENGL_PLATFORM", "").strip().lower()
    candidates = [platform] if platform in _GL_LIBRARIES else list(_GL_LIBRARIES)
    for backend in candidates:
        if _library_loads(_GL_LIBRARIES[backend]):
            os.environ["MUJOCO_GL"] = backend
            os.environ.setdefault("PYOPENGL_PLATFORM", backend)
            return backend, None
    found = " or ".join(f"lib{_GL_LIBRARIES[b]}" for b in candidates)
    return None, f"no headless OpenGL library found ({found}) for MuJoCo rendering; {_GL_INSTALL}"


# Must run before the first `import mujoco` in the process (mujoco picks its GL context
# class, and PyOpenGL its platform, at import time).
GL_BACKEND, _GL_PROBLEM = select_gl_backend()

import gymnasium  # noqa: E402
import numpy as np  # noqa: E402
from gymnasium import spaces  # noqa: E402

try:
    import mujoco
except Exception as exc:  # e.g. MUJOCO_GL=osmesa without libOSMesa: PyOpenGL fails inside
    raise ImportError(
        f"importing mujoco with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r} failed "
        f"({type(exc).__name__}: {exc}); {_GL_INSTALL}, or unset MUJOCO_GL to choose automatically"
    ) from exc
from metaworld.env_dict import MT50_V3  # noqa: E402
from metaworld.types import Task  # noqa: E402

# All 50 MT50 task names, in metaworld's benchmark order.
MT50_TASKS: tuple[str, ...] = tuple(MT50_V3)

CAMERA = "corner2"
CAMERA_POS = (0.75, 0.075, 0.7)
EPISODE_STEPS = 500  # metaworld env steps per episode (metaworld's max_path_length)
GOALS_PER_TASK = 50  # metaworld's _N_GOALS
GOAL_SEED = 0  # seed of the bundled metaworld.MT50 goals
GOALS_FILE = Path(__file__).with_name("metaworld_mt50_goals.json")

_STATE_SPEC = mujoco.mjtState.mjSTATE_INTEGRATION
# Model fields that metaworld's reset_model rewrites (object and goal placement).
_MODEL_FIELDS = ("body_pos", "body_quat", "site_pos", "site_quat", "geom_pos", "geom_quat")
# Attributes of metaworld's env fixed by construction; never overwritten by set_state.
_CONFIG_ATTRS = frozenset(
    {"width", "height", "render_mode", "camera_id", "camera_name", "frame_skip", "max_path_length"}
)
_PLAIN = (np.ndarray, np.generic, bool, int, float, str, type(None))


def check_task(task: str) -> None:
    """Raise a one-line ValueError naming `task` unless it is one of the 50 MT50 tasks."""
    if task not in MT50_V3:
        raise ValueError(f"unknown Meta-World task {task!r}; valid tasks: {', '.join(MT50_TASKS)}")


def generate_mt50_goals(seed: int) -> dict[str, list[list[float]]]:
    """Each task's 50 goal vectors (`rand_vec`) of `metaworld.MT50(seed=seed)`, in order.

    Slow (~1.5 min on 2 CPU cores): metaworld builds all 50 envs and resets each 50 times.
    The bundled file is `{"seed": 0, "goals": generate_mt50_goals(0)}` as JSON (one task
    per line); Python's float repr makes the JSON round trip exact.
    """
    import metaworld

    goals: dict[str, list[list[float]]] = {}
    for task in metaworld.MT50(seed=seed).train_tasks:
        data = pickle.loads(task.data)
        goals.setdefault(task.env_name, []).append(
            [float(x) for x in np.asarray(data["rand_vec"], np.float64)]
        )
    return goals


@functools.lru_cache(maxsize=4)
def _all_goals(seed: int) -> dict[str, list[list[float]]]:
    if seed == GOAL_SEED and GOALS_FILE.exists():
        stored = json.loads(GOALS_FILE.read_text())
        if stored["seed"] == seed:
            return stored["goals"]
    return generate_mt50_goals(seed)


def mt50_goals(task: str, seed: int = GOAL_SEED) -> np.ndarray:
    """float64 [50, D] goal vectors of `task` in the MT50 benchmark built with `seed`."""
    check_task(task)
    goals = np.array(_all_goals(seed)[task], np.float64)
    if goals.shape[0] != GOALS_PER_TASK:
        raise ValueError(f"{task}: expected {GOALS_PER_TASK} MT50 goals, found {goals.shape[0]}")
    return goals


def _is_plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def _views_mujoco(value: Any) -> bool:
    """Whether `value` is a live view into MuJoCo's memory (e.g. metaworld's
    `init_left_pad = get_body_com(...)`); such attributes are not saved: every env's own
    one already views the same field of its own data."""
    base = value.base if isinstance(value, np.ndarray) else None
    while isinstance(base, np.ndarray):
        base = base.base
    return base is not None


# Envs whose GL context is still open; closed at exit before MuJoCo's EGL atexit handler
# terminates the display (otherwise their finalisers print EGL errors at shutdown).
_LIVE: weakref.WeakSet = weakref.WeakSet()
_atexit_registered = False


def _close_live_envs() -> None:
    for env in list(_LIVE):
        env.close()


class MetaWorldEnv(gymnasium.Env):
    """One MT50 task from pixels; see the module docstring for the rules.

    `info` holds "life_loss" (always False), "success" and, after reset, "goal" (the goal
    index in 0..49).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        task: str,
        *,
        action_repeat: int = 1,
        image_size: int = 64,
        episode_steps: int = EPISODE_STEPS,
        goal_seed: int = GOAL_SEED,
    ) -> None:
        check_task(task)
        if action_repeat < 1 or image_size < 1 or episode_steps < 1:
            raise ValueError(
                f"need action_repeat >= 1, image_size >= 1, episode_steps >= 1; got "
                f"{action_repeat=}, {image_size=}, {episode_steps=}"
            )
        if _GL_PROBLEM is not None:
            raise RuntimeError(_GL_PROBLEM)
        self.task = task
        self._repeat = action_repeat
        self._goals = mt50_goals(task, goal_seed)
        cls = MT50_V3[task]
        self._tasks = [
            Task(
                env_name=task,
                data=pickle.dumps(
                    {"rand_vec": vec, "env_cls": cls, "partially_observable": False}
                ),
            )
            for vec in self._goals
        ]
        # metaworld renders nothing itself; frames come from our own mujoco.Renderer (the
        # same pixels as metaworld's rgb_array path, a test checks; no depth read-back).
        self._env = cls(render_mode=None, width=image_size, height=image_size)
        self._env.max_path_length = episode_steps
        model = self._env.model
        self._camera = model.camera(CAMERA).id
        model.cam_pos[self._camera] = CAMERA_POS
        model.vis.quality.shadowsize = 0  # before the first render: no shadow pass
        model.vis.quality.offsamples = 0  # no multisample offscreen buffer
        self._size = image_size
        self._renderer: mujoco.Renderer | None = None  # created at the first frame
        self._goal = 0
        self._goal_sequence: list[int] | None = None  # set_goal_sequence
        self._goal_position = 0
        self._env.set_task(self._tasks[0])
        self._state_size = mujoco.mj_stateSize(model, _STATE_SPEC)
        self.action_space = spaces.Box(-1.0, 1.0, (4,), np.float32)
        self.observation_space = spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self._closed = False

    @property
    def unwrapped_metaworld(self):
        """metaworld's env object (read-only inspection: model, data, goal)."""
        return self._env

    @property
    def goal(self) -> int:
        """Index (0..49) of the current episode's goal."""
        return self._goal

    def set_goal_sequence(self, goals: list[int] | None) -> None:
        """Make the following resets (without `options["goal"]`) play `goals` in order,
        cycling; None returns to sampling goals with the env's RNG."""
        if goals is not None:
            goals = [int(g) for g in goals]
            bad = [g for g in goals if not 0 <= g < len(self._tasks)]
            if not goals or bad:
                raise ValueError(f"goal sequence needs goals in 0..{len(self._tasks) - 1}, got {goals}")
        self._goal_sequence, self._goal_position = goals, 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start an episode on a goal drawn with the env's RNG (or `options["goal"]`, or the
        next one of `set_goal_sequence`).

        `seed` reseeds the goal RNG; None continues its stream.
        """
        super().reset(seed=seed)
        if options and options.get("goal") is not None:
            goal = int(options["goal"])
            if not 0 <= goal < len(self._tasks):
                raise ValueError(f"goal must be in 0..{len(self._tasks) - 1}, got {goal}")
        elif self._goal_sequence is not None:
            goal = self._goal_sequence[self._goal_position % len(self._goal_sequence)]
            self._goal_position += 1
        else:
            goal = int(self.np_random.integers(len(self._tasks)))
        self._goal = goal
        self._env.set_task(self._tasks[goal])
        self._env.reset()
        return self._render(), {"life_loss": False, "success": False, "goal": goal}

    def step(self, action):
        action = np.asarray(action, np.float32).reshape(-1)
        if action.shape != (4,) or not np.isfinite(action).all():
            raise ValueError(f"action must be 4 finite floats, got {action!r}")
        action = np.clip(action, -1.0, 1.0)
        env = self._env
        reward, success, truncated = 0.0, False, False
        for _ in range(self._repeat):
            _, r, _, truncated, info = env.step(action)
            reward += float(r)
            success = success or bool(info["success"])
            if truncated:
                break
        info = {"life_loss": False, "success": success}
        return self._render(), reward, False, bool(truncated), info

    def _render(self) -> np.ndarray:
        global _atexit_registered
        if self._renderer is None:
            if self._closed:
                raise RuntimeError(f"MetaWorldEnv({self.task!r}) is closed")
            try:  # a broken GL stack fails here, on the first frame
                self._renderer = mujoco.Renderer(self._env.model, self._size, self._size)
            except Exception as exc:
                raise RuntimeError(
                    f"MuJoCo offscreen rendering failed with MUJOCO_GL="
                    f"{os.environ.get('MUJOCO_GL')!r} ({type(exc).__name__}: {exc}); "
                    f"{_GL_INSTALL}"
                ) from exc
            if not _atexit_registered:  # after MuJoCo registered its EGL teardown: runs first
                atexit.register(_close_live_envs)
                _atexit_registered = True
            _LIVE.add(self)
        self._renderer.update_scene(self._env.data, camera=self._camera)
        return self._renderer.render()

    def get_state(self) -> dict:
        """Everything needed to continue bit-exactly; see the module docstring."""
        env = self._env
        physics = np.empty(self._state_size, np.float64)
        mujoco.mj_getState(env.model, env.data, physics, _STATE_SPEC)
        attrs = {
            key: copy.deepcopy(value)
            for key, value in vars(env).items()
            if key not in _CONFIG_ATTRS and _is_plain(value) and not _views_mujoco(value)
        }
        return {
            "task": self.task,
            "goal": self._goal,
            "goal_vec": self._goals[self._goal].copy(),
            "physics": physics,
            "model": {name: getattr(env.model, name).copy() for name in _MODEL_FIELDS},
            "attrs": attrs,
            "np_random": self.np_random.bit_generator.state,
            "goal_sequence": self._goal_sequence,
            "goal_position": self._goal_position,
        }

    def set_state(self, state: dict) -> None:
        if state["task"] != self.task:
            raise ValueError(f"state is for task {state['task']!r}, this env is {self.task!r}")
        goal = int(state["goal"])
        if not np.array_equal(self._goals[goal], state["goal_vec"]):
            raise ValueError("state was saved with other MT50 goals (a different goal_seed)")
        env = self._env
        self._goal = goal
        env.set_task(self._tasks[goal])
        for name, value in state["model"].items():
            getattr(env.model, name)[:] = value
        for key, value in state["attrs"].items():
            setattr(env, key, copy.deepcopy(value))
        physics = np.asarray(state["physics"], np.float64)
        mujoco.mj_setState(env.model, env.data, physics, _STATE_SPEC)
        mujoco.mj_forward(env.model, env.data)  # positions etc. for rendering and rewards
        # mj_forward overwrites the solver's warm start, which the next mj_step reads.
        mujoco.mj_setState(env.model, env.data, physics, _STATE_SPEC)
        self.np_random.bit_generator.state = state["np_random"]
        # states saved before goal sequences existed sampled their goals
        self._goal_sequence = state.get("goal_sequence")
        self._goal_position = int(state.get("goal_position", 0))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _LIVE.discard(self)
            if self._renderer is not None:
                self._renderer.close()
                self._renderer = None
            self._env.close()


def bench_metaworld(
    seconds: float = 3.0, *, task: str = "reach-v3", action_repeat: int = 1, image_size: int = 64
) -> dict:
    """Env steps/s of one rendering `MetaWorldEnv` under uniform random actions.

    Returns metaworld env steps/s (`env_steps_per_s`), agent steps/s and rendered frames/s
    (one frame per agent step), plus the settings and the GL backend. Construction and the
    first reset are not timed; resets at episode ends are.
    """
    env = MetaWorldEnv(task, action_repeat=action_repeat, image_size=image_size)
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    agent_steps, env_steps, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or agent_steps == 0:
        _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 4).astype(np.float32))
        agent_steps += 1
        if terminated or truncated:
            env_steps += env.unwrapped_metaworld.curr_path_length
            env.reset()
    elapsed = time.perf_counter() - t0
    env_steps += env.unwrapped_metaworld.curr_path_length
    env.close()
    return {
        "metaworld_task": task,
        "metaworld_image_size": image_size,
        "metaworld_action_repeat": action_repeat,
        "metaworld_gl": os.environ.get("MUJOCO_GL"),
        "metaworld_env_steps_per_s": env_steps / elapsed,
        "metaworld_agent_steps_per_s": agent_steps / elapsed,
        "metaworld_frames_per_s": agent_steps / elapsed,
    }
