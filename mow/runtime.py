"""Device, precision, threads and seeding: decided once per process from `train.*` params."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import random
import shutil
import sys
from dataclasses import dataclass

import numpy as np
import torch

from mow.config import ConfigError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None   # None = full fp32
    compile: bool = False           # train.compile

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def world_model_loss(self, model, log=None):
        """``model.compute_loss``, through ``torch.compile`` when ``train.compile`` is on and the
        model allows it (``compilable``, default true; MoW's does not: :data:`MOW_EAGER_NOTE`,
        said through ``log``). The loss as a whole, forward and backward, not its modules:
        compiling the conv VAE and Transformer blocks one by one measured no faster than eager
        on CPU (oneDNN already runs the convolutions); the gain is in fusing the loss's many
        elementwise terms. The module is untouched: checkpoints and ``state_dict`` keys are
        the same either way."""
        if not self.compile:
            return model.compute_loss
        if not getattr(model, "compilable", True):
            if log is not None:
                log(MOW_EAGER_NOTE)
            return model.compute_loss
        return torch.compile(model.compute_loss)

    @property
    def precision(self) -> str:
        return "fp32" if self.amp_dtype is None else "bf16"


#: Why MoW's world model stays eager under ``train.compile`` (logged by its trainer and warm-up).
MOW_EAGER_NOTE = ("train.compile: MoW's world model runs eager (its per-cluster row groups change shape from "
                  "update to update, and each new shape recompiled: ~100 s per update at the smoke scale)")


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device: '{name}' requested but CUDA is not available on this machine")
    return device


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_allocator_tuned = False


def tune_cpu_allocator() -> bool:
    """Keep freed CPU tensor memory in the process instead of returning it to the OS.

    glibc serves every allocation above ~32 MiB with a fresh ``mmap`` and unmaps it on
    free, so each world-model update (activations of 1,024 frames: several 32-134 MiB
    tensors) page-faults and zero-fills hundreds of MiB again; on the reference CPU that
    was ~20 % of the update's CPU time. Disabling mmap for large blocks and never trimming
    the heap makes repeated updates reuse the same pages, as a GPU caching allocator does.
    The resident size stays at its peak instead of shrinking between updates. Values and
    numerics are unaffected. Only glibc (Linux) has ``mallopt``; elsewhere this does nothing.
    Returns whether the allocator was tuned.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _allocator_tuned = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _allocator_tuned


def adam(parameters, **kwargs) -> torch.optim.Adam:
    """Adam with the fused multi-tensor kernel (CPU and CUDA): one pass over all parameters
    instead of ~10 elementwise kernels per tensor; same update rule, equal to the loop
    implementation up to float rounding (tests/test_perf.py)."""
    parameters = list(parameters)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)
    return torch.optim.Adam(parameters, fused=fused or None, **kwargs)


def retain_cpu_memory(device: torch.device) -> bool:
    """`tune_cpu_allocator` for a CPU run unless MOW_RETAIN_CPU_MEMORY=0: measured 1.35x
    faster paper-scale world-model updates (README, Speed); no change at the smoke scale."""
    if device.type != "cpu" or os.environ.get("MOW_RETAIN_CPU_MEMORY", "1") == "0":
        return False
    return tune_cpu_allocator()


def make_runtime(train_cfg) -> Runtime:
    """`precision: auto` is bf16 on a bf16-capable GPU (STORM trains in bf16) and fp32 elsewhere."""
    if train_cfg["threads"]:
        torch.set_num_threads(int(train_cfg["threads"]))
    if train_cfg["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    device = select_device(train_cfg["device"])
    retain_cpu_memory(device)
    precision = train_cfg["precision"]
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16" if bf16 else "fp32"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_compile = bool(train_cfg.get("compile", False))
    compilers = (os.environ.get("CXX", "g++"), "c++", "clang++")  # inductor builds C++ kernels on CPU
    if use_compile and device.type == "cpu" and not any(shutil.which(cc) for cc in compilers):
        raise ConfigError("train.compile: true needs a C++ compiler on CPU (g++ or clang++ on PATH, or $CXX); "
                          "install one or set train.compile: false")
    return Runtime(device=device, amp_dtype=torch.bfloat16 if precision == "bf16" else None, compile=use_compile)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block from `seed` on every global generator, then restore their previous states:
    an evaluation is reproducible on its own and leaves a training's random stream as it was."""
    state = rng_state()
    seed_everything(seed)
    try:
        yield
    finally:
        set_rng_state(state)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(tuple(state["numpy"]))  # the whole legacy state, position included
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
