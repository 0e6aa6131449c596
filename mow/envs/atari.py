"""Atari 100k environments with STORM's preprocessing (SPEC 3.1).

The ALE runs with `frameskip=1` and this module does the skipping itself, so that the
protocol is explicit and identical across ale-py versions:

* the agent's action is repeated `frame_skip` raw frames (sticky actions, if any, are
  applied by the ALE on every raw frame) and the rewards are summed, unclipped;
* the observation is the pixel-wise maximum of the last two raw frames (Atari sprites
  flicker between frames), resized to `image_size` x `image_size` RGB with cv2
  INTER_AREA; no grey-scale, no frame stack;
* the repeat stops early at a termination or at the ALE's frame cap (truncation);
* `reset` may add 1..`noop_max` raw no-op frames drawn from the env's own seeded RNG;
* a drop of `ale.lives()` is reported as `info["life_loss"]` for training envs only;
  the episode is never reset on a life loss.

The inner `ALE/<Game>-v5` env is only used for construction, seeding and resets; steps
call the `ALEInterface` directly and grab frames into preallocated buffers, which is
the hot path of data collection.
"""

from __future__ import annotations

from typing import Any

import ale_py
import cv2
import gymnasium
import numpy as np
from gymnasium import spaces

gymnasium.register_envs(ale_py)

# SPEC 3.1 / 5: the 26 Atari-100k games, in the order of the reference tables.
ATARI_GAMES: tuple[str, ...] = (
    "Alien", "Amidar", "Assault", "Asterix", "BankHeist", "BattleZone", "Boxing",
    "Breakout", "ChopperCommand", "CrazyClimber", "DemonAttack", "Freeway", "Frostbite",
    "Gopher", "Hero", "Jamesbond", "Kangaroo", "Krull", "KungFuMaster", "MsPacman",
    "Pong", "PrivateEye", "Qbert", "RoadRunner", "Seaquest", "UpNDown",
)  # fmt: skip

# SPEC 5: size of each game's minimal action set (checked against the ALE by a test).
ATARI_MINIMAL_ACTIONS: dict[str, int] = {
    "Alien": 18, "Amidar": 10, "Assault": 7, "Asterix": 9, "BankHeist": 18,
    "BattleZone": 18, "Boxing": 18, "Breakout": 4, "ChopperCommand": 18,
    "CrazyClimber": 9, "DemonAttack": 6, "Freeway": 3, "Frostbite": 18, "Gopher": 8,
    "Hero": 18, "Jamesbond": 18, "Kangaroo": 18, "Krull": 18, "KungFuMaster": 14,
    "MsPacman": 9, "Pong": 6, "PrivateEye": 18, "Qbert": 6, "RoadRunner": 18,
    "Seaquest": 18, "UpNDown": 6,
}  # fmt: skip

FULL_ACTIONS = 18  # size of the ALE's full (legal) action set
_ALL = tuple(range(FULL_ACTIONS))

# ALE action ids of each game's minimal action set, as ale-py 0.12.1's ROMs declare them
# (checked against `getMinimalActionSet()` by a test); kept here so that masks need no ROM.
_MINIMAL_ACTION_IDS: dict[str, tuple[int, ...]] = {
    "Alien": _ALL, "Amidar": (0, 1, 2, 3, 4, 5, 10, 11, 12, 13), "Assault": (0, 1, 2, 3, 4, 11, 12),
    "Asterix": (0, 2, 3, 4, 5, 6, 7, 8, 9), "BankHeist": _ALL, "BattleZone": _ALL, "Boxing": _ALL,
    "Breakout": (0, 1, 3, 4), "ChopperCommand": _ALL, "CrazyClimber": (0, 2, 3, 4, 5, 6, 7, 8, 9),
    "DemonAttack": (0, 1, 3, 4, 11, 12), "Freeway": (0, 2, 5), "Frostbite": _ALL,
    "Gopher": (0, 1, 2, 3, 4, 10, 11, 12), "Hero": _ALL, "Jamesbond": _ALL, "Kangaroo": _ALL,
    "Krull": _ALL, "KungFuMaster": (0, 2, 3, 4, 5, 8, 9, 11, 12, 13, 14, 15, 16, 17),
    "MsPacman": (0, 2, 3, 4, 5, 6, 7, 8, 9), "Pong": (0, 1, 3, 4, 11, 12), "PrivateEye": _ALL,
    "Qbert": (0, 1, 2, 3, 4, 5), "RoadRunner": _ALL, "Seaquest": _ALL,
    "UpNDown": (0, 1, 2, 5, 10, 13),
}  # fmt: skip

_NOOP = ale_py.Action.NOOP


def check_game(game: str) -> None:
    """Raise a one-line ValueError naming `game` unless it is one of the 26 games."""
    if game not in ATARI_MINIMAL_ACTIONS:
        raise ValueError(f"unknown Atari game {game!r}; valid games: {', '.join(ATARI_GAMES)}")


