# Evaluation of one task of a trained model under its protocol: one raw per-episode JSON per
# (suite, protocol, method, variant, task, seed), the file every table is built from. A STORM
# model is its task's own run; a MoW model is the joint run of the suite (task `all`), whose
# tasks are evaluated as separate jobs. The result is also logged to the training's MLflow run
# (for MoW as a nested child run per task).


rule evaluate:
    input:
        model=trained_model,
    output:
        raw=raw_result("{suite}", "{protocol}", "{method}", "{variant}", "{task}", "{seed}"),
    log:
        f"logs/{SCALE}/evaluate/{{suite}}/{{protocol}}/{{method}}/{{variant}}/{{task}}/seed{{seed}}.log",
    threads: 1
    resources:
        **EVAL_RESOURCES,
    params:
        scale=SCALE,
    shell:
        "{MOW} evaluate --suite {wildcards.suite} --method {wildcards.method} --variant {wildcards.variant} "
        "--task {wildcards.task} --seed {wildcards.seed} --protocol {wildcards.protocol} "
        "--scale {params.scale} --set train.threads={threads} > {log} 2>&1"
