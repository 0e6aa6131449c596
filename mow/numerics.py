"""Numerical building blocks shared by STORM and MoW (SPEC §6.4-6.6, §1.6-1.7).

Everything here is a pure function or a small module without learnable weights:
symlog transforms, the symlog two-hot distribution used for rewards and values, the
categorical-latent helpers (unimix, KL with free bits), the λ-return and the
percentile-based return normaliser.

All loss computations run in float32 regardless of an enclosing bf16 autocast region:
inputs are cast with ``.float()`` before softmax, log-softmax or KL.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

LambdaForm = Literal["official", "paper"]
LAMBDA_FORMS: tuple[str, ...] = ("official", "paper")


def symlog(x: torch.Tensor) -> torch.Tensor:
    """sign(x) * log(1 + |x|): compresses large magnitudes, identity near zero."""
    return torch.sign(x) * torch.log1p(torch.abs(x))


def symexp(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`symlog`: sign(x) * (exp(|x|) - 1)."""
    return torch.sign(x) * torch.expm1(torch.abs(x))


class TwoHot(nn.Module):
    """Symlog two-hot distribution over ``num_bins`` bins spaced uniformly in symlog space.

    A scalar target y is mapped to symlog(y), clamped to [low, high], and its unit mass is
    split between the two neighbouring bins in proportion to the distance to each (the
    closer bin gets the larger weight). Predictions are logits over the bins, decoded as
    symexp(softmax(logits) · bins).

    The bins are a non-persistent buffer: they follow ``.to(device)`` but are not part of
    checkpoints (they are a function of the constructor arguments).
    """

    bins: torch.Tensor

    def __init__(self, num_bins: int = 255, low: float = -20.0, high: float = 20.0) -> None:
        super().__init__()
        if num_bins < 2:
            raise ValueError(f"TwoHot needs at least 2 bins, got {num_bins}")
        if not low < high:
            raise ValueError(f"TwoHot needs low < high, got low={low}, high={high}")
        self.num_bins = num_bins
        self.low = low
        self.high = high
        self.register_buffer("bins", torch.linspace(low, high, num_bins), persistent=False)

    def encode(self, target: torch.Tensor) -> torch.Tensor:
        """Two-hot weights of shape ``target.shape + (num_bins,)`` (float32, rows sum to 1)."""
        x = symlog(target.float()).clamp(self.low, self.high)
        step = (self.high - self.low) / (self.num_bins - 1)
        position = (x - self.low) / step
        lower = position.floor().clamp(0, self.num_bins - 2)
        upper_weight = position - lower  # in [0, 1]; 1 only at the top edge
        lower_index = lower.long().unsqueeze(-1)
        weights = torch.zeros(*x.shape, self.num_bins, device=x.device, dtype=torch.float32)
        weights.scatter_(-1, lower_index, (1.0 - upper_weight).unsqueeze(-1))
        weights.scatter_(-1, lower_index + 1, upper_weight.unsqueeze(-1))
        return weights

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """Expected value in symlog space, mapped back with symexp. Shape ``logits.shape[:-1]``."""
        probs = torch.softmax(logits.float(), dim=-1)
        return symexp(probs @ self.bins)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy between the two-hot encoding of ``target`` and ``logits``, averaged."""
        log_probs = F.log_softmax(logits.float(), dim=-1)
        return -(self.encode(target) * log_probs).sum(-1).mean()


def unimix_logits(logits: torch.Tensor, mix: float = 0.01) -> torch.Tensor:
    """Mix a categorical with the uniform distribution: log((1 - mix) * softmax + mix / K).

    Applied over the last dimension (the classes). Returns float32 log-probabilities,
    which are valid logits of the mixed distribution.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if mix > 0.0:
        probs = (1.0 - mix) * probs + mix / logits.shape[-1]
    return torch.log(probs)


