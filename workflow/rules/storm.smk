# Single-task STORM baselines: one training per (protocol, game, seed) on Atari, on every
# Atari protocol; each model is evaluated by the evaluate rule (evaluate.smk).


rule train_storm:
    output:
        model=f"runs/{SCALE}/atari/{{protocol}}/storm/full/{{game}}/seed{{seed}}/model.ckpt",
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
        "--no-eval --no-progress > {log} 2>&1"
