"""Sequence model of STORM (SPEC §6.3): token mixer and a post-LN causal Transformer with
learned positions and a KV cache for autoregressive imagination.

MoW reuses both pieces: one ``TokenMixer`` + ``CausalTransformer`` per expert, and a
``CausalTransformer`` as the shared backbone (fed projected, concatenated expert outputs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mow.models.heads import concat_condition
from mow.models.linear import Linear


class TokenMixer(nn.Module):
    """(latent z, action, optional conditioning) -> one d_model token per time step.

    Linear(z ⊕ a ⊕ cond -> d, no bias), LayerNorm, ReLU, Linear(d -> d, no bias),
    LayerNorm, where a is one_hot(action) for discrete actions (STORM) and the action
    vector itself for ``continuous`` ones (Meta-World's 4 floats; ``num_actions`` is then
    its dimension). The one-hot product is computed as a row lookup: the action block of
    the first weight matrix is stored as an ``nn.Embedding`` (same parameters, same
    initialisation as the corresponding Linear columns), so no one-hot tensor is built;
    the continuous block is a bias-free ``nn.Linear`` with that same initialisation.
    """

    def __init__(
        self, latent_dim: int, num_actions: int, d_model: int, cond_dim: int = 0,
        continuous: bool = False,
    ) -> None:
        super().__init__()
        self.num_actions = num_actions
        self.continuous = continuous
        self.latent_proj = Linear(latent_dim + cond_dim, d_model, bias=False)
        if continuous:
            self.action_proj = Linear(num_actions, d_model, bias=False)
            action_weight = self.action_proj.weight
        else:
            self.action_embed = nn.Embedding(num_actions, d_model)
            action_weight = self.action_embed.weight
        fan_in = latent_dim + num_actions + cond_dim
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.latent_proj.weight, -bound, bound)
        nn.init.uniform_(action_weight, -bound, bound)
        self.body = nn.Sequential(
            nn.LayerNorm(d_model),
            nn.ReLU(inplace=True),
            Linear(d_model, d_model, bias=False),
            nn.LayerNorm(d_model),
        )

    def forward(
        self, z: torch.Tensor, actions: torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``z`` ``[B, T, latent]``, ``actions`` long ``[B, T]`` (or float ``[B, T, A]``
        when continuous) -> tokens ``[B, T, d_model]``."""
        x = self.latent_proj(concat_condition(z, cond))
        if self.continuous:
            x = x + self.action_proj(actions.to(x.dtype))
        else:
            x = x + self.action_embed(actions).to(x.dtype)
        return self.body(x)


class KVCache:
    """Keys and values of every attention layer for the steps processed so far.

    Buffers are allocated lazily at the first write (batch size, dtype and device follow
    the first keys) with room for ``max_len`` steps, and filled in place; ``length`` is a
    plain Python int, so no device synchronisation is needed to read it.
    """

    def __init__(self, num_layers: int, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def append(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[B, heads, T, d_head]`` keys/values after the cached steps of ``layer``;
        return all keys/values of that layer including the new ones."""
        start, stop = self.length, self.length + keys.shape[2]
        if stop > self.max_len:
            raise ValueError(f"KV cache overflow: {stop} steps > max_len {self.max_len}")
        if self.keys[layer] is None:
            shape = (*keys.shape[:2], self.max_len, keys.shape[3])
            self.keys[layer] = keys.new_empty(shape)
            self.values[layer] = values.new_empty(shape)
        cached_keys, cached_values = self.keys[layer], self.values[layer]
        cached_keys[:, :, start:stop] = keys
        cached_values[:, :, start:stop] = values
        return cached_keys[:, :, :stop], cached_values[:, :, :stop]

    def advance(self, steps: int) -> None:
        """Mark ``steps`` new positions as filled (called once all layers have appended)."""
        self.length += steps


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, bias-free projections; fused SDPA kernel except in CPU
    inference (:func:`explicit_attention`)."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.qkv = Linear(d_model, 3 * d_model, bias=False)
        self.out = Linear(d_model, d_model, bias=False)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        batch, steps, width = x.shape
        q, k, v = self.qkv(x).view(batch, steps, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(layer, k, v)
        # New queries sit at absolute positions past..past+steps-1 and may look at every key
        # up to their own position. SDPA's is_causal aligns the mask top-left, which is only
        # right without a cache prefix; one query needs no mask at all.
        mask, is_causal = None, False
        if steps > 1 and past == 0:
            is_causal = True
        elif steps > 1:
            mask = torch.ones(steps, past + steps, dtype=torch.bool, device=x.device)
            mask = mask.tril(diagonal=past)
        if x.device.type == "cpu" and not self.training:
            attended = explicit_attention(q, k, v, mask, is_causal)
        else:
            attended = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=is_causal,
            )
        return self.out(attended.transpose(1, 2).reshape(batch, steps, width))


def explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v as two batched products, softmax in float32.

    Used for CPU inference (imagination, acting): at its shapes (one to a few queries per
    row over at most ``max_len`` keys, thousands of rows) torch's CPU flash-attention
    kernel is 1.1-2.1x slower than this in fp32 and 1.8-3.2x in bf16 (README Speed). Training
    keeps SDPA, which runs this same formula on CPU when dropout is on; CUDA keeps SDPA's
    fused kernels."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if is_causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.float().softmax(-1).to(v.dtype) @ v


class TransformerBlock(nn.Module):
    """Post-LN block: x = LN(x + Drop(Attn(x))); x = LN(x + Drop(FFN(x)))."""

    def __init__(self, d_model: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.attention = CausalSelfAttention(d_model, heads, dropout)
        self.attention_dropout = nn.Dropout(dropout)
        self.attention_norm = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            Linear(d_model, ffn),
            nn.ReLU(inplace=True),
            Linear(ffn, d_model),
            nn.Dropout(dropout),
        )
        self.ffn_norm = nn.LayerNorm(d_model)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        x = self.attention_norm(x + self.attention_dropout(self.attention(x, cache, layer)))
        return self.ffn_norm(x + self.ffn(x))


class CausalTransformer(nn.Module):
    """Learned positions + LayerNorm + ``layers`` post-LN causal blocks (STORM's sequence model).

    ``forward(tokens)`` processes a whole sequence with a causal mask. With a ``KVCache``
    (from :meth:`new_cache`) the tokens are treated as the continuation of the cached steps:
    positions continue from ``cache.length``, attention covers cache ∪ new tokens, and the
    new keys/values are appended. Feeding a sequence in one call, in chunks, or one step at
    a time gives the same outputs (in eval mode).
    """

    def __init__(
        self,
        d_model: int = 512,
        layers: int = 2,
        heads: int = 8,
        ffn: int = 1024,
        dropout: float = 0.1,
        max_len: int = 64,
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.positions = nn.Embedding(max_len, d_model)
        self.input_norm = nn.LayerNorm(d_model)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, heads, ffn, dropout) for _ in range(layers)
        )

    def new_cache(self) -> KVCache:
        return KVCache(len(self.blocks), self.max_len)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """``[B, T, d_model]`` -> hidden states ``[B, T, d_model]``."""
        start = cache.length if cache is not None else 0
        steps = tokens.shape[1]
        if start + steps > self.max_len:
            raise ValueError(f"sequence of {start + steps} steps exceeds max_len {self.max_len}")
        positions = torch.arange(start, start + steps, device=tokens.device)
        x = self.input_norm(tokens + self.positions(positions).to(tokens.dtype))
        for index, block in enumerate(self.blocks):
            x = block(x, cache, index)
        if cache is not None:
            cache.advance(steps)
        return x
