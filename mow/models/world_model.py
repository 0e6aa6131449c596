"""STORM world model (SPEC §6.2-6.6): categorical VAE + token mixer + causal Transformer +
prior / reward / termination heads, its training loss, the acting state and imagination.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mow.models.heads import DistHead, RewardHead, TerminationHead
from mow.models.transformer import CausalTransformer, KVCache, TokenMixer
from mow.models.vae import CategoricalVAE, images_to_float
from mow.numerics import TwoHot, kl_loss_free_bits
from mow.profiling import phase

Policy = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class WorldModelConfig:
    """STORM world-model hyper-parameters; defaults are the paper/official values (SPEC §2.2)."""

    image_size: int = 64
    """Square observation side in pixels."""
    channels: int = 3
    """Image channels (RGB)."""
    encoder_channels: tuple[int, ...] = (32, 64, 128, 256)
    """Output channels of the stride-2 encoder convs (4 convs: 64 px -> 4x4)."""
    stoch: int = 32
    """Number of categorical latent variables."""
    classes: int = 32
    """Classes per categorical variable."""
    unimix: float = 0.01
    """Uniform mix of posterior and prior (1 %)."""
    d_model: int = 512
    """Transformer width (token and hidden-state size)."""
    layers: int = 2
    """Transformer blocks."""
    heads: int = 8
    """Attention heads."""
    ffn: int = 1024
    """Feed-forward hidden width."""
    dropout: float = 0.1
    """Dropout of attention weights, attention output and FFN output."""
    max_len: int = 64
    """Rows of the learned positional table (longest sequence, cache included)."""
    head_hidden: int = 512
    """Width of the reward / termination head trunks."""
    head_layers: int = 2
    """Layers of the reward / termination head trunks."""
    reward_bins: int = 255
    """Symlog two-hot bins of the reward head."""
    loss_dyn: float = 0.5
    """Weight of the dynamics KL (trains the prior)."""
    loss_rep: float = 0.1
    """Weight of the representation KL (trains the encoder)."""
    free_bits: float = 1.0
    """Free nats: both KL terms are max(free_bits, mean KL)."""

    @property
    def latent_dim(self) -> int:
        return self.stoch * self.classes

    @property
    def state_dim(self) -> int:
        """Agent state size: prior sample (latent_dim) + hidden state (d_model)."""
        return self.latent_dim + self.d_model


@dataclass
class Imagination:
    """An imagined batch of trajectories (everything detached, float32 except actions)."""

    states: torch.Tensor
    """[B, H+1, S] agent states [ẑ_t, h_{t-1}]."""
    actions: torch.Tensor
    """[B, H] long (or [B, H, A] float for continuous actions), the action taken in states[:, t]."""
    rewards: torch.Tensor
    """[B, H] predicted reward of each transition (symexp of the two-hot mean)."""
    terminations: torch.Tensor
    """[B, H] 0/1: the termination logit of each transition is > 0."""


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode and restore every submodule's own mode afterwards.

    The flag is written straight into each submodule's ``__dict__``: through ``Module.train()``
    and ``Module.__setattr__`` it cost about a third of a MoW acting step at the smoke scale
    (profiled; hundreds of submodules, and every env step enters this two or three times)."""
    modules = list(module.modules())
    modes = [m.training for m in modules]
    for m in modules:
        m.__dict__["training"] = False
    try:
        yield
    finally:
        for m, training in zip(modules, modes):
            m.__dict__["training"] = training


