"""Modules of one architecture, each run on its own rows of a batch, as one batched call.

MoW runs every expert on the rows of the tasks routed to it, and every cluster's heads and
critic on that cluster's rows; in imagination at every imagined step (with 7 experts and
13 clusters in use, ~250 operators per step). On a GPU a step of that many small
operators is bound by kernel launches, not arithmetic (README, Speed).
:class:`ModuleBatch` stacks the modules' weights and runs the same module code over the
stack with ``torch.func.vmap`` + ``functional_call``, so each operator launches once for
all of them. Rows are padded to
the largest group (padding repeats a real row; its outputs are dropped): FLOPs that a GPU
has to spare and a CPU does not, so the models take this path on CUDA only
(:func:`use_module_batches`) and loop on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from mow.models.row_groups import RowGroup, assemble, to_device
from mow.models.transformer import KVCache


def use_module_batches(override: bool | None, device: torch.device) -> bool:
    """Whether a model runs its per-group modules as ModuleBatches: ``override``
    when set, else on CUDA (launch-bound) and not on CPU (FLOP-bound: the padding costs)."""
    return device.type == "cuda" if override is None else override


@dataclass
class ModuleBatch:
    """Groups of a batch's rows, each for the module at ``keys[g]`` of a module list, padded
    to one length: ``index`` ``[G, R]`` holds each group's batch rows (its first repeated as
    padding) and ``valid`` the positions of the real ones in the flattened ``[G * R]``, in
    group order."""

    keys: list[int]
    index: torch.Tensor
    valid: torch.Tensor
    _stacks: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, keys: list[int], rows: list[torch.Tensor], device: torch.device) -> ModuleBatch:
        """The groups of rows ``rows`` (host index tensors, non-empty) for the modules at
        ``keys``, padded, with ``index`` and ``valid`` on ``device`` (one copy that the host
        does not wait for)."""
        width = max(len(r) for r in rows)
        index = torch.stack([torch.cat([r, r[:1].expand(width - len(r))]) for r in rows])
        valid = torch.cat([g * width + torch.arange(len(r)) for g, r in enumerate(rows)])
        return cls(keys, *to_device([index, valid], device))

    def mask(self) -> torch.Tensor:
        """``[G, R]``: True where a padded position holds a real row."""
        count, width = self.index.shape
        return torch.zeros(count * width, dtype=torch.bool, device=self.index.device).index_fill_(
            0, self.valid, True).view(count, width)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, ...]`` -> each group's rows, padded: ``[G, R, ...]``."""
        return x[self.index]

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """``[G, R, ...]`` -> the real rows ``[N, ...]``, group after group."""
        return x.flatten(0, 1)[self.valid]

    def in_batch_order(self, x: torch.Tensor, groups: list[RowGroup]) -> torch.Tensor:
        """``[G, R, ...]`` -> the real rows in batch order ``[B, ...]``, for the row groups
        ``groups`` this batch was made from (``of`` with their keys and rows)."""
        return assemble(list(self.unpad(x).split([g.size for g in groups])), groups)

    def vmap(self, name: str, modules: Sequence[nn.Module], fn: Callable[..., Any], *grouped: Any) -> Any:
        """``fn(call, *args)`` for every group at once under ``torch.func.vmap``, where
        ``call(*inputs)`` runs the group's module (``modules[keys[g]]``) and ``grouped``
        have a leading group dimension ``[G, ...]`` (pytrees of such tensors). Gradients
        reach each module's own parameters through the stack. Without gradients (a
        rollout, in which weights do not change) the stack for ``name`` is made once and
        kept; with them, at every call. Modules with buffers (BatchNorm) or randomness
        (dropout in training) are not for this: their state and draws are per module."""
        stacks = None if torch.is_grad_enabled() else self._stacks.get(name)
        if stacks is None:
            named = [dict(modules[k].named_parameters()) for k in self.keys]
            stacks = {p: torch.stack([params[p] for params in named]) for p in named[0]}
            if not torch.is_grad_enabled():
                self._stacks[name] = stacks
        template = modules[self.keys[0]]

        def one(params, *args):
            return fn(lambda *inputs: functional_call(template, params, inputs), *args)

        return vmap(one)(stacks, *grouped)


class _StepCache:
    """What one expert's Transformer sees inside ``vmap`` in place of a ``KVCache``: the
    keys/values of the past steps (read only), and the new ones collected, to be written
    into the shared cache after the call (a tensor made inside ``vmap`` cannot outlive it)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int) -> None:
        self.past_keys, self.past_values, self.length = keys, values, length
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.new[layer] = (keys, values)
        if not self.length:
            return keys, values
        return (torch.cat([self.past_keys[layer], keys], dim=2),
                torch.cat([self.past_values[layer], values], dim=2))

    def advance(self, steps: int) -> None:
        pass  # the shared cache advances after the call


def run_experts(
    batch: ModuleBatch,
    experts: nn.ModuleList,
    z: torch.Tensor,
    actions: torch.Tensor,
    embedding: torch.Tensor,
    cache: KVCache | None,
) -> torch.Tensor:
    """The experts (``Expert.forward``) of ``batch``'s groups on their rows: outputs
    ``[N, T, d]`` in group order (what the per-expert loop concatenates). ``z`` ``[B, T,
    latent]``, ``actions`` ``[B, T(, A)]``, ``embedding`` ``[B, e]``; ``cache`` covers the
    ``G * R`` padded rows and is continued and advanced as the experts' own caches would be."""
    count, width = batch.index.shape
    steps = z.shape[1]
    length = cache.length if cache is not None else 0
    past: tuple[list, list] = ([], [])
    if length:
        past = ([k[:, :, :length].unflatten(0, (count, width)) for k in cache.keys],  # type: ignore[union-attr]
                [v[:, :, :length].unflatten(0, (count, width)) for v in cache.values])  # type: ignore[union-attr]

    def one_expert(call, z, actions, embedding, past_keys, past_values):
        step_cache = _StepCache(past_keys, past_values, length) if cache is not None else None
        out = call(z, actions, embedding, step_cache)
        new = [step_cache.new[layer] for layer in sorted(step_cache.new)] if step_cache else []
        return out, [k for k, _ in new], [v for _, v in new]

    out, keys, values = batch.vmap(
        "experts", experts, one_expert, batch.rows(z), batch.rows(actions), batch.rows(embedding), *past
    )
    if cache is not None:
        for layer, (k, v) in enumerate(zip(keys, values)):
            cache.append(layer, k.flatten(0, 1), v.flatten(0, 1))
        cache.advance(steps)
    return batch.unpad(out)
