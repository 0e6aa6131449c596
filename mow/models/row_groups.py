"""Rows of a mixed-task batch grouped by a per-row key (a task's cluster, its task, an expert).

MoW runs each cluster's VAE, heads and critic, and each expert, on its own rows. When a
key's rows are contiguous (the trainer orders every batch by cluster, then task:
``mow.train_mow.cluster_major``) a group is a ``slice``: indexing a tensor with it is a view
and putting the per-group results back in batch order is one concatenation. Otherwise the
group holds the row indices, which gather copies and need a permutation to reassemble.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowGroup:
    """The rows of a batch that share ``key``: ``tensor[group.rows]`` selects them."""

    key: int
    rows: slice | torch.Tensor
    size: int

    def indices(self, device: torch.device) -> torch.Tensor:
        """The rows as an index tensor."""
        if isinstance(self.rows, slice):
            return torch.arange(self.rows.start, self.rows.stop, device=device)
        return self.rows


def group_rows(keys: torch.Tensor) -> list[RowGroup]:
    """One group per distinct value of ``keys`` ``[B]``: slices, in batch order, when each
    value's rows form one run; else index tensors, by ascending value."""
    values, counts = torch.unique_consecutive(keys, return_counts=True)
    values, counts = values.tolist(), counts.tolist()
    if len(set(values)) == len(values):
        groups, start = [], 0
        for value, count in zip(values, counts):
            groups.append(RowGroup(value, slice(start, start + count), count))
            start += count
        return groups
    groups = []
    for value in sorted(set(values)):
        rows = (keys == value).nonzero().squeeze(1)
        groups.append(RowGroup(value, rows, len(rows)))
    return groups


def assemble(parts: list[torch.Tensor], groups: list[RowGroup]) -> torch.Tensor:
    """Stack per-group results (``parts[i]`` for ``groups[i]``, which partition the rows)
    back into batch order."""
    if len(parts) == 1:
        return parts[0]  # one group holds every row, already in order
    stacked = torch.cat(parts)
    if all(isinstance(g.rows, slice) for g in groups):
        return stacked  # runs in batch order: the concatenation is the batch
    order = torch.cat([g.indices(stacked.device) for g in groups])
    return stacked[torch.argsort(order)]
