"""The Snakemake pipeline, run for real in a copy of the project at a reduced smoke budget,
plus fast checks of the DAG it plans at the paper scale, the lint and the DVC stages."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO

_IGNORE = shutil.ignore_patterns(".venv", ".git", "runs", ".snakemake", "mlflow.db", "mlartifacts", "logs",
                                 "__pycache__", ".pytest_cache", "bench", "report.html", "dvc.lock")
_RESULTS = shutil.ignore_patterns("raw", "figures", "*.csv", "*.json", "REPORT.md")  # what the pipeline writes


def COPY_IGNORE(folder: str, names: list[str]) -> set[str]:
    ignored = set(_IGNORE(folder, names))
    if Path(folder).resolve() == (REPO / "results").resolve():
        ignored |= set(_RESULTS(folder, names))
    return ignored
GAMES = ("Pong", "Breakout")                          # the smoke scale's Atari games
MT_TASKS = ("reach-v3", "button-press-topdown-v3")    # and Meta-World tasks
PROTOCOLS = ("storm_compat", "atari100k_standard")    # STORM runs both; MoW the default one
# below the paper scale a MoW model's tasks are evaluated in one job per model (one rule per suite)
DAG_RULES = {"collect", "pretrain", "cluster", "train_mow", "train_storm", "evaluate", "evaluate_mow_atari",
             "evaluate_mow_metaworld", "aggregate", "figures", "report", "all"}
RESULTS_RULES = ("aggregate", "figures", "report")
BIN = Path(sys.executable).parent


def make_copy(tmp_path: Path, metaworld: bool = True, variants: tuple[str, ...] | None = None) -> Path:
    """The project without its outputs, at the smallest smoke budget that still runs every step.

    `metaworld=False`: without the Meta-World suite, for tests about the Atari DAG alone.
    `variants`: keep only these MoW variants in params.yaml, so that every command (Snakemake,
    the DVC stages) runs that smaller grid."""
    work = tmp_path / "project"
    shutil.copytree(REPO, work, ignore=COPY_IGNORE)
    params = yaml.safe_load((work / "params.yaml").read_text())
    smoke = params["scales"]["smoke"]
    if variants is not None:
        for tree in (params, smoke):
            tree["variants"] = {k: v for k, v in tree["variants"].items() if k in variants}
    if not metaworld:
        for tree in (params, smoke):
            del tree["suites"]["metaworld"], tree["protocols"]["metaworld_mt50"]
    smoke["train"].update(env_steps=300, warmup_steps=200, checkpoint_every=100, log_every=100)
    for name in PROTOCOLS:
        smoke["protocols"][name].update(eval_episodes=1, eval_envs=1, max_frames=1000)
    smoke["warmup"].update(collect_steps=100, pretrain_steps=5, cluster_batches=1)
    if metaworld:  # Meta-World renders every step (tens of steps/s on 2 cores): a smaller budget
        mt = smoke["suites"]["metaworld"]
        mt["train"].update(env_steps=160, warmup_steps=80, checkpoint_every=80)
        mt["warmup"].update(collect_steps=40)
        smoke["protocols"]["metaworld_mt50"].update(eval_episodes=1, eval_envs=1, episode_steps=40)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return work


def snakemake(work: Path, *args: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=work, capture_output=True, text=True,
                          timeout=timeout)


def job_stats(output: str) -> dict[str, int]:
    """The `Job stats:` table Snakemake prints before running (or dry-running) a DAG."""
    block = output.split("Job stats:", 1)[1]
    counts = {}
    for line in block.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


@pytest.mark.slow
def test_smoke_dag_runs_every_rule_and_a_rerun_has_nothing_to_do(tmp_path):
    # one ablation besides full keeps the test short; the smoke scale's full grid (every
    # variant) is planned by test_smoke_scale_plans_every_variant_and_the_option_narrows_it
    work = make_copy(tmp_path, variants=("full", "no_experts"))
    start = time.monotonic()
    res = snakemake(work, "--cores", "2")
    print(f"smoke DAG on 2 cores: {time.monotonic() - start:.0f} s")
    assert res.returncode == 0, res.stderr[-4000:]
    stats = job_stats(res.stderr + res.stdout)
    assert set(stats) - {"total"} == DAG_RULES, stats  # every rule of the DAG ran ...
    assert stats["train_storm"] == len(GAMES) * len(PROTOCOLS) and stats["train_mow"] == 3  # ... once per run
    assert stats["evaluate"] == len(GAMES) * len(PROTOCOLS)  # ... STORM per game, MoW per model
    assert stats["evaluate_mow_atari"] == 2 and stats["evaluate_mow_metaworld"] == 1
    check_smoke_outputs(work)
    start = time.monotonic()
    dry = snakemake(work, "-n")
    print(f"no-op snakemake -n: {time.monotonic() - start:.1f} s")
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr

    # DVC around the finished DAG: the training stages find every job done, the report
    # stage redraws the report; a second `dvc repro` is a no-op
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # the stages call `snakemake`
    first = subprocess.run([str(BIN / "dvc"), "repro"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-4000:]
    assert out.count("Nothing to be done") == 2 and "Forced execution" in out, out[-4000:]
    start = time.monotonic()
    second = subprocess.run([str(BIN / "dvc"), "repro"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    print(f"no-op dvc repro: {time.monotonic() - start:.1f} s")
    assert second.returncode == 0 and "Data and pipelines are up to date" in second.stdout, second.stdout + second.stderr
    assert "Running stage" not in second.stdout


def check_smoke_outputs(work: Path) -> None:
    from mlflow.tracking import MlflowClient

    from mow.results import FIGURES, REPORT, TABLES
    from mow.results.tables import ATARI_TABLE_COLUMNS

    # raw files: STORM on both protocols, MoW (variant full) on the default protocol, each game
    raws = sorted(work.glob("results/raw/smoke/atari/*/*/*/*/seed*.json"))
    found = {(r.parts[-5], r.parts[-4], r.parts[-3], r.parts[-2]) for r in raws}  # protocol, method, variant, game
    expected = {(p, "storm", "full", g) for p in PROTOCOLS for g in GAMES}
    expected |= {("storm_compat", "mow", v, g) for v in ("full", "no_experts") for g in GAMES}
    assert found == expected
    for raw in raws:
        record = json.loads(raw.read_text())
        assert record["protocol"] == raw.parts[-5] and len(record["returns"]) == 1
        assert record["protocol_config"]["sticky_prob"] == (0.25 if record["protocol"] == "storm_compat" else 0.0)
    mt_raws = sorted(work.glob("results/raw/smoke/metaworld/metaworld_mt50/mow/full/*/seed1.json"))
    assert sorted(r.parts[-2] for r in mt_raws) == sorted(MT_TASKS)
    for raw in mt_raws:
        assert json.loads(raw.read_text())["success_rate"] in (0.0, 1.0)  # one episode
    for rule in ("collect", "pretrain", "cluster", "train_mow", "train_storm", "evaluate"):
        assert list((work / "logs/smoke" / rule).rglob("*.log")), rule
    for rule in RESULTS_RULES:
        assert (work / f"logs/smoke/{rule}.log").is_file(), rule

    # the report's outputs
    results = work / "results"
    for name in TABLES:
        assert (results / name).is_file(), name
    table = pd.read_csv(results / "atari_table.csv")
    assert list(table.columns[:len(ATARI_TABLE_COLUMNS)]) == list(ATARI_TABLE_COLUMNS)
    per_game = table[table["random"].notna()]  # below them: the aggregate rows (mean HNS, ...)
    assert sorted(per_game["game"]) == sorted(GAMES)
    assert (per_game["storm_repro_seeds"] == 1).all() and (per_game["mow_repro_seeds"] == 1).all()
    assert {"mean HNS", "median HNS", "IQM HNS"} <= set(table["game"])
    assert set(pd.read_csv(results / "metaworld_table.csv")["task"]) == {*MT_TASKS, "mean success"}
    report = (results / REPORT).read_text()
    assert "smoke" in report
    for name in FIGURES:
        figure = results / "figures" / name
        assert figure.is_file() and figure.stat().st_size > 0, name

    # MLflow: one experiment, one parent run per (method, variant), child runs with metrics
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("mow-atari")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = {r.data.tags["mow.parent_key"]: r for r in runs if "mow.parent_key" in r.data.tags}
    assert sorted(r.data.tags.get("mow.parent_key") for r in runs if "mow.parent_key" in r.data.tags) == \
        ["mow/full/smoke", "mow/no_experts/smoke", "storm/full/smoke"]  # created once, before the parallel jobs
    children = {}
    for r in runs:
        children.setdefault(r.data.tags.get("mlflow.parentRunId"), []).append(r)
    storm_runs = children[parents["storm/full/smoke"].info.run_id]
    assert sorted((r.data.tags["mow.protocol"], r.info.run_name) for r in storm_runs) == \
        sorted((p, f"storm/{g}/seed1") for p in PROTOCOLS for g in GAMES)
    (mow_run,) = children[parents["mow/full/smoke"].info.run_id]
    assert mow_run.info.run_name == "mow/all/seed1"
    assert sorted(r.info.run_name for r in children[mow_run.info.run_id]) == sorted(f"mow/{g}/seed1" for g in GAMES)
    for r in [*storm_runs, mow_run, *children[mow_run.info.run_id]]:
        assert r.info.status == "FINISHED", r.info.run_name
    for r in [*storm_runs, *children[mow_run.info.run_id]]:  # MoW evaluates per game, in nested runs
        assert any(k.startswith("eval/") for k in r.data.metrics), r.info.run_name
    for r in [*storm_runs, mow_run]:
        assert len(r.data.metrics) > 3, r.info.run_name  # training metrics besides the evaluation
    # Meta-World: its own experiment; the MoW run's children carry the success rate
    mt_exp = client.get_experiment_by_name("mow-metaworld")
    mt_runs = client.search_runs([mt_exp.experiment_id], max_results=100)
    mt_children = [r for r in mt_runs if r.data.tags.get("mow.task") in MT_TASKS]
    assert len(mt_children) == len(MT_TASKS) and all("eval/success_rate" in r.data.metrics for r in mt_children)


def test_paper_scale_dry_run_plans_every_job(tmp_path):
    work = make_copy(tmp_path)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    paper = params  # the paper preset is empty: the top-level values are the paper configuration
    games, seeds, variants = paper["suites"]["atari"]["tasks"], paper["seeds"], paper["variants"]
    res = snakemake(work, "-n", "--cores", "1", "--config", "scale=paper", timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    stats = job_stats(res.stdout + res.stderr)
    protocols = [n for n, p in params["protocols"].items() if p["suite"] == "atari"]
    # MoW: every Atari variant, and the full variant on each further suite params.yaml declares
    mow_suites = [s for s in paper["suites"] if s in ("atari", "metaworld")]
    trainings = len(variants) * len(seeds) + (len(mow_suites) - 1) * len(seeds)
    # the clustering ablation and the 4 cluster sweeps train from full's warm-up model
    # (tests/test_config.py: variants differing only in the clustering share it)
    pretrainings = trainings - len({"no_clustering", "single_vae", "clusters_3", "clusters_6", "clusters_9",
                                    "clusters_12"} & set(variants)) * len(seeds)
    mow_evals = len(variants) * len(seeds) * len(games) + sum(
        len(paper["suites"][s]["tasks"]) * len(seeds) for s in mow_suites if s != "atari")
    storm = len(games) * len(seeds) * len(protocols)                 # 26 x 5 x 2
    expected = {
        "train_storm": storm,
        "collect": len(seeds) * len(mow_suites),                    # shared by every variant
        "pretrain": pretrainings, "cluster": trainings, "train_mow": trainings,
        "evaluate": storm + mow_evals,                              # one job per task
        "aggregate": 1, "figures": 1, "report": 1, "all": 1,
    }
    assert stats == {**expected, "total": sum(expected.values())}
    assert not (work / "runs").exists() and not (work / "results" / "raw").exists()  # nothing ran


def test_smoke_scale_plans_every_variant_and_the_option_narrows_it(tmp_path):
    work = make_copy(tmp_path)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    variants, metaworld = params["variants"], int("metaworld" in params["suites"])  # Meta-World: full only
    every = job_stats(snakemake(work, "-n", "--cores", "1", timeout=300).stdout)
    assert every["train_mow"] == len(variants) + metaworld  # smoke: each Atari variant, once
    assert set(every) - {"total"} == DAG_RULES
    res = snakemake(work, "-n", "--cores", "1", "results/atari_table.csv",  # targets before --config
                    "--config", "ablations=[no_experts,single_vae]", timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    stats = job_stats(res.stdout + res.stderr)
    assert stats["train_mow"] == 3 + metaworld and "report" not in stats
    assert "all" not in stats  # a named target runs only what it needs
    assert job_stats(snakemake(work, "-n", "--config", "ablations=none", timeout=300).stdout)["pretrain"] == \
        1 + metaworld  # full's, on each suite
    bad = snakemake(work, "-n", "--config", "ablations=[no_such_variant]", timeout=300)
    assert bad.returncode != 0 and "no_such_variant" in bad.stdout + bad.stderr


def test_lint_reports_only_the_two_deliberate_warnings(tmp_path):
    work = make_copy(tmp_path)
    res = snakemake(work, "--lint", timeout=300)
    text = res.stdout + res.stderr
    rules = re.findall(r"^Lints for rule (\w+)", text, flags=re.M)
    assert set(rules) <= DAG_RULES, text[-3000:]
    assert "Lints for snakefile" not in text, text[-3000:]
    warnings = set(re.findall(r"^\s+\* (.+?):?$", text, flags=re.M))
    assert warnings <= {"Specify a conda environment or container for each rule.",
                        "Shell command directly uses variable MOW from outside of the rule",
                        "Shell command directly uses variable MOW_TRAIN from outside of the rule"}, warnings


def test_dvc_stages_parse_and_mirror_the_dag(tmp_path):
    work = make_copy(tmp_path)
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    dvc = [str(BIN / "dvc")]
    listed = subprocess.run([*dvc, "stage", "list"], cwd=work, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines() if line.strip()] == ["storm_baselines", "mow", "report"]
    dag = subprocess.run([*dvc, "dag", "--md"], cwd=work, capture_output=True, text=True, timeout=120)
    assert dag.returncode == 0, dag.stderr
    names = dict(re.findall(r'(\w+)\["(\w+)"\]', dag.stdout))  # mermaid: node1["mow"], node1-->node2
    edges = {(names[a], names[b]) for a, b in re.findall(r"(\w+)-->(\w+)", dag.stdout)}
    assert edges == {("storm_baselines", "report"), ("mow", "report")}, dag.stdout
    # `--dry` of the whole pipeline stops at the report stage (DVC checks its inputs, which
    # only the earlier stages create); the first stages print their Snakemake commands.
    dry = subprocess.run([*dvc, "repro", "--dry", "storm_baselines", "mow"], cwd=work, capture_output=True,
                         text=True, timeout=120)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "snakemake storm_all --cores all" in dry.stdout and "storm_all" in dry.stdout and "mow_all" in dry.stdout


def test_tracking_init_creates_the_experiment_and_parents_once(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from mow.tracking import tracking_uri
    from mow.tracking_init import init_tracking, main

    monkeypatch.chdir(tmp_path)
    parents = [("storm", "full"), ("mow", "full"), ("mow", "no_experts")]
    first = init_tracking("atari", "smoke", parents)
    assert main(["--scale", "smoke", *(f"--parent=atari:{m}/{v}" for m, v in parents)]) == 0
    assert init_tracking("atari", "smoke", parents) == first  # idempotent: found, not created again
    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name("mow-atari")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["mow.parent_key"] for r in runs) == ["mow/full/smoke", "mow/no_experts/smoke",
                                                                   "storm/full/smoke"]
    assert {r.info.run_name for r in runs} == {"storm/full", "mow/full", "mow/no_experts"}
