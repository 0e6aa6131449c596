"""Throughput benchmark: world-model updates/s, imagination rollouts/s, actor-critic
updates/s and env steps/s (Atari Pong; Meta-World with 64x64 rendering), per scale and
precision, on the current device; written as JSON.

Timings are medians over `repeats` after one warm-up call. Speed targets are judged from
this file (ratios within one run), never by timed assertions in tests.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from mow.checkpoint import atomic_write_text
from mow.config import Params
from mow.runtime import Runtime, make_runtime

# The official STORM code measured on this project's reference CPU (2 vCPU AMD EPYC,
# fp32, 2 threads; DESIGN.md): seconds per world-model update at 16x64 and per 1024x16
# imagination plus actor-critic update. Our paper-scale numbers are divided by these.
OFFICIAL_STORM_CPU_FP32 = {"wm_update_s": 5.3, "imagine_and_ac_update_s": 17.6}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, repeats: int, device: torch.device) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def native_bf16(device: torch.device) -> bool:
    """bf16 is only worth timing where the hardware has it: emulated bf16 on an AVX2 CPU
    runs ~20x slower than fp32 and would take the benchmark hours."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bench_models(params: Params, runtime: Runtime, repeats: int, imag_batch: int | None = None,
                 method: str = "storm") -> dict:
    """One env step's updates of `method`: STORM, or MoW over the 26 Atari games with
    task-mixed batches (rows cycle through the tasks, as in training)."""
    from mow.train import build_models
    from mow.train_mow import build_mow_models

    cfg, wm_cfg = params["train"], params["model"]["world_model"]
    device, num_actions = runtime.device, 18
    if method == "mow":
        from mow.envs import ATARI_GAMES

        tasks = ATARI_GAMES
        wm, ac = build_mow_models(params, "atari", tasks, num_actions,
                                  [k % params["model"]["mow"]["num_clusters"] for k in range(len(tasks))], device)

        def task_ids(b):
            return (torch.arange(b) % len(tasks)).to(device)

        extra = task_ids
    else:
        wm, ac = build_models(params, num_actions, device)
        extra = None
    wm_opt = torch.optim.Adam(wm.parameters(), lr=cfg["wm_lr"])
    ac_opt = torch.optim.Adam([p for p in ac.parameters() if p.requires_grad], lr=cfg["ac_lr"], eps=cfg["ac_eps"])
    gen = torch.Generator().manual_seed(0)
    size = wm_cfg["image_size"]

    def frames(b, t):
        return torch.randint(0, 256, (b, t, size, size, 3), dtype=torch.uint8, generator=gen).to(device)

    def actions(b, t):
        return torch.randint(0, num_actions, (b, t), generator=gen).to(device)

    B, T = cfg["wm_batch"], cfg["wm_seq_len"]
    obs, act = frames(B, T), actions(B, T)
    rew, term = torch.randn(B, T, device=device), (torch.rand(B, T, device=device) < 0.05).float()

    wm_args = (extra(B),) if extra else ()

    def wm_update():
        wm.train()
        with runtime.autocast():
            loss, _ = wm.compute_loss(obs, act, rew, term, *wm_args)
        wm_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(wm.parameters(), cfg["wm_clip"])
        wm_opt.step()

    full_batch = cfg["imag_batch"]
    ib = min(imag_batch or full_batch, full_batch)
    ctx_obs, ctx_act = frames(ib, cfg["imag_context"]), actions(ib, cfg["imag_context"])
    holder = {}
    im_tasks = extra(ib) if extra else None

    def imagine():
        with runtime.autocast():
            if im_tasks is None:
                holder["imag"] = wm.imagine(lambda s: ac.act(s), ctx_obs, ctx_act, cfg["imag_horizon"])
            else:
                holder["imag"] = wm.imagine(lambda s: ac.act(s, im_tasks), ctx_obs, ctx_act, im_tasks,
                                            cfg["imag_horizon"])

    def ac_update():
        with runtime.autocast():
            loss, _ = ac.compute_loss(holder["imag"], *((im_tasks,) if im_tasks is not None else ()))
        ac_opt.zero_grad(set_to_none=True)
        loss.backward()
        ac_opt.step()
        ac.update_slow_critic()

    t_wm = _time(wm_update, repeats, device)
    t_im = _time(imagine, repeats, device) * full_batch / ib
    t_ac = _time(ac_update, repeats, device) * full_batch / ib
    return {
        "wm_batch": [B, T], "imag_batch": full_batch, "imag_batch_measured": ib, "imag_horizon": cfg["imag_horizon"],
        "wm_update_s": t_wm, "wm_updates_per_s": 1 / t_wm,
        "imagine_s": t_im, "imagination_rollouts_per_s": full_batch / t_im,
        "ac_update_s": t_ac, "ac_updates_per_s": 1 / t_ac,
        "imagine_and_ac_update_s": t_im + t_ac,
        "train_step_s": t_wm + t_im + t_ac,  # one env step's updates at update_ratio 1
        "parameters": sum(p.numel() for p in wm.parameters()) + sum(p.numel() for p in ac.parameters()),
    }


