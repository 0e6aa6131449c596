"""Throughput benchmark: world-model updates/s, imagination rollouts/s, actor-critic
updates/s and env steps/s (Atari Pong; Meta-World with 64x64 rendering), per scale and precision, on the current device; peak memory;
MoW's cost relative to STORM; optionally (``--sweep``) how MoW's update time and parameter
count grow with the number of tasks and experts against K separate STORMs; optionally
(``--profile``) where each part spends its time (`mow.profiling`); an estimate of the
device-hours of the paper-scale DAG. Written as JSON plus a figure next to it.

Timings are medians over `repeats` after warm-up rounds, which last until the process's
memory stops growing (`settle`); STORM and MoW each run in a
process of their own, their repeats interleaved so that their ratio survives load changes
on a shared machine. Beside the times, each part's matmul / convolution / attention FLOPs
are counted once (`torch.utils.flop_counter`): a MoW/STORM cost ratio that no load on the
machine can change. Speed targets are judged from this file (ratios within one run), never
by timed assertions in tests.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import resource
import statistics
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from mow.checkpoint import atomic_write_text
from mow.config import Params
from mow.models import linear
from mow.profiling import params_with_grad, phase, profile_call
from mow.runtime import Runtime, adam, make_runtime, retain_cpu_memory
from mow.settling import MAX_SETTLE_ROUNDS, fault_limit, minor_page_faults, settle

# The official STORM code measured on this project's reference CPU (2 vCPU AMD EPYC,
# fp32, 2 threads; DESIGN.md): seconds per world-model update at 16x64 and per 1024x16
# imagination plus actor-critic update. Our paper-scale numbers are divided by these.
OFFICIAL_STORM_CPU_FP32 = {"wm_update_s": 5.3, "imagine_and_ac_update_s": 17.6}

#: The timed parts of one env step's updates (a compiled run adds the eager update beside them).
STEP_PARTS = ("wm_update", "imagine", "ac_update")

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


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn`` (matrix products, convolutions, attention; elementwise ops
    and the optimiser are not counted). torch's counter lacks the CPU flash-attention kernels
    that fused attention dispatches to on CPU, which take the formulas of the GPU ones, and
    oneDNN's linear (``mow.models.linear``): 2·M·K·N like ``mm``."""
    from torch.utils import flop_counter

    def attention(query, key, value, *args, out_shape=None, **kwargs):  # arguments arrive as shapes
        return flop_counter.sdpa_flop_count(query, key, value)

    def attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

    def onednn_linear(x, weight, *args, out_shape=None, **kwargs):
        return flop_counter.mm_flop(x, list(reversed(weight)))

    aten = torch.ops.aten
    cpu_kernels = {aten._scaled_dot_product_flash_attention_for_cpu: attention,
                   aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward}
    if linear.ONEDNN:
        cpu_kernels[torch.ops.mkldnn._linear_pointwise] = onednn_linear
    with flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_kernels) as counter:
        fn()
    return counter.get_total_flops()


