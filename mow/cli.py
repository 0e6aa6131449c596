"""`mow` command line: one verb per pipeline step.

    mow train --game Pong --seed 1            train (or resume) STORM on one game, then evaluate
    mow train --method mow --seed 1           MoW on every task of the suite: warm-up (collect,
                                              pretrain, cluster: each skipped when done), joint
                                              training (resumes), evaluation of every task
    mow collect | pretrain | cluster          the MoW warm-up steps one at a time (the pipeline)
    mow evaluate --game Pong --seed 1         evaluate a finished run (or --model PATH); MoW: every
                                              task, or the one --task names
    mow aggregate | figures | report          results tables, figures, REPORT.md (report --all: all three)
    mow params                                parameter counts per component (MoW, STORM, 26 STORMs)
    mow bench                                 throughput benchmark, written as JSON
    mow bench-versions 021078a HEAD           one method's updates in two versions of this code,
                                              side by side (before/after a change), as JSON
    mow sync-mlflow [RUN_DIR ...]             send MLflow calls spooled while the store was down

Bad input ends with one line `mow: error: ...` naming the key, file or value, exit code 2,
and nothing written. A failure while running (a diverged loss, a full disk, an unwritable
folder, an MLflow store still down for `sync-mlflow`) is one line too, exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from mow.config import ConfigError, load_params

EXIT_USAGE = 2
EXIT_FAILURE = 1


class UsageError(ValueError):
    """Bad command-line input; the message names the argument and the value."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default=None, help="parameter file (default: ./params.yaml)")
    p.add_argument("--scale", default=None, help="scale preset from params.yaml (smoke, paper, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any parameter by dotted path, e.g. --set train.env_steps=5000 (repeatable)")


def _run_args(p: argparse.ArgumentParser, *, method: bool = True) -> None:
    p.add_argument("--suite", default="atari", help="task suite (atari, metaworld, sanity)")
    if method:
        p.add_argument("--method", default="storm", help="method (storm, mow)")
        p.add_argument("--task", "--game", dest="task", default=None,
                       help="task / Atari game, e.g. Pong or reach-v3 (STORM; MoW trains every task of the suite)")
    p.add_argument("--variant", default="full", help="MoW variant from params.yaml `variants:` (ablations)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--protocol", default=None, help="protocol from params.yaml (default: the suite's default)")
    p.add_argument("--runs-root", default="runs", type=Path)
    p.add_argument("--results-root", default="results/raw", type=Path)


