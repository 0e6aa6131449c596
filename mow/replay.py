"""Replay of uint8 frames with fast sequence sampling (STORM: uniform, may span episodes).

Storage is one ring per environment stream ([rows, num_envs, ...]) kept on the training
device, so a sampled batch is a single gather and frames stay uint8 until the model
converts them. Actions are stored as long indices ([rows, num_envs]), or with
`action_dim > 0` as float32 vectors ([rows, num_envs, action_dim]: Meta-World).
Sampling draws from its own seeded generator, which is checkpointed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    obs: torch.Tensor          # uint8 [B, T, H, W, C]
    actions: torch.Tensor      # long [B, T], or float32 [B, T, A] for continuous actions
    rewards: torch.Tensor      # float32 [B, T]
    terminations: torch.Tensor  # float32 [B, T]


class ReplayBuffer:
    def __init__(self, capacity: int, num_envs: int, obs_shape: tuple[int, ...], *, device: torch.device | str = "cpu", seed: int = 0,
                 action_dim: int = 0):
        self.rows = max(1, capacity // num_envs)
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.obs = torch.zeros((self.rows, num_envs, *obs_shape), dtype=torch.uint8, device=self.device)
        self.action_dim = action_dim  # 0: discrete action indices
        action_shape, dtype = ((action_dim,), torch.float32) if action_dim else ((), torch.long)
        self._action_np = np.float32 if action_dim else np.int64
        self.actions = torch.zeros((self.rows, num_envs, *action_shape), dtype=dtype, device=self.device)
        self.rewards = torch.zeros((self.rows, num_envs), dtype=torch.float32, device=self.device)
        self.terminations = torch.zeros((self.rows, num_envs), dtype=torch.float32, device=self.device)
        self.cursor = 0   # next row to write
        self.filled = 0   # rows holding data
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        """Transitions stored over all streams."""
        return self.filled * self.num_envs

    def add(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, terminations: np.ndarray) -> None:
        """Store one transition per env: the observation the action was taken from, and its outcome."""
        row = self.cursor
        self.obs[row].copy_(torch.from_numpy(np.ascontiguousarray(obs)))
        self.actions[row].copy_(torch.from_numpy(np.asarray(actions, dtype=self._action_np)))
        self.rewards[row].copy_(torch.from_numpy(np.asarray(rewards, dtype=np.float32)))
        self.terminations[row].copy_(torch.from_numpy(np.asarray(terminations, dtype=np.float32)))
        self.cursor = (row + 1) % self.rows
        self.filled = min(self.filled + 1, self.rows)

    def can_sample(self, seq_len: int) -> bool:
        return self.filled >= seq_len

    def _rows(self, batch: int, seq_len: int, streams: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.can_sample(seq_len):
            raise ValueError(f"replay holds {self.filled} steps per stream, fewer than a sequence of {seq_len}")
        starts = torch.randint(0, self.filled - seq_len + 1, (batch,), generator=self.generator)
        if streams is None:
            envs = torch.randint(0, self.num_envs, (batch,), generator=self.generator)
        else:
            envs = torch.as_tensor(streams, dtype=torch.long).cpu()
            if envs.shape != (batch,) or envs.min() < 0 or envs.max() >= self.num_envs:
                raise ValueError(f"streams must be {batch} indices in [0, {self.num_envs}), got {envs.tolist()}")
        oldest = self.cursor if self.filled == self.rows else 0
        rows = (oldest + starts[:, None] + torch.arange(seq_len)[None]) % self.rows
        return rows.to(self.device), envs[:, None].expand(-1, seq_len).to(self.device)

    def sample(self, batch: int, seq_len: int, streams: torch.Tensor | None = None) -> Batch:
        """`batch` sequences of `seq_len` steps; row i from stream `streams[i]` if given
        (the multi-task trainer picks each row's task), else from a uniform stream."""
        rows, envs = self._rows(batch, seq_len, streams)
        return Batch(self.obs[rows, envs], self.actions[rows, envs], self.rewards[rows, envs], self.terminations[rows, envs])

    def recent_context(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last `length` frames and actions of every stream, oldest first: [N, L, ...]."""
        length = min(length, self.filled)
        rows = (self.cursor - length + torch.arange(length)) % self.rows
        rows = rows.to(self.device)
        return self.obs[rows].transpose(0, 1), self.actions[rows].transpose(0, 1)

    def state_dict(self) -> dict:
        n = self.filled
        return {
            "rows": self.rows, "num_envs": self.num_envs, "action_dim": self.action_dim, "cursor": self.cursor, "filled": n,
            "obs": self.obs[:n].cpu(), "actions": self.actions[:n].cpu(),
            "rewards": self.rewards[:n].cpu(), "terminations": self.terminations[:n].cpu(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["rows"], state["num_envs"]) != (self.rows, self.num_envs):
            raise ValueError(f"replay layout {state['rows']}x{state['num_envs']} does not match {self.rows}x{self.num_envs}")
        if state.get("action_dim", 0) != self.action_dim:  # states written before continuous actions are discrete
            raise ValueError(f"replay holds action_dim {state.get('action_dim', 0)}, this buffer {self.action_dim}")
        n = state["filled"]
        for name in ("obs", "actions", "rewards", "terminations"):
            getattr(self, name)[:n].copy_(state[name])
        self.cursor, self.filled = state["cursor"], n
        self.generator.set_state(state["generator"])