def count_ops(fn) -> int:
    """Operators one call of ``fn`` dispatches, views and the profiler's range markers
    (`mow.profiling.phase`) excluded. On a GPU each of them launches at least one kernel, and
    an eager operator costs some microseconds of launch and Python time whatever its size:
    the count bounds how fast a step with small tensors can run there."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.namespace != "profiler":
                self.count += 1
            return func(*args, **(kwargs or {}))

    with Counter() as counter:
        fn()
    return counter.count


def count_work(fn) -> tuple[int, int]:
    """FLOPs and operators (:func:`count_flops`, :func:`count_ops`) of one call of ``fn``."""
    ops = []
    flops = count_flops(lambda: ops.append(count_ops(fn)))
    return flops, ops[0]


def _wm_update(model, opt, runtime: Runtime, clip: float, batch: tuple, loss_fn):
    """One world-model update on a fixed batch (what the trainer does per update, with its
    loss function `loss_fn`), as a closure to time."""
    def step():
        model.train()
        with phase("loss"), runtime.autocast():
            loss, _ = loss_fn(*batch)
        with phase("backward"):
            opt.zero_grad(set_to_none=True)
            loss.backward()
        with phase("clip_grad_norm"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        with phase("optimizer_step"):
            opt.step()
    return step


class _Setup:
    """One method's models, optimisers and fixed inputs, with the three timed parts of an env
    step's updates as closures: world-model update, imagination, actor-critic update (which
    learns from the imagination just made)."""

    def __init__(self, params: Params, runtime: Runtime, imag_batch: int | None, method: str):
        from mow.train import build_models
        from mow.train_mow import build_mow_models, cluster_major, mixed_task_rows

        cfg, wm_cfg = params["train"], params["model"]["world_model"]
        device, num_actions = runtime.device, 18
        self.method, self.device = method, device
        torch.manual_seed(0)  # the same weights every run: MoW's routing, and so its work, follow them
        if method == "mow":  # the 26 Atari games; rows mixed and ordered as the trainer does
            from mow.envs import ATARI_GAMES

            tasks = ATARI_GAMES
            clusters = torch.arange(len(tasks)) % params["model"]["mow"]["num_clusters"]
            wm, ac = build_mow_models(params, "atari", tasks, num_actions, clusters.tolist(), device)

            def extra(b):
                return (cluster_major(mixed_task_rows(0, b, len(tasks)), clusters).to(device),)
        else:
            wm, ac = build_models(params, num_actions, device)

            def extra(b):
                return ()
        wm_opt = adam(wm.parameters(), lr=cfg["wm_lr"])
        ac_opt = adam([p for p in ac.parameters() if p.requires_grad], lr=cfg["ac_lr"], eps=cfg["ac_eps"])
        gen = torch.Generator().manual_seed(0)
        size = wm_cfg["image_size"]

        def frames(b, t):
            return torch.randint(0, 256, (b, t, size, size, 3), dtype=torch.uint8, generator=gen).to(device)

        def actions(b, t):
            return torch.randint(0, num_actions, (b, t), generator=gen).to(device)

        B, T = cfg["wm_batch"], cfg["wm_seq_len"]
        obs, act = frames(B, T), actions(B, T)
        rew, term = torch.randn(B, T, generator=gen).to(device), (torch.rand(B, T, generator=gen) < 0.05).float().to(device)
        self.full_batch = cfg["imag_batch"]
        self.imag_batch = min(imag_batch or self.full_batch, self.full_batch)
        ctx_obs, ctx_act = frames(self.imag_batch, cfg["imag_context"]), actions(self.imag_batch, cfg["imag_context"])
        im_extra = extra(self.imag_batch)
        holder = {}

        def imagine():
            with runtime.autocast():
                holder["imag"] = wm.imagine(lambda s: ac.act(s, *im_extra), ctx_obs, ctx_act, *im_extra,
                                            cfg["imag_horizon"])

        def ac_update():
            with phase("loss"), runtime.autocast():
                loss, _ = ac.compute_loss(holder["imag"], *im_extra)
            with phase("backward"):
                ac_opt.zero_grad(set_to_none=True)
                loss.backward()
            with phase("optimizer_step"):
                ac_opt.step()
            with phase("slow_critic"):
                ac.update_slow_critic()

        wm_batch = (obs, act, rew, term, *extra(B))
        loss_fn = runtime.world_model_loss(wm)
        compiled = loss_fn != wm.compute_loss  # MoW's stays eager (runtime.MOW_EAGER_NOTE)
        self.parts = {"wm_update": _wm_update(wm, wm_opt, runtime, cfg["wm_clip"], wm_batch, loss_fn),
                      "imagine": imagine, "ac_update": ac_update}
        if compiled:  # the eager update beside the compiled one, same model and batch
            self.parts["wm_update_eager"] = _wm_update(wm, wm_opt, runtime, cfg["wm_clip"], wm_batch, wm.compute_loss)
        self.updated = {"wm_update": wm, "ac_update": ac}   # whose gradients an update fills
        self.profile: dict[str, dict] = {}
        self.first_call_s: dict[str, float] = {}
        self.samples: dict[str, list[float]] = {name: [] for name in self.parts}
        self.faults: dict[str, list[int]] = {name: [] for name in self.parts}  # per recorded call
        self.meta = {"wm_batch": [B, T], "imag_batch": self.full_batch, "imag_batch_measured": self.imag_batch,
                     "imag_horizon": cfg["imag_horizon"],
                     "parameters": sum(p.numel() for p in wm.parameters()) + sum(p.numel() for p in ac.parameters())}
        if method == "mow":  # the operator count grows with the experts the tasks' routing selects
            self.meta["experts_in_use"] = int(wm.routing().indices.unique().numel())
            self.meta["module_batches"] = wm._batched(device)  # experts and cluster heads (CUDA)

    def _scale(self, name: str) -> float:
        """Imagination and its update run at imag_batch rows: scaled to the full batch."""
        return 1.0 if name.startswith("wm_update") else self.full_batch / self.imag_batch

    def _eager_parts(self):
        """(name, eager function) of each timed part: a compiled update computes what its
        eager twin does, and counters and the profiler see eager operators only."""
        return [(name, self.parts.get(f"{name}_eager", fn)) for name, fn in self.parts.items()
                if not name.endswith("_eager")]

    def record_work(self) -> None:
        """One call of each eager part under the FLOP and operator counters. Operators are
        not scaled to the full imagination batch: their number does not grow with the rows."""
        self.flops, self.ops = {}, {}
        for name, fn in self._eager_parts():
            flops, self.ops[name] = count_work(fn)
            self.flops[name] = flops * self._scale(name)

    def record_profile(self) -> None:
        """Each eager part under the profiler (`mow.profiling.profile_call`: 3 calls), with
        the parameters an update gave a gradient."""
        for name, fn in self._eager_parts():
            self.profile[name] = profile_call(fn, self.device)
            if name in self.updated:
                self.profile[name]["params_with_grad"] = params_with_grad(self.updated[name])

    def run_once(self, record: bool) -> int:
        """One call of each part, timed (kept with ``record``); returns the page faults the
        round took (recorded per part with ``record``)."""
        total = 0
        for name, fn in self.parts.items():
            _sync(self.device)
            faults, t0 = minor_page_faults(), time.perf_counter()
            fn()
            _sync(self.device)
            seconds, faults = time.perf_counter() - t0, minor_page_faults() - faults
            total += faults
            if record:
                self.samples[name].append(seconds * self._scale(name))
                self.faults[name].append(faults)
            else:  # the first warm-up call: a compiled update compiles here
                self.first_call_s.setdefault(name, seconds)
        return total

    def settle(self) -> None:
        """Untimed rounds until the process's memory stops growing (:func:`settle`: two
        rounds in a row each faulting in under 1 % of the peak resident size); the first of
        them is also the warm-up after the counting call's seconds of host-only work."""
        limit = fault_limit(peak_memory(self.device)["peak_rss_mib"] * 2**20)
        self.meta["settle_rounds"], self.meta["settled"] = settle(lambda: self.run_once(record=False), limit)

    def result(self) -> dict:
        t = {name: statistics.median(v) for name, v in self.samples.items()}
        compiled = {}
        if "wm_update_eager" in t:
            compiled = {"wm_update_eager_s": t.pop("wm_update_eager"),
                        "wm_update_first_call_s": self.first_call_s["wm_update"]}  # compile included
            compiled["compile_speedup_wm_update"] = compiled["wm_update_eager_s"] / t["wm_update"]
        profiled = {"profile": self.profile} if self.profile else {}
        return {**self.meta, "compile": bool(compiled), **compiled, **profiled,
                "wm_update_s": t["wm_update"], "wm_updates_per_s": 1 / t["wm_update"],
                "imagine_s": t["imagine"], "imagination_rollouts_per_s": self.full_batch / t["imagine"],
                "ac_update_s": t["ac_update"], "ac_updates_per_s": 1 / t["ac_update"],
                "imagine_and_ac_update_s": t["imagine"] + t["ac_update"],
                "train_step_s": sum(t.values()),  # one env step's updates at update_ratio 1
                "samples_s": {name: [round(x, 4) for x in v] for name, v in self.samples.items()},
                "page_faults": self.faults,
                "flops": {**self.flops, "train_step": sum(self.flops.values())},
                "ops": {**self.ops, "train_step": sum(self.ops.values())}}


