"""Small MLP modules reading a hidden state: trunk builder, distribution, reward and
termination heads (SPEC §6.3-6.4), plus the one place where an optional conditioning
vector (MoW's task embedding e_k) is concatenated onto a module's input.
"""

from __future__ import annotations

import torch
from torch import nn

from mow.models.linear import Linear
from mow.numerics import unimix_logits


def concat_condition(x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """Append ``cond`` to the features of ``x``, broadcasting over x's leading dimensions.

    ``cond`` may be ``[E]``, ``[B, E]`` for ``x`` of shape ``[B, ..., D]``, or have all of
    x's leading dimensions. ``None`` returns ``x`` unchanged. This is the single injection
    point for MoW's task embedding into every conditioned module.
    """
    if cond is None:
        return x
    cond = cond.to(x.dtype)
    while cond.dim() < x.dim():
        cond = cond.unsqueeze(-2)
    return torch.cat([x, cond.expand(*x.shape[:-1], cond.shape[-1])], dim=-1)


def mlp_trunk(in_dim: int, hidden: int, layers: int) -> nn.Sequential:
    """``layers`` x [Linear (no bias), LayerNorm, ReLU]: the STORM head / agent trunk."""
    if layers < 1:
        raise ValueError(f"an MLP trunk needs at least one layer, got {layers}")
    modules: list[nn.Module] = []
    for index in range(layers):
        modules += [
            Linear(in_dim if index == 0 else hidden, hidden, bias=False),
            nn.LayerNorm(hidden),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*modules)


class DistHead(nn.Module):
    """Linear map to the logits of ``stoch`` categoricals with ``classes`` classes each,
    followed by the uniform mix. Used as STORM's prior head (h_t -> ẑ_{t+1}) and, with a
    flattened image feature as input, as the VAE posterior head.
    """

    def __init__(
        self, in_dim: int, stoch: int, classes: int, unimix: float = 0.01, cond_dim: int = 0
    ) -> None:
        super().__init__()
        self.stoch, self.classes, self.unimix = stoch, classes, unimix
        self.linear = Linear(in_dim + cond_dim, stoch * classes)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """``[..., in_dim]`` -> float32 unimixed logits ``[..., stoch, classes]``."""
        return unimix_logits(self.raw_logits(x, cond), self.unimix)

    def raw_logits(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The logits before the uniform mix, ``[..., stoch, classes]``: MoW mixes the rows
        of all its cluster heads at once (one elementwise pass instead of one per cluster)."""
        return self.linear(concat_condition(x, cond)).unflatten(-1, (self.stoch, self.classes))


class RewardHead(nn.Module):
    """MLP trunk -> logits over the symlog two-hot reward bins."""

    def __init__(
        self, in_dim: int, hidden: int, layers: int, bins: int = 255, cond_dim: int = 0
    ) -> None:
        super().__init__()
        self.trunk = mlp_trunk(in_dim + cond_dim, hidden, layers)
        self.out = Linear(hidden, bins)

    def forward(self, h: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.out(self.trunk(concat_condition(h, cond)))


class TerminationHead(nn.Module):
    """MLP trunk -> one termination logit (BCE-with-logits; terminal iff logit > 0)."""

    def __init__(self, in_dim: int, hidden: int, layers: int, cond_dim: int = 0) -> None:
        super().__init__()
        self.trunk = mlp_trunk(in_dim + cond_dim, hidden, layers)
        self.out = Linear(hidden, 1)

    def forward(self, h: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """``[..., in_dim]`` -> ``[...]`` logits."""
        return self.out(self.trunk(concat_condition(h, cond))).squeeze(-1)
