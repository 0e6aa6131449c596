"""The one ``Linear`` every model here uses: ``nn.Linear`` whose float32 CPU products run
through oneDNN instead of the BLAS that ``torch.mm`` calls.

Why: torch's CPU wheels send float32 ``mm`` to MKL, which picks its kernels by CPU vendor:
on this project's 2-core AMD EPYC it reaches ~200 GFLOP/s, where oneDNN (the library the
convolutions already use, here with AVX-512) reaches ~460 on the same products, forward
and backward (README "Speed"). The results are float32 products to float32 rounding, not
a lower precision: oneDNN's default math mode is strict.

Small products stay with ``F.linear``: below about 4 M multiply-adds oneDNN's per-call set-up
outweighs its speed (measured crossover on that CPU; the smoke scale's layers are there).
Everything else falls back to ``F.linear`` unchanged too: other devices, other dtypes, bf16
autocast (its products already run in oneDNN), ``torch.compile`` (Inductor picks its own
kernels), functorch transforms (``ModuleBatch``'s ``vmap``), CPUs other than x86-64 (not
measured) and a torch build without oneDNN. Set ``MOW_ONEDNN_LINEAR=0`` to turn the path off.
"""

from __future__ import annotations

import os
import platform

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _onednn_available() -> bool:
    return (
        os.environ.get("MOW_ONEDNN_LINEAR", "1") != "0"
        and platform.machine().lower() in ("x86_64", "amd64")  # measured there only
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


ONEDNN = _onednn_available()
#: Multiply-adds (rows x in x out) from which a product goes to oneDNN: forward and backward
#: measured even at 4.2 M (e.g. 256 x 128 x 128), oneDNN 1.5-2x faster from 16 M, BLAS up to
#: 3x faster at 0.26 M (2-core AMD EPYC, torch 2.13).
ONEDNN_MIN_MACS = 1 << 22


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` for 2-D ``x`` in oneDNN (strided inputs are read as they are)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """F.linear on 2-D input with all three products (output, input and weight gradients)
    in oneDNN; the gradients are the textbook ones: g·W, gᵀ·x and Σ g."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _product(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = _product(grad, weight.t(), None) if ctx.needs_input_grad[0] else None
        grad_weight = _product(grad.t(), x.t(), None) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def uses_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether :func:`linear` runs ``x`` through oneDNN (see the module docstring)."""
    return (
        ONEDNN
        and not torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and x.numel() * weight.shape[0] >= ONEDNN_MIN_MACS
        and not torch.is_autocast_enabled("cpu")
        and not any(_is_wrapped(t) for t in (x, weight, bias) if t is not None)
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` of any leading shape, through oneDNN where
    :func:`uses_onednn` says so."""
    if not uses_onednn(x, weight, bias):
        return F.linear(x, weight, bias)
    out = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, initialisation and ``state_dict``) computed by
    :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
