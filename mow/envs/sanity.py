"""Small built-in pixel tasks that prove an agent learns, in minutes on a CPU.

Each task is a fixed-length episode of 64x64 RGB frames (drawn on a 64x64 canvas and
resized when `image_size` differs) with big saturated shapes, so that a tiny conv VAE sees
them. The cue that decides the reward is always visible in the current frame, so a policy
acting on the current latent can be optimal.

The cues of `side`, `opposite` and `color` are drawn at reset and hold for the episode, so
every next frame is predictable. A cue redrawn at every step cannot be imagined: the
world model's prior is a product of independent categoricals, and when the VAE spreads the
cue over several latent variables (measured: 7-16 of 16 at the smoke width) each variable
is sampled on its own, so imagined frames mix the cues, the reward head scores them
inconsistently and the actor learns (or collapses onto a wrong action) from noise. The episode ends by a time limit
(`truncated=True`, never `terminated`): elapsed time is not drawn, so an end the agent cannot
see is not presented as a terminal state. `info["life_loss"]` is always False.

Tasks (random = expected return of the uniform policy over the task's own actions,
optimal = the scripted optimal policy; `SANITY_REFERENCE` holds these numbers and
tests/test_envs_sanity.py re-measures them):

============  =======  ======  ======  =======================================================
task          actions  length  random  optimal
============  =======  ======  ======  =======================================================
side          2        10      0.0     10.0  left or right half lit white (drawn at reset); +1
                                             for choosing the lit side (0 = left, 1 = right),
                                             -1 otherwise
opposite      2        10      0.0     10.0  the same lit half plus a magenta bar on top; +1 for
                                             the dark side: the reward conflicts with `side`
chase         2        20      0.23    5.87  a cyan block (agent, bottom row) and a yellow block
                                             (target, top row) on 8 cells; 0 = left, 1 = right;
                                             +1 when the agent reaches the target column (the
                                             target then jumps elsewhere), -0.05 per other step
color         3        10      0.0     10.0  a red, green or blue square (drawn at reset); +1
                                             when the action is the colour's index (0 red,
                                             1 green, 2 blue), -0.5 otherwise
============  =======  ======  ======  =======================================================

The chase numbers are Monte Carlo estimates (100k episodes); the others are exact.
With `full_action_space=True` the action space is Discrete(18); actions outside the
task's own set are legal but never right: a wrong choice, or standing still in `chase`.
"""

from __future__ import annotations

from typing import Any

import cv2
import gymnasium
import numpy as np
from gymnasium import spaces

# (random-policy expected return, scripted-optimal return) per task; see the docstring.
SANITY_REFERENCE: dict[str, tuple[float, float]] = {
    "side": (0.0, 10.0),
    "opposite": (0.0, 10.0),
    "chase": (0.23, 5.87),
    "color": (0.0, 10.0),
}

FULL_ACTIONS = 18
_CANVAS = 64
_WHITE = (255, 255, 255)
_MAGENTA = (255, 0, 255)
_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))  # color task: index = correct action


