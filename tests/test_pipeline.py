"""The Snakemake pipeline, run for real in a copy of the project at a reduced smoke budget."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

COPY_IGNORE = shutil.ignore_patterns(".venv", ".git", "runs", "raw", ".snakemake", "mlflow.db", "mlartifacts",
                                     "logs", "__pycache__", ".pytest_cache", "bench")


def make_copy(tmp_path: Path) -> Path:
    work = tmp_path / "project"
    shutil.copytree(REPO, work, ignore=COPY_IGNORE)
    params = yaml.safe_load((work / "params.yaml").read_text())
    smoke = params["scales"]["smoke"]
    smoke["train"].update(env_steps=300, warmup_steps=100, checkpoint_every=100, log_every=100)
    for name in ("storm_compat", "atari100k_standard"):
        smoke["protocols"][name].update(eval_episodes=1, eval_envs=1, max_frames=2000)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return work


def snakemake(work: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=work, capture_output=True, text=True,
                          timeout=1500)


@pytest.mark.slow
def test_smoke_dag_runs_every_rule_and_a_rerun_has_nothing_to_do(tmp_path):
    work = make_copy(tmp_path)
    res = snakemake(work, "--cores", "2")
    assert res.returncode == 0, res.stderr[-4000:]
    raws = sorted(work.glob("results/raw/smoke/atari/*/storm/full/*/seed*.json"))
    expected = {(p, g) for p in ("storm_compat", "atari100k_standard") for g in ("Pong", "Breakout")}
    assert {(r.parts[-5], r.parts[-2]) for r in raws} == expected
    for raw in raws:
        record = json.loads(raw.read_text())
        assert record["protocol"] == raw.parts[-5] and len(record["returns"]) == 1
        assert record["protocol_config"]["sticky_prob"] == (0.25 if record["protocol"] == "storm_compat" else 0.0)
    dry = snakemake(work, "-n")
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr
