"""`mow` command line: one verb per pipeline step.

    mow train --game Pong --seed 1            train (or resume) STORM on one game, then evaluate
    mow train --method mow --seed 1           MoW on every task of the suite: warm-up (collect,
                                              pretrain, cluster: each skipped when done), joint
                                              training (resumes), evaluation of every task
    mow collect | pretrain | cluster          the MoW warm-up steps one at a time (the pipeline)
    mow evaluate --game Pong --seed 1         evaluate a finished run (or --model PATH)
    mow params                                parameter counts per component (MoW, STORM, 26 STORMs)
    mow bench                                 throughput benchmark, written as JSON

Bad input ends with one line `mow: error: ...` naming the key, file or value, exit code 2,
and nothing written.
"""

from __future__ import annotations

import argparse
import contextlib
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


def _run_args(p: argparse.ArgumentParser, *, method: bool = True) -> None:
    p.add_argument("--suite", default="atari", help="task suite (atari, sanity)")
    if method:
        p.add_argument("--method", default="storm", help="method (storm, mow)")
        p.add_argument("--task", "--game", dest="task", default=None,
                       help="task / Atari game, e.g. Pong (STORM; MoW trains every task of the suite)")
    p.add_argument("--variant", default="full", help="MoW variant from params.yaml `variants:` (ablations)")
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

    for verb, text in (("collect", "MoW warm-up: fixed random-policy replay of every task"),
                       ("pretrain", "MoW warm-up: train the shared VAE and heads offline"),
                       ("cluster", "MoW warm-up: per-task gradients -> clusters.json")):
        p = sub.add_parser(verb, help=text)
        _common(p)
        _run_args(p, method=False)
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("evaluate", help="evaluate a finished run under its protocol")
    _common(p)
    _run_args(p)
    p.add_argument("--model", type=Path, default=None, help="model file (default: the run folder's model.ckpt)")
    p.add_argument("--out", type=Path, default=None, help="raw JSON path (default: results/raw/...)")
    p.add_argument("--episodes", type=int, default=None, help="override the protocol's episode count")

    p = sub.add_parser("params", help="parameter counts per component")
    _common(p)
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON")

    p = sub.add_parser("bench", help="throughput benchmark (JSON)")
    _common(p)
    p.add_argument("--scales", default="smoke,paper", help="comma-separated scales to measure")
    p.add_argument("--out", type=Path, default=Path("results/bench/bench.json"),
                   help="JSON output; the figure is written next to it (.png)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sweep", action="store_true",
                   help="also time MoW against the number of tasks (2-26) and experts (3, 6, 12)")
    p.add_argument("--sweep-batch", default="16x16", help="BxT batch of the sweep's updates")
    p.add_argument("--imag-batch", type=int, default=None, help="override the imagination batch (scaled to the full batch)")

    from mow.results import cli as results_cli

    results_cli.add_parser(sub)
    return parser


def _load(args):
    return load_params(args.params, scale=args.scale, overrides=args.overrides, variant=args.variant)


def resolve_spec(args, params):
    from mow.envs import ATARI_GAMES, SANITY_TASKS
    from mow.runs import JOINT_TASK, METHODS, MULTITASK_METHODS, RunSpec

    valid_tasks = {"atari": ATARI_GAMES, "sanity": SANITY_TASKS}
    if args.suite not in valid_tasks:
        raise UsageError(f"--suite: unknown suite '{args.suite}' (valid: {', '.join(valid_tasks)})")
    method = getattr(args, "method", "mow")
    if method not in METHODS:
        raise UsageError(f"--method: unknown method '{method}' (valid: {', '.join(METHODS)})")
    task = getattr(args, "task", None)
    if method in MULTITASK_METHODS:
        if task not in (None, JOINT_TASK):
            raise UsageError(f"--task: {method} trains every task of suite '{args.suite}' together; "
                             f"choose them under suites.{args.suite}.tasks in params.yaml, not with --task")
        task = JOINT_TASK
    else:
        if args.variant != "full":
            raise UsageError(f"--variant: variants are MoW ablations; {method} has only 'full'")
        if task is None:
            raise UsageError(f"--task: required for {method} (one of {', '.join(valid_tasks[args.suite])})")
        if task not in valid_tasks[args.suite]:
            raise UsageError(f"--task: unknown {args.suite} task '{task}' (valid: {', '.join(valid_tasks[args.suite])})")
    if args.seed < 0:
        raise UsageError(f"--seed: must be >= 0, got {args.seed}")
    protocol = args.protocol or (params["protocol"] if args.suite == "atari" else args.suite)
    proto = params.protocol(protocol)
    if proto["suite"] != args.suite:
        raise UsageError(f"--protocol: '{protocol}' is a {proto['suite']} protocol, not for suite '{args.suite}'")
    return RunSpec(suite=args.suite, method=method, variant=args.variant, task=task, seed=args.seed,
                   protocol=protocol, scale=params.scale)


