"""Acting in the real environment with a world model and an actor.

STORM's official code chooses the action for step t from [z_hat_t, h_{t-1}], where h_{t-1}
comes from the last L (frame, action) pairs *before* o_t and z_hat_t is a sample of the
prior; o_t only enters the context afterwards (`act_latent: prior`, the default, as the
reported scores were produced that way). `act_latent: posterior` instead uses the
posterior sample of the current frame o_t with the same h_{t-1}, so the policy reacts to
what it sees now. The context is not cleared at episode ends, as in the official code.
"""

from __future__ import annotations

import numpy as np
import torch


class ContextWindow:
    """The last `length` (frame, action) pairs of every env, on the model's device; actions
    are long indices, or float32 vectors of `action_dim` > 0 (continuous actions)."""

    def __init__(self, num_envs: int, length: int, obs_shape: tuple[int, ...], device: torch.device,
                 action_dim: int = 0):
        self.obs = torch.zeros((num_envs, length, *obs_shape), dtype=torch.uint8, device=device)
        shape, dtype = ((action_dim,), torch.float32) if action_dim else ((), torch.long)
        self.actions = torch.zeros((num_envs, length, *shape), dtype=dtype, device=device)
        self.count = 0

    def push(self, obs: torch.Tensor, actions: torch.Tensor) -> None:
        self.obs = torch.roll(self.obs, -1, dims=1)
        self.actions = torch.roll(self.actions, -1, dims=1)
        self.obs[:, -1] = obs
        self.actions[:, -1] = actions.to(self.actions.dtype)
        self.count = min(self.count + 1, self.obs.shape[1])

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.obs[:, -self.count:], self.actions[:, -self.count:]

    def state_dict(self) -> dict:
        return {"obs": self.obs.cpu(), "actions": self.actions.cpu(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.obs.copy_(state["obs"])
        self.actions.copy_(state["actions"])
        self.count = state["count"]


class Policy:
    """Maps the current observations (plus the context window) to env actions.

    With ``task_ids`` (long ``[N]``, one per env) the models are MoW's: the world model and
    the shared actor take the task of every env, and the actor masks each task's illegal
    actions itself.
    """

    def __init__(self, world_model, actor_critic, runtime, *, act_latent: str = "prior",
                 action_mask: torch.Tensor | None = None, task_ids: torch.Tensor | None = None):
        if act_latent not in ("prior", "posterior"):
            raise ValueError(f"train.act_latent: unknown value '{act_latent}' (valid: prior, posterior)")
        self.wm, self.ac, self.runtime = world_model, actor_critic, runtime
        self.act_latent = act_latent
        self.action_mask = action_mask
        self.task_ids = task_ids

    @torch.no_grad()
    def __call__(self, context: ContextWindow, current_obs: torch.Tensor, *, greedy: bool) -> torch.Tensor | None:
        """Actions [N] ([N, A] continuous) on the device, or None while the context is empty
        (caller acts randomly)."""
        if context.count == 0:
            return None
        obs_ctx, act_ctx = context.view()
        tasks = () if self.task_ids is None else (self.task_ids,)
        # act_state and posterior_sample run in eval mode themselves (world_model.eval_mode)
        with self.runtime.autocast():
            state = self.wm.act_state(obs_ctx, act_ctx, *tasks)
            if self.act_latent == "posterior":
                z = self.wm.posterior_sample(current_obs, *tasks).to(state.dtype)
                state = torch.cat([z, state[:, z.shape[-1]:]], dim=-1)
            if self.task_ids is not None:
                return self.ac.act(state.float(), self.task_ids, greedy=greedy)
            return self.ac.act(state.float(), greedy=greedy, action_mask=self.action_mask)


def random_actions(rng: np.random.Generator, num_envs: int, num_actions: int, continuous: bool = False) -> np.ndarray:
    """Uniform random actions: indices in [0, num_actions), or float32 vectors uniform in
    [-1, 1]^num_actions when `continuous` (the Box(-1, 1) of Meta-World)."""
    if continuous:
        return rng.uniform(-1.0, 1.0, size=(num_envs, num_actions)).astype(np.float32)
    return rng.integers(0, num_actions, size=num_envs)