def minimal_action_ids(game: str) -> tuple[int, ...]:
    """ALE action ids (0..17) of the game's minimal action set."""
    check_game(game)
    return _MINIMAL_ACTION_IDS[game]


class AtariEnv(gymnasium.Env):
    """One Atari game under a named protocol; see the module docstring for the rules.

    Observations are uint8 [S, S, 3] RGB; the reset observation is the current frame
    alone, as in STORM. Actions index the minimal action set, or all 18 ALE actions when
    `full_action_space` (use `legal_action_mask` to mask the rest). `info` holds
    "life_loss" and "lives".
    """

    def __init__(
        self,
        game: str,
        *,
        sticky_prob: float,
        noop_max: int,
        frame_skip: int,
        max_frames: int,
        image_size: int,
        train: bool,
        full_action_space: bool = False,
    ) -> None:
        check_game(game)
        if not 0.0 <= sticky_prob <= 1.0:
            raise ValueError(f"sticky_prob must be in [0, 1], got {sticky_prob}")
        if frame_skip < 1 or noop_max < 0 or max_frames < 1 or image_size < 1:
            raise ValueError(
                f"need frame_skip >= 1, noop_max >= 0, max_frames >= 1, image_size >= 1; got "
                f"{frame_skip=}, {noop_max=}, {max_frames=}, {image_size=}"
            )
        self.game = game
        self._train = train
        self._frame_skip = frame_skip
        self._noop_max = noop_max
        self._size = (image_size, image_size)
        self._env = gymnasium.make(
            f"ALE/{game}-v5",
            frameskip=1,
            repeat_action_probability=sticky_prob,
            full_action_space=full_action_space,
            max_num_frames_per_episode=max_frames,
        )
        self._ale: ale_py.ALEInterface = self._env.unwrapped.ale
        actions = (
            self._ale.getLegalActionSet() if full_action_space else self._ale.getMinimalActionSet()
        )
        self._action_set = list(actions)
        self.action_space = spaces.Discrete(len(self._action_set))
        self.observation_space = spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        height, width = self._ale.getScreenDims()
        # The last two raw frames (written alternately) and their pixel-wise maximum.
        self._frames = np.zeros((2, height, width, 3), np.uint8)
        self._latest = 0  # index of the most recent raw frame in `_frames`
        self._pooled = np.empty((height, width, 3), np.uint8)
        self._lives = 0

    @property
    def ale(self) -> ale_py.ALEInterface:
        """The emulator, for read-only inspection (lives, settings, frame counters)."""
        return self._ale

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start an episode; `seed` reseeds the ALE and the no-op RNG, None continues both."""
        super().reset(seed=seed)
        self._env.reset(seed=seed)
        if self._noop_max > 0:
            for _ in range(int(self.np_random.integers(1, self._noop_max + 1))):
                self._ale.act(_NOOP)
                if self._ale.game_over():
                    self._env.reset()
        self._ale.getScreenRGB(self._frames[self._latest])
        self._frames[1 - self._latest] = self._frames[self._latest]
        self._lives = self._ale.lives()
        obs = cv2.resize(self._frames[self._latest], self._size, interpolation=cv2.INTER_AREA)
        return obs, {"life_loss": False, "lives": self._lives}

    def step(self, action):
        if not 0 <= action < len(self._action_set):
            raise ValueError(f"action {action} outside Discrete({len(self._action_set)})")
        ale, frames = self._ale, self._frames
        ale_action = self._action_set[action]
        reward = 0.0
        for _ in range(self._frame_skip):
            reward += ale.act(ale_action)
            # Every raw frame is grabbed (not only the last two) so that an early stop
            # still pools the true last two frames.
            self._latest ^= 1
            ale.getScreenRGB(frames[self._latest])
            if ale.game_over():  # termination or the frame cap
                break
        np.maximum(frames[0], frames[1], out=self._pooled)
        obs = cv2.resize(self._pooled, self._size, interpolation=cv2.INTER_AREA)
        lives = ale.lives()
        life_loss = self._train and lives < self._lives
        self._lives = lives
        terminated, truncated = ale.game_over(with_truncation=False), ale.game_truncated()
        return obs, reward, terminated, truncated, {"life_loss": life_loss, "lives": lives}

    def get_state(self) -> dict:
        """Everything needed to continue bit-exactly: emulator (incl. its RNG), RNG, buffers."""
        return {
            "game": self.game,
            "ale": self._ale.cloneState(include_rng=True).serialize(),
            "np_random": self.np_random.bit_generator.state,
            "last_frame": self._frames[self._latest].copy(),
            "lives": self._lives,
        }

    def set_state(self, state: dict) -> None:
        if state["game"] != self.game:
            raise ValueError(f"state is for {state['game']!r}, this env plays {self.game!r}")
        self._ale.restoreState(ale_py.ALEState(state["ale"]))
        self.np_random.bit_generator.state = state["np_random"]
        self._frames[:] = state["last_frame"]
        self._lives = int(state["lives"])

    def close(self) -> None:
        self._env.close()