class WorldModel(nn.Module):
    """STORM's world model for one game with ``num_actions`` discrete actions, or with
    ``continuous`` action vectors of dimension ``num_actions`` (fed to the token mixer
    as they are, see ``TokenMixer``)."""

    def __init__(self, cfg: WorldModelConfig, num_actions: int, continuous: bool = False) -> None:
        super().__init__()
        self.cfg, self.num_actions, self.continuous = cfg, num_actions, continuous
        self.state_dim = cfg.state_dim
        self.vae = CategoricalVAE(
            cfg.image_size, cfg.channels, cfg.encoder_channels, cfg.stoch, cfg.classes, cfg.unimix
        )
        self.mixer = TokenMixer(cfg.latent_dim, num_actions, cfg.d_model, continuous=continuous)
        self.transformer = CausalTransformer(
            cfg.d_model, cfg.layers, cfg.heads, cfg.ffn, cfg.dropout, cfg.max_len
        )
        self.prior_head = DistHead(cfg.d_model, cfg.stoch, cfg.classes, cfg.unimix)
        self.reward_head = RewardHead(
            cfg.d_model, cfg.head_hidden, cfg.head_layers, cfg.reward_bins
        )
        self.termination_head = TerminationHead(cfg.d_model, cfg.head_hidden, cfg.head_layers)
        self.two_hot = TwoHot(cfg.reward_bins)

    # ------------------------------------------------------------------ training
    def compute_loss(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        terminations: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """World-model loss on a batch of sequences (SPEC §6.5).

        ``obs`` uint8 ``[B, T, H, W, C]``, ``actions`` long ``[B, T]`` (float ``[B, T, A]``
        when continuous), ``rewards`` and
        ``terminations`` ``[B, T]``. Reward and termination at step t belong to the
        transition (o_t, a_t) and are predicted from h_t. Returns the total loss and
        detached scalar metrics.
        """
        batch, steps = actions.shape[:2]
        images = images_to_float(obs.flatten(0, 1))  # also the reconstruction target
        posterior = self.vae.encode_images(images)  # [B*T, stoch, classes] float32
        z = self.vae.sample(posterior)
        reconstruction = self.vae.decode(z)
        rec_loss = (reconstruction.float() - images).square().sum(dim=(1, 2, 3)).mean()

        hidden = self.transformer(self.mixer(z.view(batch, steps, -1), actions))
        reward_logits = self.reward_head(hidden)
        termination_logits = self.termination_head(hidden).float()
        reward_loss = self.two_hot.loss(reward_logits, rewards)
        termination_loss = F.binary_cross_entropy_with_logits(
            termination_logits, terminations.to(termination_logits.dtype)
        )

        # The prior read at step t predicts the posterior of step t + 1.
        prior = self.prior_head(hidden[:, :-1])
        posterior_next = posterior.view(batch, steps, *posterior.shape[1:])[:, 1:]
        dyn_loss, dyn_kl = kl_loss_free_bits(posterior_next.detach(), prior, self.cfg.free_bits)
        rep_loss, _ = kl_loss_free_bits(posterior_next, prior.detach(), self.cfg.free_bits)

        total = (
            rec_loss
            + reward_loss
            + termination_loss
            + self.cfg.loss_dyn * dyn_loss
            + self.cfg.loss_rep * rep_loss
        )
        with torch.no_grad():
            log_probs = F.log_softmax(posterior, dim=-1)
            entropy = -(log_probs.exp() * log_probs).sum(dim=(-2, -1)).mean()
        metrics = {
            "wm/total": total,
            "wm/rec": rec_loss,
            "wm/reward": reward_loss,
            "wm/termination": termination_loss,
            "wm/dyn": dyn_loss,
            "wm/rep": rep_loss,
            "wm/dyn_kl_raw": dyn_kl,
            "wm/posterior_entropy": entropy,
        }
        return total, {name: value.detach() for name, value in metrics.items()}

    # ------------------------------------------------------------------ inference
    def _context_hidden(
        self, obs_ctx: torch.Tensor, act_ctx: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Encode a context in one encoder call and one Transformer pass; last hidden state."""
        batch, steps = act_ctx.shape[:2]
        z = self.vae.sample(self.vae.encode(obs_ctx.flatten(0, 1)))
        tokens = self.mixer(z.view(batch, steps, -1), act_ctx)
        return self.transformer(tokens, cache)[:, -1]

    def _prior_state(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ẑ ~ prior(h); return (ẑ, agent state [ẑ, h]) in float32."""
        z = self.vae.sample(self.prior_head(hidden))
        return z, torch.cat([z, hidden.float()], dim=-1)

    @torch.no_grad()
    def posterior_sample(self, obs: torch.Tensor) -> torch.Tensor:
        """A posterior sample of uint8 frames ``[B, H, W, C]`` (eval mode) -> ``[B, latent]``."""
        with eval_mode(self):
            return self.vae.sample(self.vae.encode(obs))

    @torch.no_grad()
    def act_state(self, obs_ctx: torch.Tensor, act_ctx: torch.Tensor) -> torch.Tensor:
        """Agent state for acting (SPEC §6.6), computed in eval mode.

        ``obs_ctx`` uint8 ``[B, L, H, W, C]`` and ``act_ctx`` long ``[B, L]`` are the last
        L <= 16 (frame, action taken there) pairs. Returns ``[B, state_dim]`` =
        [ẑ ~ prior(h_{L-1}), h_{L-1}]: the state in which the next action is chosen.
        """
        with eval_mode(self):
            return self._prior_state(self._context_hidden(obs_ctx, act_ctx))[1]

    @torch.no_grad()
    def imagine(
        self, policy: Policy, obs_ctx: torch.Tensor, act_ctx: torch.Tensor, horizon: int
    ) -> Imagination:
        """Roll out ``horizon`` steps from real contexts with the KV cache (SPEC §6.6).

        The context (uint8 ``[B, L, H, W, C]`` frames with their actions ``[B, L]``) goes
        through one batched encoder call and one parallel Transformer pass that fills the
        cache. Each imagined step samples ẑ from the prior, asks ``policy`` for an action
        and feeds (ẑ, a) through the cache. Reward and termination heads run once on all
        imagined hidden states after the loop. BatchNorm and dropout are in eval mode.
        """
        batch = act_ctx.shape[0]
        with eval_mode(self):
            with phase("context"):
                cache = self.transformer.new_cache()
                hidden = self._context_hidden(obs_ctx, act_ctx, cache)
            states = torch.empty(batch, horizon + 1, self.state_dim, device=hidden.device)
            actions, hiddens = [], []  # actions: [B] long or [B, A] float per step
            with phase("rollout"):
                for step in range(horizon):
                    z, state = self._prior_state(hidden)
                    states[:, step] = state
                    actions.append(policy(state))
                    token = self.mixer(z.unsqueeze(1), actions[-1].unsqueeze(1))
                    hidden = self.transformer(token, cache)[:, 0]
                    hiddens.append(hidden)
                states[:, horizon] = self._prior_state(hidden)[1]
            with phase("reward_termination"):
                imagined = torch.stack(hiddens, dim=1)
                rewards = self.two_hot.decode(self.reward_head(imagined))
                terminations = (self.termination_head(imagined) > 0).float()
        return Imagination(states, torch.stack(actions, dim=1), rewards, terminations)
