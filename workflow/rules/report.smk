# The last rule: every table, figure and REPORT.md (names fixed in mow.results: TABLES,
# FIGURES, REPORT), regenerated from the raw per-seed files of the default protocol
# (`protocol:` in params.yaml): STORM on every game and seed, and MoW in every variant the
# scale runs (mow_variants() in common.smk: paper = all variants, smoke = full plus
# `--config ablations=...`). The MoW figures also read the full run's side files.
# Users name its outputs as targets, e.g. `snakemake --cores all results/atari_table.csv`.


rule report:
    input:
        storm=storm_results([P["protocol"]]),
        mow=mow_results(),
        side=mow_side_files(),
    output:
        captioned_report_outputs(),   # report_outputs() with captions (common.smk)
    log:
        f"logs/{SCALE}/report.log",
    threads: 1
    resources:
        **REPORT_RESOURCES,
    params:
        scale=SCALE,
        protocol=P["protocol"],
    shell:
        "{MOW} report --scale {params.scale} --protocol {params.protocol} > {log} 2>&1"