class _Parser(argparse.ArgumentParser):
    """argparse's own errors as one line too (it prints the whole usage block otherwise)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"mow: error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--no-track", action="store_true", help="do not log the result to the run's MLflow run")

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
    p.add_argument("--profile", action="store_true",
                   help="also profile 3 calls of each part: phase times, top operators, CUDA kernels and host syncs")

    p = sub.add_parser("bench-versions", help="updates of two or more versions of this code, side by side (JSON)")
    p.add_argument("versions", nargs="+",
                   help="git revisions, each REV or REV+KEY=VALUE+... with overrides for it; . is the working tree")
    p.add_argument("--scale", default="paper", help="scale preset of each version's params.yaml")
    p.add_argument("--methods", default="storm,mow", help="comma-separated: storm, mow")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("results/bench/versions.json"), help="JSON output")

    p = sub.add_parser("sync-mlflow", help="send MLflow calls spooled while the store was down")
    p.add_argument("paths", nargs="*", type=Path, default=[Path("runs")],
                   help="run folders or mlflow_spool.jsonl files (default: every spool under runs/)")

    from mow.results import cli as results_cli

    results_cli.add_parsers(sub)
    return parser


def _load(args):
    return load_params(args.params, scale=args.scale, overrides=args.overrides, variant=args.variant,
                       suite=getattr(args, "suite", None))


def resolve_spec(args, params):
    from mow.envs import ATARI_GAMES, SANITY_TASKS
    from mow.runs import JOINT_TASK, METHODS, MULTITASK_METHODS, RunSpec

    valid_tasks = {"atari": ATARI_GAMES, "metaworld": None, "sanity": SANITY_TASKS}
    if args.suite not in valid_tasks:
        raise UsageError(f"--suite: unknown suite '{args.suite}' (valid: {', '.join(valid_tasks)})")
    if args.suite == "metaworld":  # imports mujoco (choosing the GL backend): only when asked for
        from mow.envs.metaworld import MT50_TASKS

        valid_tasks["metaworld"] = MT50_TASKS
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
    # default: `protocol:` for Atari, else the first protocol declared for the suite
    suite_protocols = [name for name, p in params["protocols"].items() if p["suite"] == args.suite]
    protocol = args.protocol or (params["protocol"] if args.suite == "atari" else
                                 (suite_protocols or [args.suite])[0])
    proto = params.protocol(protocol)
    if proto["suite"] != args.suite:
        raise UsageError(f"--protocol: '{protocol}' is a {proto['suite']} protocol, not for suite '{args.suite}'")
    return RunSpec(suite=args.suite, method=method, variant=args.variant, task=task, seed=args.seed,
                   protocol=protocol, scale=params.scale)


def _warmup_paths(args, params, spec, owner: str):
    """(warm-up data, warm-up model, clusters) of a MoW run. The warm-up model is the one of
    `owner`, the variant it shares it with (`_warmup_owner`); the clusters are its own."""
    import dataclasses

    from mow.runs import clusters_path, pretrain_path, warmup_data_path

    data = warmup_data_path(args.runs_root, params.scale, spec.suite, spec.protocol, spec.seed)
    pretrained = pretrain_path(dataclasses.replace(spec, variant=owner).run_dir(args.runs_root))
    return data, pretrained, clusters_path(spec.run_dir(args.runs_root))


def _warmup_owner(args) -> str:
    from mow.config import warmup_owners

    return warmup_owners(args.params, scale=args.scale, overrides=args.overrides,
                         suite=getattr(args, "suite", None))[args.variant]


def _warmup_params(args, params, owner: str):
    """The parameters the warm-up model is pretrained with: those of the variant that owns it."""
    if owner == args.variant:
        return params
    print(f"variant {args.variant} trains from the warm-up model of variant {owner} "
          f"(they differ only in the clustering)")
    return load_params(args.params, scale=args.scale, overrides=args.overrides, variant=owner,
                       suite=getattr(args, "suite", None))


def cmd_collect(args) -> int:
    from mow import warmup
    from mow.runs import warmup_data_path

    params = _load(args)
    spec = resolve_spec(args, params)
    data = warmup_data_path(args.runs_root, params.scale, spec.suite, spec.protocol, spec.seed)
    warmup.collect(params, spec.suite, spec.protocol, spec.seed, data, progress=not args.no_progress)
    return 0


def cmd_pretrain(args) -> int:
    from mow import warmup

    params = _load(args)
    spec = resolve_spec(args, params)
    owner = _warmup_owner(args)
    data, pretrained, _ = _warmup_paths(args, params, spec, owner)
    warmup.pretrain(_warmup_params(args, params, owner), spec.suite, spec.seed, data, pretrained,
                    progress=not args.no_progress)
    return 0


def cmd_cluster(args) -> int:
    from mow import warmup

    params = _load(args)
    spec = resolve_spec(args, params)
    data, pretrained, clusters = _warmup_paths(args, params, spec, _warmup_owner(args))
    warmup.cluster(params, spec.suite, spec.seed, data, pretrained, clusters)
    return 0


def _train_mow(args, params, spec) -> int:
    """Warm-up steps whose outputs are missing, joint training, then every task's evaluation."""
    from mow import warmup
    from mow.checkpoint import file_sha256
    from mow.evaluate import evaluate, load_model
    from mow.runtime import Runtime, select_device
    from mow.train_mow import MultiTaskTrainer, check_ranks, distributed

    tasks = warmup.check_suite_tasks(params, spec.suite)
    rank, world = distributed()
    check_ranks(params, world)   # before the warm-up writes anything
    owner = _warmup_owner(args)
    data, pretrained, clusters = _warmup_paths(args, params, spec, owner)
    if clusters.is_file():  # refuse a stale file before anything is written
        warmup.check_clusters_file(clusters, tasks, params)
    progress = not args.no_progress
    if rank == 0:
        if not data.is_file():
            warmup.collect(params, spec.suite, spec.protocol, spec.seed, data, progress=progress)
        if not pretrained.is_file():
            warmup.pretrain(_warmup_params(args, params, owner), spec.suite, spec.seed, data, pretrained,
                            progress=progress)
        if not clusters.is_file():
            warmup.cluster(params, spec.suite, spec.seed, data, pretrained, clusters)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    trainer = MultiTaskTrainer(spec, params, runs_root=args.runs_root, track=not args.no_track, progress=progress,
                               pretrained=pretrained)
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
                print(f"mow/{task}/seed{spec.seed}: {_summary(record)} -> {out}")
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
    out = {"eval/mean_return": record["mean_return"], "eval/std_return": record["std_return"],
           "eval/episodes": len(record["returns"])}
    if "success_rate" in record:
        out["eval/success_rate"] = record["success_rate"]
    return out


