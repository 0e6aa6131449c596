"""Benchmark statistics: human-normalised Atari scores, rliable aggregates, Meta-World success.

Why this module exists: headline numbers (mean / median HNS, IQM, optimality gap) are only
comparable with the literature if every method is normalised against the *same* random/human
table and aggregated with the *same* definitions. So there is exactly one pinned reference table
(`paper/atari_reference_scores.csv`) and one place that defines the aggregates.

Definitions (matching the Atari-100k literature and rliable, Agarwal et al. 2021):

* mean HNS   = mean over games of the per-game mean-over-seeds HNS   (``metrics.aggregate_mean``)
* median HNS = median over games of the per-game mean-over-seeds HNS (``metrics.aggregate_median``)
  -- *not* the median over all run x game cells;
* IQM and optimality gap (threshold 1.0) are taken over all run x game scores, as rliable does.

Confidence intervals come from rliable's stratified bootstrap. rliable draws its bootstrap
indices from numpy's *global* generator (``np.random.choice``), so passing a ``RandomState`` is
not enough for reproducibility; every bootstrap here runs inside :func:`_seeded`, which seeds the
global generator and restores its previous state afterwards (no leaked side effect). We do not
also pass ``random_state=``: rliable's index sampling ignores it and ``arch`` deprecates it.

Apart from :func:`load_reference_scores`, nothing here touches the file system.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from rliable import library as rly
from rliable import metrics

REFERENCE_SCORES = Path(__file__).resolve().parents[1] / "paper" / "atari_reference_scores.csv"

#: Order of the values returned by :func:`_aggregate_vector`.
AGGREGATES = ("mean", "median", "iqm", "optimality_gap")


# --------------------------------------------------------------------------- reference scores
def load_reference_scores(path: str | Path | None = None) -> pd.DataFrame:
    """The single pinned random/human score table, indexed by game name.

    Default: ``<repo>/paper/atari_reference_scores.csv`` (resolved from this file, not the CWD,
    so results never depend on where a command was launched). A relative ``path`` is also
    resolved against the repository root.
    """
    if path is None:
        path = REFERENCE_SCORES
    path = Path(path)
    if not path.is_absolute():
        path = Path(__file__).resolve().parents[1] / path
    table = pd.read_csv(path).set_index("game")
    missing = {"random", "human"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
    return table


def human_normalized(scores: Mapping[str, float | np.ndarray], reference: pd.DataFrame | None = None
                     ) -> dict[str, float | np.ndarray]:
    """(score - random) / (human - random), per game; values keep their shape (float or array).

    An unknown game raises ValueError naming it: silently skipping a game would change the
    number of games behind a mean/median without anyone noticing.
    """
    ref = load_reference_scores() if reference is None else reference
    out: dict[str, float | np.ndarray] = {}
    for game, value in scores.items():
        if game not in ref.index:
            raise ValueError(f"unknown game {game!r}: not in the reference score table")
        lo, hi = float(ref.at[game, "random"]), float(ref.at[game, "human"])
        hns = (np.asarray(value, dtype=float) - lo) / (hi - lo)
        out[game] = float(hns) if np.ndim(hns) == 0 else hns
    return out


def normalize_matrix(raw: np.ndarray, games: Sequence[str], reference: pd.DataFrame | None = None
                     ) -> np.ndarray:
    """Human-normalise a raw ``[runs, games]`` matrix (as built by :func:`score_matrix`)."""
    raw = np.asarray(raw, dtype=float)
    if raw.ndim != 2 or raw.shape[1] != len(games):
        raise ValueError(f"expected a [runs, {len(games)}] matrix, got shape {raw.shape}")
    hns = human_normalized({g: raw[:, j] for j, g in enumerate(games)}, reference)
    return np.stack([hns[g] for g in games], axis=1)


# --------------------------------------------------------------------------- score matrix
def score_matrix(records: Iterable[Mapping] | pd.DataFrame, games: Sequence[str]) -> np.ndarray:
    """Build the ``[runs, games]`` matrix rliable expects from per-seed records.

    ``records``: dicts (or DataFrame rows) with ``game``, ``seed``, ``score``. Rows are the sorted
    union of seeds seen for ``games``; columns follow ``games``. Records of other games are ignored.
    A missing (game, seed) cell, a duplicate, or a non-finite score raises ValueError naming the
    game and seed -- never filled in or averaged over, because that would bias the aggregate.
    """
    df = records if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
    missing_cols = {"game", "seed", "score"} - set(df.columns)
    if missing_cols:
        raise ValueError(f"records lack column(s) {sorted(missing_cols)}")
    games = list(games)
    df = df[df["game"].isin(games)]
    cells: dict[tuple[str, object], float] = {}
    for game, seed, score in zip(df["game"], df["seed"], df["score"]):
        try:
            value = float(score)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"non-finite score {score!r} for game {game!r}, seed {seed!r}")
        if (game, seed) in cells:
            raise ValueError(f"duplicate score for game {game!r}, seed {seed!r}")
        cells[(game, seed)] = value
    seeds = sorted({seed for _, seed in cells})
    if not seeds:
        raise ValueError(f"no scores for any of the games {games}")
    out = np.empty((len(seeds), len(games)))
    for j, game in enumerate(games):
        for i, seed in enumerate(seeds):
            if (game, seed) not in cells:
                raise ValueError(f"missing score for game {game!r}, seed {seed!r}")
            out[i, j] = cells[(game, seed)]
    return out


# --------------------------------------------------------------------------- aggregates
@contextlib.contextmanager
def _seeded(seed: int):
    """Seed numpy's global generator (what rliable's bootstrap uses); restore it on exit."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _check_matrix(x: np.ndarray, name: str = "scores") -> np.ndarray:
    x = np.asarray(x, dtype=float)
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"{name}: expected a non-empty [runs, tasks] matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        run, task = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"{name}: non-finite value at run {run}, task {task}")
    return x


