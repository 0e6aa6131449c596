# Single-task STORM baselines: one job per (protocol, game, seed); training ends with the
# protocol's evaluation, whose raw per-episode JSON is the rule's output.


rule train_storm:
    output:
        raw=f"results/raw/{SCALE}/atari/{{protocol}}/storm/full/{{game}}/seed{{seed}}.json",
    log:
        f"logs/{SCALE}/train_storm/{{protocol}}/{{game}}/seed{{seed}}.log",
    threads: TRAIN_THREADS
    resources:
        **TRAIN_RESOURCES,
    params:
        scale=SCALE,
    shell:
        # MOW stays a global (lint flags it): as a rule param its absolute interpreter path
        # would be a rerun trigger, so a checkout on another machine would redo every job.
        "{MOW} train --suite atari --method storm --game {wildcards.game} --seed {wildcards.seed} "
        "--protocol {wildcards.protocol} --scale {params.scale} --set train.threads={threads} "
        "--no-progress > {log} 2>&1"
