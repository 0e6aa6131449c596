"""Gradient-based task clustering (SPEC §1.8): hand-computed values and planted groups."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from mow.clustering import (
    ClusterAssignment,
    cluster_tasks,
    cosine_similarity_matrix,
    layer_averaged_gradient,
    random_clusters_like,
    read_clusters_json,
    task_gradient_signatures,
    write_clusters_json,
)


def test_layer_average_is_signed_mean_per_tensor_in_sorted_name_order():
    grads = {
        "z.weight": torch.tensor([[1.0, -3.0], [2.0, 4.0]]),  # mean 1.0
        "a.bias": torch.tensor([-1.0, -2.0, 6.0]),            # mean 1.0 (signs kept, not |g|)
        "m.weight": torch.tensor([0.5, -1.5]),                # mean -0.5
        "unused": None,                                       # no gradient -> 0
    }
    np.testing.assert_allclose(layer_averaged_gradient(grads), [1.0, -0.5, 0.0, 1.0])


def test_cosine_matrix_by_hand_and_zero_vector_gives_no_nan():
    sig = np.array([[3.0, 4.0], [4.0, -3.0], [0.0, 0.0], [-6.0, -8.0]])
    sim = cosine_similarity_matrix(sig)
    expected = np.array([
        [1.0, 0.0, 0.0, -1.0],
        [0.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [-1.0, 0.0, 0.0, 1.0],
    ])
    assert not np.isnan(sim).any()
    np.testing.assert_allclose(sim, expected, atol=1e-12)


def test_signatures_by_hand_average_over_batches_and_leave_grad_untouched():
    w = torch.zeros(2, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    other = torch.zeros(3, requires_grad=True)  # not in params: must not appear in L

    def loss_fn(batch):  # d/dw = batch, d/db = 3, d/dother = 0
        return (w * batch).sum() + 3 * b.sum() + 0 * other.sum()

    task_batches = [
        [torch.tensor([1.0, 3.0]), torch.tensor([3.0, 5.0])],  # mean grad w = [2, 4] -> 3
        [torch.tensor([-2.0, 0.0])],                           # mean grad w -> -1
    ]
    sig = task_gradient_signatures(loss_fn, task_batches, {"w": w, "b": b})
    # Sorted names: "b", "w".
    np.testing.assert_allclose(sig, [[3.0, 3.0], [3.0, -1.0]])
    assert w.grad is None and b.grad is None
    # named_parameters()-style iterables work too.
    sig2 = task_gradient_signatures(loss_fn, task_batches, [("w", w), ("b", b)])
    np.testing.assert_allclose(sig2, sig)
    with pytest.raises(ValueError, match="task 1 has no batches"):
        task_gradient_signatures(loss_fn, [[torch.ones(2)], []], {"w": w})


def _planted(seed: int = 0):
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(3, 40))
    # Interleaved planted groups so that recovery is not an artefact of task order.
    truth = np.array([0, 1, 2, 1, 0, 2, 2, 1, 0])
    sig = dirs[truth] + 0.05 * rng.normal(size=(9, 40))
    return sig, truth


def test_clustering_recovers_planted_groups_canonically_and_deterministically():
    sig, truth = _planted()
    sim = cosine_similarity_matrix(sig)
    labels = cluster_tasks(sim, 3, seed=0)
    # Already first-appearance ordered, so the planted labels must match exactly.
    np.testing.assert_array_equal(labels, truth)
    np.testing.assert_array_equal(cluster_tasks(sim, 3, seed=0), labels)
    np.testing.assert_array_equal(cluster_tasks(sim, 3, seed=7), labels)
    # Relabelled / permuted tasks give the same partition, canonically numbered.
    perm = np.array([2, 0, 1, 8, 7, 6, 3, 4, 5])
    permuted = cluster_tasks(sim[np.ix_(perm, perm)], 3, seed=0)
    assert permuted[0] == 0
    for i in range(9):
        for j in range(9):
            assert (permuted[i] == permuted[j]) == (truth[perm[i]] == truth[perm[j]])


def test_trivial_cluster_counts_and_invalid_inputs():
    sim = cosine_similarity_matrix(_planted()[0])
    np.testing.assert_array_equal(cluster_tasks(sim, 1), np.zeros(9))
    np.testing.assert_array_equal(cluster_tasks(sim, 9), np.arange(9))
    for bad in (0, 10):
        with pytest.raises(ValueError, match=rf"num_clusters={bad}.*K=9"):
            cluster_tasks(sim, bad)
    with pytest.raises(ValueError, match="square"):
        cluster_tasks(np.ones((2, 3)), 1)
    asym = np.eye(3)
    asym[0, 1] = 0.5
    with pytest.raises(ValueError, match="symmetric"):
        cluster_tasks(asym, 2)


def test_real_torch_model_opposite_tasks_are_anticorrelated_and_separated():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    params = dict(model.named_parameters())

    def loss_fn(batch):
        x, target = batch
        return ((model(x).squeeze(-1) - target) ** 2).mean()

    # Kind A pulls the output to +3, kind B to -3 (interleaved tasks), same input law:
    # near init |output| << 3 so the two kinds' gradients point in opposite directions.
    kinds = [0, 1, 0, 1, 1, 0]
    gen = torch.Generator().manual_seed(1)
    task_batches = []
    for kind in kinds:
        target = 3.0 if kind == 0 else -3.0
        task_batches.append([
            (torch.rand(16, 3, generator=gen) + 0.5, torch.full((16,), target)) for _ in range(3)
        ])
    sig = task_gradient_signatures(loss_fn, task_batches, params)
    assert sig.shape == (6, 4)
    sim = cosine_similarity_matrix(sig)
    same = np.equal.outer(kinds, kinds)
    off_diag = ~np.eye(6, dtype=bool)
    assert (sim[same & off_diag] > 0.5).all()
    assert (sim[~same] < -0.5).all()
    np.testing.assert_array_equal(cluster_tasks(sim, 2, seed=0), kinds)
    assert all(p.grad is None for p in model.parameters())


def test_clusters_json_round_trip_and_validation(tmp_path):
    tasks = ["Pong", "Breakout", "Boxing", "Seaquest"]
    labels = np.array([0, 1, 0, 1])
    sim = cosine_similarity_matrix(np.array([[1.0, 0.1], [0.1, 1.0], [0.9, 0.2], [0.0, 1.0]]))
    path = tmp_path / "clusters.json"
    write_clusters_json(path, labels, sim, tasks, seed=5, method="agglomerative-average-cosine")
    back = read_clusters_json(path, tasks)
    assert isinstance(back, ClusterAssignment)
    np.testing.assert_array_equal(back.labels, labels)
    np.testing.assert_allclose(back.similarity, sim)
    assert (back.tasks, back.num_clusters, back.seed, back.method) == (
        tasks, 2, 5, "agglomerative-average-cosine")
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic: no leftovers
    # Writing a read-back assignment round-trips too.
    write_clusters_json(tmp_path / "again.json", back, back.similarity, tasks, back.seed, back.method)
    assert json.loads((tmp_path / "again.json").read_text()) == json.loads(path.read_text())

    with pytest.raises(ValueError, match=rf"clusters file {path} was made for tasks .*Pong.*, not .*Alien"):
        read_clusters_json(path, ["Alien", "Breakout", "Boxing", "Seaquest"])
    with pytest.raises(ValueError, match="was made for tasks"):
        read_clusters_json(path, tasks[:3])

    doc = json.loads(path.read_text())
    doc["assignment"] = [0, 1, 2, 1]  # 2 is outside [0, num_clusters=2)
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"{path}.*outside \[0, 2\)"):
        read_clusters_json(path, tasks)
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        write_clusters_json(tmp_path / "bad.json", [0, 1, -1, 1], sim, tasks, 0, "m", num_clusters=2)


def test_random_clusters_like_keeps_sizes_and_is_seeded():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 0, 1])
    a = random_clusters_like(labels, seed=3)
    np.testing.assert_array_equal(np.bincount(a, minlength=4), np.bincount(labels))
    np.testing.assert_array_equal(random_clusters_like(labels, seed=3), a)
    others = [random_clusters_like(labels, seed=s) for s in range(4, 10)]
    assert any(not np.array_equal(o, a) for o in others)
    assert any(not np.array_equal(o, labels) for o in others)
