"""The results figures (PNG), each written atomically by one function that returns its path.

The set of files is fixed: a figure whose inputs do not exist at this scale (no Meta-World
run, no MoW run, no clusters file yet) is written as a labelled placeholder saying so, so the
pipeline's last rule can declare every figure as an output and a reader never mistakes a
missing input for an empty result.

Figures are drawn on a bare ``matplotlib.figure.Figure`` (Agg rendering, no pyplot): no global
backend switch and no figure registry that could leak between calls.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from mow import metrics
from mow.checkpoint import atomic_write_bytes
from mow.results.collect import MAIN_VARIANT, ResultsError

DPI = 120
#: Fixed colours, so a method looks the same in every figure.
COLOURS = {"storm_official": "#7f7f7f", "storm_repro": "#1f77b4", "mow_repro": "#d62728",
           "SimPLe": "#bcbd22", "IRIS": "#9467bd", "DIAMOND": "#2ca02c"}
METHOD_ORDER = tuple(COLOURS)
PROFILE_TAUS = np.linspace(0.0, 8.0, 81)  # the HNS range rliable plots for Atari


# --------------------------------------------------------------------------- writing
def save(fig: Figure, path: Path | str) -> Path:
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def placeholder(path: Path | str, title: str, scale: str, reason: str = "") -> Path:
    """A figure that says plainly why it has no data."""
    fig = Figure(figsize=(6.4, 3.2))
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.62, title, ha="center", va="center", fontsize=15, weight="bold", transform=ax.transAxes)
    ax.text(0.5, 0.40, f"not run at scale {scale}", ha="center", va="center", fontsize=13, color="#b00",
            transform=ax.transAxes)
    if reason:
        ax.text(0.5, 0.20, reason, ha="center", va="center", fontsize=9, color="#555", transform=ax.transAxes,
                wrap=True)
    return save(fig, path)


def _grid(n: int, width: float = 3.6, height: float = 2.6) -> tuple[Figure, list]:
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig, axes[:n]


# --------------------------------------------------------------------------- run folders
def read_metrics(path: Path | str) -> list[dict]:
    """The lines of one ``metrics.jsonl`` (a torn last line from a killed writer is skipped)."""
    path = Path(path)
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue
            raise ResultsError(f"{path}:{i + 1}: not a JSON line") from None
    return out


def series(records: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(env step, value) pairs of one metric key, in step order."""
    pts = sorted((float(r["step"]), float(r[key])) for r in records if key in r and "step" in r)
    if not pts:
        return np.empty(0), np.empty(0)
    steps, values = np.asarray(pts).T
    return steps, values


def _method_dir(runs_root: Path | str, scale: str, suite: str, protocol: str, method: str) -> Path:
    return Path(runs_root) / scale / suite / protocol / method / MAIN_VARIANT


def run_curves(runs_root: Path | str, *, scale: str, suite: str, protocol: str, key: str = "episode/return"
               ) -> dict[str, dict[str, list[tuple[np.ndarray, np.ndarray]]]]:
    """``{task: {method_label: [(steps, values) per seed]}}`` from every run folder's metrics.jsonl.

    Single-task runs log ``key``; a MoW multi-task run (task folder ``all``) logs ``key/<task>``.
    """
    curves: dict[str, dict[str, list]] = {}
    for method, label in (("storm", "storm_repro"), ("mow", "mow_repro")):
        for file in sorted(_method_dir(runs_root, scale, suite, protocol, method).glob("*/seed*/metrics.jsonl")):
            records = read_metrics(file)
            task = file.parent.parent.name
            keys = ({k[len(key) + 1:]: k for r in records for k in r if k.startswith(key + "/")}
                    if task == "all" else {task: key})
            for name, k in keys.items():
                steps, values = series(records, k)
                if steps.size:
                    curves.setdefault(name, {}).setdefault(label, []).append((steps, values))
    return dict(sorted(curves.items()))


