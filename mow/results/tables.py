"""The results tables (CSV), computed from the tidy raw-results frame of :func:`mow.results.collect.load_results`.

Every statistic comes from :mod:`mow.metrics`; this module only decides which numbers go
into which cell. Conventions shared by all tables:

* reproduced methods are labelled ``<method>_repro`` (``storm_repro``, ``mow_repro``) and use
  the ``full`` variant; the other variants appear only in the ablation table;
* every method is aggregated over the *same* games: the games run at this scale, or all 26
  when nothing was run (so the literature rows still say something). A reproduced method
  that ran some but not all of them is an error, not a mean over fewer games;
* a bootstrap CI needs at least two runs per game; with one (smoke scale, per-game
  literature means) the CI cells are empty rather than a zero-width interval that would
  look like certainty;
* a method with no runs at all gets empty cells, never an error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mow import metrics
from mow.checkpoint import atomic_write_text
from mow.results.collect import MAIN_VARIANT, ResultsError

PAPER = Path(__file__).resolve().parents[2] / "paper"
OFFICIAL_FILE = PAPER / "storm_official_per_seed.csv"
BASELINES_FILE = PAPER / "atari_baselines_mean.csv"
REPORTED_FILE = PAPER / "reported_headline.csv"

#: Raw method name -> label used in every table and figure.
REPRO_LABELS = {"storm": "storm_repro", "mow": "mow_repro"}
LITERATURE = ("SimPLe", "IRIS", "DIAMOND")
#: metrics.AGGREGATES name -> (atari_table row label, summary metric name).
AGGREGATE_NAMES = {"mean": ("mean HNS", "mean_hns"), "median": ("median HNS", "median_hns"),
                   "iqm": ("IQM HNS", "iqm_hns"), "optimality_gap": ("optimality gap", "optimality_gap")}
TABLE_METHODS = ("storm_official", "storm_repro", "mow_repro")

ATARI_TABLE_COLUMNS = (
    "game", "random", "human", "storm_official_mean",
    "storm_repro_mean", "storm_repro_std", "storm_repro_seeds",
    "mow_repro_mean", "mow_repro_std", "mow_repro_seeds",
    "hns_storm_official", "hns_storm_official_ci_low", "hns_storm_official_ci_high",
    "hns_storm_repro", "hns_storm_repro_ci_low", "hns_storm_repro_ci_high",
    "hns_mow_repro", "hns_mow_repro_ci_low", "hns_mow_repro_ci_high",
    "n_games", "protocol", "scale", "reference_files", "raw_files", "mlflow_run_ids", "git_commits",
)
SUMMARY_COLUMNS = ("method", "metric", "value", "ci_low", "ci_high", "n_games", "n_seeds", "games",
                   "scale", "protocol", "source", "raw_files", "mlflow_run_ids", "git_commits")
PARAMS_COLUMNS = ("model", "component", "parameters", "mib_fp32", "paper_mib_fp32", "diff_vs_paper_mib")
ABLATION_COLUMNS = ("variant", "n_games", "n_seeds",
                    *(f"{m}{s}" for m in ("mean_hns", "median_hns", "iqm_hns") for s in ("", "_ci_low", "_ci_high")),
                    "scale", "protocol", "raw_files", "mlflow_run_ids", "git_commits")


# --------------------------------------------------------------------------- inputs
def load_official(path: Path | str | None = None) -> pd.DataFrame:
    """STORM's official per-seed scores: columns game, seed, score."""
    return pd.read_csv(path or OFFICIAL_FILE)


def load_baselines(path: Path | str | None = None) -> pd.DataFrame:
    """SimPLe / IRIS / DIAMOND per-game means, indexed by game."""
    return pd.read_csv(path or BASELINES_FILE).set_index("game")


def load_reported(path: Path | str | None = None) -> pd.DataFrame:
    """Every headline number of the paper (benchmark, method, ..., metric, value, source)."""
    return pd.read_csv(path or REPORTED_FILE)