def _warmup_paths(args, params, spec):
    from mow.runs import clusters_path, pretrain_path, warmup_data_path

    run_dir = spec.run_dir(args.runs_root)
    data = warmup_data_path(args.runs_root, params.scale, spec.suite, spec.protocol, spec.seed)
    return data, pretrain_path(run_dir), clusters_path(run_dir)


def cmd_collect(args) -> int:
    from mow import warmup

    params = _load(args)
    spec = resolve_spec(args, params)
    data, _, _ = _warmup_paths(args, params, spec)
    warmup.collect(params, spec.suite, spec.protocol, spec.seed, data, progress=not args.no_progress)
    return 0


def cmd_pretrain(args) -> int:
    from mow import warmup

    params = _load(args)
    spec = resolve_spec(args, params)
    data, pretrained, _ = _warmup_paths(args, params, spec)
    warmup.pretrain(params, spec.suite, spec.seed, data, pretrained, progress=not args.no_progress)
    return 0


def cmd_cluster(args) -> int:
    from mow import warmup

    params = _load(args)
    spec = resolve_spec(args, params)
    data, pretrained, clusters = _warmup_paths(args, params, spec)
    warmup.cluster(params, spec.suite, spec.seed, data, pretrained, clusters)
    return 0


def _train_mow(args, params, spec) -> int:
    """Warm-up steps whose outputs are missing, joint training, then every task's evaluation."""
    from mow import warmup
    from mow.checkpoint import file_sha256
    from mow.evaluate import evaluate, load_model
    from mow.runtime import Runtime, select_device
    from mow.train_mow import MultiTaskTrainer, distributed

    tasks = warmup.check_suite_tasks(params, spec.suite)
    rank, world = distributed()
    data, pretrained, clusters = _warmup_paths(args, params, spec)
    if clusters.is_file():  # refuse a stale file before anything is written
        warmup.check_clusters_file(clusters, tasks, params)
    progress = not args.no_progress
    if rank == 0:
        if not data.is_file():
            warmup.collect(params, spec.suite, spec.protocol, spec.seed, data, progress=progress)
        if not pretrained.is_file():
            warmup.pretrain(params, spec.suite, spec.seed, data, pretrained, progress=progress)
        if not clusters.is_file():
            warmup.cluster(params, spec.suite, spec.seed, data, pretrained, clusters)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    trainer = MultiTaskTrainer(spec, params, runs_root=args.runs_root, track=not args.no_track, progress=progress)
    model = trainer.run()
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if rank != 0:
        return 0
    with _closing_run(trainer.tracker):
        if not args.no_eval:
            import dataclasses

            runtime = Runtime(select_device("auto"), amp_dtype=None)
            loaded = load_model(model, runtime.device)
            for task in trainer.tasks:
                out = dataclasses.replace(spec, task=task).raw_result(args.results_root)
                if _evaluated(out, model):
                    print(f"mow/{task}/seed{spec.seed}: already evaluated -> {out}")
                    continue
                record = evaluate(model, out_path=out, task=task, loaded=loaded)
                trainer.tracker.log_task_result(task, _eval_metrics(record), trainer.step, out)
                print(f"mow/{task}/seed{spec.seed}: mean return {record['mean_return']:.2f} over "
                      f"{len(record['returns'])} episodes -> {out}")
        trainer.tracker.set_tags({"mow.checkpoint_sha256": file_sha256(model)})
    return 0


