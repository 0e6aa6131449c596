"""Synthetic inputs for the mow.results tests: raw files with known answers, run folders, side files.

Scores are built from chosen human-normalised scores (HNS) through the pinned reference
table, so every expected aggregate can be worked out by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mow import metrics
from mow.paramcount import ParamsTable

REPO = Path(__file__).resolve().parents[1]
SCALE, SUITE, PROTOCOL = "smoke", "atari", "storm_compat"

# HNS per seed (seeds 1, 2, 3). STORM per-game means: Pong 0.5, Breakout 1.0, Boxing 2.0
# -> mean 7/6, median 1.0; over the 9 cells IQM = mean(0.5, 1, 1, 1.5, 2) = 1.2 and
# optimality gap = 1 - mean(min(x, 1)) = 1 - 7/9 = 2/9.
STORM_HNS = {"Pong": [0.0, 0.5, 1.0], "Breakout": [0.5, 1.0, 1.5], "Boxing": [2.0, 2.0, 2.0]}
MOW_HNS = {"Pong": [1.0, 1.0, 1.0], "Breakout": [1.0, 1.0, 1.0], "Boxing": [1.0, 1.0, 1.0]}
GAMES = ("Pong", "Breakout", "Boxing")


def score(game: str, hns: float) -> float:
    ref = metrics.load_reference_scores()
    lo, hi = ref.at[game, "random"], ref.at[game, "human"]
    return float(lo + hns * (hi - lo))


def raw_path(root: Path, *, method: str, task: str, seed: int, variant: str = "full", scale: str = SCALE,
             suite: str = SUITE, protocol: str = PROTOCOL) -> Path:
    return Path(root) / scale / suite / protocol / method / variant / task / f"seed{seed}.json"


def write_raw(root: Path, *, method: str, task: str, seed: int, returns, variant: str = "full",
              scale: str = SCALE, suite: str = SUITE, protocol: str = PROTOCOL, successes=None,
              override: dict | None = None) -> Path:
    """One raw file in the layout and format `mow evaluate` writes; ``override`` changes what the file says."""
    path = raw_path(root, method=method, task=task, seed=seed, variant=variant, scale=scale, suite=suite,
                    protocol=protocol)
    record = {
        "format": 1, "suite": suite, "method": method, "variant": variant, "task": task, "seed": seed,
        "scale": scale, "protocol": protocol, "protocol_config": {}, "returns": list(returns),
        "lengths": [100] * len(returns), "mean_return": float(np.mean(returns)) if len(returns) else None,
        "std_return": float(np.std(returns)) if len(returns) else None, "checkpoint_sha256": "0" * 64,
        "params_hash": "p0", "mlflow_run_id": f"run-{method}-{variant}-{task}-{seed}", "git_commit": "abc123",
    }
    if successes is not None:
        record["successes"] = list(successes)
    record.update(override or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def write_known(root: Path, method: str, hns: dict[str, list[float]], variant: str = "full", **kw) -> list[Path]:
    """Each seed's episodes are (s - 1, s + 1): the file's mean is exactly the chosen score s."""
    paths = []
    for game, per_seed in hns.items():
        for seed, h in enumerate(per_seed, start=1):
            s = score(game, h)
            paths.append(write_raw(root, method=method, task=game, seed=seed, returns=[s - 1.0, s + 1.0],
                                   variant=variant, **kw))
    return paths


def fake_params_table(extra: bool = False) -> ParamsTable:
    """A parameter table shaped like mow.paramcount's, without building any model."""
    columns = {"STORM x1 (18 act.)": {"vae": 1_000_000, "transformer": 3_000_000},
               "STORM x26 (minimal)": {"vae": 26_000_000, "transformer": 78_000_000}}
    references = {"STORM x26 (minimal)": 1977.5}
    if extra:
        columns["MoW"] = {"vae": 12_000_000, "transformer": 40_000_000}
        references["MoW"] = 972.5
    return ParamsTable(components=["vae", "transformer"], columns=columns, references=references)


# --------------------------------------------------------------------------- run folders and side files
def write_metrics(path: Path, lines: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def write_runs(runs_root: Path, games=("Pong", "Breakout"), seeds=(1, 2)) -> None:
    """STORM single-game run folders and one MoW multi-task folder, like a smoke run leaves them."""
    base = Path(runs_root) / SCALE / SUITE / PROTOCOL
    for game in games:
        for seed in seeds:
            lines = [{"step": step, "episode/return": float(step / 100 + seed), "wm/total": 1.0}
                     for step in range(100, 1300, 100)]
            write_metrics(base / "storm" / "full" / game / f"seed{seed}" / "metrics.jsonl", lines)
    for seed in seeds:
        lines = []
        for step in range(100, 1300, 100):
            line = {"step": step}
            for i, game in enumerate(games):
                line[f"episode/return/{game}"] = float(step / 50 + i + seed)
                line[f"wm/sigma/{game}"] = 1.0 + 0.1 * i + step / 1e4
            lines.append(line)
        write_metrics(base / "mow" / "full" / "all" / f"seed{seed}" / "metrics.jsonl", lines)


def write_side_files(root: Path, tasks=("Pong", "Breakout", "Boxing"), experts: int = 4, frames: int = 4
                     ) -> tuple[Path, Path, Path]:
    """clusters.json, routing.json and imagination.npz in the formats the MoW stages write."""
    root.mkdir(parents=True, exist_ok=True)
    k = len(tasks)
    rng = np.random.default_rng(0)
    sim = np.eye(k) * 0.5 + 0.5
    clusters = root / "clusters.json"
    clusters.write_text(json.dumps({"tasks": list(tasks), "assignment": [1, 0, 1][:k], "num_clusters": 2,
                                    "similarity": sim.tolist(), "seed": 0, "method": "agglomerative"}))
    weights = rng.dirichlet(np.ones(experts), size=k)
    routing = root / "routing.json"
    routing.write_text(json.dumps({"tasks": list(tasks), "num_experts": experts, "weights": weights.tolist(),
                                   "indices": np.argsort(-weights, axis=1)[:, :2].tolist()}))
    imagination = root / "imagination.npz"
    real = rng.integers(0, 255, size=(k, frames, 64, 64, 3), dtype=np.uint8)
    np.savez(imagination, real=real, imagined=255 - real, tasks=np.array(tasks))
    return clusters, routing, imagination