def bench_env(protocol: dict, seconds: float = 3.0) -> dict:
    from functools import partial

    from mow.envs import make_env
    from mow.envs.vector import VectorEnv

    out = {}
    for n in (1, 4):
        envs = VectorEnv([partial(make_env, "atari", "Pong", protocol, seed=i, train=True) for i in range(n)])
        envs.reset(seed=0)
        rng = np.random.default_rng(0)
        steps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            envs.step(rng.integers(0, envs.single_action_space.n, size=n))
            steps += n
        out[f"pong_x{n}_env_steps_per_s"] = steps / (time.perf_counter() - t0)
        envs.close()
    return out


def bench_metaworld_env(protocol: dict | None, seconds: float = 3.0) -> dict:
    """Meta-World env steps/s of one env rendering every agent step (mow.envs.metaworld).

    A machine that cannot render (no EGL/OSMesa) gets `metaworld_error` with the reason
    instead of numbers, so the rest of the benchmark still runs.
    """
    repeat = int(protocol["frame_skip"]) if protocol else 1
    try:
        from mow.envs.metaworld import bench_metaworld

        return bench_metaworld(seconds, action_repeat=repeat)
    except (ImportError, RuntimeError) as exc:
        print(f"bench: Meta-World skipped: {exc}", flush=True)
        return {"metaworld_error": str(exc)}


def run_bench(params_by_scale: dict[str, Params], *, out: Path, repeats: int = 3, imag_batch: int | None = None) -> dict:
    results: dict = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "official_storm_reference_cpu_fp32": OFFICIAL_STORM_CPU_FP32, "scales": {},
    }
    for scale, params in params_by_scale.items():
        base = make_runtime(params["train"])
        results["device"] = str(base.device)
        precisions = [None, torch.bfloat16] if native_bf16(base.device) else [None]
        per_scale = {}
        for dtype in precisions:
            runtime = Runtime(base.device, dtype)
            print(f"bench: scale={scale} precision={runtime.precision} on {base.device} ...", flush=True)
            storm = bench_models(params, runtime, repeats, imag_batch)
            print(f"bench: scale={scale} precision={runtime.precision} MoW (26 Atari tasks) ...", flush=True)
            mow = bench_models(params, runtime, repeats, imag_batch, method="mow")
            storm["mow"] = mow
            # both methods run update_ratio updates per env step (MoW: summed over tasks)
            storm["mow_vs_storm_update_cost"] = mow["train_step_s"] / storm["train_step_s"]
            per_scale[runtime.precision] = storm
        if scale == "paper" and base.device.type == "cpu":
            for prec, r in per_scale.items():
                r["speedup_vs_official_cpu_fp32"] = {
                    "wm_update": OFFICIAL_STORM_CPU_FP32["wm_update_s"] / r["wm_update_s"],
                    "imagine_and_ac_update": OFFICIAL_STORM_CPU_FP32["imagine_and_ac_update_s"] / r["imagine_and_ac_update_s"],
                }
        results["scales"][scale] = per_scale
    print("bench: env steps/s ...", flush=True)
    any_params = next(iter(params_by_scale.values()))
    results["env"] = bench_env(dict(any_params.protocol("storm_compat")))
    print("bench: Meta-World env steps/s with rendering ...", flush=True)
    mw = [dict(p) for p in any_params["protocols"].values() if p["suite"] == "metaworld"]
    results["env"].update(bench_metaworld_env(mw[0] if mw else None))
    atomic_write_text(Path(out), json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return results
