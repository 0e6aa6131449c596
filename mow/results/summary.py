"""Machine-readable summaries for DVC: ``results/metrics.json`` and ``results/curves.csv``.

``metrics.json`` (a DVC ``metrics:`` file, so ``dvc metrics show`` / ``dvc metrics diff``
compare experiments): the scale and protocol, the games and seeds, the aggregate HNS of
every method of ``atari_summary.csv`` (mean, median, IQM, optimality gap), and the Meta-World
mean success of each reproduced method when Meta-World ran. Missing values are ``null``.

``curves.csv`` (a DVC ``plots:`` file, x = step, y = return): one row per logged episode
return of every run folder, ``step, method, task, seed, return``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from mow.checkpoint import atomic_write_text

METRICS_JSON = "metrics.json"
CURVES_CSV = "curves.csv"
CURVE_COLUMNS = ("step", "method", "task", "seed", "return")
HNS_METRICS = ("mean_hns", "median_hns", "iqm_hns", "optimality_gap")


def _number(value) -> float | int | None:
    """JSON-safe: NaN/NA become null (DVC rejects NaN), integral counts stay integers."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or pd.isna(value):
        return None
    value = float(value)
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def metrics_summary(summary: pd.DataFrame, metaworld: pd.DataFrame, *, scale: str, protocol: str,
                    metaworld_protocol: str) -> dict:
    """The content of ``metrics.json`` from the ``atari_summary.csv`` and ``metaworld_table.csv`` frames."""
    methods: dict[str, dict] = {}
    games: list[str] = []
    for _, row in summary.iterrows():
        if row["metric"] not in HNS_METRICS:
            continue  # e.g. P(MoW > STORM): a comparison, not a per-method aggregate
        entry = methods.setdefault(str(row["method"]), {"n_games": _number(row["n_games"]),
                                                        "n_seeds": _number(row["n_seeds"])})
        entry[row["metric"]] = _number(row["value"])
        if not games and isinstance(row.get("games"), str) and row["games"]:
            games = row["games"].split(";")
    out = {"scale": scale, "atari": {"protocol": protocol, "n_games": len(games), "games": games,
                                     "methods": methods}}
    mean_rows = metaworld[metaworld["task"] == "mean success"] if "task" in metaworld else metaworld.iloc[0:0]
    if not mean_rows.empty:
        row = mean_rows.iloc[0]
        mw_methods = {}
        for col in metaworld.columns:
            if col.endswith("_success") and not col.startswith("paper_") and _number(row[col]) is not None:
                label = col[: -len("_success")]
                mw_methods[label] = {"mean_success": _number(row[col]), "n_seeds": _number(row.get(f"{label}_seeds"))}
        tasks = [t for t in metaworld["task"] if t != "mean success"]
        out["metaworld"] = {"protocol": metaworld_protocol, "n_tasks": len(tasks), "methods": mw_methods}
    return out


def write_metrics_json(data: Mapping, path: Path | str) -> Path:
    path = Path(path)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")
    return path


def learning_curves_frame(runs_root: Path | str, *, scale: str, suite: str, protocol: str,
                          key: str = "episode/return") -> pd.DataFrame:
    """Every logged ``key`` of the main variant's run folders as rows (step, method, task, seed, return).

    Single-task runs log ``key``; a MoW multi-task run (task folder ``all``) logs ``key/<task>``.
    """
    from mow.results.figures import MAIN_VARIANT, read_metrics

    rows = []
    for method in ("storm", "mow"):
        base = Path(runs_root) / scale / suite / protocol / method / MAIN_VARIANT
        for file in sorted(base.glob("*/seed*/metrics.jsonl")):
            task, seed = file.parent.parent.name, file.parent.name[len("seed"):]
            if not seed.isdigit():
                continue
            for record in read_metrics(file):
                if "step" not in record:
                    continue
                for name, value in record.items():
                    if name == key and task != "all":
                        rows.append((int(record["step"]), method, task, int(seed), float(value)))
                    elif task == "all" and name.startswith(key + "/"):
                        rows.append((int(record["step"]), method, name[len(key) + 1:], int(seed), float(value)))
    frame = pd.DataFrame(rows, columns=list(CURVE_COLUMNS))
    return frame.sort_values(["method", "task", "seed", "step"], kind="stable").reset_index(drop=True)


def write_curves_csv(frame: pd.DataFrame, path: Path | str) -> Path:
    path = Path(path)
    atomic_write_text(path, frame.to_csv(index=False))
    return path
