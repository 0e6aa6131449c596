"""Every speed optimisation keeps the numerics (issue 9). No test here measures time:
throughput is `mow bench`'s job; these only pin the values against a plain reference.

Tolerances: fp32 kernels that only reorder sums agree to 1e-5 relative (a gradient: to 1e-5
of its largest entry; measured up to 4e-6 for the compiled loss); bf16 autocast
(8-bit mantissa) is held to 5 % on a loss of order 1e3 and 2e-2 absolute on activations.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import subprocess
import sys

import pytest
import torch

from mow.bench import MAX_SETTLE_ROUNDS, count_flops, count_ops, count_work, minor_page_faults, round_totals, settle
from mow.config import load_params
from mow.models import linear as fast_linear
from mow.models.linear import Linear, uses_onednn
from mow.models.transformer import CausalSelfAttention, KVCache, explicit_attention
from mow.models.world_model import WorldModel, WorldModelConfig
from mow.profiling import phase
from mow.runtime import adam, retain_cpu_memory, tune_cpu_allocator

from conftest import PARAMS, run_mow

torch.set_num_threads(2)

TINY = WorldModelConfig(
    image_size=16, encoder_channels=(4, 8), stoch=4, classes=4, d_model=16, layers=1, heads=2,
    ffn=32, max_len=8, head_hidden=16, head_layers=1, reward_bins=17,
)


def reference_attention(module: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Unfused causal attention written out: softmax(q k^T / sqrt(d) + causal mask) v."""
    batch, steps, width = x.shape
    q, k, v = module.qkv(x).view(batch, steps, 3, module.heads, -1).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    future = torch.ones(steps, steps, dtype=torch.bool).triu(1)
    weights = scores.masked_fill(future, float("-inf")).softmax(-1)
    return module.out((weights @ v).transpose(1, 2).reshape(batch, steps, width))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_attention_matches_reference_with_and_without_cache(mode):
    """eval on CPU runs `explicit_attention`; train (dropout 0 here) runs fused SDPA."""
    torch.manual_seed(0)
    attention = CausalSelfAttention(32, 4, dropout=0.0).train(mode == "train")
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        expected = reference_attention(attention, x)
        torch.testing.assert_close(attention(x), expected, rtol=1e-5, atol=1e-5)
        # the KV-cache path: a 4-step prefix (masked against nothing cached), then a
        # 2-step chunk (masked against the cached prefix), then one step (imagination)
        cache = KVCache(1, 8)
        chunks = []
        for start, stop in [(0, 4), (4, 6), (6, 7)]:
            chunks.append(attention(x[:, start:stop], cache, 0))
            cache.advance(stop - start)
    torch.testing.assert_close(torch.cat(chunks, 1), expected, rtol=1e-5, atol=1e-5)


