"""Several envs stepped together in-process, with auto-reset and episode accounting.

On 2 CPU cores subprocess vector envs are no faster than a loop (DESIGN.md), and a loop
keeps every env's state in this process, which makes exact checkpointing simple.

Episode accounting adds a step's reward to the running return *before* checking whether
the episode ended, so a finished episode's return includes its final reward (STORM's
official logger drops it, SPEC 3.1 / issue #16). Envs that report `info["success"]`
(Meta-World) get it per step and, per finished episode, whether it was set at any step.
Discrete actions are passed to the envs as ints, continuous (Box) ones as arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gymnasium
import numpy as np
from gymnasium import spaces


@dataclass
class VectorStep:
    """What one `VectorEnv.step` returns; arrays are indexed by env."""

    obs: np.ndarray  # [N, S, S, 3] uint8; the next episode's first obs where one ended
    reward: np.ndarray  # [N] float32
    terminated: np.ndarray  # [N] bool
    truncated: np.ndarray  # [N] bool
    life_loss: np.ndarray  # [N] bool
    finished: list[tuple[int, float, int]]  # (env index, return incl. final reward, length)
    # info["success"] of this step (False where an env reports none), and for each entry
    # of `finished` whether the episode's success flag was set at any step.
    success: np.ndarray | None = None  # [N] bool
    finished_success: list[bool] | None = None


class VectorEnv:
    """Steps several envs together in-process (on 2 cores async is no faster), auto-resets,
    and keeps episode accounting.

    After `reset(seed)` env i is seeded with `seed + i`; later episodes reset with
    `seed=None`, so each env continues its own RNG stream and a run is deterministic given
    the initial seed. `obs` always holds the observation to act on next, also after
    `set_state`.
    """

    def __init__(self, env_fns: list[Callable[[], gymnasium.Env]]) -> None:
        if not env_fns:
            raise ValueError("VectorEnv needs at least one env")
        self.envs = [fn() for fn in env_fns]
        self.num_envs = len(self.envs)
        self.single_observation_space = self.envs[0].observation_space
        self.single_action_space = self.envs[0].action_space
        self._discrete = isinstance(self.single_action_space, spaces.Discrete)
        self.obs = np.zeros((self.num_envs, *self.single_observation_space.shape), np.uint8)
        self._returns = [0.0] * self.num_envs
        self._lengths = [0] * self.num_envs
        self._successes = [False] * self.num_envs

    def reset(self, seed: int) -> np.ndarray:
        for i, env in enumerate(self.envs):
            self.obs[i], _ = env.reset(seed=seed + i)
        self._returns = [0.0] * self.num_envs
        self._lengths = [0] * self.num_envs
        self._successes = [False] * self.num_envs
        return self.obs.copy()

    def step(self, actions: np.ndarray) -> VectorStep:
        n = self.num_envs
        reward = np.zeros(n, np.float32)
        terminated = np.zeros(n, bool)
        truncated = np.zeros(n, bool)
        life_loss = np.zeros(n, bool)
        success = np.zeros(n, bool)
        finished, finished_success = [], []
        for i, (env, action) in enumerate(zip(self.envs, actions, strict=True)):
            obs, r, term, trunc, info = env.step(int(action) if self._discrete else action)
            reward[i], terminated[i], truncated[i] = r, term, trunc
            life_loss[i] = info["life_loss"]
            success[i] = info.get("success", False)
            self._returns[i] += r
            self._lengths[i] += 1
            self._successes[i] = self._successes[i] or bool(success[i])
            if term or trunc:
                finished.append((i, self._returns[i], self._lengths[i]))
                finished_success.append(self._successes[i])
                self._returns[i], self._lengths[i], self._successes[i] = 0.0, 0, False
                obs, _ = env.reset()
            self.obs[i] = obs
        return VectorStep(
            self.obs.copy(), reward, terminated, truncated, life_loss, finished,
            success, finished_success,
        )

    def get_state(self) -> dict:
        """All envs, the current observations and the running episode returns/lengths."""
        return {
            "envs": [env.get_state() for env in self.envs],
            "obs": self.obs.copy(),
            "returns": list(self._returns),
            "lengths": list(self._lengths),
            "successes": list(self._successes),
        }

    def set_state(self, state: dict) -> None:
        if len(state["envs"]) != self.num_envs:
            raise ValueError(
                f"state holds {len(state['envs'])} envs, this VectorEnv has {self.num_envs}"
            )
        for env, env_state in zip(self.envs, state["envs"], strict=True):
            env.set_state(env_state)
        self.obs[:] = state["obs"]
        self._returns = [float(r) for r in state["returns"]]
        self._lengths = [int(n) for n in state["lengths"]]
        # States saved before success tracking existed hold no flags: none was set.
        self._successes = [bool(s) for s in state.get("successes", [False] * self.num_envs)]

    def close(self) -> None:
        for env in self.envs:
            env.close()
