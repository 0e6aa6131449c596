# Mixture-of-World Models: the warm-up (collect -> pretrain -> cluster), then one joint
# training of every task of a suite per (protocol, variant, seed); the evaluate rule
# (evaluate.smk) then evaluates each task of the trained model.
#
# Which runs (mow_runs() in common.smk): on Atari every variant under `variants:` in
# params.yaml (narrowed by `--config ablations=...`) on the default protocol (`protocol:`);
# on Meta-World (when params.yaml declares the suite) the full variant under its protocol.
#
# Paths (mow/runs.py): the random-policy warm-up data is shared by every variant of a
# (suite, protocol, seed); the warm-up model and clusters belong to the variant's run folder,
# and variants that differ only in the clustering train from one warm-up model, the first
# such variant's (common.smk warmup_model(); the pretrain job runs for that variant alone).
# Every step writes its outputs atomically and `mow train` resumes a killed run.

MOW_RUN = run_dir("{suite}", "{protocol}", "mow", "{variant}", "all", "{seed}")


rule collect:
    output:
        data=f"runs/{SCALE}/{{suite}}/{{protocol}}/warmup_data/seed{{seed}}/replay.ckpt",
    log:
        f"logs/{SCALE}/collect/{{suite}}/{{protocol}}/seed{{seed}}.log",
    threads: 1
    resources:
        **COLLECT_RESOURCES,
    params:
        scale=SCALE,
    shell:
        "{MOW} collect --suite {wildcards.suite} --seed {wildcards.seed} --protocol {wildcards.protocol} "
        "--scale {params.scale} --set train.threads={threads} --no-progress > {log} 2>&1"


rule pretrain:
    input:
        data=rules.collect.output.data,
    output:
        model=f"{MOW_RUN}/warmup/pretrain.ckpt",
    log:
        f"logs/{SCALE}/pretrain/{{suite}}/{{protocol}}/{{variant}}/seed{{seed}}.log",
    threads: TRAIN_THREADS
    resources:
        **WARMUP_RESOURCES,
    params:
        scale=SCALE,
    shell:
        "{MOW} pretrain --suite {wildcards.suite} --seed {wildcards.seed} --protocol {wildcards.protocol} "
        "--variant {wildcards.variant} --scale {params.scale} --set train.threads={threads} "
        "--no-progress > {log} 2>&1"


rule cluster:
    input:
        data=rules.collect.output.data,
        model=warmup_model,
    output:
        clusters=f"{MOW_RUN}/warmup/clusters.json",
    log:
        f"logs/{SCALE}/cluster/{{suite}}/{{protocol}}/{{variant}}/seed{{seed}}.log",
    threads: TRAIN_THREADS
    resources:
        **WARMUP_RESOURCES,
    params:
        scale=SCALE,
    shell:
        "{MOW} cluster --suite {wildcards.suite} --seed {wildcards.seed} --protocol {wildcards.protocol} "
        "--variant {wildcards.variant} --scale {params.scale} --set train.threads={threads} "
        "--no-progress > {log} 2>&1"


rule train_mow:
    input:
        data=rules.collect.output.data,
        model=warmup_model,
        clusters=rules.cluster.output.clusters,
    output:
        model=f"{MOW_RUN}/model.ckpt",
        routing=f"{MOW_RUN}/routing.json",
        imagination=f"{MOW_RUN}/imagination.npz",
    log:
        f"logs/{SCALE}/train_mow/{{suite}}/{{protocol}}/{{variant}}/seed{{seed}}.log",
    threads: TRAIN_THREADS * NPROC   # per rank: TRAIN_THREADS
    resources:
        **MOW_TRAIN_RESOURCES,
    params:
        scale=SCALE,
        rank_threads=TRAIN_THREADS,
    shell:
        # MOW_TRAIN stays a global (see storm.smk): an interpreter path must not be a rerun trigger.
        "{MOW_TRAIN} train --suite {wildcards.suite} --method mow --seed {wildcards.seed} "
        "--protocol {wildcards.protocol} --variant {wildcards.variant} --scale {params.scale} "
        "--set train.threads={params.rank_threads} --no-eval --no-progress > {log} 2>&1"