def test_explicit_attention_matches_a_float64_truth_in_fp32_and_bf16():
    """The CPU inference formula at an imagination shape (one query over a cached prefix)
    and a context shape (causal) against float64 attention: fp32 to 1e-5; bf16 within the
    2e-2 absolute that bf16 activations are held to, plus torch's bf16 relative tolerance
    (1.6e-2) for the larger outputs."""
    torch.manual_seed(0)
    for queries, keys, causal in [(1, 24, False), (8, 8, True)]:
        q, k, v = (torch.randn(64, 8, n, 64) for n in (queries, keys, keys))
        truth = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                                 is_causal=causal)
        bf = [t.bfloat16() for t in (q, k, v)]
        torch.testing.assert_close(explicit_attention(q, k, v, is_causal=causal).double(), truth,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(explicit_attention(*bf, is_causal=causal).double(), truth,
                                   rtol=1.6e-2, atol=2e-2)


def _linear_kernels(fn) -> list[str]:
    """Names of the matrix-product operators ``fn`` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    names = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ("mm", "addmm", "_linear_pointwise"):
                names.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    with Spy():
        fn()
    return names


@pytest.mark.skipif(not fast_linear.ONEDNN, reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 24), (3, 7, 24), "transposed"])
def test_onednn_linear_matches_a_float64_truth_forward_and_backward(bias, shape, monkeypatch):
    """The CPU fp32 Linear runs its output and both gradients through oneDNN (three
    products, no BLAS call) and equals float64 F.linear to fp32 rounding (1e-5 relative)."""
    monkeypatch.setattr(fast_linear, "ONEDNN_MIN_MACS", 0)  # small shapes, same kernels
    torch.manual_seed(0)
    layer = Linear(24, 40, bias=bias)
    x = torch.randn(24, 6).t() if shape == "transposed" else torch.randn(*shape)  # strided input too
    x.requires_grad_(True)
    grad = torch.randn(*x.shape[:-1], 40)
    assert uses_onednn(x, layer.weight, layer.bias)
    assert _linear_kernels(lambda: layer(x).backward(grad)) == ["_linear_pointwise"] * 3

    params = [x] + list(layer.parameters())
    fast = torch.autograd.grad(layer(x), params, grad)
    truth_params = [p.detach().double().requires_grad_(True) for p in params]
    truth_out = torch.nn.functional.linear(*truth_params) if bias else \
        torch.nn.functional.linear(truth_params[0], truth_params[1])
    truth = torch.autograd.grad(truth_out, truth_params, grad.double())
    torch.testing.assert_close(layer(x).double(), truth_out.detach(), rtol=1e-5, atol=1e-5)
    for name, got, want in zip(["input", "weight", "bias"], fast, truth):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=name)
    # a broadcast gradient (strides of 0, as a sum's backward gives) reads as the dense one
    summed = torch.autograd.grad(layer(x).sum(), params)
    dense = torch.autograd.grad(layer(x), params, torch.ones_like(grad))
    for got, want in zip(summed, dense):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(not fast_linear.ONEDNN, reason="this torch build has no oneDNN linear")
def test_only_products_above_the_threshold_go_to_onednn():
    """Below ONEDNN_MIN_MACS multiply-adds oneDNN's per-call set-up costs more than it saves."""
    layer = Linear(128, 128)
    assert _linear_kernels(lambda: layer(torch.randn(255, 128))) == ["addmm"]
    assert _linear_kernels(lambda: layer(torch.randn(256, 128))) == ["_linear_pointwise"]


def test_linear_falls_back_to_torch_where_onednn_does_not_apply(monkeypatch):
    """bf16 autocast (its products already run in oneDNN, in bf16), float64, and vmap
    (``ModuleBatch``) take ``F.linear``: same dtype and values as torch's own layer."""
    monkeypatch.setattr(fast_linear, "ONEDNN_MIN_MACS", 0)
    torch.manual_seed(0)
    layer, x = Linear(8, 4), torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not uses_onednn(x, layer.weight, layer.bias)
        assert layer(x).dtype == torch.bfloat16
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    double = Linear(8, 4).double()
    assert _linear_kernels(lambda: double(x.double())) == ["addmm"]
    weights, biases = torch.randn(2, 4, 8), torch.randn(2, 4)
    batched = torch.func.vmap(lambda w, b, x: torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,)))(
        weights, biases, torch.stack([x, x]))
    for i in range(2):
        torch.testing.assert_close(batched[i], x @ weights[i].T + biases[i])


def test_onednn_linear_can_be_turned_off_by_the_environment():
    code = "from mow.models import linear; print(linear.ONEDNN)"
    env = {**os.environ, "MOW_ONEDNN_LINEAR": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_fused_adam_matches_the_loop_implementation():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 5))
    b = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 5))
    b.load_state_dict(a.state_dict())
    fused = adam(a.parameters(), lr=1e-2, eps=1e-5)
    loop = torch.optim.Adam(b.parameters(), lr=1e-2, eps=1e-5, foreach=False)
    assert fused.defaults["fused"]
    x, y = torch.randn(16, 12), torch.randn(16, 5)
    for _ in range(5):
        for model, opt in ((a, fused), (b, loop)):
            loss = (model(x) - y).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_autocast_world_model_loss_within_tolerance():
    torch.manual_seed(0)
    model = WorldModel(TINY, 3).train()
    obs = torch.randint(0, 256, (2, 4, 16, 16, 3), dtype=torch.uint8)
    act, rew, term = torch.randint(0, 3, (2, 4)), torch.randn(2, 4), torch.zeros(2, 4)
    torch.manual_seed(1)
    fp32, _ = model.compute_loss(obs, act, rew, term)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, _ = model.compute_loss(obs, act, rew, term)
    assert bf16.dtype == torch.float32  # losses are always reduced in fp32
    assert abs(bf16.item() - fp32.item()) <= 0.05 * abs(fp32.item())