@contextlib.contextmanager
def _closing_run(tracker):
    """End the MLflow run as FINISHED, or FAILED when the block raises (then re-raise)."""
    try:
        yield
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")


def _eval_metrics(record: dict) -> dict[str, float]:
    return {"eval/mean_return": record["mean_return"], "eval/std_return": record["std_return"],
            "eval/episodes": len(record["returns"])}


def cmd_train(args) -> int:
    from mow.checkpoint import file_sha256
    from mow.evaluate import evaluate
    from mow.runs import MULTITASK_METHODS
    from mow.train import Trainer

    params = _load(args)
    spec = resolve_spec(args, params)
    if spec.method in MULTITASK_METHODS:
        return _train_mow(args, params, spec)
    trainer = Trainer(spec, params, runs_root=args.runs_root, track=not args.no_track, progress=not args.no_progress)
    model = trainer.run()
    with _closing_run(trainer.tracker):
        out = spec.raw_result(args.results_root)
        if not args.no_eval and _evaluated(out, model):
            print(f"{spec.name}: already evaluated -> {out}")
        elif not args.no_eval:
            record = evaluate(model, out_path=out)
            trainer.tracker.log(_eval_metrics(record), trainer.step)
            trainer.tracker.log_artifact(out, "eval")
            print(f"{spec.name}: mean return {record['mean_return']:.2f} over {len(record['returns'])} episodes -> {out}")
        trainer.tracker.set_tags({"mow.checkpoint_sha256": file_sha256(model)})
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
        from mow.runs import MULTITASK_METHODS

        if args.task is None and args.method not in MULTITASK_METHODS:
            raise UsageError("evaluate: give --model PATH or the run (--task/--game, --seed, ...)")
        params = _load(args)
        spec = resolve_spec(args, params)
        model, out = model_path(spec.run_dir(args.runs_root)), args.out or spec.raw_result(args.results_root)
        if spec.method in MULTITASK_METHODS:
            return _evaluate_tasks(model, spec, params, args)
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


def _evaluate_tasks(model: Path, spec, params, args) -> int:
    """Every task of a multi-task model, one raw file each."""
    import dataclasses

    from mow.evaluate import evaluate, load_model
    from mow.runtime import select_device

    if not Path(model).is_file():
        raise UsageError(f"--model: checkpoint not found: {model}")
    loaded = load_model(model, select_device("auto"))
    for task in loaded[0]["tasks"]:
        out = dataclasses.replace(spec, task=task).raw_result(args.results_root)
        record = evaluate(model, out_path=out, episodes=args.episodes, task=task, loaded=loaded)
        print(f"{task}: mean return {record['mean_return']:.2f} over {len(record['returns'])} episodes -> {out}")
    return 0


def cmd_params(args) -> int:
    from mow.paramcount import params_table

    # the paper configuration (plus --set overrides): counts are about the published model
    params = load_params(args.params, scale=args.scale or "paper", overrides=args.overrides)
    table = params_table(params)
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
    try:
        sweep_batch = tuple(int(v) for v in args.sweep_batch.lower().split("x"))
    except ValueError:
        sweep_batch = ()
    if len(sweep_batch) != 2 or min(sweep_batch) < 1:
        raise UsageError(f"--sweep-batch: expected BxT with positive integers, got {args.sweep_batch!r}")
    run_bench(params, out=args.out, repeats=args.repeats, imag_batch=args.imag_batch, sweep=args.sweep,
              sweep_batch=sweep_batch)
    return 0


COMMANDS = {"train": cmd_train, "collect": cmd_collect, "pretrain": cmd_pretrain, "cluster": cmd_cluster,
            "evaluate": cmd_evaluate, "params": cmd_params, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    from mow.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        if args.command not in COMMANDS:  # subcommands that bring their own handler (report)
            return args.func(args)
        return COMMANDS[args.command](args)
    except (ConfigError, UsageError, CheckpointError) as exc:
        print(f"mow: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
