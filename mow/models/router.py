"""MoW task embedding and task-level router (SPEC §1.2, §1.4 item 2).

Routing reads only the task embedding e_k, so every token of every sequence of task k uses
the same experts ("task-level routing", no fragmented trajectories).

Decisions the paper leaves open (SPEC §1.9), fixed here:

- e_k: a learnable table normalised to unit L2 norm in :class:`TaskEmbedding` (the only
  place where the normalisation happens); dimension set by ``MoWConfig.task_embed_dim``.
- Router MLP: Linear(E -> hidden), ReLU, Linear(hidden -> N_e); S_k = Softmax(logits / τ).
- Top-k is the deterministic, descending-sorted ``torch.topk`` of S_k. The weights W_k are
  the selected softmax probabilities themselves (not renormalised over the top k), sorted
  descending (answers reviewer 2's "Is W_k sorted?"). Because softmax is monotone, the
  selection does not depend on τ; τ shapes the weights, hence the scaling of the expert
  outputs and the balance loss.
- Temperature τ: linear anneal from ``temperature_start`` to ``temperature_end`` (= 1) over
  ``temperature_anneal_updates`` world-model updates, constant afterwards. The current
  value lives in a persistent buffer so that it is saved with checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mow.models.linear import Linear


class TaskEmbedding(nn.Module):
    """Learnable per-task vectors e_k with ‖e_k‖₂ = 1."""

    def __init__(self, num_tasks: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(num_tasks, dim)

    def forward(self, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``task_ids`` long ``[...]`` -> ``[..., dim]`` unit vectors; ``None`` -> all ``[K, dim]``."""
        weight = self.table.weight if task_ids is None else self.table(task_ids)
        return F.normalize(weight, dim=-1)


def annealed_temperature(update: int, start: float, end: float, updates: int) -> float:
    """Linear schedule: ``start`` at update 0, ``end`` from update ``updates`` on."""
    if updates <= 0:
        return float(end)
    fraction = min(max(update, 0) / updates, 1.0)
    return float(start + (end - start) * fraction)


@dataclass
class Routing:
    """Router output for a set of tasks (leading dims ``[...]``, usually ``[K]``)."""

    probs: torch.Tensor
    """[..., N_e] S_k = Softmax(MLP(e_k) / τ)."""
    weights: torch.Tensor
    """[..., top_k] W_k: selected probabilities, sorted descending (not renormalised)."""
    indices: torch.Tensor
    """[..., top_k] long J_k: selected experts, in the order of ``weights``."""
    dense: torch.Tensor
    """[..., N_e] W_k scattered onto all experts (0 for unselected), for the balance loss."""


class TaskRouter(nn.Module):
    """S_k = Softmax(MLP(e_k) / τ); (W_k, J_k) = TopK(S_k, top_k) (SPEC Eq. 3)."""

    current_temperature: torch.Tensor

    def __init__(
        self,
        embed_dim: int,
        hidden: int,
        num_experts: int,
        top_k: int,
        temperature_start: float = 4.0,
        temperature_end: float = 1.0,
        anneal_updates: int = 50_000,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if temperature_start <= 0 or temperature_end <= 0:
            raise ValueError(
                f"temperatures must be > 0, got start={temperature_start}, end={temperature_end}"
            )
        self.num_experts, self.top_k = num_experts, top_k
        self.temperature_start, self.temperature_end = temperature_start, temperature_end
        self.anneal_updates = anneal_updates
        self.mlp = nn.Sequential(
            Linear(embed_dim, hidden), nn.ReLU(inplace=True), Linear(hidden, num_experts)
        )
        self.register_buffer("current_temperature", torch.tensor(float(temperature_start)))

    def temperature(self, update: int) -> float:
        """τ after ``update`` world-model updates (see :func:`annealed_temperature`)."""
        return annealed_temperature(
            update, self.temperature_start, self.temperature_end, self.anneal_updates
        )

    def anneal(self, update: int) -> float:
        """Set the temperature used by :meth:`forward` to ``temperature(update)``; return it."""
        value = self.temperature(update)
        self.current_temperature.fill_(value)
        return value

    def forward(self, task_embeddings: torch.Tensor) -> Routing:
        """``[..., E]`` task embeddings -> :class:`Routing` at the current temperature."""
        logits = self.mlp(task_embeddings).float()
        probs = torch.softmax(logits / self.current_temperature, dim=-1)
        weights, indices = torch.topk(probs, self.top_k, dim=-1, sorted=True)
        dense = torch.zeros_like(probs).scatter(-1, indices, weights)
        return Routing(probs, weights, indices, dense)
