"""Tables, figures and REPORT.md, regenerated from the raw per-seed evaluation files.

    results/raw/...              (input: mow.results.collect.load_results)
    results/<TABLES>             (mow.results.tables)
    results/<SUMMARIES>          (mow.results.summary: metrics.json and curves.csv, for DVC)
    results/figures/<FIGURES>    (mow.results.figures)
    results/REPORT.md            (mow.results.report)

The output file names are fixed (``TABLES``, ``SUMMARIES``, ``FIGURES``, ``REPORT``) whatever was run, so
the pipeline's rules can declare them. Three stages, one pipeline rule each: :func:`aggregate` (tables and
summaries from the raw files), :func:`draw_figures` and :func:`write_report` (both from the tables);
:func:`build_all` runs the three in order.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from mow.results.collect import ResultsError, load_results

if TYPE_CHECKING:
    import pandas as pd

TABLES = ("atari_table.csv", "atari_summary.csv", "params.csv", "ablations.csv", "metaworld_table.csv")
FIGURES = ("learning_curves.png", "hns_bars.png", "performance_profile.png", "similarity_matrix.png",
           "expert_usage.png", "sigma.png", "imagination.png", "params_bars.png", "ablation_bars.png",
           "metaworld_success.png")
#: For DVC: ``metrics:`` (aggregates per method) and ``plots:`` (learning curves, x=step, y=return).
SUMMARIES = ("metrics.json", "curves.csv")
REPORT = "REPORT.md"
METAWORLD = "metaworld"

__all__ = ["FIGURES", "REPORT", "SUMMARIES", "TABLES", "ResultsError", "aggregate", "build_all", "draw_figures",
           "load_results", "mow_side_file", "outputs", "read_tables", "write_report"]


def outputs(results_dir: Path | str = "results") -> list[Path]:
    """Every file :func:`build_all` writes, in the order it returns them."""
    root = Path(results_dir)
    return [*(root / t for t in TABLES), *(root / s for s in SUMMARIES), *(root / "figures" / f for f in FIGURES),
            root / REPORT]


def _expected_tasks(params_dict: Mapping | None, suite: str) -> list[str] | None:
    try:
        return list(params_dict["suites"][suite]["tasks"])  # type: ignore[index]
    except (KeyError, TypeError):
        return None


def _metaworld_protocol(params_dict: Mapping | None) -> str:
    """The first protocol declared for the Meta-World suite (the suite has one protocol)."""
    for name, proto in ((params_dict or {}).get("protocols") or {}).items():
        if isinstance(proto, Mapping) and proto.get("suite") == METAWORLD:
            return name
    return METAWORLD


#: Where a MoW run folder keeps the side files of the figures (see mow/runs.py).
MOW_SIDE_FILES = {"clusters": "warmup/clusters.json", "routing": "routing.json", "imagination": "imagination.npz"}


def mow_side_file(runs_root: Path | str, scale: str, protocol: str, kind: str) -> Path | None:
    """The side file of the full MoW Atari run with the lowest seed, or None when there is none."""
    base = Path(runs_root) / scale / "atari" / protocol / "mow" / "full" / "all"
    seeds = sorted((int(d.name[4:]), d) for d in base.glob("seed*") if d.name[4:].isdigit())
    return next((d / MOW_SIDE_FILES[kind] for _, d in seeds if (d / MOW_SIDE_FILES[kind]).exists()), None)


def _load_runs(raw_root, scale: str, protocol: str, params_dict: Mapping | None):
    """The raw Atari (on `protocol`) and Meta-World results; the Meta-World protocol."""
    mw_protocol = _metaworld_protocol(params_dict)
    atari = load_results(raw_root, scale=scale, suite="atari", protocol=protocol,
                         expected_tasks=_expected_tasks(params_dict, "atari"))
    metaworld = load_results(raw_root, scale=scale, suite=METAWORLD, protocol=mw_protocol,
                             expected_tasks=_expected_tasks(params_dict, METAWORLD))
    return atari, metaworld, mw_protocol


def aggregate(raw_root: Path | str, runs_root: Path | str, results_dir: Path | str, scale: str, protocol: str,
              params_dict: Mapping | None, *, params_table=None, reps: int = 2000, seed: int = 0) -> list[Path]:
    """Stage 1 (`mow aggregate`): every table (``TABLES``) and DVC summary (``SUMMARIES``) from the raw files.

    ``params_dict``: the *resolved* parameters of this scale (``load_params(...).to_dict()``):
    its task lists are what every method that ran must cover. ``params_table``: a
    ``mow.paramcount.ParamsTable`` (computed when None).
    """
    from mow import metrics
    from mow.results import summary, tables

    results_dir = Path(results_dir)
    atari, metaworld, mw_protocol = _load_runs(raw_root, scale, protocol, params_dict)
    reference = metrics.load_reference_scores()
    stats = {"reps": reps, "seed": seed}
    built = {
        "atari_table.csv": tables.atari_table(atari, reference, scale=scale, protocol=protocol, **stats),
        "atari_summary.csv": tables.atari_summary(atari, reference, scale=scale, protocol=protocol, **stats),
        "params.csv": tables.params_csv(params_table),
        "ablations.csv": tables.ablations_table(atari, reference, scale=scale, protocol=protocol, **stats),
        "metaworld_table.csv": tables.metaworld_table(metaworld, scale=scale, protocol=mw_protocol, **stats),
    }
    paths = [tables.write_table(built[name], results_dir / name) for name in TABLES]
    return paths + [
        summary.write_metrics_json(summary.metrics_summary(built["atari_summary.csv"], built["metaworld_table.csv"],
                                                           scale=scale, protocol=protocol,
                                                           metaworld_protocol=mw_protocol),
                                   results_dir / "metrics.json"),
        summary.write_curves_csv(summary.learning_curves_frame(runs_root, scale=scale, suite="atari",
                                                               protocol=protocol), results_dir / "curves.csv"),
    ]


def read_tables(results_dir: Path | str) -> dict[str, pd.DataFrame]:
    """The tables `aggregate` wrote, by file name; a missing one is named with the command that writes it."""
    import pandas as pd

    found = {}
    for name in TABLES:
        path = Path(results_dir) / name
        if not path.is_file():
            raise ResultsError(f"{path}: not found (run `mow aggregate` first)")
        try:
            found[name] = pd.read_csv(path)
        except (ValueError, pd.errors.ParserError) as exc:
            raise ResultsError(f"{path}: not a readable table ({exc})") from exc
    return found


def draw_figures(raw_root: Path | str, runs_root: Path | str, results_dir: Path | str, scale: str, protocol: str,
                 params_dict: Mapping | None, clusters_json: Path | str | None = None,
                 routing_json: Path | str | None = None, imagination_npz: Path | str | None = None, *,
                 reps: int = 2000, seed: int = 0) -> list[Path]:
    """Stage 2 (`mow figures`): every figure (``FIGURES``) from the tables, the raw files and run folders.

    The MoW side files default to those of the full MoW run with the lowest seed (``mow_side_file``).
    """
    from mow import metrics
    from mow.results import figures, tables

    built = read_tables(results_dir)
    clusters_json = clusters_json or mow_side_file(runs_root, scale, protocol, "clusters")
    routing_json = routing_json or mow_side_file(runs_root, scale, protocol, "routing")
    imagination_npz = imagination_npz or mow_side_file(runs_root, scale, protocol, "imagination")
    fig_dir = Path(results_dir) / "figures"
    atari, _, _ = _load_runs(raw_root, scale, protocol, params_dict)
    _, matrices = tables.hns_matrices(atari, metrics.load_reference_scores(), literature=False)
    run_matrices = matrices if len(matrices) > 1 else {}  # only the official file: nothing of ours to profile
    where = {"scale": scale, "suite": "atari", "protocol": protocol}
    drawn = {
        "learning_curves.png": lambda p: figures.learning_curves(runs_root, p, **where),
        "hns_bars.png": lambda p: figures.hns_bars(built["atari_summary.csv"], p, scale=scale, protocol=protocol),
        "performance_profile.png": lambda p: figures.performance_profile(run_matrices, p, scale=scale, reps=reps,
                                                                         seed=seed),
        "similarity_matrix.png": lambda p: figures.similarity_matrix(clusters_json, p, scale=scale),
        "expert_usage.png": lambda p: figures.expert_usage(routing_json, p, scale=scale),
        "sigma.png": lambda p: figures.sigma(runs_root, p, **where),
        "imagination.png": lambda p: figures.imagination(imagination_npz, p, scale=scale),
        "params_bars.png": lambda p: figures.params_bars(built["params.csv"], p, scale=scale),
        "ablation_bars.png": lambda p: figures.ablation_bars(built["ablations.csv"], p, scale=scale),
        "metaworld_success.png": lambda p: figures.metaworld_success(built["metaworld_table.csv"], p, scale=scale),
    }
    return [drawn[name](fig_dir / name) for name in FIGURES]


def write_report(results_dir: Path | str, scale: str, protocol: str, params_dict: Mapping | None, *,
                 reps: int = 2000, seed: int = 0, git_commit: str | None = None, date: str | None = None) -> Path:
    """Stage 3 (`mow report`): REPORT.md from the tables, linking the tables and figures."""
    from mow.results import report

    built = read_tables(results_dir)
    return report.write_report(
        results_dir, scale=scale, protocol=protocol, summary=built["atari_summary.csv"],
        metaworld=built["metaworld_table.csv"], params=built["params.csv"], params_dict=params_dict,
        figures=FIGURES, table_files=TABLES, git_commit=git_commit, date=date, reps=reps, seed=seed)


def build_all(raw_root: Path | str, runs_root: Path | str, results_dir: Path | str, scale: str, protocol: str,
              params_dict: Mapping | None, clusters_json: Path | str | None = None,
              routing_json: Path | str | None = None, imagination_npz: Path | str | None = None, *,
              params_table=None, reps: int = 2000, seed: int = 0, git_commit: str | None = None,
              date: str | None = None) -> list[Path]:
    """The three stages in order (`mow report --all`): every table, figure and REPORT.md; their paths."""
    stats = {"reps": reps, "seed": seed}
    paths = aggregate(raw_root, runs_root, results_dir, scale, protocol, params_dict, params_table=params_table,
                      **stats)
    paths += draw_figures(raw_root, runs_root, results_dir, scale, protocol, params_dict, clusters_json,
                          routing_json, imagination_npz, **stats)
    paths.append(write_report(results_dir, scale, protocol, params_dict, git_commit=git_commit, date=date, **stats))
    return paths
