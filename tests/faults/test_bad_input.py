"""The bad-input corpus: params.yaml, command-line arguments and files, each through the real
`mow` entry point (`mow.cli.main`, in-process): exit code non-zero, exactly one stderr line
`mow: error: ...` naming the key, argument, value or path, and nothing written.
(tests/test_params_schema.py adds 20 file edits checked at the loader.)"""

from __future__ import annotations

import pytest

from faultkit import PARAMS, in_tmp, listing, mow_cli  # noqa: F401 - fixture

BASE = ["--params", "params.yaml"]
MOW = ["train", *BASE, "--suite", "sanity", "--method", "mow", "--no-track"]
STORM = ["train", *BASE, "--suite", "sanity", "--task", "chase", "--no-track"]

# id -> (argv, files to create first {path: text}, what the one line must name)
CASES = {
    "unknown_game": (["train", *BASE, "--game", "Pongg"], {}, "Pongg"),
    "unknown_protocol": (["train", *BASE, "--game", "Pong", "--protocol", "nope"], {}, "nope"),
    "protocol_of_other_suite": (STORM + ["--protocol", "storm_compat"], {}, "storm_compat"),
    "unknown_suite": (["train", *BASE, "--suite", "minecraft", "--task", "x"], {}, "minecraft"),
    "unknown_scale": (STORM + ["--scale", "galaxy"], {}, "galaxy"),
    "unknown_scale_via_set": (STORM + ["--set", "scale=galaxy"], {}, "galaxy"),
    "negative_seed": (STORM + ["--seed", "-3"], {}, "--seed"),
    "seed_not_an_int": (STORM + ["--seed", "abc"], {}, "--seed"),
    "unknown_option": (STORM + ["--gmae", "Pong"], {}, "--gmae"),
    "unknown_method": (["train", *BASE, "--method", "ppo", "--game", "Pong"], {}, "ppo"),
    "missing_task": (["train", *BASE, "--suite", "sanity", "--no-track"], {}, "--task"),
    "negative_env_steps": (STORM + ["--set", "train.env_steps=-100"], {}, "train.env_steps"),
    "env_steps_wrong_type": (STORM + ["--set", "train.env_steps=lots"], {}, "train.env_steps"),
    "unknown_key": (STORM + ["--set", "train.lr=0.1"], {}, "train.lr"),
    "set_without_value": (STORM + ["--set", "train.env_steps"], {}, "train.env_steps"),
    "bad_enum": (STORM + ["--set", "train.precision=fp8"], {}, "train.precision"),
    "warmup_not_below_budget": (STORM + ["--set", "train.warmup_steps=999999"], {}, "train.warmup_steps"),
    "empty_task_list": (MOW + ["--set", "suites.sanity.tasks=[]"], {}, "suites.sanity.tasks"),
    "duplicate_tasks": (MOW + ["--set", "suites.sanity.tasks=[side, side]"], {}, "suites.sanity.tasks"),
    "top_k_above_experts": (MOW + ["--set", "model.mow.top_k=4"], {}, "model.mow.top_k"),
    "more_clusters_than_tasks": (MOW + ["--set", "suites.sanity.tasks=[side]"], {}, "model.mow.num_clusters"),
    "mow_with_a_task": (MOW + ["--task", "side"], {}, "--task"),
    "unknown_variant": (MOW + ["--variant", "bogus"], {}, "bogus"),
    "ranks_differ_from_nproc": (MOW + ["--set", "train.nproc_per_node=2"], {}, "train.nproc_per_node: 2 but launched with 1 rank"),
    "variant_for_storm": (STORM + ["--variant", "no_experts"], {}, "--variant"),
    "evaluate_zero_episodes": (["evaluate", *BASE, "--game", "Pong", "--episodes", "0"], {}, "--episodes"),
    "evaluate_missing_model": (["evaluate", "--model", "missing/model.ckpt", "--out", "x.json"], {}, "missing/model.ckpt"),
    "evaluate_run_not_trained": (["evaluate", *BASE, "--game", "Pong", "--seed", "4"], {}, "model.ckpt"),
    "evaluate_model_without_out": (["evaluate", "--model", "m.ckpt"], {"m.ckpt": "x"}, "--out"),
    "bench_zero_repeats": (["bench", *BASE, "--repeats", "0"], {}, "--repeats"),
    "params_file_missing": (["params", "--params", "nowhere.yaml"], {}, "nowhere.yaml"),
    "params_not_yaml": (STORM[:1] + ["--params", "bad.yaml"] + STORM[3:], {"bad.yaml": "scale: [smoke\n"}, "bad.yaml"),
    "params_top_level_list": (STORM[:1] + ["--params", "list.yaml"] + STORM[3:], {"list.yaml": "- 1\n- 2\n"}, "list.yaml"),
    "params_python_tag": (STORM[:1] + ["--params", "evil.yaml"] + STORM[3:],
                          {"evil.yaml": "scale: !!python/object/apply:os.system ['touch pwned']\n"}, "evil.yaml"),
    "corrupt_model_file": (["evaluate", "--model", "model.ckpt", "--out", "out.json"],
                           {"model.ckpt": "MOWCKPT1" + "\0" * 40}, "model.ckpt"),
    "foreign_model_file": (["evaluate", "--model", "model.pt", "--out", "out.json"], {"model.pt": "PK\3\4 zip"}, "model.pt"),
    "clusters_not_json": (MOW, {"runs/smoke/sanity/sanity/mow/full/all/seed1/warmup/clusters.json": "{\"tasks\": [\"si"},
                          "clusters.json"),
    "truncated_raw_result": (["aggregate", "--params", "params.yaml", "--raw-root", "raw", "--results-dir", "out"],
                             {"raw/smoke/atari/storm_compat/storm/full/Pong/seed1.json": "{\"suite\": \"atari\", \"ret"},
                             "raw/smoke/atari/storm_compat/storm/full/Pong/seed1.json"),
    "sync_mlflow_missing_folder": (["sync-mlflow", "nowhere"], {}, "nowhere"),
}


@pytest.mark.parametrize("argv, files, named", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_one_line_nonzero_exit_and_writes_nothing(tmp_path, argv, files, named):
    (tmp_path / "params.yaml").write_text(PARAMS.read_text())
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    before = listing(tmp_path)
    code, _, err = mow_cli(argv)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mow: error:") and named in lines[0], err
    assert listing(tmp_path) == before
    assert not (tmp_path / "pwned").exists()


def test_the_corpus_has_at_least_25_distinct_bad_inputs():
    assert len(CASES) >= 25
