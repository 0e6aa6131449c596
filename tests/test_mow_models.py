"""Tests of the MoW world-model components: router, losses, grouping, gradients, KV cache."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mow.models.multitask_losses import balance_loss, harmonious_loss
from mow.models.mow_world_model import MoWConfig, MoWWorldModel, mow_parameter_breakdown
from mow.models.router import TaskEmbedding, TaskRouter, annealed_temperature
from mow.models.row_groups import assemble, group_rows
from mow.models.vae import CategoricalVAE
from mow.models.world_model import Imagination, WorldModelConfig

torch.set_num_threads(2)

TINY_WORLD = WorldModelConfig(
    image_size=16, encoder_channels=(4, 8), stoch=4, classes=5, d_model=32, layers=1,
    heads=2, ffn=32, max_len=32, head_hidden=16, head_layers=1, reward_bins=17,
)  # fmt: skip
TINY = MoWConfig(
    world=TINY_WORLD, num_tasks=4, num_clusters=3, num_experts=8, top_k=2, task_embed_dim=8,
    router_hidden=16, temperature_start=3.0, temperature_anneal_updates=100,
    expert_d_model=16, expert_layers=2, expert_heads=2, expert_ffn=24,
    shared_d_model=24, shared_layers=2, shared_heads=2, shared_ffn=32,
)  # fmt: skip
NUM_ACTIONS = 3


def make_model(cfg: MoWConfig = TINY, seed: int = 0) -> MoWWorldModel:
    torch.manual_seed(seed)
    model = MoWWorldModel(cfg, NUM_ACTIONS)
    model.set_clusters([0, 1, 1, 2])
    return model


def random_batch(task_ids: list[int], steps: int, cfg: MoWConfig = TINY, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batch, size = len(task_ids), cfg.world.image_size
    obs = torch.randint(0, 256, (batch, steps, size, size, 3), dtype=torch.uint8, generator=g)
    actions = torch.randint(0, NUM_ACTIONS, (batch, steps), generator=g)
    rewards = torch.randn(batch, steps, generator=g)
    terminations = (torch.rand(batch, steps, generator=g) < 0.2).float()
    return obs, actions, rewards, terminations, torch.tensor(task_ids)


# ---------------------------------------------------------------------- router
def hand_router(logits: list[float], top_k: int = 2, start: float = 2.0) -> TaskRouter:
    router = TaskRouter(4, 8, len(logits), top_k, temperature_start=start, anneal_updates=10)
    with torch.no_grad():
        router.mlp[-1].weight.zero_()
        router.mlp[-1].bias.copy_(torch.tensor(logits))
    return router


def test_router_topk_weights_and_indices_at_temperature():
    router = hand_router([0.0, 2.0, 4.0, 0.0])  # temperature 2 -> logits/τ = [0, 1, 2, 0]
    out = router(torch.randn(3, 4))
    denominator = 2 + math.e + math.e**2
    expected_weights = torch.tensor([math.e**2, math.e]) / denominator
    for task in range(3):  # the output ignores the input: every task routes identically
        assert out.indices[task].tolist() == [2, 1]  # sorted descending
        torch.testing.assert_close(out.weights[task], expected_weights)
        torch.testing.assert_close(
            out.dense[task], torch.tensor([0.0, math.e, math.e**2, 0.0]) / denominator
        )
    # At temperature 1 the same logits give sharper weights, same selection.
    router.anneal(10)
    out = router(torch.randn(1, 4))
    denominator = 2 + math.e**2 + math.e**4
    torch.testing.assert_close(out.weights[0], torch.tensor([math.e**4, math.e**2]) / denominator)
    assert out.indices[0].tolist() == [2, 1]


def test_temperature_anneal_schedule():
    router = hand_router([0.0, 0.0], top_k=1, start=5.0)
    assert router.temperature(0) == 5.0
    assert router.temperature(5) == 3.0  # midway of the linear anneal 5 -> 1 over 10 updates
    assert router.temperature(10) == 1.0
    assert router.temperature(1000) == 1.0
    assert router.anneal(5) == 3.0 and router.current_temperature.item() == 3.0
    assert annealed_temperature(25, 3.0, 1.0, 100) == 2.5
    assert "current_temperature" in router.state_dict()  # resumes with the checkpoint


def test_task_embedding_unit_norm_and_same_task_same_experts():
    embedding = TaskEmbedding(5, 7)
    with torch.no_grad():
        embedding.table.weight.mul_(10.0)
    norms = embedding().norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(5))
    torch.testing.assert_close(embedding(torch.tensor([3, 3])).norm(dim=-1), torch.ones(2))

    model = make_model()
    routing = model.routing()
    task_ids = torch.tensor([1, 0, 1, 3, 1])
    routes = model._expert_routes(task_ids, routing, model.task_embedding(task_ids))
    chosen = {row: set() for row in range(5)}
    for route in routes:
        for row in route.rows.tolist():
            chosen[row].add(route.expert)
    assert chosen[0] == chosen[2] == chosen[4] == set(routing.indices[1].tolist())
    assert chosen[3] == set(routing.indices[3].tolist())


# ---------------------------------------------------------------------- losses
def test_balance_loss_hand_example_and_zero_when_balanced():
    # K = 2 tasks, N_e = 4, top_k = 2: target = 2 * 2 / 4 = 1 per expert.
    dense = torch.tensor([[0.6, 0.3, 0.0, 0.0], [0.5, 0.0, 0.2, 0.0]])
    # column sums [1.1, 0.3, 0.2, 0] -> (0.1)^2 + 0.7^2 + 0.8^2 + 1^2 = 2.14
    torch.testing.assert_close(balance_loss(dense, top_k=2), torch.tensor(2.14))
    balanced = torch.eye(3)  # K = 3, N_e = 3, top_k = 1: each expert used once
    assert balance_loss(balanced, top_k=1).item() == 0.0
    assert balance_loss(torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]]), 1).item() == 2.0


def test_harmonious_loss_value_and_gradient():
    losses = torch.tensor([2.0, 0.5])
    log_sigma = torch.tensor([0.0, math.log(2.0)], requires_grad=True)
    value = harmonious_loss(losses, log_sigma)
    # sigma = (1, 2): 2/1 + ln 2 + 0.5/2 + ln 3
    torch.testing.assert_close(value, torch.tensor(2.0 + math.log(2) + 0.25 + math.log(3)))
    value.backward()
    # d/dls = -L e^{-ls} + sigmoid(ls): (-2 + 0.5, -0.25 + 2/3)
    torch.testing.assert_close(log_sigma.grad, torch.tensor([-1.5, -0.25 + 2.0 / 3.0]))


# ---------------------------------------------------------------------- world model
def test_set_clusters_validation_names_bad_value():
    model = make_model()
    with pytest.raises(ValueError, match="cluster 3"):
        model.set_clusters([0, 1, 3, 2])
    with pytest.raises(ValueError, match="cluster -1"):
        model.set_clusters([0, -1, 1, 2])
    with pytest.raises(ValueError, match="4 entries"):
        model.set_clusters([0, 1, 2])
    model.set_clusters(torch.tensor([2, 2, 0, 1]))
    assert model.cluster_of_task.tolist() == [2, 2, 0, 1]


def grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(sum(g.abs().sum() for g in grads)) if grads else 0.0


def test_compute_loss_mixed_batch_gradients_reach_exactly_the_used_parts():
    cfg = dataclasses.replace(TINY, balance_coef=0.0)  # router must learn through W_k alone
    model = make_model(cfg)
    task_ids = [0, 1, 2, 1, 0, 2]  # tasks 0, 1, 2 -> clusters 0, 1; cluster 2 unused
    total, metrics = model.compute_loss(*random_batch(task_ids, steps=5, cfg=cfg))
    assert torch.isfinite(total)
    total.backward()

    routing = model.routing()
    used = set(routing.indices[:3].flatten().tolist())
    unused = set(range(cfg.num_experts)) - used
    assert unused, "test set-up: some expert must be unselected"
    for j in used:
        assert grad_norm(model.experts[j].mixer) > 0 and grad_norm(model.experts[j].transformer) > 0
    for j in unused:
        assert all(p.grad is None for p in model.experts[j].parameters())
    for c in (0, 1):
        assert grad_norm(model.vaes[c]) > 0 and grad_norm(model.heads[c]) > 0
    assert all(p.grad is None for p in model.vaes[2].parameters())
    assert all(p.grad is None for p in model.heads[2].parameters())
    assert grad_norm(model.shared) > 0 and grad_norm(model.shared_input) > 0
    assert grad_norm(model.task_head) > 0 and grad_norm(model.task_embedding) > 0
    assert grad_norm(model.router) > 0
    sigma_grad = model.log_sigma.grad
    assert (sigma_grad[:3] != 0).all() and sigma_grad[3] == 0  # task 3 absent

    for task in range(3):
        for term in ("rec", "reward", "termination", "task", "dyn", "rep", "total"):
            assert torch.isfinite(metrics[f"wm/{term}/task{task}"])
    assert "wm/rec/task3" not in metrics
    assert metrics["wm/sigma/task3"].item() == pytest.approx(1.0)
    # Total = harmonious over present tasks at sigma = 1: Σ (L_k + ln 2).
    expected = sum(metrics[f"wm/total/task{k}"] for k in range(3)) + 3 * math.log(2)
    torch.testing.assert_close(metrics["wm/total"], expected)
    # Per-task total is the weighted sum of its terms.
    m = {t: metrics[f"wm/{t}/task1"] for t in ("rec", "reward", "termination", "task", "dyn", "rep")}
    torch.testing.assert_close(
        metrics["wm/total/task1"],
        m["rec"] + m["reward"] + m["termination"] + m["task"] + 0.5 * m["dyn"] + 0.1 * m["rep"],
    )


def test_balance_loss_enters_total():
    model = make_model()
    total, metrics = model.compute_loss(*random_batch([3, 3], steps=3))
    expected = metrics["wm/harmonious"] + 0.1 * balance_loss(model.routing().dense, TINY.top_k)
    torch.testing.assert_close(total.detach(), expected.detach())


ABLATIONS = {
    "full": TINY,
    "no_experts": dataclasses.replace(TINY, use_experts=False),
    "no_shared": dataclasses.replace(TINY, use_shared=False),
}


@pytest.mark.parametrize("variant", list(ABLATIONS))
def test_kv_cache_matches_full_forward(variant):
    model = make_model(ABLATIONS[variant]).eval()
    task_ids = torch.tensor([2, 0, 3, 2])
    g = torch.Generator().manual_seed(1)
    steps = 7
    z = torch.randn(4, steps, TINY.world.latent_dim, generator=g)
    actions = torch.randint(0, NUM_ACTIONS, (4, steps), generator=g)
    with torch.no_grad():
        full = model.hidden_states(z, actions, task_ids)
        cache = model.new_cache(task_ids)
        first = model.hidden_states(z[:, :3], actions[:, :3], task_ids, cache)
        stepped = [first] + [
            model.hidden_states(z[:, t : t + 1], actions[:, t : t + 1], task_ids, cache)
            for t in range(3, steps)
        ]
    if model.shared is not None:
        assert cache.shared.length == steps
    used = set(model.routing().indices[task_ids].flatten().tolist()) if model.experts is not None else set()
    assert set(cache.experts) == used
    torch.testing.assert_close(torch.cat(stepped, dim=1), full, atol=1e-4, rtol=0)


def test_ablation_switches_remove_their_blocks_and_still_train():
    no_experts = make_model(ABLATIONS["no_experts"])
    assert no_experts.experts is None and no_experts.input_mixer is not None
    no_shared = make_model(ABLATIONS["no_shared"])
    assert no_shared.shared is None and no_shared.experts is not None
    for model in (no_experts, no_shared):
        loss, metrics = model.compute_loss(*random_batch([0, 1, 2, 3], steps=5))
        loss.backward()
        assert torch.isfinite(loss)
        trained = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        assert any(n.startswith("vaes.") for n in trained) and any(n.startswith("heads.") for n in trained)
    assert float(no_experts.compute_loss(*random_batch([0, 1], steps=3))[1]["wm/balance"]) == 0.0
    assert mow_parameter_breakdown(ABLATIONS["no_experts"], NUM_ACTIONS)["experts"] < mow_parameter_breakdown(
        TINY, NUM_ACTIONS)["experts"]
    with pytest.raises(ValueError, match="cannot both be false"):
        dataclasses.replace(TINY, use_experts=False, use_shared=False)


def test_imagine_and_act_state_shapes():
    model = make_model()
    obs, actions, _, _, task_ids = random_batch([0, 3, 1, 1, 2], steps=4)
    calls = []

    def policy(state):
        calls.append(state.shape)
        return torch.zeros(state.shape[0], dtype=torch.long)

    horizon = 6
    imagination = model.imagine(policy, obs, actions, task_ids, horizon)
    assert isinstance(imagination, Imagination)
    assert imagination.states.shape == (5, horizon + 1, TINY.state_dim)
    assert imagination.actions.shape == imagination.rewards.shape == (5, horizon)
    assert imagination.terminations.shape == (5, horizon)
    assert torch.isfinite(imagination.states).all() and torch.isfinite(imagination.rewards).all()
    assert calls == [(5, TINY.state_dim)] * horizon
    assert model.training  # eval mode restored
    state = model.act_state(obs, actions, task_ids)
    assert state.shape == (5, TINY.state_dim)


def test_parameter_breakdown_sums_to_model():
    breakdown = mow_parameter_breakdown(TINY, NUM_ACTIONS)
    model = make_model()
    assert sum(breakdown.values()) == sum(p.numel() for p in model.parameters())
    assert breakdown["experts"] == TINY.num_experts * sum(
        p.numel() for p in model.experts[0].parameters()
    )
    assert breakdown["vaes"] == TINY.num_clusters * sum(p.numel() for p in model.vaes[0].parameters())
    assert breakdown["task_embedding"] == TINY.num_tasks * TINY.task_embed_dim
    full = mow_parameter_breakdown()  # paper-size defaults, meta device: instant
    assert 200e6 < sum(full.values()) < 255e6


def test_grouped_batch_equals_each_sequence_alone():
    """Grouping by expert and re-assembling keeps every sequence in its own row."""
    model = make_model().eval()
    task_ids = torch.tensor([3, 0, 2, 0, 1])
    g = torch.Generator().manual_seed(2)
    z = torch.randn(5, 4, TINY.world.latent_dim, generator=g)
    actions = torch.randint(0, NUM_ACTIONS, (5, 4), generator=g)
    with torch.no_grad():
        batched = model.hidden_states(z, actions, task_ids)
        for row in range(5):
            one = slice(row, row + 1)
            alone = model.hidden_states(z[one], actions[one], task_ids[one])
            torch.testing.assert_close(batched[one], alone, atol=1e-5, rtol=0)


def test_row_groups_are_slices_for_runs_and_indices_otherwise():
    runs = group_rows(torch.tensor([2, 2, 0, 1, 1, 1]))
    assert [(g.key, g.rows, g.size) for g in runs] == [(2, slice(0, 2), 2), (0, slice(2, 3), 1), (1, slice(3, 6), 3)]
    mixed = group_rows(torch.tensor([1, 0, 1, 2]))  # key 1 in two runs: index tensors, ascending keys
    assert [(g.key, g.rows.tolist()) for g in mixed] == [(0, [1]), (1, [0, 2]), (2, [3])]
    for groups, size in ((runs, 6), (mixed, 4)):
        values = torch.arange(float(size)) * 10
        torch.testing.assert_close(assemble([values[g.rows] + 1 for g in groups], groups), values + 1)


def test_loss_does_not_depend_on_row_order(monkeypatch):
    """A batch in cluster order (slices, the trainer's order) and the same rows shuffled (gathers)
    give the same per-task loss terms and gradients. Sampling is made deterministic (argmax) and
    dropout is off, so both orders compute the same function."""

    def argmax_sample(logits):
        logits = logits.float()
        probs = logits.softmax(-1)
        one_hot = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(probs.dtype)
        return (one_hot + probs - probs.detach()).flatten(-2)

    monkeypatch.setattr(CategoricalVAE, "sample", staticmethod(argmax_sample))
    cfg = dataclasses.replace(TINY, expert_dropout=0.0, shared_dropout=0.0)
    ordered_tasks = [0, 0, 1, 2, 1, 2, 3]  # clusters [0, 1, 1, 2]: runs 0 | 1 1 1 1 | 2
    model = make_model(cfg)
    assert all(isinstance(g.rows, slice) for g in model._cluster_groups(torch.tensor(ordered_tasks)))
    batch = random_batch(ordered_tasks, 5, cfg)
    shuffle = torch.tensor([4, 0, 6, 2, 5, 1, 3])
    results = []
    for rows in (torch.arange(7), shuffle):
        model.zero_grad()
        loss, metrics = model.compute_loss(*(t[rows] for t in batch))
        loss.backward()
        results.append((metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (m_ordered, g_ordered), (m_shuffled, g_shuffled) = results
    assert not all(isinstance(g.rows, slice) for g in model._cluster_groups(batch[-1][shuffle]))
    assert m_ordered.keys() == m_shuffled.keys()
    for name in m_ordered:
        torch.testing.assert_close(m_ordered[name], m_shuffled[name], rtol=1e-4, atol=1e-5, msg=name)
    assert g_ordered.keys() == g_shuffled.keys()
    for name in g_ordered:
        torch.testing.assert_close(g_ordered[name], g_shuffled[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("tasks", [[3, 0, 2, 0, 1], [0, 0, 1, 2, 3]])  # gathered rows, then runs (slices)
def test_prior_of_each_row_is_its_cluster_head_mixed_once_for_all(monkeypatch, tasks):
    """The imagination's prior: per-cluster linear maps, one uniform mix over all rows; each
    row's logits equal its own cluster head's full forward."""
    model = make_model().eval()
    task_ids = torch.tensor(tasks)
    hidden = torch.randn(5, TINY.shared_d_model, generator=torch.Generator().manual_seed(3))
    embedding = model.task_embedding(task_ids)
    sampled = []

    def capture(logits):
        sampled.append(logits)
        return torch.zeros(5, TINY.world.latent_dim)

    monkeypatch.setattr(CategoricalVAE, "sample", staticmethod(capture))
    with torch.no_grad():
        model._prior_state(hidden, embedding, model._cluster_groups(task_ids))
        clusters = model.cluster_of_task[task_ids].tolist()
        expected = torch.cat([model.heads[c].prior(hidden[r:r + 1], embedding[r:r + 1]) for r, c in enumerate(clusters)])
    torch.testing.assert_close(sampled[0], expected)


# ---------------------------------------------------------------------- experts as one batch
@pytest.mark.parametrize("tasks", [[0, 1, 2, 2, 3, 0], [2, 0, 1, 3, 3, 1]])
def test_batched_experts_match_the_per_expert_loop_with_and_without_the_kv_cache(tasks):
    """``run_experts`` over a ``ModuleBatch`` (the GPU inference path) runs the same experts on the same rows: equal
    outputs for a context pass, then single steps continuing the KV cache (TINY has 2
    layers per expert), and for a pass without a cache; padding rows change nothing."""
    model = make_model().eval()
    _, actions, _, _, task_ids = random_batch(tasks, 8)
    z = torch.randn(len(tasks), 8, TINY.world.latent_dim)
    outputs = {}
    with torch.no_grad():
        embeddings = model.task_embedding()
        embedding = embeddings[task_ids]
        for batched in (False, True):
            model.batch_modules = batched
            plan = model._plan(task_ids, model.router(embeddings), embedding, model._batched(task_ids.device))
            assert (plan.expert_batch is not None) == (plan.cluster_batch is not None) == batched
            cache = model._new_cache(plan.routes, plan.expert_batch)
            seq = [model._hidden(z[:, :5], actions[:, :5], embedding, plan.routes, cache, plan.expert_batch)]
            for t in range(5, 8):
                seq.append(model._hidden(z[:, t:t + 1], actions[:, t:t + 1], embedding, plan.routes, cache, plan.expert_batch))
            outputs[batched] = torch.cat(seq, dim=1), model._hidden(z, actions, embedding, plan.routes, None, plan.expert_batch)
    assert len({r.slots.size for r in plan.routes}) > 1  # experts with different row counts: padding used
    for cached, uncached in zip(outputs[True], outputs[False]):
        torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[True][0], outputs[True][1], rtol=1e-5, atol=1e-5)


def test_module_batches_by_default_on_cuda_only_and_in_imagination_for_every_step(monkeypatch):
    from mow.models import mow_world_model

    model = make_model().eval()
    assert model._batched(torch.device("cuda")) and not model._batched(torch.device("cpu"))
    model.batch_modules = True
    assert model._batched(torch.device("cpu"))
    calls, run = [], mow_world_model.run_experts
    monkeypatch.setattr(mow_world_model, "run_experts", lambda *args: calls.append(1) or run(*args))
    obs, actions, _, _, task_ids = random_batch([0, 1, 2, 3], 4)
    imag = model.imagine(lambda s: torch.zeros(len(s), dtype=torch.long), obs, actions, task_ids, 3)
    assert len(calls) == 4 and torch.isfinite(imag.states).all()  # the context pass and 3 steps


@pytest.mark.parametrize("tasks", [[0, 1, 2, 2, 3, 0], [2, 0, 1, 3, 3, 1]])
def test_training_loss_and_gradients_equal_with_batched_cluster_heads(monkeypatch, tasks):
    """The world-model update runs the cluster heads as one ``ModuleBatch`` on a GPU:
    the same loss, metrics and gradients as the per-cluster loop (experts stay looped in
    training: ``run_experts`` is not called)."""
    from mow.models import mow_world_model

    monkeypatch.setattr(mow_world_model, "run_experts", lambda *args: pytest.fail("experts batched in training"))
    results = {}
    for batched in (False, True):
        model = make_model()
        model.batch_modules = batched
        torch.manual_seed(1)  # the same VAE samples and dropout masks
        loss, metrics = model.compute_loss(*random_batch(tasks, 5))
        loss.backward()
        results[batched] = loss, metrics, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    (loss0, metrics0, grads0), (loss1, metrics1, grads1) = results[False], results[True]
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-5)
    assert metrics1.keys() == metrics0.keys() and grads1.keys() == grads0.keys()
    for name in metrics0:
        torch.testing.assert_close(metrics1[name], metrics0[name], rtol=1e-5, atol=1e-5)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6)
    assert any(name.startswith("heads.") for name in grads0)


@pytest.mark.parametrize("tasks", [[0, 1, 2, 2, 3, 0], [2, 0, 1, 3, 3, 1]])
def test_batched_cluster_heads_match_the_per_cluster_loop(tasks):
    """Prior (uniform mix included), reward and termination heads of every cluster in one
    ``ModuleBatch`` call give each row its own cluster's outputs, in batch order, also when
    a cluster's rows are not contiguous."""
    from mow.numerics import unimix_logits

    model = make_model().eval()
    task_ids = torch.tensor(tasks)
    hidden = torch.randn(len(tasks), 3, TINY.shared_d_model)
    with torch.no_grad():
        embeddings = model.task_embedding()
        embedding = embeddings[task_ids]
        plan = model._plan(task_ids, model.router(embeddings), embedding, batched=True)
        assert len({g.size for g in plan.clusters}) > 1
        for head in ("prior", "reward", "termination"):
            batched = model._per_cluster(head, hidden, embedding, plan.clusters, plan.cluster_batch)
            looped = model._per_cluster(head, hidden, embedding, plan.clusters)
            for row, task in enumerate(tasks):  # and each row against its cluster's head alone
                alone = getattr(model.heads[int(model.cluster_of_task[task])], head)(hidden[row], embedding[row])
                torch.testing.assert_close(batched[row], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)
        raw = torch.stack([model.heads[int(model.cluster_of_task[t])].prior.raw_logits(hidden[r, 0], embedding[r])
                           for r, t in enumerate(tasks)])
        torch.testing.assert_close(model._per_cluster("prior", hidden[:, 0], embedding, plan.clusters, plan.cluster_batch),
                                   unimix_logits(raw, TINY.world.unimix), rtol=1e-5, atol=1e-5)
