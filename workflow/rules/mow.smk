# Mixture-of-World Models on Atari: the warm-up (collect -> pretrain -> cluster), then one
# joint training of every game of the suite per (protocol, variant, seed), which ends with
# the protocol's evaluation of each game: one raw per-episode JSON per game.
#
# Which variants run (mow_variants() in common.smk): at `scale=paper` every variant under
# `variants:` in params.yaml; at smoke only `full`, plus `--config ablations=[...]` (or
# `ablations=all`). MoW runs on the default protocol (`protocol:` in params.yaml) only;
# another protocol's files can still be named as targets. STORM (storm.smk) runs every
# Atari protocol.
#
# Paths (mow/runs.py): the random-policy warm-up data is shared by every variant of a
# (protocol, seed); the warm-up model and clusters belong to the variant's run folder.
# Every step writes its outputs atomically and `mow train` resumes a killed run.


rule collect:
    output:
        data=f"runs/{SCALE}/atari/{{protocol}}/warmup_data/seed{{seed}}/replay.ckpt",
    log:
        f"logs/{SCALE}/collect/{{protocol}}/seed{{seed}}.log",
    threads: 1
    resources:
        **COLLECT_RESOURCES,
    params:
        scale=SCALE,
    shell:
        "{MOW} collect --suite atari --seed {wildcards.seed} --protocol {wildcards.protocol} "
        "--scale {params.scale} --set train.threads={threads} --no-progress > {log} 2>&1"


rule pretrain:
    input:
        data=rules.collect.output.data,
    output:
        model=f"{mow_run_dir('{protocol}', '{variant}', '{seed}')}/warmup/pretrain.ckpt",
    log:
        f"logs/{SCALE}/pretrain/{{protocol}}/{{variant}}/seed{{seed}}.log",
    threads: TRAIN_THREADS
    resources:
        **WARMUP_RESOURCES,
    params:
        scale=SCALE,
    shell:
        "{MOW} pretrain --suite atari --seed {wildcards.seed} --protocol {wildcards.protocol} "
        "--variant {wildcards.variant} --scale {params.scale} --set train.threads={threads} "
        "--no-progress > {log} 2>&1"


rule cluster:
    input:
        data=rules.collect.output.data,
        model=rules.pretrain.output.model,
    output:
        clusters=f"{mow_run_dir('{protocol}', '{variant}', '{seed}')}/warmup/clusters.json",
    log:
        f"logs/{SCALE}/cluster/{{protocol}}/{{variant}}/seed{{seed}}.log",
    threads: TRAIN_THREADS
    resources:
        **WARMUP_RESOURCES,
    params:
        scale=SCALE,
    shell:
        "{MOW} cluster --suite atari --seed {wildcards.seed} --protocol {wildcards.protocol} "
        "--variant {wildcards.variant} --scale {params.scale} --set train.threads={threads} "
        "--no-progress > {log} 2>&1"


rule train_mow:
    input:
        data=rules.collect.output.data,
        model=rules.pretrain.output.model,
        clusters=rules.cluster.output.clusters,
    output:
        # one raw file per game of the suite (the game list is fixed by the scale)
        raws=[raw_result("atari", "{protocol}", "mow", "{variant}", game, "{seed}")
              for game in P["suites"]["atari"]["tasks"]],
        model=f"{mow_run_dir('{protocol}', '{variant}', '{seed}')}/model.ckpt",
        routing=f"{mow_run_dir('{protocol}', '{variant}', '{seed}')}/routing.json",
        imagination=f"{mow_run_dir('{protocol}', '{variant}', '{seed}')}/imagination.npz",
    log:
        f"logs/{SCALE}/train_mow/{{protocol}}/{{variant}}/seed{{seed}}.log",
    threads: TRAIN_THREADS * NPROC   # per rank: TRAIN_THREADS
    resources:
        **MOW_TRAIN_RESOURCES,
    params:
        scale=SCALE,
        rank_threads=TRAIN_THREADS,
    shell:
        # MOW_TRAIN stays a global (see storm.smk): an interpreter path must not be a rerun trigger.
        "{MOW_TRAIN} train --suite atari --method mow --seed {wildcards.seed} --protocol {wildcards.protocol} "
        "--variant {wildcards.variant} --scale {params.scale} --results-root results/raw "
        "--set train.threads={params.rank_threads} --no-progress > {log} 2>&1"
