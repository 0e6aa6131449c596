# Shared helpers: the run grid the params define, the raw-result paths (mow/runs.py), the
# MoW variants each scale runs, and the per-scale job resources.

# Wildcards are single path components: a protocol, variant or game never spans a "/".
wildcard_constraints:
    protocol=r"[A-Za-z0-9_]+",
    variant=r"[A-Za-z0-9_]+",
    game=r"[A-Za-z0-9_]+",
    seed=r"\d+",


def atari_protocols():
    return [name for name, proto in P["protocols"].items() if proto["suite"] == "atari"]


def raw_result(suite, protocol, method, variant, task, seed):
    return f"results/raw/{SCALE}/{suite}/{protocol}/{method}/{variant}/{task}/seed{seed}.json"


def mow_run_dir(protocol, variant, seed, suite="atari"):
    """The run folder of one MoW training (every task of the suite together, task `all`)."""
    return f"runs/{SCALE}/{suite}/{protocol}/mow/{variant}/all/seed{seed}"


def storm_results(protocols=None):
    """Every STORM raw file: each Atari game x seed, on every Atari protocol by default."""
    return [raw_result("atari", protocol, "storm", "full", game, seed)
            for protocol in (protocols or atari_protocols())
            for game in P["suites"]["atari"]["tasks"]
            for seed in P["seeds"]]


# Which MoW variants a scale runs (on the default protocol `P["protocol"]` only; STORM runs
# every Atari protocol):
#   paper: every variant under `variants:` in params.yaml (full + the ablations and sweeps);
#   smoke (and any other scale): `full` only, plus those named by the config key
#   `ablations` (a list, a comma-separated string, or `all`), e.g.
#       snakemake --cores all --config ablations=[no_experts,single_vae]
#       snakemake --cores all --config ablations=all
# `ablations` is a pipeline option, not a parameter: the Snakefile takes it out of the
# config before params.yaml is validated (its schema allows no unknown key).
def mow_variants():
    if SCALE == "paper":
        return list(P["variants"])
    extra = ABLATIONS or []
    if isinstance(extra, str):
        extra = list(P["variants"]) if extra == "all" else [v for v in extra.split(",") if v]
    unknown = [v for v in extra if v not in P["variants"]]
    if unknown:
        raise ValueError(f"config ablations: unknown variant(s) {', '.join(map(str, unknown))} "
                         f"(valid: {', '.join(P['variants'])})")
    return ["full", *[v for v in dict.fromkeys(extra) if v != "full"]]


def mow_results(variants=None, protocol=None):
    """Every MoW raw file of the given variants: each Atari game x seed on one protocol."""
    protocol = protocol or P["protocol"]
    return [raw_result("atari", protocol, "mow", variant, game, seed)
            for variant in (variants or mow_variants())
            for game in P["suites"]["atari"]["tasks"]
            for seed in P["seeds"]]


def mow_side_files():
    """What the report's MoW figures read: the full run with the lowest seed (mow.results.mow_side_file)."""
    run = mow_run_dir(P["protocol"], "full", min(P["seeds"]))
    return [f"{run}/warmup/clusters.json", f"{run}/routing.json", f"{run}/imagination.npz"]


def report_outputs():
    """The tables, DVC summaries, figures and REPORT.md that `mow report` writes (mow.results.outputs())."""
    from mow.results import outputs

    return [str(path) for path in outputs("results")]


# The report rule's outputs, annotated for `snakemake --report report.html` (after a run):
# captions in workflow/report/; figures under "Figures", the CSV tables and DVC summaries
# under "Tables", REPORT.md under "Report".
def captioned_report_outputs():
    from snakemake.io import report as annotate  # a bare `report` opens the report: directive here

    from mow.results import FIGURES, REPORT, SUMMARIES, TABLES

    caption = "../report/{}.rst".format  # relative to this file (workflow/rules/)
    return [
        *(annotate(f"results/{name}", caption=caption("tables"), category="Tables", subcategory="Results tables",
                 labels={"file": name}) for name in TABLES),
        *(annotate(f"results/{name}", caption=caption("summaries"), category="Tables", subcategory="DVC summaries",
                 labels={"file": name}) for name in SUMMARIES),
        *(annotate(f"results/figures/{name}", caption=caption(name), category="Figures", labels={"figure": name})
          for name in FIGURES),
        annotate(f"results/{REPORT}", caption=caption("report"), category="Report", labels={"file": REPORT}),
    ]


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
REPORT_RESOURCES = dict(mem_mb=8000, runtime=60, gpu=0) if PAPER else dict(mem_mb=2000, runtime=10, gpu=0)
