"""MoW's agent-side pieces with hand-computed values: the masked shared actor, cluster
critics, per-task return scales, batch mixing, warm-up weight copies, variants, params."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mow.config import ConfigError, load_params
from mow.models.actor_critic import AgentConfig, MultiTaskActorCritic
from mow.models.world_model import Imagination
from mow.paramcount import PAPER_MOW_MIB, mib_fp32, params_table
from mow.train_mow import cluster_major, mixed_task_rows, per_task_imagination_metrics
from mow.warmup import expand_warmup_weights, random_legal_actions, warmup_model

from conftest import PARAMS

SMALL = AgentConfig(hidden=16, layers=1, value_bins=15)


def _agent(masks, clusters=2):
    torch.manual_seed(0)
    ac = MultiTaskActorCritic(SMALL, state_dim=6, num_actions=masks.shape[1], action_masks=masks,
                              num_clusters=clusters)
    return ac


def test_shared_actor_never_samples_an_illegal_action_and_gives_it_zero_probability():
    masks = torch.zeros(3, 18, dtype=torch.bool)
    masks[0, [0, 1]] = True
    masks[1, [2, 5, 17]] = True
    masks[2, :] = True
    ac = _agent(masks)
    task_ids = torch.tensor([0, 1, 2]).repeat(2000)
    states = torch.randn(len(task_ids), 6) * 5
    actions = ac.act(states, task_ids)
    assert masks[task_ids, actions].all()
    assert set(actions[task_ids == 1].tolist()) == {2, 5, 17}
    probs = ac.policy(states[:3], task_ids[:3]).probs
    assert torch.all(probs[~masks] == 0) and torch.allclose(probs.sum(-1), torch.ones(3))
    greedy = ac.act(states, task_ids, greedy=True)
    assert masks[task_ids, greedy].all()


def test_random_warmup_actions_stay_legal():
    masks = np.zeros((2, 18), bool)
    masks[0, [3, 4]] = True
    masks[1, [0]] = True
    rng = np.random.default_rng(0)
    acts = np.concatenate([random_legal_actions(rng, masks, np.array([0, 1, 0])) for _ in range(200)])
    assert set(acts[0::3]) | set(acts[2::3]) == {3, 4} and set(acts[1::3]) == {0}


def test_return_scale_is_per_task_and_critics_per_cluster():
    masks = torch.ones(2, 4, dtype=torch.bool)
    ac = _agent(masks, clusters=2)
    ac.set_clusters([0, 1])
    batch, horizon = 40, 4
    task_ids = torch.tensor([0, 1]).repeat(batch // 2)
    # task 0 earns 100 per step, task 1 nothing: one global range would shrink task 1's advantages
    rewards = torch.where(task_ids[:, None] == 0, torch.full((batch, horizon), 100.0), torch.zeros(batch, horizon))
    rewards = rewards * torch.linspace(0, 1, batch)[:, None]
    imag = Imagination(torch.randn(batch, horizon + 1, 6), torch.zeros(batch, horizon, dtype=torch.long),
                       rewards, torch.zeros(batch, horizon))
    loss, metrics = ac.compute_loss(imag, task_ids)
    loss.backward()
    # EMA from 0 with decay 0.99: scale = max(1, 0.01 * (P95 - P05)) of each task's own returns
    from mow.numerics import lambda_return  # noqa: F401 - the returns themselves are checked below
    s0, s1 = float(ac.normalizers[0].scale()), float(ac.normalizers[1].scale())
    assert s1 == 1.0 and s0 > 1.0
    high0 = float(ac.normalizers[0].high) / 0.01
    low0 = float(ac.normalizers[0].low) / 0.01
    assert s0 == pytest.approx(max(1.0, 0.01 * (high0 - low0)))
    # both cluster critics got gradients; a task in cluster 1 only trains critic 1
    assert all(p.grad is not None for p in ac.critics.parameters())
    ac.zero_grad()
    only1 = torch.ones(batch, dtype=torch.long)
    ac.compute_loss(imag, only1)[0].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in ac.critics[0].parameters())
    assert any(p.grad.abs().sum() > 0 for p in ac.critics[1].parameters())
    assert all(not p.requires_grad for p in ac.slow_critics.parameters())


def test_per_task_imagination_metrics_separate_a_collapsed_task_from_a_learning_one():
    masks = torch.zeros(2, 4, dtype=torch.bool)
    masks[0, :2] = True
    masks[1, :3] = True
    ac = _agent(masks)
    with torch.no_grad():  # actor: huge logit on action 0 when state[0] > 0, else uniform
        ac.actor[-1].weight.zero_()
        ac.actor[-1].bias.zero_()
        ac.actor[0][0].weight.zero_()
        ac.actor[0][0].weight[0, 0] = 1.0
        ac.actor[-1].weight[0, 0] = 100.0
    task_ids = torch.tensor([0, 1, 0, 1])
    states = torch.zeros(4, 3, 6)
    states[task_ids == 0, :, 0] = 1.0  # task 0 collapsed onto action 0, task 1 uniform over 3
    rewards = torch.tensor([[-1.0, -1.0], [1.0, 0.0], [-1.0, -1.0], [0.0, 1.0]])
    imag = Imagination(states, torch.zeros(4, 2, dtype=torch.long), rewards, torch.zeros(4, 2))
    metrics = per_task_imagination_metrics(ac, imag, task_ids, ["side", "color"])
    assert float(metrics["ac/entropy/side"]) < 1e-3
    assert float(metrics["ac/entropy/color"]) == pytest.approx(np.log(3), abs=1e-4)
    assert float(metrics["imag/reward_mean/side"]) == -1.0 and float(metrics["imag/reward_mean/color"]) == 0.5
    assert float(metrics["ac/scale/side"]) == float(metrics["ac/scale/color"]) == 1.0
    assert set(metrics) == {f"{m}/{t}" for m in ("ac/entropy", "imag/reward_mean", "ac/scale") for t in ("side", "color")}


@pytest.mark.parametrize("num_tasks,size", [(26, 16), (4, 8), (3, 64)])
def test_batches_cycle_through_the_tasks_and_ranks_split_the_global_batch(num_tasks, size):
    counts = np.zeros(num_tasks, int)
    for update in range(num_tasks):
        rows = mixed_task_rows(update, size, num_tasks)
        counts += np.bincount(rows.numpy(), minlength=num_tasks)
        split = torch.cat([mixed_task_rows(update, size, num_tasks, rank, 2) for rank in range(2)])
        assert torch.equal(split, rows)
    assert (counts == counts[0]).all()  # K consecutive updates: every task the same number of rows


def test_cluster_major_orders_rows_by_cluster_then_task_and_keeps_them():
    tasks = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    ordered = cluster_major(tasks, torch.tensor([1, 0, 1, 2]))  # clusters of tasks 0..3
    assert ordered.tolist() == [1, 1, 0, 0, 2, 2, 3]
    rows = cluster_major(mixed_task_rows(3, 64, 26), torch.arange(26) % 15)
    assert torch.equal(torch.sort(rows).values, torch.sort(mixed_task_rows(3, 64, 26)).values)


def test_actor_critic_loss_does_not_depend_on_row_order_or_batched_critics():
    """Rows in cluster order (slices) and shuffled (gathers), critics per cluster or as one
    ``ModuleBatch`` (the GPU path): same loss, critic gradients and per-task scales."""
    masks = torch.ones(4, 5, dtype=torch.bool)
    g = torch.Generator().manual_seed(1)
    task_ids = torch.tensor([0, 0, 2, 2, 1, 1, 3, 3, 3])  # clusters [0, 1, 0, 1] after set_clusters below
    task_ids = cluster_major(task_ids, torch.tensor([0, 1, 0, 1]))
    batch, horizon = len(task_ids), 4
    imag = Imagination(torch.randn(batch, horizon + 1, 6, generator=g),
                       torch.randint(0, 5, (batch, horizon), generator=g),
                       torch.randn(batch, horizon, generator=g) * 50, torch.zeros(batch, horizon))
    shuffle = torch.randperm(batch, generator=g)
    results = []
    for batched in (False, True):
        for rows in (torch.arange(batch), shuffle):
            ac = _agent(masks, clusters=2)
            ac.set_clusters([0, 1, 0, 1])
            ac.batch_modules = batched
            part = Imagination(*(t[rows] for t in (imag.states, imag.actions, imag.rewards, imag.terminations)))
            loss, _ = ac.compute_loss(part, task_ids[rows])
            loss.backward()
            results.append((loss, [float(n.scale()) for n in ac.normalizers], [p.grad for p in ac.critics.parameters()]))
    for loss, scales, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        assert scales == pytest.approx(results[0][1])
        for grad, first in zip(grads, results[0][2]):
            torch.testing.assert_close(grad, first, rtol=1e-4, atol=1e-6)
    assert len(set(results[0][1])) > 1  # the tasks' scales differ: a mix-up would show


def test_warmup_weights_are_copied_into_every_cluster():
    params = load_params(PARAMS, scale="smoke")
    torch.manual_seed(0)
    warm = warmup_model(params, 4, 18)
    from mow.models.mow_world_model import MoWWorldModel

    model = MoWWorldModel(params.mow_config(4), 18)
    assert model.cfg.num_clusters == 2
    model.load_state_dict(expand_warmup_weights(warm.state_dict(), model))
    for c in range(2):
        for (name, a), (_, b) in zip(model.vaes[c].state_dict().items(), warm.vaes[0].state_dict().items()):
            assert torch.equal(a, b), name
        for (name, a), (_, b) in zip(model.heads[c].state_dict().items(), warm.heads[0].state_dict().items()):
            assert torch.equal(a, b), name
    assert torch.equal(model.shared_input.weight, warm.shared_input.weight)


def test_variants_resolve_to_their_switches():
    assert load_params(PARAMS, variant="no_experts")["model"]["mow"]["use_experts"] is False
    vanilla = load_params(PARAMS, variant="vanilla_multitask")["model"]["mow"]
    assert vanilla["num_clusters"] == 1 and vanilla["use_experts"] is False
    for scale in ("paper", "smoke"):  # "one STORM + e_k": STORM's Transformer depth and width
        resolved = load_params(PARAMS, variant="vanilla_multitask", scale=scale)["model"]
        storm, shared = resolved["world_model"], resolved["mow"]
        assert (shared["shared_layers"], shared["shared_d_model"]) == (storm["layers"], storm["d_model"]), scale
    assert load_params(PARAMS, variant="experts_6", scale="paper")["model"]["mow"]["num_experts"] == 6
    with pytest.raises(ConfigError, match="variant: unknown variant 'nope'"):
        load_params(PARAMS, variant="nope")
    with pytest.raises(ConfigError, match="model.mow.top_k: 5 exceeds model.mow.num_experts 3"):
        load_params(PARAMS, overrides=["model.mow.top_k=5"])


def test_mow_params_table_matches_the_paper_size_within_5_percent():
    table = params_table(load_params(PARAMS, scale="paper"))
    totals = table.totals()
    mow = mib_fp32(totals["MoW (26 games)"])
    assert abs(mow - PAPER_MOW_MIB) / PAPER_MOW_MIB < 0.05
    assert abs(mib_fp32(totals["STORM x26 (minimal)"]) - 1977.5) / 1977.5 < 0.01
    assert "MoW (26 games)" in table.render().splitlines()[0]


def test_each_row_is_scaled_by_its_own_tasks_normalizer(monkeypatch):
    """The per-row return scale handed to the loss is the scale of that row's task after
    its update, rows in any order (tasks with returns of very different spreads)."""
    from mow.models import actor_critic

    masks = torch.ones(3, 4, dtype=torch.bool)
    ac = _agent(masks, clusters=2)
    task_ids = torch.tensor([2, 0, 1, 2, 0, 2])
    returns = torch.arange(6 * 3, dtype=torch.float32).view(6, 3) * (1 + 50 * (task_ids == 2)[:, None])
    seen = {}

    def capture(cfg, two_hot, policy, logits, slow_logits, imag, return_scale):
        seen["scale"] = return_scale(returns)
        return torch.zeros(()), {}

    monkeypatch.setattr(actor_critic, "imagination_loss", capture)
    imag = Imagination(torch.randn(6, 4, 6), torch.zeros(6, 3, dtype=torch.long), torch.zeros(6, 3), torch.zeros(6, 3))
    ac.compute_loss(imag, task_ids)
    expected = torch.stack([ac.normalizers[int(t)].scale() for t in task_ids])[:, None]
    torch.testing.assert_close(seen["scale"], expected)
    assert len(set(expected.flatten().tolist())) == 2  # task 2's spread lifts its scale above the floor of 1