def test_cpu_runs_retain_memory_unless_the_environment_says_no(monkeypatch):
    monkeypatch.setenv("MOW_RETAIN_CPU_MEMORY", "0")
    assert not retain_cpu_memory(torch.device("cpu"))
    monkeypatch.delenv("MOW_RETAIN_CPU_MEMORY")
    assert not retain_cpu_memory(torch.device("cuda"))   # GPU memory has its own caching allocator
    assert retain_cpu_memory(torch.device("cpu")) == tune_cpu_allocator()   # on by default (False without glibc)


def test_allocator_tuning_is_idempotent_and_keeps_values():
    torch.manual_seed(0)
    x = torch.randn(64, 1 << 16)  # 16 MiB: a block glibc would otherwise mmap
    before = (x @ x.T).sum()
    first = tune_cpu_allocator()
    assert tune_cpu_allocator() == first
    assert torch.equal((x @ x.T).sum(), before)


def test_flop_count_matches_hand_computed_values_including_cpu_fused_attention(monkeypatch):
    """The bench's FLOP counter on a Linear (2·B·in·out; torch's and this project's, whose
    oneDNN kernels torch's counter does not know, forward and backward) and on CPU fused
    attention, which torch's own counter misses on CPU: two products of 2·B·H·Tq·Tk·D
    forward (scores, weighted values); five backward (scores recomputed, then the gradients
    of the probabilities, values, queries and keys)."""
    linear = torch.nn.Linear(8, 4)
    assert count_flops(lambda: linear(torch.randn(3, 8))) == 2 * 3 * 8 * 4
    monkeypatch.setattr(fast_linear, "ONEDNN_MIN_MACS", 0)
    ours, x = Linear(8, 4), torch.randn(3, 5, 8, requires_grad=True)
    assert uses_onednn(x, ours.weight) == fast_linear.ONEDNN
    assert count_flops(lambda: ours(x)) == 2 * 15 * 8 * 4
    out = ours(x)
    assert count_flops(lambda: out.sum().backward()) == 2 * (2 * 15 * 8 * 4)
    q, k, v = (torch.randn(1, 2, t, 4, requires_grad=True) for t in (5, 7, 7))
    product = 2 * 1 * 2 * 5 * 7 * 4
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)) == 2 * product
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert count_flops(lambda: out.sum().backward()) == 5 * product


def test_operator_count_skips_views_and_counts_backward_operators():
    x = torch.randn(4, 3)
    assert count_ops(lambda: (x + 1).relu().view(-1).t()) == 2  # add, relu; view and t are views

    def in_a_phase():
        with phase("loss"):  # its profiler range markers launch nothing: not counted
            return (x + 1).relu()

    assert count_ops(in_a_phase) == 2
    w = torch.randn(3, 2, requires_grad=True)
    flops, ops = count_work(lambda: (x @ w).sum().backward())
    assert flops == 2 * (2 * 4 * 3 * 2)  # forward product and the weight's gradient
    assert ops == 4  # mm, sum; backward: ones_like (the seed gradient), mm (expand, t: views)
    assert count_ops(lambda: (x @ w).sum().backward()) == 5  # + add_: the gradient now accumulates


