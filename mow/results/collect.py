"""Find and load the raw evaluation files of one scale, suite and protocol into a tidy table.

One row per (method, variant, task, seed). Every table and figure starts here, so this is
where bad input is stopped: a file evaluated under another protocol or scale, a non-finite
return, or a hole in a method's (task x seed) grid raises :class:`ResultsError` naming the
file, game and seed. Nothing is filled in or averaged over, because an aggregate computed
over whatever happened to finish is a different number from the one it claims to be.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pandas is imported where a table is built: every `mow` command imports this package
    import pandas as pd

#: Columns of the table :func:`collect` returns (also of an empty one).
COLUMNS = ("suite", "method", "variant", "task", "seed", "score", "success_rate", "episodes",
           "scale", "protocol", "raw_file", "mlflow_run_id", "git_commit")

#: The variant whose runs are the method's headline numbers; the others are ablations.
MAIN_VARIANT = "full"


class ResultsError(ValueError):
    """Raw results that cannot be aggregated honestly; the message names the file, game and seed."""


#: Keys every raw file has (the format ``mow.evaluate.evaluate`` writes).
REQUIRED_KEYS = ("suite", "method", "task", "seed", "protocol", "returns", "scale")


def read_record(path: Path) -> dict:
    """A raw file's JSON with its required keys checked.

    Not ``mow.evaluate.read_raw``: importing that module pulls in the environments, the
    models and the training loop, which the results stage must not need to read JSON.
    """
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ResultsError(f"{path}: unreadable raw result ({exc})") from None
    if not isinstance(record, dict):
        raise ResultsError(f"{path}: raw result is not a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ResultsError(f"{path}: raw result lacks {', '.join(missing)}")
    return record


def raw_files(raw_root: Path | str, scale: str, suite: str, protocol: str) -> list[Path]:
    """Every ``seed<k>.json`` under ``<raw_root>/<scale>/<suite>/<protocol>/<method>/<variant>/<task>/``."""
    base = Path(raw_root) / scale / suite / protocol
    return sorted(base.glob("*/*/*/seed*.json"))


def _finite_list(values, what: str, where: str) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ResultsError(f"{where}: {what} holds a non-number") from None
    if not out:
        raise ResultsError(f"{where}: no {what}")
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        raise ResultsError(f"{where}: non-finite {what} value {bad[0]}")
    return out


def _success_rate(record: dict, where: str) -> float:
    if "successes" not in record:
        return math.nan
    successes = _finite_list(record["successes"], "successes", where)
    if any(s not in (0.0, 1.0) for s in successes):
        raise ResultsError(f"{where}: successes must be 0 or 1 per episode")
    return float(np.mean(successes))


def _check_location(path: Path, record: dict, where: str) -> None:
    """The folders a file sits in must agree with what it says it is (a misplaced copy otherwise)."""
    method, variant, task = path.parts[-4:-1]
    claimed = (record["method"], record.get("variant", MAIN_VARIANT), record["task"], f"seed{record['seed']}")
    if (method, variant, task, path.stem) != claimed:
        raise ResultsError(f"{where}: file says {'/'.join(map(str, claimed))} but lies under "
                           f"{method}/{variant}/{task}/{path.stem}")


def load_row(path: Path | str, *, scale: str, protocol: str) -> dict:
    """One raw file as one table row, after checking it belongs to this scale and protocol."""
    path = Path(path)
    record = read_record(path)
    where = f"{path} (game {record['task']}, seed {record['seed']})"
    for key, wanted in (("protocol", protocol), ("scale", scale)):
        if record[key] != wanted:
            raise ResultsError(f"{where}: {key} is {record[key]!r}, expected {wanted!r}")
    _check_location(path, record, where)
    returns = _finite_list(record["returns"], "returns", where)
    return {
        "suite": record["suite"], "method": record["method"], "variant": record.get("variant", MAIN_VARIANT),
        "task": record["task"], "seed": int(record["seed"]), "score": float(np.mean(returns)),
        "success_rate": _success_rate(record, where), "episodes": len(returns),
        "scale": record["scale"], "protocol": record["protocol"], "raw_file": str(path),
        "mlflow_run_id": record.get("mlflow_run_id") or "", "git_commit": record.get("git_commit") or "",
    }


def _check_grid(df: pd.DataFrame, expected_tasks: Iterable[str] | None) -> None:
    """Each (method, variant) must hold every (task, seed) of its own grid; the main variant every expected task."""
    expected = list(expected_tasks) if expected_tasks is not None else None
    for (method, variant), group in df.groupby(["method", "variant"], sort=True):
        tasks = sorted(set(group["task"]))
        if expected is not None and variant == MAIN_VARIANT:
            absent = [t for t in expected if t not in tasks]
            if absent:
                raise ResultsError(f"{method}/{variant}: no raw file for game {absent[0]} "
                                   f"(expected games: {', '.join(expected)})")
            tasks = sorted(set(tasks) | set(expected))
        seeds = sorted(set(group["seed"]))
        present = set(zip(group["task"], group["seed"]))
        for task in tasks:
            for seed in seeds:
                if (task, seed) not in present:
                    raise ResultsError(f"{method}/{variant}: missing raw file for game {task}, seed {seed} "
                                       f"(other games have seed {seed})")


def load_results(raw_root: Path | str, *, scale: str, suite: str, protocol: str,
            expected_tasks: Iterable[str] | None = None) -> pd.DataFrame:
    """All raw results of one scale/suite/protocol, one row per (method, variant, task, seed).

    ``expected_tasks``: when given, the main variant of every method that has any run must
    cover all of them (a game that never finished is an error, not a smaller mean).
    """
    rows = [load_row(p, scale=scale, protocol=protocol) for p in raw_files(raw_root, scale, suite, protocol)]
    import pandas as pd

    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df = df.astype({"seed": int, "score": float, "success_rate": float, "episodes": int})
    _check_grid(df, expected_tasks)
    return df.sort_values(["method", "variant", "task", "seed"], ignore_index=True)
