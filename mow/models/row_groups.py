"""Rows of a mixed-task batch grouped by a per-row key (a task's cluster, its task, an expert).

MoW runs each cluster's VAE, heads and critic, and each expert, on its own rows. When a
key's rows are contiguous (the trainer orders every batch by cluster, then task:
``mow.train_mow.cluster_major``) a group is a ``slice``: indexing a tensor with it is a view
and putting the per-group results back in batch order is one concatenation. Otherwise the
group holds the row indices, which gather copies and need a permutation to reassemble.

Groups decide tensor shapes, so they are computed on the host: from keys read back from
the GPU once per forward pass (:func:`read_back`), never with a device-side ``unique`` or
``nonzero`` per group, each of which would make the host wait for the GPU (on a GPU MoW
is bound by kernel launches, and every such wait idles the device).
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


def read_back(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Integer tensors' values on the host, in one device-to-host copy (one synchronisation
    for all of them; none on a CPU)."""
    flat = torch.cat([t.reshape(-1).long() for t in tensors]).cpu()
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host index tensors onto ``device`` in one copy that the host does not wait for
    (from pinned memory, non-blocking); unchanged on a CPU."""
    if device.type == "cpu" or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors]).pin_memory().to(device, non_blocking=True)
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def group_rows(keys: torch.Tensor, device: torch.device | None = None) -> list[RowGroup]:
    """One group per distinct value of ``keys`` ``[B]``: slices, in batch order, when each
    value's rows form one run; else index tensors on ``device`` (default: the keys'), by
    ascending value. Keys on a GPU are read back first (one synchronisation): callers that
    group several keys of one batch pass them through :func:`read_back` together."""
    device = device or keys.device
    keys = keys.cpu()
    values, counts = torch.unique_consecutive(keys, return_counts=True)
    values, counts = values.tolist(), counts.tolist()
    if len(set(values)) == len(values):
        groups, start = [], 0
        for value, count in zip(values, counts):
            groups.append(RowGroup(value, slice(start, start + count), count))
            start += count
        return groups
    ordered = sorted(set(values))
    rows = to_device([(keys == value).nonzero().squeeze(1) for value in ordered], device)
    return [RowGroup(value, r, len(r)) for value, r in zip(ordered, rows)]


def host_rows(keys: torch.Tensor, groups: list[RowGroup]) -> list[torch.Tensor]:
    """Each group's rows as a host index tensor, from the host ``keys`` it was grouped by."""
    return [torch.arange(g.rows.start, g.rows.stop) if isinstance(g.rows, slice) else (keys == g.key).nonzero().squeeze(1)
            for g in groups]


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