def test_settle_runs_rounds_until_enough_in_a_row_fault_under_the_limit():
    """`mow bench`'s warm-up: rounds until ``quiet`` in a row take fewer page faults than
    the limit, at most ``max_rounds``; the counter it reads counts first touches of fresh
    memory."""
    faults = iter([90_000, 999, 50_000, 10, 0, 70_000])
    assert settle(lambda: next(faults), limit_faults=1_000, quiet=2) == (5, True)  # a quiet round alone is not enough
    faults = iter([90_000, 999, 50_000])
    assert settle(lambda: next(faults), limit_faults=1_000, quiet=1) == (2, True)
    calls = []
    assert settle(lambda: calls.append(1) or 5_000, limit_faults=1_000, max_rounds=4) == (4, False)
    assert len(calls) == 4
    size = 32 * 2**20
    data = b"\x01" * size
    with mmap.mmap(-1, size) as fresh:  # pages no one has touched, whatever malloc keeps
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            fresh.madvise(mmap.MADV_NOHUGEPAGE)  # one fault per 4 KiB page, not per 2 MiB
        before = minor_page_faults()
        fresh.write(data)
        assert minor_page_faults() - before >= 0.9 * size / mmap.PAGESIZE


def test_bench_entry_point_writes_every_figure_with_interleaved_storm_and_mow_samples(tmp_path):
    """`mow bench` at the smoke scale (2 repeats, tiny imagination batch): the JSON holds each
    part of an env step's updates for STORM and MoW, their ratio from the same interleaved
    run, env throughput, memory, the scaling sweep over tasks and experts, and the figure is
    written next to it; with ``--profile``, each part's phases and top operators. Values are
    not judged."""
    (tmp_path / "params.yaml").write_text(PARAMS.read_text())
    out = tmp_path / "bench" / "bench.json"
    res = run_mow(["bench", "--scales", "smoke", "--repeats", "2", "--imag-batch", "8", "--sweep",
                   "--sweep-batch", "4x4", "--profile", "--out", str(out)], cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    smoke = result["scales"]["smoke"]["fp32"]
    for method in (smoke, smoke["mow"]):
        for part in ("wm_update", "imagine", "ac_update"):
            assert len(method["samples_s"][part]) == 2 and method[f"{part}_s"] > 0
        assert method["train_step_s"] == pytest.approx(method["wm_update_s"] + method["imagine_s"] + method["ac_update_s"])
        assert method["peak_rss_mib"] > 0 and method["imag_batch_measured"] == 8
        assert 1 <= method["settle_rounds"] <= MAX_SETTLE_ROUNDS and isinstance(method["settled"], bool)
        assert all(len(method["page_faults"][part]) == 2 and min(method["page_faults"][part]) >= 0
                   for part in ("wm_update", "imagine", "ac_update"))
    rounds = [m / s for s, m in zip(round_totals(smoke), round_totals(smoke["mow"]))]
    assert len(rounds) == 2 and smoke["mow_vs_storm_update_cost"] == pytest.approx(sum(rounds) / 2)
    assert smoke["mow_vs_storm_update_cost_rounds"] == pytest.approx(rounds, abs=1e-4)
    for method in (smoke, smoke["mow"]):
        for work in ("flops", "ops"):
            counts = method[work]
            assert all(counts[part] > 0 for part in ("wm_update", "imagine", "ac_update"))
            assert counts["train_step"] == pytest.approx(counts["wm_update"] + counts["imagine"] + counts["ac_update"])
    phases = {"wm_update": {"loss", "backward", "clip_grad_norm", "optimizer_step"},
              "imagine": {"context", "rollout", "reward_termination"},
              "ac_update": {"loss", "backward", "optimizer_step", "slow_critic"}}
    for method in (smoke, smoke["mow"]):
        for part, names in phases.items():
            profile = method["profile"][part]
            assert set(profile["phases_s"]) == names and max(profile["phases_s"].values()) <= profile["wall_s"]
            assert profile["top_ops"] and all(op["calls"] > 0 for op in profile["top_ops"])
        assert 0 < method["profile"]["wm_update"]["params_with_grad"] < method["parameters"]
        assert 0 < method["profile"]["ac_update"]["params_with_grad"] < method["parameters"]
    assert 1 <= smoke["mow"]["experts_in_use"] <= load_params(PARAMS, scale="smoke")["model"]["mow"]["num_experts"]
    for work in ("flops", "ops"):
        assert smoke[f"mow_vs_storm_{work}"] == smoke["mow"][work]["train_step"] / smoke[work]["train_step"]
    assert result["env"]["pong_x1_env_steps_per_s"] > 0
    sweep = result["scaling"]
    assert [p["tasks"] for p in sweep["by_tasks"]] == [2, 4, 8, 16, 26]
    assert [p["experts"] for p in sweep["by_experts"]] == [3, 6, 12] and sweep["batch"] == [4, 4]
    for point in sweep["by_tasks"] + sweep["by_experts"]:
        assert point["update_cost_vs_storm"] == pytest.approx(point["wm_update_s"] / sweep["storm_wm_update_s"])
        assert point["parameters_vs_k_storms"] == pytest.approx(
            point["parameters"] / (point["tasks"] * sweep["storm_parameters"]))
    by_tasks = [p["parameters"] for p in sweep["by_tasks"]]
    by_experts = [p["parameters"] for p in sweep["by_experts"]]
    assert by_tasks == sorted(by_tasks) and by_experts == sorted(by_experts) and len(set(by_experts)) == 3
    assert out.with_suffix(".png").stat().st_size > 0


def _has_cxx() -> bool:
    import shutil

    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not _has_cxx(), reason="torch.compile on CPU needs a C++ compiler (g++ or clang++)")