def write_table(df: pd.DataFrame, path: Path | str) -> Path:
    path = Path(path)
    atomic_write_text(path, df.to_csv(index=False))
    return path


# --------------------------------------------------------------------------- shared helpers
def main_runs(df: pd.DataFrame, method: str | None = None) -> pd.DataFrame:
    runs = df[df["variant"] == MAIN_VARIANT]
    return runs if method is None else runs[runs["method"] == method]


def run_games(df: pd.DataFrame, reference: pd.DataFrame) -> list[str]:
    """Games with a main-variant run, in the reference table's order (the conventional one)."""
    played = set(main_runs(df)["task"])
    unknown = sorted(played - set(reference.index))
    if unknown:
        raise ResultsError(f"game {unknown[0]} is not in the reference score table")
    return [g for g in reference.index if g in played]


def _records(runs: pd.DataFrame) -> pd.DataFrame:
    return runs.rename(columns={"task": "game"})[["game", "seed", "score"]]


def repro_hns(df: pd.DataFrame, method: str, games: Sequence[str], reference: pd.DataFrame) -> np.ndarray | None:
    """``[seeds, games]`` HNS of a reproduced method, or None when it has no run at all."""
    runs = main_runs(df, method)
    if runs.empty:
        return None
    absent = [g for g in games if g not in set(runs["task"])]
    if absent:
        raise ResultsError(f"{REPRO_LABELS.get(method, method)} has no run of game {absent[0]}, "
                           f"which other methods ran; aggregates must cover the same games")
    try:
        raw = metrics.score_matrix(_records(runs), games)
    except ValueError as exc:
        raise ResultsError(f"{method}: {exc}") from None
    return metrics.normalize_matrix(raw, games, reference)


def hns_matrices(df: pd.DataFrame, reference: pd.DataFrame, *, official: pd.DataFrame | None = None,
                 baselines: pd.DataFrame | None = None, literature: bool = True
                 ) -> tuple[list[str], dict[str, np.ndarray]]:
    """The common game list and every method's ``[runs, games]`` HNS matrix on it.

    Literature baselines are per-game means, so they are one-row matrices.
    """
    games = run_games(df, reference) or list(reference.index)
    official = load_official() if official is None else official
    out = {"storm_official": metrics.normalize_matrix(metrics.score_matrix(official, games), games, reference)}
    for method, label in REPRO_LABELS.items():
        mat = repro_hns(df, method, games, reference)
        if mat is not None:
            out[label] = mat
    if literature:
        base = load_baselines() if baselines is None else baselines
        for name in LITERATURE:
            out[name] = metrics.normalize_matrix(base.loc[games, name].to_numpy()[None, :], games, reference)
    return games, out


def aggregate_with_ci(hns: np.ndarray, *, reps: int, seed: int) -> dict:
    """metrics.aggregate, with the CIs blanked when there is one run per game (nothing to resample)."""
    agg = metrics.aggregate(hns, reps=reps, seed=seed)
    if hns.shape[0] < 2:
        for name in metrics.AGGREGATES:
            agg[f"{name}_ci"] = [math.nan, math.nan]
    return agg


def _counts_as_int(table: pd.DataFrame, columns) -> pd.DataFrame:
    """Counts stay integers in the CSV even where a row leaves them empty."""
    for col in columns:
        table[col] = table[col].astype("Int64")
    return table


def _join(values) -> str:
    return ";".join(sorted({str(v) for v in values if isinstance(v, str) and v}))


def provenance(runs: pd.DataFrame) -> dict[str, str]:
    return {"raw_files": _join(runs["raw_file"]), "mlflow_run_ids": _join(runs["mlflow_run_id"]),
            "git_commits": _join(runs["git_commit"])}


def _seed_stats(runs: pd.DataFrame, game: str) -> tuple[float, float, int]:
    scores = runs.loc[runs["task"] == game, "score"].to_numpy(dtype=float)
    if scores.size == 0:
        return math.nan, math.nan, 0
    std = float(np.std(scores, ddof=1)) if scores.size > 1 else math.nan  # one seed has no spread to report
    return float(scores.mean()), std, int(scores.size)


