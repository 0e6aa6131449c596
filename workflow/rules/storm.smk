# Single-task STORM baselines: one job per (protocol, game, seed); training ends with the
# protocol's evaluation, whose raw per-episode JSON is the rule's output.


def storm_results():
    return [raw_result("atari", protocol, "storm", "full", game, seed)
            for protocol in atari_protocols()
            for game in P["suites"]["atari"]["tasks"]
            for seed in P["seeds"]]


rule train_storm:
    output:
        raw=f"results/raw/{SCALE}/atari/{{protocol}}/storm/full/{{game}}/seed{{seed}}.json",
    log:
        f"logs/{SCALE}/train_storm/{{protocol}}/{{game}}/seed{{seed}}.log",
    threads: 2
    resources:
        mem_mb=4000 if SCALE == "smoke" else 32000,
        runtime=30 if SCALE == "smoke" else 600,
        gpu=0 if SCALE == "smoke" else 1,
    params:
        scale=SCALE,
    shell:
        "{MOW} train --suite atari --method storm --game {wildcards.game} --seed {wildcards.seed} "
        "--protocol {wildcards.protocol} --scale {params.scale} --set train.threads={threads} "
        "--no-progress > {log} 2>&1"
