# Evaluation of one task of a trained model under its protocol: one raw per-episode JSON per
# (suite, protocol, method, variant, task, seed), the file every table is built from. A STORM
# model is its task's own run; a MoW model is the joint run of the suite (task `all`), whose
# tasks are evaluated as separate jobs at the paper scale and in one job per model below it
# (MOW_EVAL_PER_TASK, common.smk). The result is also logged to the training's MLflow run
# (for MoW as a nested child run per task).


rule evaluate:
    input:
        model=trained_model,
    output:
        raw=raw_result("{suite}", "{protocol}", "{method}", "{variant}", "{task}", "{seed}"),
    wildcard_constraints:
        method=EVAL_TASK_METHODS,
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


# Below the paper scale: every task of one MoW model in one job, which loads the model once.
# One rule per suite, as the suites' task lists (the job's outputs) differ.
if not MOW_EVAL_PER_TASK:
    for _suite in mow_suites():

        rule:
            name:
                f"evaluate_mow_{_suite}"
            input:
                model=f"{run_dir(_suite, '{protocol}', 'mow', '{variant}', 'all', '{seed}')}/model.ckpt",
            output:
                raws=[raw_result(_suite, "{protocol}", "mow", "{variant}", task, "{seed}")
                      for task in P["suites"][_suite]["tasks"]],
            log:
                f"logs/{SCALE}/evaluate/{_suite}/{{protocol}}/mow/{{variant}}/all/seed{{seed}}.log",
            threads: 1
            resources:
                **EVAL_RESOURCES,
            params:
                scale=SCALE,
                suite=_suite,
            shell:
                "{MOW} evaluate --suite {params.suite} --method mow --variant {wildcards.variant} "
                "--seed {wildcards.seed} --protocol {wildcards.protocol} "
                "--scale {params.scale} --set train.threads={threads} > {log} 2>&1"