def _iqm(x: np.ndarray) -> float:
    """rliable's IQM (scipy.stats.trim_mean(x, 0.25, axis=None)) without scipy's per-call
    argument handling, which made it ~70 % of a 2,000-resample bootstrap: the same cut
    (int(0.25 n) cells off each end of the sorted run x game scores), the same mean."""
    flat = np.sort(x, axis=None)
    cut = int(0.25 * flat.size)
    return float(flat[cut:flat.size - cut].mean())


def _aggregate_vector(x: np.ndarray) -> np.ndarray:
    """All four aggregates at once, so one bootstrap pass serves them all."""
    return np.array([
        metrics.aggregate_mean(x),        # mean over games of per-game mean over seeds
        metrics.aggregate_median(x),      # median over games of per-game mean over seeds
        _iqm(x),                          # 25 % trimmed mean over all run x game cells
        metrics.aggregate_optimality_gap(x, gamma=1.0),
    ])


def aggregate(hns_matrix: np.ndarray, *, reps: int = 2000, seed: int = 0) -> dict:
    """Mean, median, IQM and optimality gap of a ``[runs, games]`` HNS matrix, with 95 % CIs.

    CIs: rliable stratified (per-game) percentile bootstrap over runs, ``reps`` resamples,
    seeded by ``seed`` (same seed -> identical CIs). All values are plain floats.
    """
    x = _check_matrix(hns_matrix, "hns_matrix")
    with _seeded(seed):
        points, cis = rly.get_interval_estimates({"x": x}, _aggregate_vector, reps=reps)
    out: dict = {}
    for k, name in enumerate(AGGREGATES):
        out[name] = float(points["x"][k])
        out[f"{name}_ci"] = [float(cis["x"][0, k]), float(cis["x"][1, k])]
    return out


def performance_profile(hns_matrices: Mapping[str, np.ndarray], taus: Sequence[float] | np.ndarray, *,
                        reps: int = 2000, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Score distributions (fraction of run x game scores > tau) with 95 % bootstrap bands.

    Returns ``{method: (profile, ci_lo, ci_hi)}``, each an array aligned with ``taus``.
    """
    mats = {k: _check_matrix(v, k) for k, v in hns_matrices.items()}
    taus = np.asarray(taus, dtype=float)
    with _seeded(seed):
        profiles, cis = rly.create_performance_profile(mats, taus, reps=reps)
    return {k: (np.asarray(profiles[k]), np.asarray(cis[k][0]), np.asarray(cis[k][1])) for k in mats}


def probability_of_improvement(x: np.ndarray, y: np.ndarray, reps: int = 2000, seed: int = 0
                               ) -> tuple[float, float, float]:
    """P(X > Y) averaged over tasks (rliable, Mann-Whitney based), with a 95 % bootstrap CI.

    Cost: one Mann-Whitney test per task per resample (~25 ms per 26-game resample), so
    ``reps=2000`` on full Atari matrices takes about a minute.

    ``x`` and ``y`` are ``[runs, tasks]`` with the same tasks (runs may differ); each is
    resampled independently per task. Returns ``(point, lo, hi)``.
    """
    x, y = _check_matrix(x, "x"), _check_matrix(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must cover the same tasks: {x.shape[1]} vs {y.shape[1]}")
    with _seeded(seed):
        points, cis = rly.get_interval_estimates({"x,y": [x, y]}, metrics.probability_of_improvement, reps=reps)
    lo, hi = np.ravel(cis["x,y"])
    return float(points["x,y"]), float(lo), float(hi)


def mean_success(success_matrix: np.ndarray, reps: int = 2000, seed: int = 0) -> dict:
    """Meta-World: mean success over tasks and seeds, with a 95 % CI over seeds.

    The CI is a plain percentile bootstrap that resamples whole seeds (rows) with
    ``np.random.RandomState(seed)``: seeds are the independent unit in Meta-World runs, and
    tasks are a fixed set, so they are not resampled. Returns
    ``{"mean": x, "mean_ci": [lo, hi], "per_task": [...]}``.
    """
    s = _check_matrix(success_matrix, "success_matrix")
    rs = np.random.RandomState(seed)
    idx = rs.randint(0, s.shape[0], size=(reps, s.shape[0]))
    boot = s[idx].mean(axis=(1, 2))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"mean": float(s.mean()), "mean_ci": [float(lo), float(hi)],
            "per_task": [float(v) for v in s.mean(axis=0)]}
