"""DVC as the repository configures it: the default local remote, metrics and plots.

Fast checks in a scratch copy of the DVC files (no pipeline run): `dvc push`/`dvc pull`
work out of the box against the repo's default remote, and `dvc metrics show` /
`dvc plots show` parse the report's metrics.json and curves.csv as dvc.yaml declares them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO

DVC = str(Path(sys.executable).parent / "dvc")


def dvc(work: Path, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([DVC, *args], cwd=work, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"dvc {' '.join(args)}: {res.stdout}{res.stderr}"
    return res


@pytest.fixture
def dvc_copy(tmp_path) -> Path:
    """dvc.yaml, params.yaml and .dvc/config of the repository in a fresh git repository."""
    work = tmp_path / "project"
    (work / ".dvc").mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(REPO / name, work / name)
    shutil.copy(REPO / ".dvc" / "config", work / ".dvc" / "config")
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    return work


def test_default_remote_is_a_folder_in_the_repo_and_ignored_by_git(dvc_copy):
    assert dvc(dvc_copy, "remote", "default").stdout.strip() == "local"
    # `url = ../.dvc-storage` in .dvc/config, resolved from .dvc/: a folder at the repository root
    assert dvc(dvc_copy, "config", "remote.local.url").stdout.strip() == str(dvc_copy / ".dvc-storage")
    assert "url = ../.dvc-storage" in (REPO / ".dvc" / "config").read_text()
    ignored = subprocess.run(["git", "check-ignore", "-q", ".dvc-storage/files/md5/ab/cd"], cwd=dvc_copy)
    assert ignored.returncode == 0


def test_push_and_pull_work_out_of_the_box(dvc_copy):
    data = dvc_copy / "data" / "checkpoint.bin"
    data.parent.mkdir()
    data.write_bytes(b"weights" * 1000)
    dvc(dvc_copy, "add", "data/checkpoint.bin")
    dvc(dvc_copy, "push", "data/checkpoint.bin.dvc")
    assert any(p.is_file() for p in (dvc_copy / ".dvc-storage").rglob("*"))
    data.unlink()
    shutil.rmtree(dvc_copy / ".dvc" / "cache")
    dvc(dvc_copy, "pull", "data/checkpoint.bin.dvc")  # (the pipeline outs are not pushed here)
    assert data.read_bytes() == b"weights" * 1000


def test_metrics_and_plots_of_the_report_parse(dvc_copy):
    from mow.results.summary import write_curves_csv, write_metrics_json

    results = dvc_copy / "results"
    storm = {"n_games": 2, "n_seeds": 1, "mean_hns": 0.25, "median_hns": None}
    atari = {"protocol": "storm_compat", "n_games": 2, "games": ["Pong", "Breakout"], "methods": {"storm_repro": storm}}
    write_metrics_json({"scale": "smoke", "atari": atari}, results / "metrics.json")
    write_curves_csv(pd.DataFrame([(100, "storm", "Pong", 1, 1.0), (200, "storm", "Pong", 1, 2.0),
                                   (100, "mow", "Pong", 1, 0.5)], columns=["step", "method", "task", "seed", "return"]),
                     results / "curves.csv")
    (results / "figures").mkdir()
    (results / "figures" / "tiny.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)

    shown = json.loads(dvc(dvc_copy, "metrics", "show", "--json").stdout)
    metrics = shown[""]["data"]["results/metrics.json"]["data"]
    assert metrics["scale"] == "smoke" and metrics["atari"]["methods"]["storm_repro"]["mean_hns"] == 0.25

    plots = json.loads(dvc(dvc_copy, "plots", "show", "--json").stdout)
    assert not plots.get("errors"), plots.get("errors")
    (curves,) = plots["data"]["results/curves.csv"]
    spec = curves["content"]
    assert spec["encoding"]["x"]["field"] == "step" and spec["encoding"]["y"]["field"] == "return"
    assert len(spec["data"]["values"]) == 3
    assert plots["data"]["results/figures/tiny.png"]  # the figures folder: images


@pytest.mark.slow  # ~25 s: three Snakemake DAG builds and a --touch pass (which runs the onstart handler)
def test_after_a_checkout_touch_makes_snakemake_see_nothing_to_do(tmp_path):
    """DVC checks files out with new mtimes in no particular order. Snakemake 9 compares input
    and output mtimes whatever `--rerun-triggers` says (dag.py never consults the `mtime`
    trigger; only a recorded, unchanged checksum of an input <= 1 MB overrides a newer mtime),
    so the README's recipe after `dvc checkout` / `dvc pull` is `snakemake --touch`."""
    work = tmp_path / "project"
    work.mkdir()
    for name in ("Snakefile", "params.yaml"):
        shutil.copy(REPO / name, work)
    shutil.copytree(REPO / "workflow", work / "workflow")

    def snakemake(*args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=work, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout + res.stderr

    # every file of the smoke DAG, as a checkout leaves it: all present, the upstream one newest
    summary = snakemake("--summary").splitlines()
    header = next(i for i, line in enumerate(summary) if line.startswith("output_file\t"))
    files = [line.split("\t")[0] for line in summary[header + 1:] if "\t" in line]
    assert "results/REPORT.md" in files and any(f.endswith("replay.ckpt") for f in files)
    checkout = time.time() - 3600
    for name in files:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text("x\n")
        os.utime(work / name, (checkout, checkout))
    upstream = next(work / f for f in files if f.endswith("replay.ckpt"))
    os.utime(upstream, (checkout + 60, checkout + 60))  # checked out a minute after the rest

    stale = snakemake("-n", "--rerun-triggers", "params", "input", "code", "software-env")
    assert "Updated input files" in stale and "Nothing to be done" not in stale  # not enough without mtime
    snakemake("--touch", "--cores", "1")
    assert "Nothing to be done" in snakemake("-n")
    assert not any(p.stat().st_size > 2 for p in (work / "results").rglob("*") if p.is_file())  # nothing ran
