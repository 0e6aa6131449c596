"""`mow report`: regenerate every table, figure, metrics.json, curves.csv and REPORT.md from the raw results.

Registered by ``mow/cli.py`` through :func:`add_parser`; :func:`run` returns the exit code.
Bad raw input ends with one line ``mow: error: ...`` naming the file, game or seed, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE = 2


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("report", help="tables, figures, metrics.json, curves.csv and REPORT.md from results/raw")
    p.add_argument("--raw-root", type=Path, default=Path("results/raw"), help="raw per-seed evaluation files")
    p.add_argument("--runs-root", type=Path, default=Path("runs"), help="run folders (metrics.jsonl curves)")
    p.add_argument("--results-dir", type=Path, default=Path("results"),
                   help="where tables, metrics.json, curves.csv, figures/ and REPORT.md go")
    p.add_argument("--scale", default=None, help="scale preset (default: params.yaml's `scale`)")
    p.add_argument("--protocol", default=None, help="Atari protocol (default: params.yaml's `protocol`)")
    p.add_argument("--params", type=Path, default=None, help="parameter file (default: ./params.yaml)")
    side = "(default: the one in the full MoW run folder with the lowest seed)"
    p.add_argument("--clusters", type=Path, default=None, help=f"clusters.json {side}")
    p.add_argument("--routing", type=Path, default=None, help=f"routing.json {side}")
    p.add_argument("--imagination", type=Path, default=None, help=f"imagination.npz {side}")
    p.add_argument("--reps", type=int, default=2000, help="bootstrap resamples for every CI")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from mow.config import ConfigError, load_params
    from mow.results import ResultsError, build_all

    try:
        params = load_params(args.params, scale=args.scale)
        tree = params.to_dict()
        paths = build_all(args.raw_root, args.runs_root, args.results_dir, scale=params.scale,
                          protocol=args.protocol or tree["protocol"], params_dict=tree,
                          clusters_json=args.clusters, routing_json=args.routing,
                          imagination_npz=args.imagination, reps=args.reps, seed=args.seed)
    except (ConfigError, ResultsError) as exc:
        print(f"mow: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {len(paths)} files; report: {paths[-1]}")
    return 0
