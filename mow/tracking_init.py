"""Create the MLflow store, the suites' experiments and the parent runs once, before parallel jobs.

Several pipeline jobs starting at once against a fresh SQLite store crash while creating its
tables, and two jobs that both miss a parent run would each create one. The Snakefile's
``onstart:`` handler runs this module once (one process for every suite, before any job):

    python -m mow.tracking_init --scale smoke --parent atari:storm/full --parent atari:mow/full \
        --parent metaworld:mow/full

It goes through :class:`mow.tracking.Tracker`'s own lookup code (``_experiment`` and
``_find_or_create`` with the same tags), so the jobs find exactly these runs. Idempotent.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

from mow.tracking import StoreUnavailable, Tracker, _retry, tracking_uri


def init_tracking(suite: str, scale: str, parents: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Experiment `mow-<suite>` and one parent run per (method, variant); returns {method/variant: run id}."""
    from mlflow.tracking import MlflowClient

    tracker = Tracker.__new__(Tracker)  # only the store-side helpers, no child run
    tracker.client = _retry(lambda: MlflowClient(tracking_uri()), "open the store")
    exp_id = tracker._experiment(f"mow-{suite}")
    runs = {}
    for method, variant in parents:
        runs[f"{method}/{variant}"] = tracker._find_or_create(
            exp_id, {"mow.parent_key": f"{method}/{variant}/{scale}"}, run_name=f"{method}/{variant}",
            extra_tags={"mow.method": method, "mow.variant": variant, "mow.scale": scale})
    return runs


def _parent(text: str) -> tuple[str, str, str]:
    suite, colon, run = text.partition(":")
    method, sep, variant = run.partition("/")
    if not colon or not suite or not sep or not method or not variant or "/" in variant:
        raise argparse.ArgumentTypeError(f"expected SUITE:METHOD/VARIANT, got '{text}'")
    return suite, method, variant


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mow.tracking_init", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", required=True)
    p.add_argument("--parent", dest="parents", type=_parent, action="append", required=True,
                   metavar="SUITE:METHOD/VARIANT")
    args = p.parse_args(argv)
    by_suite: dict[str, list[tuple[str, str]]] = {}
    for suite, method, variant in args.parents:
        by_suite.setdefault(suite, []).append((method, variant))
    try:
        for suite, parents in by_suite.items():  # one process: MLflow is imported and the store opened once
            runs = init_tracking(suite, args.scale, parents)
            print(f"MLflow {tracking_uri()}: experiment mow-{suite}, {len(runs)} parent run(s) ready")
    except StoreUnavailable as exc:  # the jobs spool their calls (mow/tracking.py); do not stop the DAG
        print(f"warning: {exc}; the pipeline runs on, each job keeps its MLflow calls in its run folder",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