def _summary(record: dict) -> str:
    """'mean return R[, success rate S] over N episodes' for the console."""
    success = f", success rate {record['success_rate']:.2f}" if "success_rate" in record else ""
    return f"mean return {record['mean_return']:.2f}{success} over {len(record['returns'])} episodes"


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
            print(f"{spec.name}: {_summary(record)} -> {out}")
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
    """Evaluate a run's model file (or --model PATH) into raw JSON, logged to the run's MLflow run."""
    import dataclasses

    from mow.runs import MULTITASK_METHODS, model_path

    if args.episodes is not None and args.episodes < 1:
        raise UsageError(f"--episodes: must be >= 1, got {args.episodes}")
    if args.model is not None:
        if args.out is None:
            raise UsageError("--out: required with --model")
        return _evaluate_file(args.model, [(args.task, args.out)], args)
    if args.task is None and args.method not in MULTITASK_METHODS:
        raise UsageError("evaluate: give --model PATH or the run (--task/--game, --seed, ...)")
    params = _load(args)
    if params["train"]["threads"]:  # parallel pipeline jobs share the cores (`--set train.threads=1`)
        import torch

        torch.set_num_threads(int(params["train"]["threads"]))
    # a MoW run is the joint run (task `all`); --task picks one of its tasks (one pipeline job each)
    task = args.task if args.method in MULTITASK_METHODS else None
    spec = resolve_spec(argparse.Namespace(**{**vars(args), "task": None if task else args.task}), params)
    if spec.method not in MULTITASK_METHODS:
        return _evaluate_file(model_path(spec.run_dir(args.runs_root)), [(None, args.out or spec.raw_result(args.results_root))], args)
    from mow.warmup import check_suite_tasks

    tasks = check_suite_tasks(params, spec.suite)
    if task is not None and task not in tasks:
        raise UsageError(f"--task: '{task}' is not a task of suite '{spec.suite}' at this scale "
                         f"(valid: {', '.join(tasks)})")
    if args.out is not None and task is None:
        raise UsageError("--out: a MoW run writes one file per task; give --task with --out")
    jobs = [(t, args.out or dataclasses.replace(spec, task=t).raw_result(args.results_root)) for t in ([task] if task else tasks)]
    return _evaluate_file(model_path(spec.run_dir(args.runs_root)), jobs, args)


def _evaluate_file(model: Path, jobs: list[tuple[str | None, Path]], args) -> int:
    """Evaluate `model` on each (task, raw path) of `jobs` (task None: a single-task model)."""
    from mow.evaluate import evaluate, load_model
    from mow.runtime import select_device

    if not Path(model).is_file():
        raise UsageError(f"--model: checkpoint not found: {model}")
    loaded = load_model(model, select_device("auto"))
    for task, out in jobs:
        record = evaluate(model, out_path=out, episodes=args.episodes, task=task, loaded=loaded)
        if not args.no_track:
            _log_evaluation(record, Path(out), loaded[0], Path(model).parent)
        print(f"{record['method']}/{record['task']}/seed{record['seed']}: {_summary(record)} -> {out}")
    return 0


