# The MoW / STORM reproduction pipeline. Rules live in workflow/rules/, logic in `mow`.
#   snakemake --cores all                         # everything at the scale in params.yaml
#   snakemake --cores all results/atari_table.csv # one target (any file the report writes)
#   snakemake --cores all --config scale=paper    # the published configuration
#   snakemake --cores all --config ablations=none # MoW's full variant only (no ablations)
import sys

from snakemake.utils import validate

from mow.config import resolve

configfile: "params.yaml"
# `ablations` narrows the MoW variants that run (common.smk, mow_variants()); it is an option of
# the pipeline, not a parameter, so it leaves the config before params.yaml is validated.
ABLATIONS = config.pop("ablations", None)
# mow.config first: a bad key stops the run before any job with one line naming its path
# (e.g. `suites.atari.tasks.1`); then Snakemake's own validation against the same schema.
P = resolve(dict(config), scale=config.get("scale"))   # presets applied, cross-key rules checked
validate(config, "workflow/schemas/params.schema.yaml")
SCALE = P["scale"]
MOW = f"{sys.executable} -m mow"

report: "workflow/report/workflow.rst"   # `snakemake --report report.html` after a run

include: "workflow/rules/common.smk"
include: "workflow/rules/storm.smk"
include: "workflow/rules/mow.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"

localrules: all, storm_all, mow_all


rule all:
    default_target: True
    input:
        rules.report.output,
        storm_results(),   # STORM on every Atari protocol (the tables read the default one)


rule storm_all:   # every STORM baseline (dvc.yaml stage storm_baselines)
    input:
        storm_results(),


rule mow_all:     # every MoW run and evaluation, on every suite (dvc.yaml stage mow)
    input:
        [raw for suite in mow_suites() for raw in mow_results(suite)],


# Create the MLflow store, experiment and parent runs once, before jobs run in parallel
# (mow/tracking_init.py). Not run by dry runs or when there is nothing to do.
onstart:
    parents = []
    for suite in mow_suites():
        runs = ["storm/full"] if suite == "atari" else []
        runs += [f"mow/{variant}" for variant in dict.fromkeys(v for _, v, _ in mow_runs(suite))]
        parents += [f"--parent {suite}:{run}" for run in runs]
    shell(f"{sys.executable} -m mow.tracking_init --scale {SCALE} {' '.join(parents)}")