def _band(runs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean and min/max over seeds on a common step grid (episodes end at different steps per seed)."""
    if len(runs) == 1:
        steps, values = runs[0]
        return steps, values, values, values
    start = max(s[0] for s, _ in runs)
    stop = min(s[-1] for s, _ in runs)
    grid = np.linspace(start, stop, 100) if stop > start else np.array([stop])
    stack = np.stack([np.interp(grid, s, v) for s, v in runs])
    return grid, stack.mean(0), stack.min(0), stack.max(0)


# --------------------------------------------------------------------------- figures from run folders
def learning_curves(runs_root: Path | str, out: Path | str, *, scale: str, suite: str, protocol: str,
                    key: str = "episode/return") -> Path:
    curves = run_curves(runs_root, scale=scale, suite=suite, protocol=protocol, key=key)
    title = f"Learning curves ({suite}, {protocol})"
    if not curves:
        return placeholder(out, title, scale, f"no `{key}` in any metrics.jsonl under {runs_root}")
    fig, axes = _grid(len(curves))
    for ax, (task, methods) in zip(axes, curves.items()):
        for label, runs in methods.items():
            x, mean, lo, hi = _band(runs)
            ax.plot(x, mean, color=COLOURS[label], label=f"{label} ({len(runs)} seed{'s' * (len(runs) > 1)})")
            if len(runs) > 1:
                ax.fill_between(x, lo, hi, color=COLOURS[label], alpha=0.2, linewidth=0)
        ax.set_title(task)
        ax.set_xlabel("env steps")
        ax.set_ylabel("episode return")
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}, scale {scale}: mean over seeds, band = min-max")
    return save(fig, out)


def sigma(runs_root: Path | str, out: Path | str, *, scale: str, suite: str, protocol: str) -> Path:
    """MoW's per-task uncertainty weight sigma_k over training (the harmonious loss weighting)."""
    curves = run_curves(runs_root, scale=scale, suite=suite, protocol=protocol, key="wm/sigma")
    per_task = {task: m["mow_repro"] for task, m in curves.items() if "mow_repro" in m}
    title = "MoW task uncertainty sigma_k"
    if not per_task:
        return placeholder(out, title, scale, "no `wm/sigma/<task>` in a MoW run's metrics.jsonl")
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.add_subplot()
    colours = _task_colours(len(per_task))
    for colour, (task, runs) in zip(colours, per_task.items()):
        x, mean, _, _ = _band(runs)
        ax.plot(x, mean, color=colour, label=task)
    ax.set_xlabel("env steps")
    ax.set_ylabel("sigma_k")
    ax.set_title(f"{title} per task ({suite}, scale {scale}, mean over seeds)")
    ax.legend(fontsize=7, ncol=max(1, len(per_task) // 13), loc="best")
    return save(fig, out)


def _task_colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab20"] if n > 10 else colormaps["tab10"]
    return [cmap(i % cmap.N) for i in range(n)]


# --------------------------------------------------------------------------- figures from tables
def _bar_group(ax, labels: Sequence[str], groups: Sequence[str], values, lows, highs, colours) -> None:
    """Grouped bars: one group per ``groups`` entry, one bar per label, CI whiskers where known."""
    width = 0.8 / max(1, len(labels))
    x = np.arange(len(groups))
    for i, label in enumerate(labels):
        v, lo, hi = (np.asarray(a[i], dtype=float) for a in (values, lows, highs))
        err = np.vstack([v - lo, hi - v])
        err = np.where(np.isfinite(err), err, 0.0)
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, np.nan_to_num(v), width, yerr=err, capsize=3,
               color=colours[i], label=label)
    ax.set_xticks(x, groups)
    ax.legend(fontsize=8)


def hns_bars(summary: pd.DataFrame, out: Path | str, *, scale: str, protocol: str) -> Path:
    metrics_shown = {"mean_hns": "mean", "median_hns": "median", "iqm_hns": "IQM"}
    rows = summary[summary["metric"].isin(metrics_shown)]
    title = "Atari 100k aggregate human-normalised score"
    if rows.empty:
        return placeholder(out, title, scale)
    methods = [m for m in METHOD_ORDER if m in set(rows["method"])]
    table = {k: rows.pivot(index="method", columns="metric", values=k).loc[methods, list(metrics_shown)].to_numpy()
             for k in ("value", "ci_low", "ci_high")}
    fig = Figure(figsize=(9, 4.8), layout="constrained")
    ax = fig.add_subplot()
    _bar_group(ax, methods, list(metrics_shown.values()), table["value"], table["ci_low"], table["ci_high"],
               [COLOURS[m] for m in methods])
    ax.axhline(1.0, color="k", linestyle=":", linewidth=1)
    ax.set_ylabel("HNS (1.0 = human)")
    n_games = int(rows["n_games"].iloc[0])
    ax.set_title(f"{title}\n{n_games} game(s), scale {scale}, protocol {protocol}; whiskers: 95 % bootstrap CI")
    return save(fig, out)


def performance_profile(matrices: Mapping[str, np.ndarray], out: Path | str, *, scale: str,
                        reps: int = 2000, seed: int = 0) -> Path:
    title = "Performance profile (Atari 100k)"
    if not matrices:
        return placeholder(out, title, scale)
    profiles = metrics.performance_profile(dict(matrices), PROFILE_TAUS, reps=reps, seed=seed)
    fig = Figure(figsize=(7, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for label in [m for m in METHOD_ORDER if m in profiles]:
        curve, lo, hi = profiles[label]
        ax.plot(PROFILE_TAUS, curve, color=COLOURS[label], label=label)
        ax.fill_between(PROFILE_TAUS, lo, hi, color=COLOURS[label], alpha=0.15, linewidth=0)
    ax.set_xlabel("human-normalised score tau")
    ax.set_ylabel("fraction of runs with score > tau")
    n_games = next(iter(matrices.values())).shape[1]
    ax.set_title(f"{title}, {n_games} game(s), scale {scale}")
    ax.legend(fontsize=8)
    return save(fig, out)


def params_bars(params: pd.DataFrame, out: Path | str, *, scale: str) -> Path:
    title = "Model size (fp32)"
    parts = params[params["component"] != "total"]
    if parts.empty:
        return placeholder(out, title, scale, "empty parameter table")
    models = list(dict.fromkeys(parts["model"]))
    components = list(dict.fromkeys(parts["component"]))
    mib = parts.pivot(index="component", columns="model", values="mib_fp32").loc[components, models].fillna(0.0)
    fig = Figure(figsize=(max(6.0, 2.2 * len(models)), 5), layout="constrained")
    ax = fig.add_subplot()
    bottom = np.zeros(len(models))
    for colour, comp in zip(_task_colours(len(components)), components):
        ax.bar(models, mib.loc[comp].to_numpy(), bottom=bottom, color=colour, label=comp)
        bottom += mib.loc[comp].to_numpy()
    totals = params[params["component"] == "total"].set_index("model")
    paper = totals.reindex(models)["paper_mib_fp32"].to_numpy(dtype=float)
    if np.isfinite(paper).any():
        ax.scatter(models, paper, marker="D", color="k", zorder=3, label="paper")
    for i, total in enumerate(bottom):
        ax.annotate(f"{total:.1f} MiB", (i, total), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("MiB of fp32 weights")
    ax.set_title(f"{title} per component; diamonds: the paper's reported size")
    ax.legend(fontsize=7)
    return save(fig, out)


def ablation_bars(ablations: pd.DataFrame, out: Path | str, *, scale: str) -> Path:
    title = "MoW ablations"
    if ablations.empty:
        return placeholder(out, title, scale, "no raw result of a MoW variant other than `full`")
    shown = {"mean_hns": "mean", "median_hns": "median", "iqm_hns": "IQM"}
    variants = list(ablations["variant"])

    def grab(suffix: str) -> np.ndarray:
        return ablations[[f"{m}{suffix}" for m in shown]].to_numpy(dtype=float)

    fig = Figure(figsize=(9, 4.8), layout="constrained")
    ax = fig.add_subplot()
    _bar_group(ax, variants, list(shown.values()), grab(""), grab("_ci_low"), grab("_ci_high"),
               _task_colours(len(variants)))
    ax.set_ylabel("HNS (1.0 = human)")
    ax.set_title(f"{title}, scale {scale}; whiskers: 95 % bootstrap CI")
    return save(fig, out)


def metaworld_success(table: pd.DataFrame, out: Path | str, *, scale: str) -> Path:
    title = "Meta-World success rate per task"
    per_task = table[table["task"] != "mean success"]
    if per_task.empty:
        return placeholder(out, title, scale, "no Meta-World raw result")
    labels = [c[: -len("_success")] for c in table.columns
              if c.endswith("_success") and per_task[c].notna().any()]
    fig = Figure(figsize=(8, 1.0 + 0.28 * len(per_task) * max(1, len(labels))), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(per_task))
    height = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        ax.barh(y + i * height, per_task[f"{label}_success"].to_numpy(dtype=float), height,
                color=COLOURS.get(label), label=label)
    ax.set_yticks(y + height * (len(labels) - 1) / 2, per_task["task"])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("success rate (mean over seeds)")
    ax.set_title(f"{title}, scale {scale}")
    ax.legend(fontsize=8)
    return save(fig, out)


# --------------------------------------------------------------------------- figures from side files
def _read_json(path: Path | str, fields: set[str]) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ResultsError(f"{path}: unreadable ({exc})") from None
    missing = fields - set(doc)
    if missing:
        raise ResultsError(f"{path}: lacks field(s) {sorted(missing)}")
    return doc


def similarity_matrix(clusters_json: Path | str | None, out: Path | str, *, scale: str) -> Path:
    """Task-similarity heatmap, tasks grouped by cluster, cluster boundaries drawn."""
    title = "Task similarity and clusters"
    if clusters_json is None or not Path(clusters_json).exists():
        return placeholder(out, title, scale, "no clusters.json")
    doc = _read_json(clusters_json, {"tasks", "assignment", "similarity", "num_clusters"})
    tasks, labels = list(doc["tasks"]), np.asarray(doc["assignment"], dtype=int)
    sim = np.asarray(doc["similarity"], dtype=float)
    if sim.shape != (len(tasks), len(tasks)) or labels.shape != (len(tasks),):
        raise ResultsError(f"{clusters_json}: similarity {sim.shape} / assignment {labels.shape} "
                           f"do not match {len(tasks)} tasks")
    order = np.lexsort((np.arange(len(tasks)), labels))
    fig = Figure(figsize=(max(6.0, 2.5 + 0.32 * len(tasks)), max(5.0, 1.6 + 0.3 * len(tasks))), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(sim[np.ix_(order, order)], cmap="RdBu_r", vmin=-1, vmax=1)
    names = [f"{tasks[i]} [{labels[i]}]" for i in order]
    ax.set_xticks(range(len(tasks)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(tasks)), names, fontsize=7)
    for edge in np.flatnonzero(np.diff(labels[order])) + 0.5:
        ax.axhline(edge, color="k", linewidth=1.5)
        ax.axvline(edge, color="k", linewidth=1.5)
    fig.colorbar(image, ax=ax, label="cosine similarity of task gradients")
    ax.set_title(f"{title}\n{doc['num_clusters']} clusters (id in brackets), {doc.get('method', '?')}, "
                 f"scale {scale}")
    return save(fig, out)


def expert_usage(routing_json: Path | str | None, out: Path | str, *, scale: str) -> Path:
    """Task x expert routing weights; dots mark each task's top-k experts."""
    title = "MoW expert usage"
    if routing_json is None or not Path(routing_json).exists():
        return placeholder(out, title, scale, "no routing.json")
    doc = _read_json(routing_json, {"tasks", "num_experts", "weights"})
    tasks, weights = list(doc["tasks"]), np.asarray(doc["weights"], dtype=float)
    if weights.shape != (len(tasks), int(doc["num_experts"])):
        raise ResultsError(f"{routing_json}: weights have shape {weights.shape}, "
                           f"expected {(len(tasks), int(doc['num_experts']))}")
    fig = Figure(figsize=(max(6.0, 2.5 + 0.45 * weights.shape[1]), max(4.0, 1.5 + 0.3 * len(tasks))),
                 layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(weights, cmap="viridis", vmin=0, aspect="auto")
    if "indices" in doc:
        idx = np.asarray(doc["indices"], dtype=int)
        rows, cols = np.repeat(np.arange(len(tasks)), idx.shape[1]), idx.ravel()
        ax.scatter(cols, rows, s=12, color="w", edgecolors="k", linewidths=0.5, label="top-k")
        ax.legend(fontsize=7, loc="upper right")
    ax.set_xticks(range(weights.shape[1]))
    ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
    ax.set_xlabel("expert")
    fig.colorbar(image, ax=ax, label="routing weight")
    ax.set_title(f"{title}\nrouting weight per task and expert (scale {scale})")
    return save(fig, out)


def imagination(imagination_npz: Path | str | None, out: Path | str, *, scale: str) -> Path:
    """Real frames above imagined frames, one block per task."""
    title = "Imagination: real vs imagined frames"
    if imagination_npz is None or not Path(imagination_npz).exists():
        return placeholder(out, title, scale, "no imagination.npz")
    with np.load(imagination_npz, allow_pickle=False) as data:
        real, imagined, tasks = data["real"], data["imagined"], [str(t) for t in data["tasks"]]
    if real.shape != imagined.shape or real.ndim != 5 or real.shape[0] != len(tasks):
        raise ResultsError(f"{imagination_npz}: real {real.shape} and imagined {imagined.shape} must both be "
                           f"[{len(tasks)} tasks, T, H, W, 3]")
    k, t, h = real.shape[:3]
    fig = Figure(figsize=(max(4.0, 0.75 * t), 0.5 + 1.6 * k), layout="constrained")
    axes = fig.subplots(k, 1, squeeze=False)[:, 0]
    for ax, task, r, i in zip(axes, tasks, real, imagined):
        strip = np.concatenate([np.concatenate(list(r), axis=1), np.concatenate(list(i), axis=1)], axis=0)
        ax.imshow(strip.astype(np.uint8), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([h / 2, h * 1.5], ["real", "imagined"], fontsize=8)
        ax.set_ylabel(task, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(f"{title}, {t} steps per task (scale {scale})")
    return save(fig, out)
