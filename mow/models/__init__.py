"""Neural networks of STORM and MoW: VAE, sequence model, heads, world model, actor-critic."""

from __future__ import annotations

import torch
from torch import nn

from mow.models.actor_critic import ActorCritic, AgentConfig
from mow.models.heads import DistHead, RewardHead, TerminationHead, concat_condition, mlp_trunk
from mow.models.transformer import CausalTransformer, KVCache, TokenMixer
from mow.models.vae import CategoricalVAE
from mow.models.world_model import Imagination, WorldModel, WorldModelConfig

__all__ = [
    "ActorCritic",
    "AgentConfig",
    "CategoricalVAE",
    "CausalTransformer",
    "DistHead",
    "Imagination",
    "KVCache",
    "RewardHead",
    "TerminationHead",
    "TokenMixer",
    "WorldModel",
    "WorldModelConfig",
    "concat_condition",
    "count_parameters",
    "mlp_trunk",
    "storm_parameter_breakdown",
]


def count_parameters(*modules: nn.Module) -> int:
    """Number of scalar parameters (trainable or not, buffers excluded) of ``modules``."""
    return sum(p.numel() for module in modules for p in module.parameters())


def storm_parameter_breakdown(
    num_actions: int,
    world_model_cfg: WorldModelConfig | None = None,
    agent_cfg: AgentConfig | None = None,
) -> dict[str, int]:
    """Parameters per STORM component for a game with ``num_actions`` actions (SPEC §4.5).

    The models are built on the meta device, so this allocates no weights and is instant.
    The values sum to the full agent (world model + actor + critic + slow critic).
    """
    world_model_cfg = world_model_cfg or WorldModelConfig()
    agent_cfg = agent_cfg or AgentConfig()
    with torch.device("meta"):
        world_model = WorldModel(world_model_cfg, num_actions)
        agent = ActorCritic(agent_cfg, world_model.state_dim, num_actions)
    vae = world_model.vae
    return {
        "encoder": count_parameters(vae.encoder),
        "posterior_head": count_parameters(vae.posterior_head),
        "decoder": count_parameters(vae.decoder_stem, vae.decoder_stem_norm, vae.decoder),
        "prior_head": count_parameters(world_model.prior_head),
        "token_mixer": count_parameters(world_model.mixer),
        "transformer": count_parameters(world_model.transformer),
        "reward_head": count_parameters(world_model.reward_head),
        "termination_head": count_parameters(world_model.termination_head),
        "actor": count_parameters(agent.actor),
        "critic": count_parameters(agent.critic),
        "slow_critic": count_parameters(agent.slow_critic),
    }
