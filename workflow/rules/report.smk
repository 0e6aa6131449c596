# The results stages, each regenerating fixed file names (mow.results) from what the runs
# wrote. Users name their outputs as targets, e.g.
#   snakemake --cores all results/atari_table.csv
#   aggregate: every table and DVC summary from the raw per-seed files of the default Atari
#              protocol (STORM on every game and seed, MoW in every variant that ran) and of
#              Meta-World;
#   figures:   every figure from the tables, the raw files and the full MoW run's side files;
#   report:    REPORT.md, the paper's numbers beside the reproduced ones, from the tables.


rule aggregate:
    input:
        raws=aggregate_inputs(),
    output:
        table_outputs(),
    log:
        f"logs/{SCALE}/aggregate.log",
    threads: 1
    resources:
        **REPORT_RESOURCES,
    params:
        scale=SCALE,
        protocol=P["protocol"],
        reps=BOOTSTRAP_REPS,
    shell:
        "{MOW} aggregate --scale {params.scale} --protocol {params.protocol} --reps {params.reps} > {log} 2>&1"


rule figures:
    input:
        tables=rules.aggregate.output,
        side=mow_side_files(),
    output:
        figure_outputs(),
    log:
        f"logs/{SCALE}/figures.log",
    threads: 1
    resources:
        **REPORT_RESOURCES,
    params:
        scale=SCALE,
        protocol=P["protocol"],
        reps=BOOTSTRAP_REPS,
    shell:
        "{MOW} figures --scale {params.scale} --protocol {params.protocol} --reps {params.reps} > {log} 2>&1"


rule report:
    input:
        tables=rules.aggregate.output,
        figures=rules.figures.output,  # REPORT.md links every figure
    output:
        report_output(),
    log:
        f"logs/{SCALE}/report.log",
    threads: 1
    resources:
        **REPORT_RESOURCES,
    params:
        scale=SCALE,
        protocol=P["protocol"],
        reps=BOOTSTRAP_REPS,
    shell:
        "{MOW} report --scale {params.scale} --protocol {params.protocol} --reps {params.reps} > {log} 2>&1"