def categorical_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) of factorised categoricals ``[..., variables, classes]``, summed over variables.

    Returns a float32 tensor of shape ``[...]``.
    """
    log_p = F.log_softmax(p_logits.float(), dim=-1)
    log_q = F.log_softmax(q_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=(-2, -1))


def kl_loss_free_bits(
    p_logits: torch.Tensor, q_logits: torch.Tensor, free_bits: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """STORM's KL term: max(free_bits, mean over batch and time of KL summed over variables).

    The clip acts on the *mean* (SPEC §6.5), so the gradient is zero as a whole when the
    mean KL is below ``free_bits``. Stop-gradients are the caller's choice: pass
    ``p_logits.detach()`` for the dynamics term and ``q_logits.detach()`` for the
    representation term. Returns ``(clipped loss, unclipped mean KL)``.
    """
    mean_kl = categorical_kl(p_logits, q_logits).mean()
    return torch.clamp(mean_kl, min=free_bits), mean_kl


def lambda_return(
    rewards: torch.Tensor,
    values: torch.Tensor,
    continues: torch.Tensor,
    gamma: float,
    lam: float,
    form: LambdaForm = "official",
) -> torch.Tensor:
    """λ-returns G_0..G_{T-1} of an imagined trajectory, without a Python loop over time.

    Shapes: ``rewards`` and ``continues`` ``[B, T]``, ``values`` ``[B, T + 1]`` (V of
    s_0..s_T). The recursion, bootstrapped with G_T = V(s_T), is

        G_t = r_t + γ c_t [(1 - λ) V_x + λ G_{t+1}]

    with V_x = V(s_t) for ``form="official"`` (what the official STORM code computes) and
    V_x = V(s_{t+1}) for ``form="paper"`` (the standard TD(λ) target written in the papers).

    The linear recursion G_t = a_t + b_t G_{t+1} is solved in closed form,
    G_t = Σ_{k=t}^{T-1} (Π_{j=t}^{k-1} b_j) a_k + (Π_{j=t}^{T-1} b_j) V(s_T), with the
    products taken from a cumulative product over an upper-triangular [T, T] matrix
    (no division, so exact zeros from terminations are safe).
    """
    if form not in LAMBDA_FORMS:
        raise ValueError(f"lambda form must be one of {LAMBDA_FORMS}, got {form!r}")
    rewards, values, continues = rewards.float(), values.float(), continues.float()
    horizon = rewards.shape[-1]
    if values.shape[-1] != horizon + 1:
        raise ValueError(
            f"values need T + 1 = {horizon + 1} entries along time, got {values.shape[-1]}"
        )
    bootstrap_values = values[..., :-1] if form == "official" else values[..., 1:]
    discount = gamma * continues
    offset = rewards + discount * (1.0 - lam) * bootstrap_values  # a_t
    factor = discount * lam  # b_t

    # products[..., t, k] = Π_{j=t}^{k} b_j for k >= t (entries below the diagonal are
    # junk and masked out below).
    upper = torch.ones(horizon, horizon, dtype=torch.bool, device=rewards.device).triu()
    spread = torch.where(upper, factor.unsqueeze(-2), torch.ones_like(factor).unsqueeze(-2))
    products = torch.cumprod(spread, dim=-1)
    # weights[..., t, k] = Π_{j=t}^{k-1} b_j (1 on the diagonal, 0 below it).
    shifted = torch.cat([torch.ones_like(products[..., :1]), products[..., :-1]], dim=-1)
    weights = torch.where(upper, shifted, torch.zeros_like(shifted))
    return (weights @ offset.unsqueeze(-1)).squeeze(-1) + products[..., -1] * values[..., -1:]


class PercentileNormalizer(nn.Module):
    """EMA of the low and high percentiles of λ-returns; scale = max(1, high - low).

    Both EMAs start at 0 (as in STORM), so early scales are floored at 1. The state lives
    in float32 buffers and is therefore saved with ``state_dict()``.
    """

    low: torch.Tensor
    high: torch.Tensor
    levels: torch.Tensor

    def __init__(self, decay: float = 0.99, low: float = 0.05, high: float = 0.95) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"percentile decay must be in [0, 1), got {decay}")
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"need 0 <= low < high <= 1, got low={low}, high={high}")
        self.decay, self.percentiles = decay, (low, high)
        self.register_buffer("low", torch.zeros((), dtype=torch.float32))
        self.register_buffer("high", torch.zeros((), dtype=torch.float32))
        # Kept on the module's device so that an update needs no host-to-device copy.
        self.register_buffer("levels", torch.tensor([low, high]), persistent=False)

    @torch.no_grad()
    def update(self, returns: torch.Tensor) -> torch.Tensor:
        """Fold the percentiles of ``returns`` (all elements) into the EMAs; return the new scale."""
        low, high = torch.quantile(returns.detach().float().flatten(), self.levels)
        self.low.lerp_(low, 1.0 - self.decay)
        self.high.lerp_(high, 1.0 - self.decay)
        return self.scale()

    def scale(self) -> torch.Tensor:
        """max(1, high - low) as a float32 scalar tensor (no host sync)."""
        return torch.clamp(self.high - self.low, min=1.0)


@torch.no_grad()
def update_normalizers(normalizers: list[PercentileNormalizer], returns: torch.Tensor) -> torch.Tensor:
    """``normalizers[i].update(row i of returns)`` for all i at once: ``returns`` ``[N, M]``
    with NaN where a row has fewer than M values (ragged groups, padded); returns the new
    scales ``[N]``. One quantile over all rows (NaNs ignored: the same order statistics as
    each row's values alone) and one multi-tensor EMA step for all normalizers, instead of
    ~17 operators per normaliser (MoW has one per task)."""
    first = normalizers[0]
    if any((n.decay, n.percentiles) != (first.decay, first.percentiles) for n in normalizers):
        raise ValueError("update_normalizers needs normalizers with one decay and one pair of percentiles")
    low, high = torch.nanquantile(returns.detach().float(), first.levels, dim=1)  # each [N]
    lows, highs = [n.low for n in normalizers], [n.high for n in normalizers]
    torch._foreach_lerp_(lows, list(low.unbind()), 1.0 - first.decay)
    torch._foreach_lerp_(highs, list(high.unbind()), 1.0 - first.decay)
    return torch.clamp(torch.stack(highs) - torch.stack(lows), min=1.0)
