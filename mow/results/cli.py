"""`mow aggregate`, `mow figures`, `mow report`: the results stages, one pipeline rule each.

    mow aggregate   tables (TABLES) and DVC summaries (metrics.json, curves.csv) from results/raw
    mow figures     every figure (FIGURES) from those tables, the raw files and the run folders
    mow report      REPORT.md from the tables; `--all` runs the three stages in order

Registered by ``mow/cli.py`` through :func:`add_parsers`; each handler returns the exit code.
Bad input ends with one line ``mow: error: ...`` naming the file, game or seed, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE = 2
STAGES = ("aggregate", "figures", "report")


def add_parsers(subparsers) -> None:
    helps = {"aggregate": "tables, metrics.json and curves.csv from results/raw",
             "figures": "every figure from the tables (run `mow aggregate` first)",
             "report": "REPORT.md from the tables; --all: aggregate, figures and report in one go"}
    for stage in STAGES:
        p = subparsers.add_parser(stage, help=helps[stage])
        p.add_argument("--raw-root", type=Path, default=Path("results/raw"), help="raw per-seed evaluation files")
        p.add_argument("--runs-root", type=Path, default=Path("runs"), help="run folders (metrics.jsonl curves)")
        p.add_argument("--results-dir", type=Path, default=Path("results"),
                       help="where tables, metrics.json, curves.csv, figures/ and REPORT.md go")
        p.add_argument("--scale", default=None, help="scale preset (default: params.yaml's `scale`)")
        p.add_argument("--protocol", default=None, help="Atari protocol (default: params.yaml's `protocol`)")
        p.add_argument("--params", type=Path, default=None, help="parameter file (default: ./params.yaml)")
        p.add_argument("--reps", type=int, default=2000, help="bootstrap resamples for every CI")
        p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
        if stage != "aggregate":
            side = "(default: the one in the full MoW run folder with the lowest seed)"
            p.add_argument("--clusters", type=Path, default=None, help=f"clusters.json {side}")
            p.add_argument("--routing", type=Path, default=None, help=f"routing.json {side}")
            p.add_argument("--imagination", type=Path, default=None, help=f"imagination.npz {side}")
        if stage == "report":
            p.add_argument("--all", action="store_true", help="first aggregate and draw the figures")
        p.set_defaults(func=run, stage=stage)


def run(args: argparse.Namespace) -> int:
    from mow.config import ConfigError, load_params
    from mow import results

    try:
        params = load_params(args.params, scale=args.scale)
        tree = params.to_dict()
        where = dict(scale=params.scale, protocol=args.protocol or tree["protocol"], params_dict=tree)
        stats = dict(reps=args.reps, seed=args.seed)
        side = {key: getattr(args, key.split("_")[0], None) for key in ("clusters_json", "routing_json",
                                                                          "imagination_npz")}
        if args.stage == "aggregate":
            paths = results.aggregate(args.raw_root, args.runs_root, args.results_dir, **where, **stats)
        elif args.stage == "figures":
            paths = results.draw_figures(args.raw_root, args.runs_root, args.results_dir, **where, **side, **stats)
        elif args.all:
            paths = results.build_all(args.raw_root, args.runs_root, args.results_dir, **where, **side, **stats)
        else:
            paths = [results.write_report(args.results_dir, **where, **stats)]
    except (ConfigError, results.ResultsError) as exc:
        print(f"mow: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.stage}: wrote {len(paths)} files (last: {paths[-1]})")
    return 0