# --------------------------------------------------------------------------- atari_table.csv
def _game_row(game: str, df: pd.DataFrame, reference: pd.DataFrame, official: pd.DataFrame) -> dict:
    row = {"game": game, "random": float(reference.at[game, "random"]), "human": float(reference.at[game, "human"]),
           "storm_official_mean": float(official.loc[official["game"] == game, "score"].mean())}
    for method, label in REPRO_LABELS.items():
        mean, std, n = _seed_stats(main_runs(df, method), game)
        row.update({f"{label}_mean": mean, f"{label}_std": std, f"{label}_seeds": n})
    for label in TABLE_METHODS:
        row[f"hns_{label}"] = metrics.human_normalized({game: row[f"{label}_mean"]}, reference)[game]
    runs = main_runs(df)
    return {**row, "n_games": 1, **provenance(runs[runs["task"] == game])}


def _aggregate_rows(mats: Mapping[str, np.ndarray], games: Sequence[str], runs: pd.DataFrame,
                    *, reps: int, seed: int) -> list[dict]:
    aggs = {label: aggregate_with_ci(mats[label], reps=reps, seed=seed) for label in TABLE_METHODS if label in mats}
    rows = []
    for name, (row_label, _) in AGGREGATE_NAMES.items():
        row = {"game": row_label, "n_games": len(games), **provenance(runs)}
        for label in TABLE_METHODS:
            agg = aggs.get(label)
            lo, hi = agg[f"{name}_ci"] if agg else (math.nan, math.nan)
            row.update({f"hns_{label}": agg[name] if agg else math.nan,
                        f"hns_{label}_ci_low": lo, f"hns_{label}_ci_high": hi})
        rows.append(row)
    return rows


