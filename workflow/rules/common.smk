# Shared helpers: the run grid the params define, the run-folder and raw-result paths
# (mow/runs.py), the MoW variants and suites a run covers, and the per-scale job resources.
import functools

# Wildcards are single path components: a protocol, variant or task never spans a "/".
wildcard_constraints:
    suite=r"[a-z]+",
    protocol=r"[A-Za-z0-9_]+",
    method=r"[a-z]+",
    variant=r"[A-Za-z0-9_]+",
    task=r"[A-Za-z0-9_\-]+",
    game=r"[A-Za-z0-9_]+",
    seed=r"\d+",


def atari_protocols():
    return [name for name, proto in P["protocols"].items() if proto["suite"] == "atari"]


def mow_suites():
    """The suites MoW runs on: Atari always, Meta-World when params.yaml declares the suite."""
    return [s for s in ("atari", "metaworld") if s in P["suites"]]


def suite_protocol(suite):
    """The protocol MoW is trained and evaluated under: `protocol:` for Atari, else the suite's first."""
    if suite == "atari":
        return P["protocol"]
    return next(name for name, proto in P["protocols"].items() if proto["suite"] == suite)


def raw_result(suite, protocol, method, variant, task, seed):
    return f"results/raw/{SCALE}/{suite}/{protocol}/{method}/{variant}/{task}/seed{seed}.json"


def run_dir(suite, protocol, method, variant, task, seed):
    """One training's folder (mow.runs.RunSpec.run_dir); a MoW run trains every task (task `all`)."""
    return f"runs/{SCALE}/{suite}/{protocol}/{method}/{variant}/{task}/seed{seed}"


@functools.cache
def warmup_owner_of(suite):
    """{variant: variant whose warm-up model it trains from} on `suite` (mow.config.warmup_owners)."""
    from mow.config import warmup_owners

    return warmup_owners(dict(config), scale=SCALE, suite=suite)


def warmup_model(wildcards):
    """The warm-up model a MoW run's cluster step and training read: its own variant's, or that
    of the variant it shares it with (they differ only in the clustering), so the pretrain job
    runs once for them all."""
    owner = warmup_owner_of(wildcards.suite)[wildcards.variant]
    return f"{run_dir(wildcards.suite, wildcards.protocol, 'mow', owner, 'all', wildcards.seed)}/warmup/pretrain.ckpt"


def trained_model(wildcards):
    """The model file an evaluation job reads: the task's own run, or MoW's joint run."""
    from mow.runs import MULTITASK_METHODS

    task = "all" if wildcards.method in MULTITASK_METHODS else wildcards.task
    run = run_dir(wildcards.suite, wildcards.protocol, wildcards.method, wildcards.variant, task, wildcards.seed)
    return f"{run}/model.ckpt"


def storm_results(protocols=None):
    """Every STORM raw file: each Atari game x seed, on every Atari protocol by default."""
    return [raw_result("atari", protocol, "storm", "full", game, seed)
            for protocol in (protocols or atari_protocols())
            for game in P["suites"]["atari"]["tasks"]
            for seed in P["seeds"]]


# Which MoW variants run (on the default protocol `P["protocol"]` only; STORM runs every
# Atari protocol): every variant under `variants:` in params.yaml (full + the ablations and
# sweeps) at every scale, so the smoke scale exercises each one. The pipeline option
# `ablations` narrows that: `none` (full only) or a list, e.g.
#     snakemake --cores all --config ablations=none
#     snakemake --cores all --config ablations=[no_experts,single_vae]
# It is not a parameter: the Snakefile takes it out of the config before params.yaml is
# validated (its schema allows no unknown key). Meta-World runs the full variant only.
def mow_variants():
    extra = ABLATIONS if ABLATIONS is not None else "all"
    if isinstance(extra, str):
        extra = {"all": list(P["variants"]), "none": []}.get(extra, [v for v in extra.split(",") if v])
    unknown = [v for v in extra if v not in P["variants"]]
    if unknown:
        raise ValueError(f"config ablations: unknown variant(s) {', '.join(map(str, unknown))} "
                         f"(valid: {', '.join(P['variants'])}, or all / none)")
    return ["full", *[v for v in dict.fromkeys(extra) if v != "full"]]


def mow_runs(suite="atari"):
    """(protocol, variant, seed) of every MoW training on `suite`."""
    variants = mow_variants() if suite == "atari" else ["full"]
    return [(suite_protocol(suite), variant, seed) for variant in variants for seed in P["seeds"]]


def mow_results(suite="atari"):
    """Every MoW raw file on `suite`: each task x variant x seed."""
    return [raw_result(suite, protocol, "mow", variant, task, seed)
            for protocol, variant, seed in mow_runs(suite)
            for task in P["suites"][suite]["tasks"]]


def mow_side_files():
    """What the MoW figures read: the full Atari run with the lowest seed (mow.results.mow_side_file)."""
    run = run_dir("atari", P["protocol"], "mow", "full", "all", min(P["seeds"]))
    return [f"{run}/warmup/clusters.json", f"{run}/routing.json", f"{run}/imagination.npz"]


