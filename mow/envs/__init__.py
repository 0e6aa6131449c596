"""Environment suites behind one factory: `make_env(suite, task, protocol, ...)`.

Every env yields uint8 [S, S, 3] RGB observations, `info["life_loss"]` on every step, and
`get_state`/`set_state` for bit-exact resumption. Atari and sanity envs have a Discrete
action space (the task's minimal set, or the 18 ALE actions with `full_action_space`);
`legal_action_mask` says which actions of the chosen space belong to a task's minimal set,
so that one shared actor over 18 actions can mask its logits per task. Meta-World envs
(`mow.envs.metaworld`, imported on first use because it must choose MuJoCo's OpenGL
backend before `mujoco` is imported) have a continuous Box(-1, 1, (4,)) action space, the
same for all 50 tasks, and report `info["success"]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium
import numpy as np

from mow.envs.atari import (
    ATARI_GAMES,
    ATARI_MINIMAL_ACTIONS,
    FULL_ACTIONS,
    AtariEnv,
    check_game,
    minimal_action_ids,
)
from mow.envs.sanity import SANITY_REFERENCE, SANITY_TASKS, make_sanity_env, sanity_action_count
from mow.envs.vector import VectorEnv, VectorStep

__all__ = [
    "ATARI_GAMES",
    "ATARI_MINIMAL_ACTIONS",
    "MT50_TASKS",
    "MetaWorldEnv",
    "SANITY_REFERENCE",
    "SANITY_TASKS",
    "SUCCESS_SUITES",
    "SUITES",
    "VectorEnv",
    "VectorStep",
    "action_spec",
    "bench_metaworld",
    "legal_action_mask",
    "make_env",
    "shared_action_spec",
]

SUITES: tuple[str, ...] = ("atari", "sanity", "metaworld")
SUCCESS_SUITES: tuple[str, ...] = ("metaworld",)  # suites whose envs report info["success"]
METAWORLD_ACTION_DIM = 4  # xyz end-effector delta + gripper, the same for all 50 tasks
_METAWORLD_EXPORTS = ("MT50_TASKS", "MetaWorldEnv", "bench_metaworld")


def __getattr__(name: str) -> Any:
    """`mow.envs.MT50_TASKS` etc. import mow.envs.metaworld (and mujoco) on first use."""
    if name in _METAWORLD_EXPORTS:
        from mow.envs import metaworld

        return getattr(metaworld, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
_ATARI_KEYS = ("sticky_prob", "noop_max", "frame_skip", "max_frames", "image_size")
_METAWORLD_KEYS = ("frame_skip", "image_size")


def _check_suite(suite: str) -> None:
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; valid suites: {', '.join(SUITES)}")


def make_env(
    suite: str,
    task: str,
    protocol: Mapping[str, Any],
    *,
    seed: int,
    train: bool,
    full_action_space: bool = False,
) -> gymnasium.Env:
    """Build one env of `suite` under `protocol` and reset it with `seed`.

    Atari reads sticky_prob, noop_max, frame_skip, max_frames and image_size from
    `protocol`; the sanity tasks read only image_size. Meta-World (`task` = an MT50 v3
    name, e.g. "reach-v3") reads frame_skip (the action repeat) and image_size, and
    optionally episode_steps (metaworld env steps per episode, default 500, so an episode
    is ceil(500 / frame_skip) agent steps) and goal_seed (seed of the MT50 goal set,
    default 0); `train` and `full_action_space` do not change a Meta-World env (its
    Box(-1, 1, (4,)) actions are shared by all tasks, it never reports a life loss).
    `train=False` turns Atari life-loss reporting off (evaluation envs). Other protocol
    keys are ignored. The action space is not seeded and not part of `get_state`: draw
    random actions from the caller's RNG.
    """
    _check_suite(suite)
    if suite == "atari":
        check_game(task)
        missing = [key for key in _ATARI_KEYS if key not in protocol]
        if missing:
            raise ValueError(f"protocol lacks {', '.join(missing)} needed by Atari envs")
        env = AtariEnv(
            task,
            sticky_prob=float(protocol["sticky_prob"]),
            noop_max=int(protocol["noop_max"]),
            frame_skip=int(protocol["frame_skip"]),
            max_frames=int(protocol["max_frames"]),
            image_size=int(protocol["image_size"]),
            train=train,
            full_action_space=full_action_space,
        )
    elif suite == "metaworld":
        from mow.envs.metaworld import MetaWorldEnv, check_task

        check_task(task)
        missing = [key for key in _METAWORLD_KEYS if key not in protocol]
        if missing:
            raise ValueError(f"protocol lacks {', '.join(missing)} needed by Meta-World envs")
        env = MetaWorldEnv(
            task,
            action_repeat=int(protocol["frame_skip"]),
            image_size=int(protocol["image_size"]),
            episode_steps=int(protocol.get("episode_steps", 500)),
            goal_seed=int(protocol.get("goal_seed", 0)),
        )
    else:
        env = make_sanity_env(
            task,
            image_size=int(protocol.get("image_size", 64)),
            full_action_space=full_action_space,
        )
    env.reset(seed=seed)
    return env


def legal_action_mask(suite: str, task: str, full_action_space: bool) -> np.ndarray | None:
    """Bool mask over the env's action space marking the task's minimal action set.

    Without `full_action_space` every action is legal; with it the mask has 18 entries
    (ALE action ids for Atari; the task's actions first for the sanity tasks). Meta-World
    actions are continuous and the same for every task, so no mask applies: None (after
    checking the task name).
    """
    _check_suite(suite)
    if suite == "metaworld":
        from mow.envs.metaworld import check_task

        check_task(task)
        return None
    legal_ids = list(
        minimal_action_ids(task) if suite == "atari" else range(sanity_action_count(task))
    )
    if not full_action_space:
        return np.ones(len(legal_ids), bool)
    mask = np.zeros(FULL_ACTIONS, bool)
    mask[legal_ids] = True
    return mask


def action_spec(space: gymnasium.Space) -> tuple[int, bool]:
    """(size, continuous) of an env's action space: Discrete(n) -> (n, False); a 1-D
    Box(-1, 1) -> (its dimension, True), the form every model and buffer here takes."""
    if isinstance(space, gymnasium.spaces.Discrete):
        return int(space.n), False
    if isinstance(space, gymnasium.spaces.Box) and len(space.shape) == 1:
        return int(space.shape[0]), True
    raise ValueError(f"unsupported action space {space}; need Discrete or a 1-D Box")


def shared_action_spec(suite: str, tasks) -> tuple[int, bool]:
    """(size, continuous) of the action space one multi-task agent shares over `tasks`,
    without building an env: the 18 ALE actions (Atari), the sanity tasks' padded set, or
    Meta-World's 4-D continuous action."""
    _check_suite(suite)
    if suite == "metaworld":
        for task in tasks:
            legal_action_mask(suite, task, full_action_space=True)  # checks the name
        return METAWORLD_ACTION_DIM, True
    return len(legal_action_mask(suite, tasks[0], full_action_space=True)), False
