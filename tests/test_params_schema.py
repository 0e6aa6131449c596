"""Bad edits of the params.yaml *file* are rejected before anything runs, naming the key.

tests/test_config.py covers `--set` overrides (negative steps, unknown train key, wrong
type, unknown scale/protocol/game, empty seeds, ...); here the same kinds of mistakes are
made in the file itself, including inside a scale preset and a variant preset, and each
must fail in `mow.config.load_params` with a one-line ConfigError naming the key path.
A few of them also go through `snakemake -n` in a copy of the workflow: non-zero exit,
the key named, no job planned or run.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mow.config import ConfigError, load_params

from conftest import PARAMS, REPO

RAW = yaml.safe_load(PARAMS.read_text())


def _set(*path, value):
    def edit(raw: dict) -> None:
        node = raw
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def _delete(*path):
    def edit(raw: dict) -> None:
        node = raw
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return edit


# id -> (edit of the parsed params.yaml, what the message must name)
EDITS = {
    "seeds_wrong_type": (_set("seeds", value="1,2"), "seeds"),
    "unknown_top_level_key": (_set("learning_rate", value=1e-4), "'learning_rate'"),
    "unknown_game": (_set("suites", "atari", "tasks", value=["Pong", "Pacman"]), "suites.atari.tasks.1"),
    "unknown_suite": (_set("suites", "procgen", value={"tasks": ["coinrun"]}), "suites.procgen"),
    "empty_seeds_in_scale_preset": (_set("scales", "smoke", "seeds", value=[]), "scales.smoke: seeds"),
    "duplicate_seeds": (_set("seeds", value=[1, 1]), "seeds"),
    "bad_scale_name": (_set("scale", value="tiny"), "scale"),
    "scale_preset_not_a_mapping": (_set("scales", "smoke", value="small"), "scales.smoke"),
    "negative_steps": (_set("warmup", "collect_steps", value=-1), "warmup.collect_steps"),
    "top_k_above_num_experts": (_set("model", "mow", "top_k", value=13), "model.mow.top_k"),
    "top_k_above_num_experts_in_smoke_preset":
        (_set("scales", "smoke", "model", "mow", value={**RAW["scales"]["smoke"]["model"]["mow"], "top_k": 4}),
         "scales.smoke: model.mow.top_k"),
    "unknown_protocol": (_set("protocol", value="atari100k"), "protocol"),
    "protocol_unknown_suite": (_set("protocols", "sanity", "suite", value="dmc"), "protocols.sanity.suite"),
    "bad_variant_preset_key": (_set("variants", "no_experts", value={"model": {"mow": {"use_expertz": False}}}),
                               "variants.no_experts (scale paper): unknown key 'model.mow.use_expertz'"),
    "bad_variant_name": (_set("variants", "no/experts", value={}), "variants"),
    "image_size_mismatch": (_set("protocols", "storm_compat", "image_size", value=96),
                            "protocols.storm_compat.image_size"),
    "bad_enum_value": (_set("model", "world_model", "channels", value=2), "model.world_model.channels"),
    "bool_as_string": (_set("train", "deterministic", value="yes"), "train.deterministic"),
    "list_too_short": (_set("model", "world_model", "encoder_channels", value=[32, 64, 128]),
                       "model.world_model.encoder_channels"),
    "missing_key": (_delete("train", "wm_lr"), "'wm_lr' is a required property"),
}


def edited(edit) -> dict:
    raw = copy.deepcopy(RAW)
    edit(raw)
    return raw


@pytest.mark.parametrize("name", list(EDITS))
def test_load_params_rejects_the_edit_naming_the_key(name, tmp_path):
    edit, named = EDITS[name]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(edited(edit), sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    msg = str(err.value)
    assert named in msg and "\n" not in msg, msg
    assert msg.startswith(f"{path}: ")  # the file comes first, then the key


def test_the_unedited_file_loads():
    load_params(PARAMS)  # checks every scale and variant preset too: the edits above are the only faults


# `snakemake -n` takes a few seconds each: a schema error, a nested one, a cross-key rule and
# a variant preset (only resolved by mow.config, which the Snakefile runs before validate()).
SNAKEMAKE_EDITS = ("unknown_top_level_key", "unknown_game", "top_k_above_num_experts", "bad_variant_preset_key")


@pytest.fixture(scope="module")
def workflow_copy(tmp_path_factory) -> Path:
    """What `snakemake -n` reads: the Snakefile, workflow/ and params.yaml (mow is imported from the venv)."""
    work = tmp_path_factory.mktemp("workflow")
    shutil.copy(REPO / "Snakefile", work)
    shutil.copytree(REPO / "workflow", work / "workflow")
    return work


@pytest.mark.parametrize("name", SNAKEMAKE_EDITS)
def test_snakemake_dry_run_rejects_the_edit_before_any_job(name, workflow_copy):
    edit, named = EDITS[name]
    (workflow_copy / "params.yaml").write_text(yaml.safe_dump(edited(edit), sort_keys=False))
    res = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1"], cwd=workflow_copy,
                         capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    # the error is mow.config's one line, near the top, not a dump of the schema
    assert any(named in line and "ConfigError" not in line for line in out.splitlines()[:3]), out[-3000:]
    assert "ConfigError" in out and "Job stats" not in out and not (workflow_copy / "runs").exists()