def _method_worker(conn, params: Params, runtime: Runtime, imag_batch: int | None, method: str,
                   threads: int) -> None:
    """One method's models and timed parts in a process of its own (`bench_models`): builds
    them, then runs one round per request, one request at a time."""
    torch.set_num_threads(threads)
    retain_cpu_memory(runtime.device)
    try:
        if runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(runtime.device)
        setup = _Setup(params, runtime, imag_batch, method)
        conn.send(("ready", None))
        while (request := conn.recv()) != "result":
            if request == "count":
                setup.record_work()
            elif request == "profile":
                setup.record_profile()
            elif request == "settle":
                setup.settle()
            else:
                setup.run_once(record=request == "record")
            conn.send(("done", None))
        conn.send(("result", {**setup.result(), **peak_memory(runtime.device)}))
    except Exception:
        conn.send(("error", traceback.format_exc()))


def _answer(method: str, conn, proc) -> object:
    try:
        kind, payload = conn.recv()
    except EOFError:
        proc.join(timeout=10)
        raise RuntimeError(f"bench: the {method} worker process died (exit code {proc.exitcode})") from None
    if kind == "error":
        raise RuntimeError(f"bench: the {method} worker failed:\n{payload}")
    return payload


def bench_models(params: Params, runtime: Runtime, repeats: int, imag_batch: int | None = None,
                 methods: tuple[str, ...] = ("storm", "mow"), profile: bool = False) -> dict[str, dict]:
    """One env step's updates of each of `methods` (STORM; MoW over the 26 Atari games with
    task-mixed batches), medians over `repeats` after a warm-up call, and each part's
    FLOPs and operators, counted in a call after the warm-up (the optimisers' state exists by
    then: the operators are those of a steady update), then warm-up rounds until the
    process's memory stops growing (:func:`settle`). Each timed call's page faults are kept
    beside its time.

    Each method runs in a process of its own, as it trains: sharing one process made the
    second method's timings depend on the memory the first had freed (STORM's imagination
    ~25 % slower next to MoW's models than alone on the same CPU). Their rounds alternate
    (STORM, MoW, STORM, MoW, ...) with one process computing at a time, so a load change on
    a shared machine hits both alike and their ratio stays comparable. Peak memory is each
    method's own process. With ``profile``, each part then runs 3 more calls under the
    profiler (after the timed rounds, which it does not touch)."""
    ctx = multiprocessing.get_context("spawn")   # no fork of a process that holds OpenMP/CUDA state
    workers = {}
    try:
        for method in methods:   # built one after another: their peaks do not add up
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=_method_worker, daemon=True,
                               args=(child, params, runtime, imag_batch, method, torch.get_num_threads()))
            proc.start()
            child.close()
            workers[method] = (conn, proc)
            _answer(method, conn, proc)
        # settled after the count's seconds of host-only work: on an H200 the first timed
        # round after it had calls up to 9x slower than the rest (the idle GPU's clock drops,
        # the likely cause); on a CPU the heap grows for rounds more (`settle`)
        for request in ["warm-up", "count", "settle"] + ["record"] * repeats + ["profile"] * profile:
            for method, (conn, proc) in workers.items():
                conn.send(request)
                _answer(method, conn, proc)
        results = {}
        for method, (conn, proc) in workers.items():
            conn.send("result")
            results[method] = _answer(method, conn, proc)
        return results
    finally:
        for conn, proc in workers.values():
            conn.close()
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