def aggregate_inputs():
    """The raw files the results stages read: STORM on the default protocol, MoW on every suite."""
    return [*storm_results([P["protocol"]]), *(raw for suite in mow_suites() for raw in mow_results(suite))]


# The results stages' outputs (names fixed in mow.results), annotated for `snakemake --report
# report.html` (after a run): captions in workflow/report/; figures under "Figures", the CSV
# tables and DVC summaries under "Tables", REPORT.md under "Report".
def _caption(name):
    return "../report/{}.rst".format(name)  # relative to this file (workflow/rules/)


def table_outputs():
    from snakemake.io import report as annotate  # a bare `report` opens the report: directive here

    from mow.results import SUMMARIES, TABLES

    return [
        *(annotate(f"results/{name}", caption=_caption("tables"), category="Tables", subcategory="Results tables",
                   labels={"file": name}) for name in TABLES),
        *(annotate(f"results/{name}", caption=_caption("summaries"), category="Tables", subcategory="DVC summaries",
                   labels={"file": name}) for name in SUMMARIES),
    ]


def figure_outputs():
    from snakemake.io import report as annotate

    from mow.results import FIGURES

    return [annotate(f"results/figures/{name}", caption=_caption(name), category="Figures", labels={"figure": name})
            for name in FIGURES]


def report_output():
    from snakemake.io import report as annotate

    from mow.results import REPORT

    return annotate(f"results/{REPORT}", caption=_caption("report"), category="Report", labels={"file": REPORT})


# Per-job resources, by scale. runtime is in minutes, mem_mb in MB, gpu a count (the SLURM
# executor turns it into --gpus=N; 0 requests none). smoke: minutes on 2 CPU cores; paper:
# one GPU for a 102k-step run (raise runtime for a slow GPU).
PAPER = SCALE == "paper"
# Threads of a training-type job: the smoke models are too small to gain from a second
# thread, so on a 2-core machine two smoke jobs run side by side instead.
TRAIN_THREADS = 2 if PAPER else 1
TRAIN_RESOURCES = dict(mem_mb=32000, runtime=600, gpu=1) if PAPER else dict(mem_mb=4000, runtime=30, gpu=0)
# MoW trains all 26 games in one model (~255 M parameters) for 26 x 102k env steps, data
# parallel over `train.nproc_per_node` ranks in one job (torchrun on one node): one GPU per
# rank at the paper scale (`sbatch --gpus=N`), TRAIN_THREADS CPUs per rank (the job's threads).
# The ranks share the replay (each holds 1/N of the env steps); each adds a model copy.
NPROC = P["train"]["nproc_per_node"]
MOW_TRAIN_RESOURCES = (dict(mem_mb=128000 + 16000 * (NPROC - 1), runtime=7 * 1440, gpu=NPROC) if PAPER
                       else dict(mem_mb=6000 + 2000 * (NPROC - 1), runtime=30, gpu=0))
# The training command of train_mow: `python -m mow`, or torchrun starting NPROC ranks of it
# (--standalone: a single-node rendezvous on a free local port, so jobs sharing a node never
# collide). Ranks talk NCCL on GPUs, gloo on CPU (mow/train_mow.py).
MOW_TRAIN = MOW if NPROC == 1 else f"{sys.executable} -m torch.distributed.run --standalone --nproc-per-node {NPROC} -m mow"
COLLECT_RESOURCES = dict(mem_mb=16000, runtime=60, gpu=0) if PAPER else dict(mem_mb=2000, runtime=10, gpu=0)
WARMUP_RESOURCES = dict(mem_mb=32000, runtime=240, gpu=1) if PAPER else dict(mem_mb=4000, runtime=10, gpu=0)
# How a MoW model's tasks are evaluated (evaluate.smk): at the paper scale one job per task, so
# the 26 evaluations of a model run side by side on the cluster; below it one job per model,
# because a smoke task's episodes take less time than a job's start (importing torch and
# MLflow, opening the store, loading the model: ~7 s of a ~14 s job on 2 cores).
MOW_EVAL_PER_TASK = PAPER
EVAL_TASK_METHODS = r"[a-z]+" if MOW_EVAL_PER_TASK else "storm"  # methods `rule evaluate` serves
# Evaluation plays the protocol's episodes (100 at most) with a loaded model: one GPU helps.
EVAL_RESOURCES = dict(mem_mb=16000, runtime=120, gpu=1) if PAPER else dict(mem_mb=2000, runtime=10, gpu=0)
# Bootstrap resamples behind every confidence interval of the tables, figures and report:
# rliable's 2,000 at the paper scale; 200 at smoke scale, whose 2 games x 1 seed make any
# interval meaningless and whose results stages would otherwise be a minute of the DAG.
BOOTSTRAP_REPS = 2000 if PAPER else 200
REPORT_RESOURCES = dict(mem_mb=8000, runtime=60, gpu=0) if PAPER else dict(mem_mb=2000, runtime=10, gpu=0)
