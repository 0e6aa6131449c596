"""A bounded continuous policy head for Meta-World's Box(-1, 1, (4,)) actions.

`TanhGaussian` is a diagonal Gaussian over pre-squash values u, pushed through tanh:
a = tanh(u), so actions lie in [-1, 1] (exactly +-1 only where float32 tanh rounds).
Its density follows from the change of variables

    log p(a) = sum_i [ log N(u_i; mean_i, std_i) - log(1 - tanh(u_i)^2) ],
    log(1 - tanh(u)^2) = 2 * (log 2 - u - softplus(-2 u)),

where the right-hand form is exact and stable for large |u| (1 - tanh(u)^2 underflows to 0
in float32 for |u| > ~9, its logarithm would be -inf). `log_prob(action)` inverts the squash
with atanh, after clipping the action to [-1 + eps, 1 - eps] (eps = 1e-6, i.e. |u| <= ~7.25)
so that +-1 gives a finite value; `sample_with_log_prob()` uses the sampled u itself and is
exact also where tanh saturates.

The squashed Gaussian has no closed-form entropy: `entropy()` is the Monte Carlo estimate
-mean_k log p(a_k) over `samples` reparameterised draws (an unbiased estimate, with
gradients through the draws); `gaussian_entropy()` is the closed-form entropy of the
pre-squash Gaussian, a deterministic alternative regulariser that ignores the squash.

`TanhGaussianHead` maps trunk features to (mean, log_std); the log-std is squashed
smoothly into [LOG_STD_MIN, LOG_STD_MAX] = [-5, 2] (std in [0.0067, 7.39]) by
min + (max - min) * sigmoid(x), which keeps gradients everywhere; `TanhGaussian` itself
hard-clamps a log-std passed in directly to the same range.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mow.models.linear import Linear

LOG_STD_MIN = -5.0
LOG_STD_MAX = 2.0
ACTION_EPS = 1e-6  # actions are clipped to [-1 + eps, 1 - eps] before atanh
_LOG_2 = math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def tanh_log_det_jacobian(u: torch.Tensor) -> torch.Tensor:
    """Elementwise log(d tanh(u) / du) = log(1 - tanh(u)^2), computed stably."""
    return 2.0 * (_LOG_2 - u - F.softplus(-2.0 * u))


class TanhGaussian:
    """tanh-squashed diagonal Gaussian over the last dimension (the action dimension).

    `mean` and `log_std` are [..., A]; `log_std` is clamped to [LOG_STD_MIN, LOG_STD_MAX].
    Methods returning densities or entropies sum over the action dimension: [...].
    """

    def __init__(self, mean: torch.Tensor, log_std: torch.Tensor) -> None:
        if mean.shape != log_std.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and log_std {tuple(log_std.shape)} differ")
        self.mean = mean
        self.log_std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        self.std = self.log_std.exp()

    @property
    def action_dim(self) -> int:
        return self.mean.shape[-1]

    def _gaussian_log_prob(self, u: torch.Tensor) -> torch.Tensor:
        z = (u - self.mean) / self.std
        return -0.5 * z.square() - self.log_std - _HALF_LOG_2PI

    def rsample_pre_tanh(self, sample_shape: torch.Size | tuple = ()) -> torch.Tensor:
        """Reparameterised pre-squash draws u = mean + std * eps, [*sample_shape, ..., A]."""
        shape = torch.Size(sample_shape) + self.mean.shape
        eps = torch.randn(shape, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.std * eps

    def sample(self, sample_shape: torch.Size | tuple = ()) -> torch.Tensor:
        """Reparameterised actions tanh(u) in [-1, 1] (gradients flow to mean and log_std)."""
        return torch.tanh(self.rsample_pre_tanh(sample_shape))

    rsample = sample

    def sample_with_log_prob(
        self, sample_shape: torch.Size | tuple = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(action, log p(action)) from one draw, the density computed from u (exact)."""
        u = self.rsample_pre_tanh(sample_shape)
        log_prob = (self._gaussian_log_prob(u) - tanh_log_det_jacobian(u)).sum(-1)
        return torch.tanh(u), log_prob

    def log_prob(self, action: torch.Tensor) -> torch.Tensor:
        """log p(action) for actions in [-1, 1] (clipped to +-(1 - ACTION_EPS) first)."""
        limit = 1.0 - ACTION_EPS
        u = torch.atanh(action.to(self.mean.dtype).clamp(-limit, limit))
        return (self._gaussian_log_prob(u) - tanh_log_det_jacobian(u)).sum(-1)

    def entropy(self, samples: int = 1) -> torch.Tensor:
        """Sample-based entropy estimate -mean_k log p(a_k), a_k reparameterised: [...]."""
        if samples < 1:
            raise ValueError(f"entropy needs samples >= 1, got {samples}")
        _, log_prob = self.sample_with_log_prob((samples,))
        return -log_prob.mean(0)

    def gaussian_entropy(self) -> torch.Tensor:
        """Closed-form entropy of the pre-squash Gaussian: sum(log_std + 0.5 log(2 pi e))."""
        return (self.log_std + _HALF_LOG_2PI + 0.5).sum(-1)

    def mode(self) -> torch.Tensor:
        """tanh(mean): the deterministic (greedy) action used in evaluation."""
        return torch.tanh(self.mean)


class TanhGaussianHead(nn.Module):
    """Linear map from trunk features [..., in_dim] to a `TanhGaussian` over `action_dim`."""

    def __init__(self, in_dim: int, action_dim: int) -> None:
        super().__init__()
        self.action_dim = action_dim
        self.linear = Linear(in_dim, 2 * action_dim)

    def forward(self, features: torch.Tensor) -> TanhGaussian:
        mean, raw = self.linear(features).float().chunk(2, dim=-1)
        log_std = LOG_STD_MIN + (LOG_STD_MAX - LOG_STD_MIN) * torch.sigmoid(raw)
        return TanhGaussian(mean, log_std)