def peak_memory(device: torch.device) -> dict:
    """Peak resident set size of this process so far (MiB; it only grows, so a later entry
    includes the earlier ones) and, on CUDA, the peak allocated GPU memory since the last
    reset (MiB)."""
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_params(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def bench_scaling(params: Params, runtime: Runtime, *, tasks=(2, 4, 8, 16, 26), experts=(3, 6, 12),
                  batch: tuple[int, int] = (16, 16), repeats: int = 3) -> dict:
    """MoW world-model update time and parameter count against the number of tasks K (at
    the configured N_e) and of experts N_e (at K = 26), next to K separate STORMs.

    Parameter counts are exact (models built on the meta device, actor-critic included).
    Times are the median of ``repeats`` world-model updates (loss, backward, clipping, Adam),
    after one untimed, at the reduced batch ``batch`` (rows mixed and ordered as in
    training); N_m = min(num_clusters, K).
    K STORMs run K updates per env step of every task, as does MoW (update_ratio counts
    updates summed over tasks), so the per-update time ratio is the per-env-step cost ratio.
    """
    from mow.models import storm_parameter_breakdown
    from mow.models.actor_critic import MultiTaskActorCritic
    from mow.models.mow_world_model import MoWWorldModel
    from mow.models.world_model import WorldModel
    from mow.train_mow import cluster_major, mixed_task_rows

    device, num_actions = runtime.device, 18
    cfg, base = params["train"], params.mow_config(26)
    B, T = batch
    size = base.world.image_size
    gen = torch.Generator().manual_seed(0)
    obs = torch.randint(0, 256, (B, T, size, size, 3), dtype=torch.uint8, generator=gen).to(device)
    act = torch.randint(0, num_actions, (B, T), generator=gen).to(device)
    rew, term = torch.randn(B, T, generator=gen).to(device), torch.zeros(B, T, device=device)

    def update_time(model, extra=()):
        opt = adam(model.parameters(), lr=cfg["wm_lr"])
        # eager: MoW trains so (runtime.MOW_EAGER_NOTE), and a compile per swept model would take hours
        return _time(_wm_update(model, opt, runtime, cfg["wm_clip"], (obs, act, rew, term, *extra), model.compute_loss),
                     repeats, device)

    storm_params = sum(storm_parameter_breakdown(num_actions, base.world, params.agent_config()).values())
    storm_s = update_time(WorldModel(base.world, num_actions).to(device))

    def point(k: int, n_e: int) -> dict:
        import dataclasses

        mcfg = dataclasses.replace(base, num_tasks=k, num_experts=n_e, num_clusters=min(base.num_clusters, k),
                                   top_k=min(base.top_k, n_e))
        masks = torch.ones(k, num_actions, dtype=torch.bool)  # validated on the host, outside "meta"
        with torch.device("meta"):
            meta_wm = MoWWorldModel(mcfg, num_actions)
            meta_ac = MultiTaskActorCritic(params.agent_config(), meta_wm.state_dim, num_actions, masks,
                                           mcfg.num_clusters)
        n_params = _total_params(meta_wm, meta_ac)
        del meta_wm, meta_ac
        torch.manual_seed(0)  # reproducible routing (see _Setup)
        model = MoWWorldModel(mcfg, num_actions).to(device)
        rows = cluster_major(mixed_task_rows(0, B, k), model.cluster_of_task.cpu())
        seconds = update_time(model, (rows.to(device),))
        del model
        print(f"bench: sweep K={k} N_e={n_e}: {seconds:.2f} s/update, {n_params / 1e6:.1f} M parameters", flush=True)
        return {"tasks": k, "experts": n_e, "clusters": mcfg.num_clusters, "wm_update_s": seconds,
                "parameters": n_params, "storms_parameters": k * storm_params,
                "update_cost_vs_storm": seconds / storm_s, "parameters_vs_k_storms": n_params / (k * storm_params)}

    by_tasks = [point(k, base.num_experts) for k in tasks]
    reuse = {p["experts"]: p for p in by_tasks if p["tasks"] == 26}
    by_experts = [reuse.get(n) or point(26, n) for n in experts]
    return {"batch": [B, T], "storm_wm_update_s": storm_s, "storm_parameters": storm_params,
            "by_tasks": by_tasks, "by_experts": by_experts, **peak_memory(device)}


def paper_dag_estimate(params: Params, paper: dict, env_steps_per_s: float) -> dict:
    """Device-hours of the paper-scale DAG on the benchmarked device, from its measured
    per-update and per-env-step costs: every STORM job (Atari protocols x games x seeds)
    and every MoW job (variants x seeds, each priced as the full model: the ablations are
    cheaper or equal), plus each MoW job's warm-up (collection and offline pretraining).
    Evaluation episodes are not counted (minutes per job)."""
    cfg, warm = params["train"], params["warmup"]
    games = len(params.tasks("atari"))
    seeds = len(params["seeds"])
    protocols = [n for n, p in params["protocols"].items() if p["suite"] == "atari"]
    per_env_step = 1.0 / env_steps_per_s
    steps, ratio = cfg["env_steps"], cfg["update_ratio"]
    storm_job_s = steps * (ratio * paper["train_step_s"] + per_env_step)
    mow = paper["mow"]
    mow_job_s = (games * steps * (ratio * mow["train_step_s"] + per_env_step)
                 + games * warm["collect_steps"] * per_env_step + warm["pretrain_steps"] * mow["wm_update_s"])
    storm_jobs, mow_jobs = len(protocols) * games * seeds, len(params["variants"]) * seeds
    hours = {"storm_job_h": storm_job_s / 3600, "storm_jobs": storm_jobs,
             "storm_total_h": storm_jobs * storm_job_s / 3600,
             "mow_job_h": mow_job_s / 3600, "mow_jobs": mow_jobs, "mow_total_h": mow_jobs * mow_job_s / 3600}
    hours["total_h"] = hours["storm_total_h"] + hours["mow_total_h"]
    return hours


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


def round_totals(result: dict) -> list[float]:
    """Seconds of one env step's updates in each recorded round (the parts' samples summed)."""
    return [sum(parts) for parts in zip(*(result["samples_s"][name] for name in STEP_PARTS))]


def round_ratios(storm: dict, mow: dict) -> list[float]:
    """MoW's cost per env step relative to STORM's within each recorded round. Each MoW
    round runs right after STORM's, so a load change on a shared machine between rounds
    cancels out of a round's ratio, where a ratio of the two medians would pick it up; the
    bench reports their median. Kept in the JSON: their spread says how far a median near
    a target can be trusted, and rounds of several runs can be pooled."""
    return [m / s for s, m in zip(round_totals(storm), round_totals(mow))]


def end_to_end_env_steps_per_s(result: dict, env_steps_per_s: float, update_ratio: float) -> float:
    """Env steps/s of the sequential training loop (step the env, then update_ratio updates),
    from the measured parts: 1 / (env step time + update_ratio x one step's updates)."""
    return 1.0 / (1.0 / env_steps_per_s + update_ratio * result["train_step_s"])


def run_bench(params_by_scale: dict[str, Params], *, out: Path, repeats: int = 3, imag_batch: int | None = None,
              sweep: bool = False, sweep_batch: tuple[int, int] = (16, 16), profile: bool = False) -> dict:
    results: dict = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_fp32_linear": "onednn" if linear.ONEDNN else "blas",  # mow.models.linear
        "official_storm_reference_cpu_fp32": OFFICIAL_STORM_CPU_FP32, "scales": {},
    }
    print("bench: env steps/s ...", flush=True)
    any_params = next(iter(params_by_scale.values()))
    results["env"] = bench_env(dict(any_params.protocol("storm_compat")))
    env_sps = results["env"]["pong_x1_env_steps_per_s"]
    for scale, params in params_by_scale.items():
        base = make_runtime(params["train"])
        results["device"] = str(base.device)
        results["device_name"] = device_name(base.device)
        results["threads"] = torch.get_num_threads()
        precisions = [None, torch.bfloat16] if native_bf16(base.device) else [None]
        per_scale = {}
        ratio = params["train"]["update_ratio"]
        for dtype in precisions:
            runtime = Runtime(base.device, dtype, base.compile)
            print(f"bench: scale={scale} precision={runtime.precision} on {base.device}: STORM and MoW "
                  f"(26 Atari tasks), each in its own process, interleaved ...", flush=True)
            both = bench_models(params, runtime, repeats, imag_batch, profile=profile)
            storm, mow = both["storm"], both["mow"]
            storm["mow"] = mow
            # both methods run update_ratio updates per env step (MoW: summed over tasks)
            rounds = round_ratios(storm, mow)
            storm["mow_vs_storm_update_cost"] = statistics.median(rounds)
            storm["mow_vs_storm_update_cost_rounds"] = [round(r, 4) for r in rounds]
            storm["mow_vs_storm_flops"] = mow["flops"]["train_step"] / storm["flops"]["train_step"]
            storm["mow_vs_storm_ops"] = mow["ops"]["train_step"] / storm["ops"]["train_step"]
            storm["end_to_end_env_steps_per_s"] = end_to_end_env_steps_per_s(storm, env_sps, ratio)
            mow["end_to_end_env_steps_per_s"] = end_to_end_env_steps_per_s(mow, env_sps, ratio)
            per_scale[runtime.precision] = storm
        if scale == "paper" and base.device.type == "cpu":
            for prec, r in per_scale.items():
                r["speedup_vs_official_cpu_fp32"] = {
                    "wm_update": OFFICIAL_STORM_CPU_FP32["wm_update_s"] / r["wm_update_s"],
                    "imagine_and_ac_update": OFFICIAL_STORM_CPU_FP32["imagine_and_ac_update_s"] / r["imagine_and_ac_update_s"],
                }
        if scale == "paper":
            fastest = min(per_scale.values(), key=lambda r: r["train_step_s"])
            results["paper_dag_device_hours"] = {"device": results["device_name"],
                                                 **paper_dag_estimate(params, fastest, env_sps)}
        results["scales"][scale] = per_scale
    print("bench: Meta-World env steps/s with rendering ...", flush=True)
    mw = [dict(p) for p in any_params["protocols"].values() if p["suite"] == "metaworld"]
    results["env"].update(bench_metaworld_env(mw[0] if mw else None))
    if sweep:
        scale, params = next(((s, p) for s, p in params_by_scale.items() if s == "paper"),
                             next(iter(params_by_scale.items())))
        runtime = make_runtime(params["train"])
        print(f"bench: MoW scaling sweep at scale={scale}, batch {sweep_batch[0]}x{sweep_batch[1]} ...", flush=True)
        results["scaling"] = {"scale": scale, **bench_scaling(params, runtime, batch=sweep_batch)}
    out = Path(out)
    atomic_write_text(out, json.dumps(results, indent=1) + "\n")
    results["figure"] = str(write_figure(results, out.with_suffix(".png")))
    print(json.dumps(results, indent=1))
    return results


