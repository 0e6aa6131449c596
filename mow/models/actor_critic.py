"""STORM actor-critic trained on imagined trajectories (SPEC §6.6).

The actor is a categorical policy over a fixed action set; an optional boolean mask
restricts it to a subset (MoW's shared 18-action actor, masked to each game's minimal
set). With ``continuous=True`` (Meta-World's Box(-1, 1, (4,)) actions) the actor's last
layer is a ``TanhGaussianHead`` instead: a tanh-squashed diagonal Gaussian, so every
action lies in [-1, 1] and its log-density includes the squash's Jacobian. The critic
predicts symlog two-hot values; a slow (EMA) copy regularises it. Critic, λ-returns,
normalisation and imagination are the same for both kinds of actor.

Continuous actor, decisions (SPEC 1.7 leaves the Meta-World head open):
- policy gradient: the same REINFORCE term as for discrete actions,
  -log π(a_t|s_t) · sg(advantage), with log π of the imagined action (DreamerV3 uses
  REINFORCE for continuous actions as well); imagination stays detached, as in STORM.
- entropy bonus η · H(π): the squashed Gaussian has no closed-form entropy, so H is the
  one-sample reparameterised estimate -log π(tanh(u)), u = mean + std · ε, drawn afresh in
  the loss (``TanhGaussian.entropy``). Its gradient flows through the draw; the entropy of
  the pre-squash Gaussian would keep rewarding a growing std even where tanh saturates
  and the real action distribution collapses onto ±1.
- greedy action (evaluation with ``eval_policy: greedy``): tanh(mean).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import Categorical

from mow.models.continuous import TanhGaussian, TanhGaussianHead
from mow.models.heads import mlp_trunk
from mow.models.linear import Linear
from mow.models.module_batch import ModuleBatch, use_module_batches
from mow.models.row_groups import RowGroup, assemble, group_rows, host_rows, read_back
from mow.models.world_model import Imagination
from mow.numerics import LAMBDA_FORMS, PercentileNormalizer, TwoHot, lambda_return, update_normalizers


@dataclass(frozen=True)
class AgentConfig:
    """Actor-critic hyper-parameters; defaults are STORM's (SPEC §2.2)."""

    hidden: int = 512
    """Width of the actor and critic MLP trunks."""
    layers: int = 2
    """Layers of the actor and critic trunks."""
    value_bins: int = 255
    """Symlog two-hot bins of the critic."""
    gamma: float = 0.985
    """Discount."""
    lam: float = 0.95
    """λ of the λ-return."""
    entropy: float = 3e-4
    """Entropy bonus coefficient η."""
    slow_critic_decay: float = 0.98
    """EMA decay of the slow critic (slow <- decay * slow + (1 - decay) * critic)."""
    percentile_decay: float = 0.99
    """EMA decay of the return percentiles."""
    percentile_low: float = 0.05
    """Lower return percentile of the normaliser."""
    percentile_high: float = 0.95
    """Upper return percentile of the normaliser."""
    lambda_form: str = "official"
    """λ-return form: "official" uses V(s_t) in the (1-λ) term (STORM's code), "paper" V(s_{t+1})."""

    def __post_init__(self) -> None:
        if self.lambda_form not in LAMBDA_FORMS:
            raise ValueError(f"lambda_form must be one of {LAMBDA_FORMS}, got {self.lambda_form!r}")
        if not 0.0 <= self.slow_critic_decay <= 1.0:
            raise ValueError(f"slow_critic_decay must be in [0, 1], got {self.slow_critic_decay}")


class NonFiniteOutput(FloatingPointError):
    """A network produced NaN/Inf where an action distribution was needed (diverged
    weights: a learning rate far too high, an overflow). `rows` are the batch rows hit."""

    def __init__(self, what: str, rows: list[int]):
        super().__init__(f"non-finite {what} in rows {rows}")
        self.what, self.rows = what, rows


def sample_actions(dist: Categorical) -> torch.Tensor:
    """`dist.sample()`, with NaN logits reported as NonFiniteOutput instead of torch's bare
    multinomial error. torch.multinomial already checks its input (a host sync it always
    makes); the logits are only inspected once it has failed, so a healthy step pays nothing."""
    try:
        return dist.sample()
    except RuntimeError:
        # normalised logits are NaN where a raw logit was NaN or +-inf (masked actions stay -inf)
        bad = torch.isnan(dist.logits).reshape(-1, dist.logits.shape[-1]).any(dim=-1)
        if not bool(bad.any()):
            raise
        raise NonFiniteOutput("actor/logits", bad.nonzero().flatten().tolist()) from None