class SanityEnv(gymnasium.Env):
    """Fixed-length pixel task; a subclass defines its variables, reward and drawing.

    The whole task state is `self._vars` (a dict of ints) plus the step counter and the
    RNG, which makes `get_state`/`set_state` generic.
    """

    task: str
    n_actions: int
    episode_length: int

    def __init__(self, image_size: int = 64, full_action_space: bool = False) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self._size = image_size
        self.action_space = spaces.Discrete(FULL_ACTIONS if full_action_space else self.n_actions)
        self.observation_space = spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self._t = 0
        self._vars: dict[str, int] = {}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start an episode; `seed` reseeds the task RNG, None continues its stream."""
        super().reset(seed=seed)
        self._t = 0
        self._vars = self._start()
        return self._render(), {"life_loss": False}

    def step(self, action):
        if not 0 <= action < self.action_space.n:
            raise ValueError(f"action {action} outside Discrete({self.action_space.n})")
        reward = self._advance(int(action))
        self._t += 1
        truncated = self._t >= self.episode_length
        return self._render(), float(reward), False, truncated, {"life_loss": False}

    def get_state(self) -> dict:
        return {
            "task": self.task,
            "t": self._t,
            "vars": dict(self._vars),
            "np_random": self.np_random.bit_generator.state,
        }

    def set_state(self, state: dict) -> None:
        if state["task"] != self.task:
            raise ValueError(f"state is for task {state['task']!r}, this env is {self.task!r}")
        self._t = int(state["t"])
        self._vars = {k: int(v) for k, v in state["vars"].items()}
        self.np_random.bit_generator.state = state["np_random"]

    def optimal_action(self) -> int:
        """The scripted optimal action for the current state (used by tests and docs)."""
        raise NotImplementedError

    def _start(self) -> dict[str, int]:
        raise NotImplementedError

    def _advance(self, action: int) -> float:
        """Apply `action`, update `self._vars`, return the reward."""
        raise NotImplementedError

    def _draw(self, canvas: np.ndarray) -> None:
        raise NotImplementedError

    def _render(self) -> np.ndarray:
        canvas = np.zeros((_CANVAS, _CANVAS, 3), np.uint8)
        self._draw(canvas)
        if self._size != _CANVAS:
            canvas = cv2.resize(canvas, (self._size, self._size), interpolation=cv2.INTER_AREA)
        return canvas


class SideEnv(SanityEnv):
    """One half of the screen is lit (for the whole episode); choose it."""

    task = "side"
    n_actions = 2
    episode_length = 10

    def optimal_action(self) -> int:
        return self._vars["lit"]

    def _start(self) -> dict[str, int]:
        return {"lit": int(self.np_random.integers(2))}

    def _advance(self, action: int) -> float:
        return 1.0 if action == self.optimal_action() else -1.0

    def _draw(self, canvas: np.ndarray) -> None:
        half = _CANVAS // 2
        canvas[:, self._vars["lit"] * half : (self._vars["lit"] + 1) * half] = _WHITE


class OppositeEnv(SideEnv):
    """`side` with a marker bar, rewarding the dark half: the conflicting task."""

    task = "opposite"

    def optimal_action(self) -> int:
        return 1 - self._vars["lit"]

    def _draw(self, canvas: np.ndarray) -> None:
        super()._draw(canvas)
        canvas[:8] = _MAGENTA


class ChaseEnv(SanityEnv):
    """Move the agent block along 8 cells onto the target block's column."""

    task = "chase"
    n_actions = 2
    episode_length = 20
    cells = 8
    step_cost = 0.05

    def optimal_action(self) -> int:
        return 1 if self._vars["target"] > self._vars["agent"] else 0

    def _start(self) -> dict[str, int]:
        agent = int(self.np_random.integers(self.cells))
        return {"agent": agent, "target": self._new_target(agent)}

    def _new_target(self, agent: int) -> int:
        target = int(self.np_random.integers(self.cells - 1))
        return target + (target >= agent)  # uniform over the other cells

    def _advance(self, action: int) -> float:
        move = {0: -1, 1: 1}.get(action, 0)
        agent = min(self.cells - 1, max(0, self._vars["agent"] + move))
        self._vars["agent"] = agent
        if agent != self._vars["target"]:
            return -self.step_cost
        self._vars["target"] = self._new_target(agent)
        return 1.0

    def _draw(self, canvas: np.ndarray) -> None:
        width = _CANVAS // self.cells
        target, agent = self._vars["target"] * width, self._vars["agent"] * width
        canvas[4:28, target : target + width] = (255, 255, 0)
        canvas[36:60, agent : agent + width] = (0, 255, 255)


class ColorEnv(SanityEnv):
    """A coloured square (for the whole episode); answer with the colour's index."""

    task = "color"
    n_actions = 3
    episode_length = 10

    def optimal_action(self) -> int:
        return self._vars["color"]

    def _start(self) -> dict[str, int]:
        return {"color": int(self.np_random.integers(len(_COLORS)))}

    def _advance(self, action: int) -> float:
        # -1/(n-1) for a wrong answer makes the uniform policy's expectation exactly 0.
        return 1.0 if action == self.optimal_action() else -1.0 / (len(_COLORS) - 1)

    def _draw(self, canvas: np.ndarray) -> None:
        canvas[16:48, 16:48] = _COLORS[self._vars["color"]]


_ENVS: dict[str, type[SanityEnv]] = {
    cls.task: cls for cls in (SideEnv, OppositeEnv, ChaseEnv, ColorEnv)
}
SANITY_TASKS: tuple[str, ...] = tuple(_ENVS)  # side, opposite, chase, color


def check_task(task: str) -> None:
    """Raise a one-line ValueError naming `task` unless it is a sanity task."""
    if task not in _ENVS:
        raise ValueError(f"unknown sanity task {task!r}; valid tasks: {', '.join(SANITY_TASKS)}")


def make_sanity_env(
    task: str, *, image_size: int = 64, full_action_space: bool = False
) -> SanityEnv:
    check_task(task)
    return _ENVS[task](image_size=image_size, full_action_space=full_action_space)


def sanity_action_count(task: str) -> int:
    """Size of the task's own action set."""
    check_task(task)
    return _ENVS[task].n_actions