def write_figure(results: dict, path: Path) -> Path:
    """Per-step seconds of STORM and MoW per scale; with a sweep, parameters and update time
    against the number of tasks (MoW vs K STORMs) and against the number of experts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = results.get("scaling")
    fig, axes = plt.subplots(1, 3 if sweep else 1, figsize=(15 if sweep else 6, 4), squeeze=False)
    ax = axes[0][0]
    labels, parts = [], {"wm_update_s": [], "imagine_s": [], "ac_update_s": []}
    for scale, per in results["scales"].items():
        for prec, r in per.items():
            cost = (f"\n{r['mow_vs_storm_update_cost']:.2f}x time\n{r['mow_vs_storm_flops']:.2f}x FLOPs"
                    f"\n{r['mow_vs_storm_ops']:.1f}x ops")
            for name, entry, note in (("STORM", r, ""), ("MoW", r["mow"], cost)):
                labels.append(f"{name}\n{scale} {prec}{note}")
                for key in parts:
                    parts[key].append(entry[key])
    bottom = np.zeros(len(labels))
    for key, values in parts.items():
        ax.bar(labels, values, bottom=bottom, label=key.removesuffix("_s").replace("_", " "))
        bottom += np.asarray(values)
    ax.set_ylabel("seconds per env step's updates")
    ax.set_title(f"{results.get('device_name', results['device'])}, {results['threads']} threads")
    ax.legend(fontsize=8)
    if sweep:
        ks = [p["tasks"] for p in sweep["by_tasks"]]
        ax = axes[0][1]
        ax.plot(ks, [p["parameters"] / 1e6 for p in sweep["by_tasks"]], "o-", label="MoW (one model)")
        ax.plot(ks, [p["storms_parameters"] / 1e6 for p in sweep["by_tasks"]], "s--", label="K separate STORMs")
        ax.set_xlabel("tasks K")
        ax.set_ylabel("parameters (M)")
        ax.legend(fontsize=8)
        ax = axes[0][2]
        ax.plot(ks, [p["update_cost_vs_storm"] for p in sweep["by_tasks"]], "o-", label="vs tasks (N_e fixed)")
        ne = [p["experts"] for p in sweep["by_experts"]]
        ax.plot(ne, [p["update_cost_vs_storm"] for p in sweep["by_experts"]], "s-", label="vs experts (K=26)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("tasks K / experts N_e")
        ax.set_ylabel(f"MoW / STORM update time (batch {sweep['batch'][0]}x{sweep['batch'][1]})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