@torch.no_grad()
def ema_(slow: nn.Module, fast: nn.Module, weight: float) -> None:
    """slow <- slow + weight * (fast - slow) for every parameter, as one multi-tensor
    operation (one kernel for all of MoW's cluster critics instead of one per tensor)."""
    torch._foreach_lerp_(list(slow.parameters()), list(fast.parameters()), weight)


def mask_logits(logits: torch.Tensor, action_mask: torch.Tensor | None) -> torch.Tensor:
    """Set the logits of illegal actions to -inf (mask: bool, True = legal, broadcastable)."""
    if action_mask is None:
        return logits
    return logits.masked_fill(
        ~action_mask.to(device=logits.device, dtype=torch.bool), float("-inf")
    )


def _actor(cfg: AgentConfig, state_dim: int, num_actions: int, continuous: bool) -> nn.Sequential:
    """MLP trunk + logits over ``num_actions`` actions, or a tanh-Gaussian over a
    ``num_actions``-dimensional action vector when ``continuous``."""
    head = TanhGaussianHead(cfg.hidden, num_actions) if continuous else Linear(cfg.hidden, num_actions)
    return nn.Sequential(mlp_trunk(state_dim, cfg.hidden, cfg.layers), head)


def _act(dist: Categorical | TanhGaussian, greedy: bool) -> torch.Tensor:
    if isinstance(dist, TanhGaussian):
        return dist.mode() if greedy else dist.sample()
    return dist.logits.argmax(dim=-1) if greedy else sample_actions(dist)