def test_compiled_world_model_loss_matches_eager(monkeypatch):
    """`train.compile` (Runtime.world_model_loss, what the trainers call): the compiled STORM loss and
    its gradients equal eager ones to fp32 rounding. Inductor's own RNG is replaced by eager's
    here (fallback_random), so both draw the same posterior samples."""
    import torch._inductor.config as inductor_config

    from mow.runtime import make_runtime

    monkeypatch.setattr(inductor_config, "fallback_random", True)
    runtime = make_runtime({"threads": 0, "deterministic": False, "device": "cpu", "precision": "fp32", "compile": True})
    torch.manual_seed(0)
    model = WorldModel(TINY, 3).train()
    obs = torch.randint(0, 256, (2, 4, 16, 16, 3), dtype=torch.uint8)
    act, rew, term = torch.randint(0, 3, (2, 4)), torch.randn(2, 4), (torch.rand(2, 4) < 0.3).float()
    results = []
    for loss_fn in (model.compute_loss, runtime.world_model_loss(model)):
        torch.manual_seed(1)
        model.zero_grad(set_to_none=True)
        loss, metrics = loss_fn(obs, act, rew, term)
        loss.backward()
        results.append((loss.detach(), {k: v.detach() for k, v in metrics.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (eager, eager_metrics, eager_grads), (compiled, compiled_metrics, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert compiled_metrics.keys() == eager_metrics.keys()
    for key in eager_metrics:
        torch.testing.assert_close(compiled_metrics[key], eager_metrics[key], rtol=1e-5, atol=1e-5, msg=key)
    assert compiled_grads.keys() == eager_grads.keys() and eager_grads
    for name, eager_grad in eager_grads.items():  # fused sums round differently: to the tensor's scale
        error = (compiled_grads[name] - eager_grad).abs().max().item()
        assert error <= 1e-5 * eager_grad.abs().max().item() + 1e-7, (name, error)


def test_compile_without_a_compiler_is_refused_naming_the_key(monkeypatch):
    import shutil

    from mow.config import ConfigError
    from mow.runtime import make_runtime

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"^train\.compile: true needs a C\+\+ compiler"):
        make_runtime({"threads": 0, "deterministic": False, "device": "cpu", "precision": "fp32", "compile": True})
    make_runtime({"threads": 0, "deterministic": False, "device": "cpu", "precision": "fp32", "compile": False})


def test_the_storm_trainer_updates_through_the_compiled_loss_only_when_asked(tmp_path):
    from mow.config import load_params
    from mow.runs import RunSpec
    from mow.train import Trainer

    spec = RunSpec("sanity", "storm", "full", "chase", 1, "sanity", "smoke")
    for flag in (False, True):
        params = load_params(PARAMS, scale="smoke", overrides=[f"train.compile={str(flag).lower()}"], suite="sanity")
        trainer = Trainer(spec, params, runs_root=tmp_path, track=False, progress=False, log=lambda *a: None)
        # torch.compile is lazy: nothing compiles until the first update
        compiled = getattr(trainer.wm_loss, "_torchdynamo_orig_callable", None)
        assert (compiled == trainer.wm.compute_loss) if flag else (trainer.wm_loss == trainer.wm.compute_loss)
        trainer.envs.close()


@pytest.mark.parametrize("batched", [False, True], ids=["looped", "module_batches"])
@pytest.mark.parametrize("order", ["cluster_major", "mixed"])
def test_mow_steps_read_device_values_only_through_one_read_back(monkeypatch, order, batched):
    """On a GPU each read of device values (``.tolist()``, ``nonzero``, ``unique``, ``.item()``,
    boolean indexing) makes the host wait for the device, and MoW on a GPU is bound by kernel
    launches that such waits stall. Its grouping reads task ids, clusters and routing once per
    pass through ``row_groups.read_back``. On the meta device every other such read raises, so
    running the world-model loss and its backward, an imagination, the actor-critic loss and
    the per-task metrics there shows each pass reads the device exactly once (``read_back`` is
    given the values a CPU twin of the model holds). Both paths: per-group loops (CPU) and
    ModuleBatches (CUDA)."""
    from test_mow_models import NUM_ACTIONS, TINY as MOW_TINY, make_model, random_batch

    from mow.models import actor_critic, module_batch, mow_world_model, row_groups
    from mow.models.actor_critic import AgentConfig, MultiTaskActorCritic
    from mow.train_mow import per_task_imagination_metrics
    import mow.train_mow as train_mow

    tasks = [0, 1, 2, 2, 3, 0] if order == "cluster_major" else [2, 0, 1, 2, 3, 0]
    model = make_model()  # clusters [0, 1, 1, 2]: cluster-major order keeps each run contiguous
    torch.manual_seed(0)
    ac = MultiTaskActorCritic(AgentConfig(hidden=16, layers=1, value_bins=15), MOW_TINY.state_dim, NUM_ACTIONS,
                              action_masks=torch.ones(4, NUM_ACTIONS, dtype=torch.bool), num_clusters=3)
    ac.set_clusters([0, 1, 1, 2])
    model.batch_modules = ac.batch_modules = batched
    host = {(len(tasks),): torch.tensor(tasks), (4,): model.cluster_of_task.clone(),
            tuple(model.routing().indices.shape): model.routing().indices.clone()}
    assert len(host) == 3  # the three values are told apart by shape
    reads = []

    def read_back(*tensors):
        assert all(t.device.type == "meta" for t in tensors)
        reads.append(len(tensors))
        return [host[tuple(t.shape)] for t in tensors]

    def to_device(tensors, device):
        return [t.to(device) for t in tensors]

    for module in (mow_world_model, actor_critic, train_mow):
        monkeypatch.setattr(module, "read_back", read_back)
    for module in (mow_world_model, row_groups, module_batch):
        monkeypatch.setattr(module, "to_device", to_device)
    model, ac = model.to("meta"), ac.to("meta")
    obs, actions, rewards, terminations, task_ids = (t.to("meta") for t in random_batch(tasks, 5))

    loss, _ = model.compute_loss(obs, actions, rewards, terminations, task_ids)
    loss.backward()
    assert reads == [3]
    imagination = model.imagine(lambda s: ac.act(s, task_ids), obs[:, :3], actions[:, :3], task_ids, 4)
    assert reads == [3, 3]
    ac_loss, _ = ac.compute_loss(imagination, task_ids)
    ac_loss.backward()
    ac.update_slow_critic()
    assert reads == [3, 3, 2]
    metrics = per_task_imagination_metrics(ac, imagination, task_ids, ["a", "b", "c", "d"])
    assert reads == [3, 3, 2, 1] and len(metrics) == 12
