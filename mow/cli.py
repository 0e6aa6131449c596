"""`mow` command line: one verb per pipeline step.

    mow train --game Pong --seed 1            train (or resume) STORM on one game, then evaluate
    mow evaluate --game Pong --seed 1         evaluate a finished run (or --model PATH)
    mow params                                parameter counts per component (STORM, 26 STORMs)
    mow bench                                 throughput benchmark, written as JSON

Bad input ends with one line `mow: error: ...` naming the key, file or value, exit code 2,
and nothing written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mow.config import ConfigError, load_params

EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad command-line input; the message names the argument and the value."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default=None, help="parameter file (default: ./params.yaml)")
    p.add_argument("--scale", default=None, help="scale preset from params.yaml (smoke, paper, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any parameter by dotted path, e.g. --set train.env_steps=5000 (repeatable)")


def _run_args(p: argparse.ArgumentParser, *, task_required: bool = True) -> None:
    p.add_argument("--suite", default="atari", help="task suite (atari, sanity)")
    p.add_argument("--method", default="storm", help="method (storm)")
    p.add_argument("--variant", default="full", help="variant name (ablations)")
    p.add_argument("--task", "--game", dest="task", required=task_required, help="task / Atari game, e.g. Pong")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--protocol", default=None, help="protocol from params.yaml (default: the suite's default)")
    p.add_argument("--runs-root", default="runs", type=Path)
    p.add_argument("--results-root", default="results/raw", type=Path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) one run, then evaluate it")
    _common(p)
    _run_args(p)
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow (metrics.jsonl is still written)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("evaluate", help="evaluate a finished run under its protocol")
    _common(p)
    _run_args(p, task_required=False)
    p.add_argument("--model", type=Path, default=None, help="model file (default: the run folder's model.ckpt)")
    p.add_argument("--out", type=Path, default=None, help="raw JSON path (default: results/raw/...)")
    p.add_argument("--episodes", type=int, default=None, help="override the protocol's episode count")

    p = sub.add_parser("params", help="parameter counts per component")
    _common(p)
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON")

    p = sub.add_parser("bench", help="throughput benchmark (JSON)")
    _common(p)
    p.add_argument("--scales", default="smoke,paper", help="comma-separated scales to measure")
    p.add_argument("--out", type=Path, default=Path("bench/bench.json"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--imag-batch", type=int, default=None, help="override the imagination batch (scaled to the full batch)")
    return parser


def resolve_spec(args, params):
    from mow.envs import ATARI_GAMES, SANITY_TASKS
    from mow.runs import METHODS, RunSpec

    valid_tasks = {"atari": ATARI_GAMES, "sanity": SANITY_TASKS}
    if args.suite not in valid_tasks:
        raise UsageError(f"--suite: unknown suite '{args.suite}' (valid: {', '.join(valid_tasks)})")
    if args.method not in METHODS:
        raise UsageError(f"--method: unknown method '{args.method}' (valid: {', '.join(METHODS)})")
    if args.task not in valid_tasks[args.suite]:
        raise UsageError(f"--task: unknown {args.suite} task '{args.task}' (valid: {', '.join(valid_tasks[args.suite])})")
    if args.seed < 0:
        raise UsageError(f"--seed: must be >= 0, got {args.seed}")
    protocol = args.protocol or (params["protocol"] if args.suite == "atari" else args.suite)
    proto = params.protocol(protocol)
    if proto["suite"] != args.suite:
        raise UsageError(f"--protocol: '{protocol}' is a {proto['suite']} protocol, not for suite '{args.suite}'")
    return RunSpec(suite=args.suite, method=args.method, variant=args.variant, task=args.task, seed=args.seed,
                   protocol=protocol, scale=params.scale)


def cmd_train(args) -> int:
    from mow.checkpoint import file_sha256
    from mow.evaluate import evaluate
    from mow.train import Trainer

    params = load_params(args.params, scale=args.scale, overrides=args.overrides)
    spec = resolve_spec(args, params)
    trainer = Trainer(spec, params, runs_root=args.runs_root, track=not args.no_track, progress=not args.no_progress)
    model = trainer.run()
    try:
        out = spec.raw_result(args.results_root)
        if not args.no_eval and _evaluated(out, model):
            print(f"{spec.name}: already evaluated -> {out}")
        elif not args.no_eval:
            record = evaluate(model, out_path=out)
            trainer.tracker.log({"eval/mean_return": record["mean_return"], "eval/std_return": record["std_return"],
                                 "eval/episodes": len(record["returns"])}, trainer.step)
            trainer.tracker.log_artifact(out, "eval")
            print(f"{spec.name}: mean return {record['mean_return']:.2f} over {len(record['returns'])} episodes -> {out}")
        trainer.tracker.set_tags({"mow.checkpoint_sha256": file_sha256(model)})
    except BaseException:
        trainer.tracker.finish("FAILED")
        raise
    trainer.tracker.finish("FINISHED")
    return 0


def _evaluated(raw: Path, model: Path) -> bool:
    """The raw result exists and was produced from exactly this model file."""
    from mow.checkpoint import file_sha256

    try:
        return json.loads(Path(raw).read_text()).get("checkpoint_sha256") == file_sha256(model)
    except (OSError, ValueError):
        return False


def cmd_evaluate(args) -> int:
    from mow.evaluate import evaluate
    from mow.runs import model_path

    if args.episodes is not None and args.episodes < 1:
        raise UsageError(f"--episodes: must be >= 1, got {args.episodes}")
    if args.model is None:
        if args.task is None:
            raise UsageError("evaluate: give --model PATH or the run (--task/--game, --seed, ...)")
        params = load_params(args.params, scale=args.scale, overrides=args.overrides)
        spec = resolve_spec(args, params)
        model, out = model_path(spec.run_dir(args.runs_root)), args.out or spec.raw_result(args.results_root)
    else:
        model = args.model
        if args.out is None:
            raise UsageError("--out: required with --model")
        out = args.out
    if not Path(model).is_file():
        raise UsageError(f"--model: checkpoint not found: {model}")
    record = evaluate(model, out_path=out, episodes=args.episodes)
    print(f"mean return {record['mean_return']:.2f} over {len(record['returns'])} episodes -> {out}")
    return 0


def cmd_params(args) -> int:
    from mow.paramcount import params_table

    load_params(args.params, scale=args.scale, overrides=args.overrides)  # validates the input
    table = params_table()
    print(table.render())
    if args.json:
        from mow.checkpoint import atomic_write_text

        atomic_write_text(args.json, json.dumps(table.as_dict(), indent=1) + "\n")
    return 0


def cmd_bench(args) -> int:
    from mow.bench import run_bench

    scales = [s for s in args.scales.split(",") if s]
    params = {s: load_params(args.params, scale=s, overrides=args.overrides) for s in scales}  # validate first
    if args.repeats < 1:
        raise UsageError(f"--repeats: must be >= 1, got {args.repeats}")
    run_bench(params, out=args.out, repeats=args.repeats, imag_batch=args.imag_batch)
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "params": cmd_params, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    from mow.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, UsageError, CheckpointError) as exc:
        print(f"mow: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