class ActorCritic(nn.Module):
    """Actor, critic, slow critic and return normaliser of one agent; ``num_actions`` is the
    action count, or the action dimension when ``continuous``."""

    def __init__(self, cfg: AgentConfig, state_dim: int, num_actions: int, continuous: bool = False) -> None:
        super().__init__()
        self.cfg, self.state_dim, self.num_actions = cfg, state_dim, num_actions
        self.continuous = continuous
        self.actor = _actor(cfg, state_dim, num_actions, continuous)
        self.critic = nn.Sequential(
            mlp_trunk(state_dim, cfg.hidden, cfg.layers), Linear(cfg.hidden, cfg.value_bins)
        )
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.two_hot = TwoHot(cfg.value_bins)
        self.normalizer = PercentileNormalizer(
            cfg.percentile_decay, cfg.percentile_low, cfg.percentile_high
        )

    def policy(
        self, states: torch.Tensor, action_mask: torch.Tensor | None = None
    ) -> Categorical | TanhGaussian:
        """Masked categorical policy over actions for ``[..., state_dim]`` states (float32
        logits), or the tanh-Gaussian of a continuous actor (no mask applies)."""
        if self.continuous:
            if action_mask is not None:
                raise ValueError("a continuous actor takes no action mask")
            return self.actor(states)
        logits = mask_logits(self.actor(states).float(), action_mask)
        return Categorical(logits=logits, validate_args=False)

    @torch.no_grad()
    def act(
        self, state: torch.Tensor, greedy: bool = False, action_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Long ``[B]`` actions: sampled, or the most likely legal one when ``greedy``;
        continuous: float ``[B, A]`` in [-1, 1], sampled or tanh(mean)."""
        return _act(self.policy(state, action_mask), greedy)

    def compute_loss(
        self, imag: Imagination, action_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Actor-critic loss on an imagined batch (SPEC §6.6); updates the percentile EMAs.

        value loss = CE(V(s_t), sg G^λ[critic]) + CE(V(s_t), sg G^λ[slow critic]);
        policy loss = -mean(log π(a_t|s_t) · sg((G^λ - V(s_t)) / max(1, S))) - η · mean H(π).
        """
        states = imag.states
        with torch.no_grad():
            slow_logits = self.slow_critic(states)
        return imagination_loss(
            self.cfg, self.two_hot, self.policy(states[:, :-1], action_mask), self.critic(states),
            slow_logits, imag, self.normalizer.update,
        )

    @torch.no_grad()
    def update_slow_critic(self) -> None:
        """slow <- decay * slow + (1 - decay) * critic."""
        ema_(self.slow_critic, self.critic, 1.0 - self.cfg.slow_critic_decay)


def imagination_loss(
    cfg: AgentConfig,
    two_hot: TwoHot,
    dist: Categorical | TanhGaussian,
    value_logits: torch.Tensor,
    slow_value_logits: torch.Tensor,
    imag: Imagination,
    return_scale,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The STORM actor-critic loss shared by the single- and multi-task agents.

    ``return_scale(returns)`` folds the λ-returns into the normaliser(s) and returns
    max(1, S), a scalar or one value per sequence ``[B, 1]``. ``dist`` is the categorical
    or tanh-Gaussian policy of ``imag.states[:, :-1]`` (see the module docstring for the
    continuous entropy estimate).
    """
    log_prob = dist.log_prob(imag.actions)
    entropy = dist.entropy().mean()
    with torch.no_grad():
        continues = 1.0 - imag.terminations.float()
        values = two_hot.decode(value_logits)
        slow_values = two_hot.decode(slow_value_logits)
        returns = lambda_return(imag.rewards, values, continues, cfg.gamma, cfg.lam, cfg.lambda_form)
        slow_returns = lambda_return(
            imag.rewards, slow_values, continues, cfg.gamma, cfg.lam, cfg.lambda_form
        )
        scale = return_scale(returns)
        advantage = (returns - values[:, :-1]) / scale
    value_loss = two_hot.loss(value_logits[:, :-1], returns) + two_hot.loss(
        value_logits[:, :-1], slow_returns
    )
    policy_loss = -(log_prob * advantage).mean()
    total = policy_loss + value_loss - cfg.entropy * entropy
    metrics = {
        "ac/total": total,
        "ac/policy": policy_loss,
        "ac/value": value_loss,
        "ac/entropy": entropy,
        "ac/return_mean": returns.mean(),
        "ac/scale": torch.as_tensor(scale).float().mean(),
        "ac/advantage_mean": advantage.mean(),
    }
    return total, {name: value.detach() for name, value in metrics.items()}


def _critic(cfg: AgentConfig, state_dim: int) -> nn.Sequential:
    return nn.Sequential(
        mlp_trunk(state_dim, cfg.hidden, cfg.layers), Linear(cfg.hidden, cfg.value_bins)
    )


class MultiTaskActorCritic(nn.Module):
    """MoW's agent (SPEC §1.7): one shared actor, one critic (+ slow copy) per cluster.

    The actor has no cluster index: it sees every task's states and acts over the full
    action set, with each task's illegal actions masked out (their probability is exactly
    0, so they are never sampled and carry no gradient). With ``continuous`` (Meta-World)
    the shared actor is a tanh-Gaussian over the ``num_actions``-dimensional action vector
    that every task shares: ``action_masks`` is None and ``num_tasks`` gives K. Critic i
    serves the tasks of cluster i, like the VAEs and heads. Return normalisation is per task (decision; SPEC
    leaves it open): Atari returns differ by orders of magnitude between games, so one
    global percentile range would shrink the advantages of every low-return game.
    """

    action_masks: torch.Tensor | None
    cluster_of_task: torch.Tensor

    #: run the cluster critics as one ModuleBatch; None: on CUDA (``use_module_batches``)
    batch_modules: bool | None = None

    def __init__(
        self,
        cfg: AgentConfig,
        state_dim: int,
        num_actions: int,
        action_masks: torch.Tensor | None,
        num_clusters: int,
        *,
        continuous: bool = False,
        num_tasks: int | None = None,
    ) -> None:
        super().__init__()
        if continuous:
            if action_masks is not None or num_tasks is None or num_tasks < 1:
                raise ValueError(
                    f"a continuous actor takes action_masks=None and num_tasks >= 1, got "
                    f"masks {'None' if action_masks is None else 'given'} and num_tasks={num_tasks}"
                )
            masks = None
        else:
            masks = torch.as_tensor(action_masks, dtype=torch.bool, device="cpu")  # validated on the host
            if masks.dim() != 2 or masks.shape[1] != num_actions or not masks.any(1).all():
                raise ValueError(
                    f"action_masks must be [num_tasks, {num_actions}] with a legal action per task, "
                    f"got shape {tuple(masks.shape)}"
                )
            num_tasks = masks.shape[0]
        self.cfg, self.state_dim, self.num_actions = cfg, state_dim, num_actions
        self.continuous = continuous
        self.num_tasks, self.num_clusters = num_tasks, num_clusters
        self.actor = _actor(cfg, state_dim, num_actions, continuous)
        self.critics = nn.ModuleList(_critic(cfg, state_dim) for _ in range(num_clusters))
        self.slow_critics = copy.deepcopy(self.critics).requires_grad_(False)
        self.two_hot = TwoHot(cfg.value_bins)
        self.normalizers = nn.ModuleList(
            PercentileNormalizer(cfg.percentile_decay, cfg.percentile_low, cfg.percentile_high)
            for _ in range(self.num_tasks)
        )
        self.register_buffer("action_masks", masks)
        self.register_buffer(
            "cluster_of_task", torch.arange(self.num_tasks, dtype=torch.long) % num_clusters
        )

    def set_clusters(self, assignment) -> None:
        values = torch.as_tensor(assignment, dtype=torch.long)
        if values.shape != (self.num_tasks,) or values.min() < 0 or values.max() >= self.num_clusters:
            raise ValueError(
                f"cluster assignment must be {self.num_tasks} values in [0, {self.num_clusters}), "
                f"got {values.tolist()}"
            )
        self.cluster_of_task.copy_(values)

    def policy(self, states: torch.Tensor, task_ids: torch.Tensor) -> Categorical | TanhGaussian:
        """Masked policy for states ``[B, ..., state_dim]`` of tasks ``task_ids`` ``[B]``
        (continuous: the shared tanh-Gaussian, the same action space for every task)."""
        if self.action_masks is None:
            return self.actor(states)
        mask = self.action_masks[task_ids]
        mask = mask.view(mask.shape[0], *([1] * (states.dim() - 2)), mask.shape[1])
        logits = mask_logits(self.actor(states).float(), mask)
        return Categorical(logits=logits, validate_args=False)

    @torch.no_grad()
    def act(self, state: torch.Tensor, task_ids: torch.Tensor, greedy: bool = False) -> torch.Tensor:
        return _act(self.policy(state, task_ids), greedy)

    @staticmethod
    def _by_cluster(
        modules: nn.ModuleList, name: str, states: torch.Tensor, groups: list[RowGroup], batch: ModuleBatch | None
    ) -> torch.Tensor:
        """Each cluster's module (critic or slow critic: ``name``) on its rows, in batch order."""
        if batch is None:
            return assemble([modules[g.key](states[g.rows]).to(states.dtype) for g in groups], groups)
        out = batch.vmap(name, modules, lambda call, x: call(x), batch.rows(states))
        return batch.in_batch_order(out, groups).to(states.dtype)

    def compute_loss(
        self, imag: Imagination, task_ids: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The STORM loss with cluster critics, the shared masked actor and per-task scales.
        The critics run as one :class:`ModuleBatch` on a GPU (``use_module_batches``), and
        the per-task normalisers update together (:func:`update_normalizers`)."""
        states = imag.states.float()
        device = task_ids.device
        tasks, clusters = read_back(task_ids, self.cluster_of_task)  # the one host read
        keys = clusters[tasks]
        cluster_groups = group_rows(keys, device)
        task_groups = group_rows(tasks, device)
        batch = None
        if use_module_batches(self.batch_modules, device):
            batch = ModuleBatch.of([g.key for g in cluster_groups], host_rows(keys, cluster_groups), device)
        by_task = ModuleBatch.of([g.key for g in task_groups], host_rows(tasks, task_groups), device)
        with torch.no_grad():
            slow_logits = self._by_cluster(self.slow_critics, "slow_critics", states, cluster_groups, batch)

        def per_task_scale(returns: torch.Tensor) -> torch.Tensor:
            padded = by_task.rows(returns.detach().float()).flatten(1)  # [tasks, R, H] -> [tasks, R * H]
            padded = padded.masked_fill(~by_task.mask().repeat_interleave(returns.shape[1], dim=1), float("nan"))
            scales = update_normalizers([self.normalizers[k] for k in by_task.keys], padded)
            # each row its task's scale
            return by_task.in_batch_order(scales[:, None].expand(by_task.index.shape), task_groups)[:, None]

        return imagination_loss(
            self.cfg, self.two_hot, self.policy(states[:, :-1], task_ids),
            self._by_cluster(self.critics, "critics", states, cluster_groups, batch), slow_logits, imag, per_task_scale,
        )

    @torch.no_grad()
    def update_slow_critic(self) -> None:
        ema_(self.slow_critics, self.critics, 1.0 - self.cfg.slow_critic_decay)