def _log_evaluation(record: dict, out: Path, payload: dict, run_dir: Path) -> None:
    """Add an evaluation to the MLflow run that trained the model (a nested child per task for MoW)."""
    from mow.runs import MULTITASK_METHODS, RunSpec
    from mow.tracking import Tracker

    if not record.get("mlflow_run_id"):
        return  # trained with --no-track: metrics.jsonl is all there is
    spec = RunSpec(**payload["spec"])
    tracker = Tracker(run_dir, suite=spec.suite, method=spec.method, variant=spec.variant, task=spec.task,
                      seed=spec.seed, protocol=spec.protocol, scale=spec.scale, params_tree=payload["params"],
                      params_hash=payload["params_hash"], resume_run_id=record["mlflow_run_id"])
    with _closing_run(tracker):
        step = int(record["env_steps_trained"])
        if spec.method in MULTITASK_METHODS:
            tracker.log_task_result(record["task"], _eval_metrics(record), step, out)
        else:
            tracker.log(_eval_metrics(record), step)
            tracker.log_artifact(out, "eval")


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
              sweep_batch=sweep_batch, profile=args.profile)
    return 0


def cmd_bench_versions(args) -> int:
    from mow.bench_versions import METHODS, compare_versions, markdown_table, parse_version
    from mow.checkpoint import atomic_write_text

    if len(args.versions) < 2:
        raise UsageError(f"bench-versions: give at least two versions to compare, got {args.versions}")
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UsageError(f"--methods: expected a comma-separated subset of {','.join(METHODS)}, got {args.methods!r}")
    if args.repeats < 1:
        raise UsageError(f"--repeats: must be >= 1, got {args.repeats}")
    try:
        for version in args.versions:
            parse_version(version)
        result = compare_versions(Path.cwd(), args.versions, scale=args.scale, methods=methods, repeats=args.repeats)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(markdown_table(result))
    print(f"bench-versions: wrote {args.out}")
    return 0


def cmd_sync_mlflow(args) -> int:
    from mow.tracking import sync_spools, tracking_uri

    try:
        done = sync_spools(args.paths)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    for spool, count in done:
        print(f"{spool}: sent {count} spooled calls to {tracking_uri()}")
    if not done:
        print("no spooled MLflow calls")
    return 0


def _interrupt_on_sigterm() -> None:
    """SLURM, Snakemake and `kill` stop a job with SIGTERM, which would end Python without
    unwinding: as KeyboardInterrupt the trainer marks its MLflow run KILLED, not RUNNING forever."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a test harness thread)
        pass


COMMANDS = {"sync-mlflow": cmd_sync_mlflow, "train": cmd_train, "collect": cmd_collect, "pretrain": cmd_pretrain, "cluster": cmd_cluster,
            "evaluate": cmd_evaluate, "params": cmd_params, "bench": cmd_bench,
            "bench-versions": cmd_bench_versions}


def main(argv: list[str] | None = None) -> int:
    from mow.checkpoint import CheckpointError, CheckpointWriteError
    from mow.tracking import StoreUnavailable

    args = build_parser().parse_args(argv)
    if args.command in ("train", "collect", "pretrain", "cluster"):
        _interrupt_on_sigterm()
    try:
        if args.command not in COMMANDS:  # subcommands that bring their own handler (report)
            return args.func(args)
        return COMMANDS[args.command](args)
    except CheckpointWriteError as exc:
        print(f"mow: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (ConfigError, UsageError, CheckpointError) as exc:
        print(f"mow: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a full disk or an unwritable folder outside the checkpoint writer
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"mow: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    except StoreUnavailable as exc:
        print(f"mow: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:
        from mow.train import TrainingDiverged

        if isinstance(exc, TrainingDiverged):
            print(f"mow: error: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        raise


if __name__ == "__main__":
    raise SystemExit(main())