def atari_table(df: pd.DataFrame, reference: pd.DataFrame | None = None, *, scale: str, protocol: str,
                official: pd.DataFrame | None = None, reps: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per game run at this scale, then one row per aggregate (mean/median/IQM HNS, optimality gap)."""
    reference = metrics.load_reference_scores() if reference is None else reference
    official = load_official() if official is None else official
    games = run_games(df, reference)
    rows = [_game_row(g, df, reference, official) for g in games]
    if games:
        _, mats = hns_matrices(df, reference, official=official, literature=False)
        rows += _aggregate_rows(mats, games, main_runs(df), reps=reps, seed=seed)
    else:  # nothing run: the aggregate rows stay, empty, so the file's shape never changes
        rows += [{"game": label, "n_games": 0} for label, _ in AGGREGATE_NAMES.values()]
    table = pd.DataFrame(rows, columns=list(ATARI_TABLE_COLUMNS))
    table["protocol"], table["scale"] = protocol, scale
    table["reference_files"] = "paper/atari_reference_scores.csv;paper/storm_official_per_seed.csv"
    return _counts_as_int(table, ["storm_repro_seeds", "mow_repro_seeds", "n_games"])


# --------------------------------------------------------------------------- atari_summary.csv
def _source(label: str) -> str:
    if label == "storm_official":
        return "paper/storm_official_per_seed.csv"
    if label in LITERATURE:
        return "paper/atari_baselines_mean.csv (per-game means)"
    return "results/raw"


def _summary_rows(label: str, hns: np.ndarray, games: Sequence[str], runs: pd.DataFrame, *, reps: int, seed: int
                  ) -> list[dict]:
    agg = aggregate_with_ci(hns, reps=reps, seed=seed)
    n_seeds = hns.shape[0] if label not in LITERATURE else math.nan  # per-game means hide their seed count
    prov = provenance(runs) if label in REPRO_LABELS.values() else {}
    return [{"method": label, "metric": metric, "value": agg[name], "ci_low": agg[f"{name}_ci"][0],
             "ci_high": agg[f"{name}_ci"][1], "n_games": len(games), "n_seeds": n_seeds, "games": ";".join(games),
             "source": _source(label), **prov}
            for name, (_, metric) in AGGREGATE_NAMES.items()]


def _improvement_row(mats: Mapping[str, np.ndarray], games: Sequence[str], runs: pd.DataFrame,
                     *, reps: int, seed: int) -> dict:
    x, y = mats["mow_repro"], mats["storm_repro"]
    point, lo, hi = metrics.probability_of_improvement(x, y, reps=reps, seed=seed)
    if min(x.shape[0], y.shape[0]) < 2:
        lo = hi = math.nan
    return {"method": "mow_repro vs storm_repro", "metric": "probability_of_improvement", "value": point,
            "ci_low": lo, "ci_high": hi, "n_games": len(games), "n_seeds": min(x.shape[0], y.shape[0]),
            "games": ";".join(games), "source": "results/raw", **provenance(runs)}


def atari_summary(df: pd.DataFrame, reference: pd.DataFrame | None = None, *, scale: str, protocol: str,
                  official: pd.DataFrame | None = None, baselines: pd.DataFrame | None = None,
                  reps: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Method x metric (mean/median/IQM HNS, optimality gap) with CIs, all on the same games.

    Adds P(MoW > STORM) (both reproduced) when both ran.
    """
    reference = metrics.load_reference_scores() if reference is None else reference
    games, mats = hns_matrices(df, reference, official=official, baselines=baselines)
    rows: list[dict] = []
    for label, hns in mats.items():
        method = next((m for m, lab in REPRO_LABELS.items() if lab == label), None)
        runs = main_runs(df, method) if method else main_runs(df).iloc[0:0]
        rows += _summary_rows(label, hns, games, runs, reps=reps, seed=seed)
    if {"mow_repro", "storm_repro"} <= set(mats):
        rows.append(_improvement_row(mats, games, main_runs(df), reps=reps, seed=seed))
    table = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    table["scale"], table["protocol"] = scale, protocol
    return _counts_as_int(table, ["n_games", "n_seeds"])


# --------------------------------------------------------------------------- params.csv
def params_csv(table=None) -> pd.DataFrame:
    """Parameters per component for every column of ``mow.paramcount.params_table()``, plus totals.

    Columns are iterated, not named, so a model added to the parameter table appears here
    without a change. The paper's MiB figure sits on the total row of the models it reports.
    """
    from mow import paramcount

    table = paramcount.params_table() if table is None else table
    rows = []
    for model, counts in table.columns.items():
        for component in table.components:
            n = int(counts.get(component, 0))
            rows.append({"model": model, "component": component, "parameters": n, "mib_fp32": paramcount.mib_fp32(n)})
        total = int(sum(counts.values()))
        paper = table.references.get(model, math.nan)
        rows.append({"model": model, "component": "total", "parameters": total,
                     "mib_fp32": paramcount.mib_fp32(total), "paper_mib_fp32": paper,
                     "diff_vs_paper_mib": paramcount.mib_fp32(total) - paper})
    return pd.DataFrame(rows, columns=list(PARAMS_COLUMNS))


# --------------------------------------------------------------------------- ablations.csv
def ablations_table(df: pd.DataFrame, reference: pd.DataFrame | None = None, *, scale: str, protocol: str,
                    reps: int = 2000, seed: int = 0) -> pd.DataFrame:
    """MoW variants x (mean/median/IQM HNS with CIs), each over the games that variant ran.

    Header only until some variant other than ``full`` has a raw file: one row is no ablation.
    """
    reference = metrics.load_reference_scores() if reference is None else reference
    mow = df[df["method"] == "mow"]
    if set(mow["variant"]) <= {MAIN_VARIANT}:
        return pd.DataFrame(columns=list(ABLATION_COLUMNS))
    rows = []
    for variant, runs in mow.groupby("variant", sort=True):
        games = [g for g in reference.index if g in set(runs["task"])]
        try:
            hns = metrics.normalize_matrix(metrics.score_matrix(_records(runs), games), games, reference)
        except ValueError as exc:
            raise ResultsError(f"mow/{variant}: {exc}") from None
        agg = aggregate_with_ci(hns, reps=reps, seed=seed)
        row = {"variant": variant, "n_games": len(games), "n_seeds": hns.shape[0], **provenance(runs)}
        for name in ("mean", "median", "iqm"):
            metric = AGGREGATE_NAMES[name][1]
            row.update({metric: agg[name], f"{metric}_ci_low": agg[f"{name}_ci"][0],
                        f"{metric}_ci_high": agg[f"{name}_ci"][1]})
        rows.append(row)
    table = pd.DataFrame(rows, columns=list(ABLATION_COLUMNS))
    table["scale"], table["protocol"] = scale, protocol
    # `full` first: it is the reference the other variants are read against
    return table.sort_values("variant", key=lambda s: s != MAIN_VARIANT, kind="stable", ignore_index=True)


# --------------------------------------------------------------------------- metaworld_table.csv
def metaworld_paper(reported: pd.DataFrame | None = None) -> dict[str, float]:
    """Meta-World MT50 mean success of every method the paper reports, keyed ``paper_<method>``."""
    reported = load_reported() if reported is None else reported
    rows = reported[(reported["benchmark"] == "metaworld_mt50") & (reported["metric"] == "mean_success")]
    return {f"paper_{m}": float(v) for m, v in zip(rows["method"], rows["value"])}


def metaworld_columns(reported: pd.DataFrame | None = None) -> list[str]:
    per_method = [f"{label}_{s}" for label in REPRO_LABELS.values()
                  for s in ("success", "std", "seeds", "ci_low", "ci_high")]
    return ["task", *per_method, *metaworld_paper(reported),
            "scale", "protocol", "raw_files", "mlflow_run_ids", "git_commits"]


def _success_matrix(runs: pd.DataFrame, tasks: Sequence[str], method: str) -> np.ndarray:
    missing = runs.loc[runs["success_rate"].isna(), "raw_file"]
    if not missing.empty:
        raise ResultsError(f"{missing.iloc[0]}: Meta-World raw result lacks `successes`")
    records = runs[["task", "seed", "success_rate"]].rename(columns={"task": "game", "success_rate": "score"})
    try:
        return metrics.score_matrix(records, tasks)
    except ValueError as exc:
        raise ResultsError(f"{method}: {exc}") from None


def metaworld_table(df: pd.DataFrame, reported: pd.DataFrame | None = None, *, scale: str, protocol: str,
                    reps: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per-task success rate (mean over seeds) per reproduced method, then a mean row with a CI over seeds.

    The paper's Meta-World numbers (mean success only) sit beside the mean row. Header only
    when nothing was run.
    """
    columns = metaworld_columns(reported)
    runs = main_runs(df)
    if runs.empty:
        return pd.DataFrame(columns=columns)
    tasks = sorted(set(runs["task"]))
    rows = [{"task": t, **provenance(runs[runs["task"] == t])} for t in tasks]
    mean_row = {"task": "mean success", **metaworld_paper(reported), **provenance(runs)}
    for method, label in REPRO_LABELS.items():
        mruns = runs[runs["method"] == method]
        if mruns.empty:
            continue
        s = _success_matrix(mruns, tasks, method)
        for row, col in zip(rows, s.T):
            row.update({f"{label}_success": float(col.mean()), f"{label}_seeds": col.size,
                        f"{label}_std": float(np.std(col, ddof=1)) if col.size > 1 else math.nan})
        stats = metrics.mean_success(s, reps=reps, seed=seed)
        lo, hi = stats["mean_ci"] if s.shape[0] > 1 else (math.nan, math.nan)
        mean_row.update({f"{label}_success": stats["mean"], f"{label}_seeds": s.shape[0],
                         f"{label}_ci_low": lo, f"{label}_ci_high": hi})
    table = pd.DataFrame([*rows, mean_row], columns=columns)
    table["scale"], table["protocol"] = scale, protocol
    return _counts_as_int(table, [f"{label}_seeds" for label in REPRO_LABELS.values()])
