"""MoW's multi-task loss combinators (SPEC §1.6, Eqs. 9-10).

- Harmonious weighting, one σ_k per task, learned in log space (DESIGN.md):
  L_H = Σ_k exp(-log σ_k) · L_k + ln(1 + exp(log σ_k)), i.e. (1/σ_k) L_k + ln(1 + σ_k).
  Initial σ_k = 1 (log σ_k = 0). d/d(log σ_k) = -L_k / σ_k + sigmoid(log σ_k).
- Expert balance loss: L_bal = ‖ Σ_k W_k − (K · top_k / N_e) · 1 ‖₂², with W_k the dense
  N_e-vector of task k's routing weights (zeros for unselected experts).

  Note: with W_k = softmax probabilities, Σ_e Σ_k W_{k,e} ≤ K < K · top_k for top_k > 1,
  so the loss cannot reach 0 then; its minimiser over a fixed total mass is still uniform
  expert usage, and it also pushes mass onto the selected experts. It is exactly 0 when
  the summed weights equal the target (e.g. one-hot weights spread evenly, top_k = 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def harmonious_loss(task_losses: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Σ_k exp(-log_sigma_k) · L_k + softplus(log_sigma_k) for ``[K]`` losses and log-σ."""
    if task_losses.shape != log_sigma.shape:
        raise ValueError(
            f"task_losses {tuple(task_losses.shape)} and log_sigma {tuple(log_sigma.shape)} differ"
        )
    log_sigma = log_sigma.float()
    return (torch.exp(-log_sigma) * task_losses.float() + F.softplus(log_sigma)).sum()


def balance_loss(dense_weights: torch.Tensor, top_k: int) -> torch.Tensor:
    """‖Σ_k W_k − (K · top_k / N_e) · 1‖₂² for dense routing weights ``[K, N_e]``."""
    if dense_weights.dim() != 2:
        raise ValueError(f"expected dense weights [K, N_e], got {tuple(dense_weights.shape)}")
    num_tasks, num_experts = dense_weights.shape
    target = num_tasks * top_k / num_experts
    return (dense_weights.float().sum(dim=0) - target).square().sum()
