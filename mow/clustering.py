"""Gradient-based task clustering of the MoW warm-up stage (SPEC §1.8, DESIGN "Decisions").

After the shared VAE and heads are warmed up, every task k gets a *gradient signature*:
the gradient of its world-model loss w.r.t. the VAE and head parameters, reduced to one
number per parameter tensor ("averaged per layer" to save cost) and averaged over several
mini-batches of the task. Tasks are compared by cosine similarity of these signatures and
grouped into N_m clusters by average-linkage agglomerative clustering on 1 - cos. The
result is written to ``clusters.json`` once and never recomputed (SPEC §1.8.6).

The functions here are generic (callables, mappings, arrays): nothing depends on a model
class, so the same code clusters the real MoW model and the tiny models of the tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from mow.checkpoint import atomic_write_text

# Tolerance for "symmetric" similarity matrices: they come from float32/float64 arithmetic.
_SYMMETRY_ATOL = 1e-6


def layer_averaged_gradient(grads: Mapping[str, torch.Tensor | None]) -> np.ndarray:
    """One number per parameter tensor: the mean of its (signed) gradient, sorted by name.

    The signed mean keeps the direction a task pushes a layer in, which is what cosine
    similarity compares (a mean of |g| would make every task look alike). Its cost is that
    opposite pulls inside one tensor cancel; the paper accepts this to save cost (SPEC
    §1.8.3). Sorting by name makes the vector layout independent of dict order. A missing
    gradient (``None``: the loss does not use that tensor) counts as 0.
    """
    names = sorted(grads)
    out = np.zeros(len(names), dtype=np.float64)
    for i, name in enumerate(names):
        g = grads[name]
        if g is not None and g.numel() > 0:
            out[i] = float(g.detach().double().mean())
    return out


def task_gradient_signatures(
    model_loss_fn: Callable[[Any], torch.Tensor],
    task_batches: Sequence[Iterable[Any]],
    params: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
) -> np.ndarray:
    """Layer-averaged loss gradients per task, averaged over that task's batches: [K, L].

    ``task_batches[k]`` yields the mini-batches of task k; ``model_loss_fn(batch)`` returns
    a scalar loss; ``params`` are the named tensors to differentiate (in MoW's warm-up: the
    shared VAE and head parameters, e.g. ``dict(model.named_parameters())`` filtered).
    Several batches per task reduce the noise of a single-batch estimate (reviewer 3).
    Averaging the per-batch reductions equals reducing the averaged gradient (both linear).

    ``torch.autograd.grad`` is used instead of ``backward``: it is the same computation,
    but it leaves the parameters' ``.grad`` fields (and any optimizer state) untouched.
    """
    named = dict(params.items() if isinstance(params, Mapping) else params)
    if not named:
        raise ValueError("task_gradient_signatures needs at least one parameter tensor")
    names = sorted(named)
    tensors = [named[n] for n in names]
    signatures = []
    for task, batches in enumerate(task_batches):
        total, count = None, 0
        for batch in batches:
            loss = model_loss_fn(batch)
            if loss.dim() != 0:
                raise ValueError(f"model_loss_fn must return a scalar loss, got shape {tuple(loss.shape)}")
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            sig = layer_averaged_gradient(dict(zip(names, grads)))
            total = sig if total is None else total + sig
            count += 1
        if count == 0:
            raise ValueError(f"task {task} has no batches to compute its gradient signature from")
        signatures.append(total / count)
    if not signatures:
        raise ValueError("task_gradient_signatures needs at least one task")
    return np.stack(signatures)


def cosine_similarity_matrix(signatures: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarity [K, K] of the rows of ``signatures`` [K, L].

    A zero row (a task whose loss does not move these parameters) has no direction: its
    similarity to every other task is 0 rather than NaN, and 1 to itself so the diagonal
    stays the identity of "same task".
    """
    x = np.asarray(signatures, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"signatures must be a [K, L] matrix, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    unit = x / safe[:, None]
    sim = np.clip(unit @ unit.T, -1.0, 1.0)
    np.fill_diagonal(sim, 1.0)
    return sim


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Renumber labels by first appearance (task 0 is in cluster 0, the next new one is 1...)."""
    mapping: dict[int, int] = {}
    return np.array([mapping.setdefault(int(lab), len(mapping)) for lab in labels], dtype=np.int64)


def _check_similarity(similarity: np.ndarray) -> np.ndarray:
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"similarity must be a square [K, K] matrix, got shape {sim.shape}")
    if not np.all(np.isfinite(sim)):
        raise ValueError("similarity matrix holds NaN or infinite values")
    if not np.allclose(sim, sim.T, atol=_SYMMETRY_ATOL):
        raise ValueError("similarity matrix is not symmetric")
    return sim


def cluster_tasks(similarity: np.ndarray, num_clusters: int, seed: int = 0) -> np.ndarray:
    """Group K tasks into ``num_clusters`` clusters; labels [K] canonical (first appearance).

    Average-linkage agglomerative clustering on the distance 1 - cos: deterministic, needs
    only the similarity matrix, and does not assume the spherical clusters of k-means.
    ``seed`` is unused by this deterministic method; it is accepted (and recorded in
    clusters.json) so that a randomised method could be swapped in without API changes.
    """
    del seed  # deterministic method (see docstring)
    sim = _check_similarity(similarity)
    k = sim.shape[0]
    if not 1 <= num_clusters <= k:
        raise ValueError(f"num_clusters={num_clusters} must be between 1 and the number of tasks K={k}")
    # Trivial cases directly: scikit-learn needs >= 2 samples, and the answers are fixed.
    if num_clusters == 1:
        return np.zeros(k, dtype=np.int64)
    if num_clusters == k:
        return np.arange(k, dtype=np.int64)
    distance = np.clip(1.0 - sim, 0.0, 2.0)
    distance = (distance + distance.T) / 2  # exact symmetry for scikit-learn
    np.fill_diagonal(distance, 0.0)
    # imported here: scikit-learn takes ~2 s to import, and every evaluation and training
    # job imports this module without clustering anything
    from sklearn.cluster import AgglomerativeClustering

    labels = AgglomerativeClustering(
        n_clusters=num_clusters, metric="precomputed", linkage="average"
    ).fit_predict(distance)
    return _canonical(labels)


@dataclass
class ClusterAssignment:
    """What clusters.json holds: task i (``tasks[i]``) belongs to cluster ``labels[i]``."""

    tasks: list[str]
    labels: np.ndarray
    num_clusters: int
    similarity: np.ndarray
    seed: int
    method: str


def _check_assignment(labels: np.ndarray, num_clusters: int, k: int, where: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.shape != (k,):
        raise ValueError(f"{where}: assignment has shape {arr.shape}, expected one label per task ({k})")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{where}: assignment must hold integers, got {arr.dtype}")
    arr = arr.astype(np.int64)
    if num_clusters < 1:
        raise ValueError(f"{where}: num_clusters={num_clusters} must be >= 1")
    bad = [(i, int(c)) for i, c in enumerate(arr) if not 0 <= c < num_clusters]
    if bad:
        raise ValueError(f"{where}: labels outside [0, {num_clusters}) for (task, label) {bad}")
    return arr


def write_clusters_json(
    path: str | Path,
    assignment: np.ndarray | Sequence[int] | ClusterAssignment,
    similarity: np.ndarray,
    tasks: Sequence[str],
    seed: int,
    method: str,
    num_clusters: int | None = None,
) -> None:
    """Write clusters.json atomically (a killed writer never leaves a half file).

    ``num_clusters`` defaults to the number of distinct labels (N_m when every cluster is
    used, as agglomerative clustering guarantees).
    """
    path = Path(path)
    tasks = [str(t) for t in tasks]
    if isinstance(assignment, ClusterAssignment):
        num_clusters = assignment.num_clusters if num_clusters is None else num_clusters
        assignment = assignment.labels
    labels = np.asarray(assignment)
    n = int(num_clusters) if num_clusters is not None else len(np.unique(labels))
    labels = _check_assignment(labels, n, len(tasks), str(path))
    sim = _check_similarity(similarity)
    if sim.shape != (len(tasks), len(tasks)):
        raise ValueError(f"{path}: similarity has shape {sim.shape}, expected {(len(tasks), len(tasks))}")
    doc = {
        "tasks": tasks,
        "assignment": labels.tolist(),
        "num_clusters": n,
        "similarity": sim.tolist(),
        "seed": int(seed),
        "method": str(method),
    }
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


def read_clusters_json(path: str | Path, tasks: Sequence[str]) -> ClusterAssignment:
    """Read and validate clusters.json for the suite whose tasks are ``tasks`` (in order)."""
    path = Path(path)
    expected = [str(t) for t in tasks]
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"clusters file {path} cannot be read: {exc}") from exc
    missing = {"tasks", "assignment", "num_clusters", "similarity", "seed", "method"} - set(doc)
    if missing:
        raise ValueError(f"clusters file {path} lacks fields {sorted(missing)}")
    if list(doc["tasks"]) != expected:
        raise ValueError(f"clusters file {path} was made for tasks {doc['tasks']}, not {expected}")
    where = f"clusters file {path}"
    labels = _check_assignment(np.asarray(doc["assignment"]), int(doc["num_clusters"]), len(expected), where)
    try:
        sim = _check_similarity(np.asarray(doc["similarity"], dtype=np.float64))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    if sim.shape != (len(expected), len(expected)):
        raise ValueError(f"{where}: similarity has shape {sim.shape}, expected {(len(expected),) * 2}")
    return ClusterAssignment(
        tasks=expected, labels=labels, num_clusters=int(doc["num_clusters"]), similarity=sim,
        seed=int(doc["seed"]), method=str(doc["method"]),
    )


def random_clusters_like(assignment: np.ndarray | Sequence[int] | ClusterAssignment, seed: int) -> np.ndarray:
    """``no_clustering`` ablation: tasks shuffled into clusters of the same sizes (seeded).

    Keeping the sizes isolates the effect of *which* tasks share a VAE from how many do.
    """
    labels = assignment.labels if isinstance(assignment, ClusterAssignment) else assignment
    labels = np.asarray(labels, dtype=np.int64)
    return np.random.default_rng(seed).permutation(labels)
