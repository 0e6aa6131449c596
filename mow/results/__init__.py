"""Tables, figures and REPORT.md, regenerated from the raw per-seed evaluation files.

    results/raw/...              (input: mow.results.collect.load_results)
    results/<TABLES>             (mow.results.tables)
    results/<SUMMARIES>          (mow.results.summary: metrics.json and curves.csv, for DVC)
    results/figures/<FIGURES>    (mow.results.figures)
    results/REPORT.md            (mow.results.report)

The output file names are fixed (``TABLES``, ``SUMMARIES``, ``FIGURES``, ``REPORT``) whatever was run, so
the pipeline's last rule can declare them; :func:`build_all` writes every one of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mow.results.collect import ResultsError, load_results

TABLES = ("atari_table.csv", "atari_summary.csv", "params.csv", "ablations.csv", "metaworld_table.csv")
FIGURES = ("learning_curves.png", "hns_bars.png", "performance_profile.png", "similarity_matrix.png",
           "expert_usage.png", "sigma.png", "imagination.png", "params_bars.png", "ablation_bars.png",
           "metaworld_success.png")
#: For DVC: ``metrics:`` (aggregates per method) and ``plots:`` (learning curves, x=step, y=return).
SUMMARIES = ("metrics.json", "curves.csv")
REPORT = "REPORT.md"
METAWORLD = "metaworld"

__all__ = ["FIGURES", "REPORT", "SUMMARIES", "TABLES", "ResultsError", "build_all", "load_results", "mow_side_file",
           "outputs"]


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


def build_all(raw_root: Path | str, runs_root: Path | str, results_dir: Path | str, scale: str, protocol: str,
              params_dict: Mapping | None, clusters_json: Path | str | None = None,
              routing_json: Path | str | None = None, imagination_npz: Path | str | None = None, *,
              params_table=None, reps: int = 2000, seed: int = 0, git_commit: str | None = None,
              date: str | None = None) -> list[Path]:
    """Write every table, figure and REPORT.md for one scale and Atari protocol; return their paths.

    The MoW side files default to those of the full MoW run with the lowest seed (``mow_side_file``).

    ``params_dict``: the *resolved* parameters of this scale (``load_params(...).to_dict()``):
    its Atari task list is what every method that ran must cover, and the report prints the
    open decisions from it. ``params_table``: a ``mow.paramcount.ParamsTable`` (computed when None).
    """
    from mow import metrics
    from mow.results import figures, report, summary, tables

    clusters_json = clusters_json or mow_side_file(runs_root, scale, protocol, "clusters")
    routing_json = routing_json or mow_side_file(runs_root, scale, protocol, "routing")
    imagination_npz = imagination_npz or mow_side_file(runs_root, scale, protocol, "imagination")
    results_dir = Path(results_dir)
    fig_dir = results_dir / "figures"
    mw_protocol = _metaworld_protocol(params_dict)
    atari = load_results(raw_root, scale=scale, suite="atari", protocol=protocol,
                    expected_tasks=_expected_tasks(params_dict, "atari"))
    metaworld = load_results(raw_root, scale=scale, suite=METAWORLD, protocol=mw_protocol,
                        expected_tasks=_expected_tasks(params_dict, METAWORLD))
    reference = metrics.load_reference_scores()
    stats = {"reps": reps, "seed": seed}
    where = {"scale": scale, "suite": "atari", "protocol": protocol}
    built = {
        "atari_table.csv": tables.atari_table(atari, reference, scale=scale, protocol=protocol, **stats),
        "atari_summary.csv": tables.atari_summary(atari, reference, scale=scale, protocol=protocol, **stats),
        "params.csv": tables.params_csv(params_table),
        "ablations.csv": tables.ablations_table(atari, reference, scale=scale, protocol=protocol, **stats),
        "metaworld_table.csv": tables.metaworld_table(metaworld, scale=scale, protocol=mw_protocol, **stats),
    }
    paths = [tables.write_table(built[name], results_dir / name) for name in TABLES]
    paths += [
        summary.write_metrics_json(summary.metrics_summary(built["atari_summary.csv"], built["metaworld_table.csv"],
                                                           scale=scale, protocol=protocol,
                                                           metaworld_protocol=mw_protocol),
                                   results_dir / "metrics.json"),
        summary.write_curves_csv(summary.learning_curves_frame(runs_root, **where), results_dir / "curves.csv"),
    ]

    _, matrices = tables.hns_matrices(atari, reference, literature=False)
    run_matrices = matrices if len(matrices) > 1 else {}  # only the official file: nothing of ours to profile
    drawn = {
        "learning_curves.png": lambda p: figures.learning_curves(runs_root, p, **where),
        "hns_bars.png": lambda p: figures.hns_bars(built["atari_summary.csv"], p, scale=scale, protocol=protocol),
        "performance_profile.png": lambda p: figures.performance_profile(run_matrices, p, scale=scale, **stats),
        "similarity_matrix.png": lambda p: figures.similarity_matrix(clusters_json, p, scale=scale),
        "expert_usage.png": lambda p: figures.expert_usage(routing_json, p, scale=scale),
        "sigma.png": lambda p: figures.sigma(runs_root, p, **where),
        "imagination.png": lambda p: figures.imagination(imagination_npz, p, scale=scale),
        "params_bars.png": lambda p: figures.params_bars(built["params.csv"], p, scale=scale),
        "ablation_bars.png": lambda p: figures.ablation_bars(built["ablations.csv"], p, scale=scale),
        "metaworld_success.png": lambda p: figures.metaworld_success(built["metaworld_table.csv"], p, scale=scale),
    }
    paths += [drawn[name](fig_dir / name) for name in FIGURES]

    paths.append(report.write_report(
        results_dir, scale=scale, protocol=protocol, summary=built["atari_summary.csv"],
        metaworld=built["metaworld_table.csv"], params=built["params.csv"], params_dict=params_dict,
        figures=FIGURES, table_files=TABLES, git_commit=git_commit, date=date, **stats))
    return paths
