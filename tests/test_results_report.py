"""mow.results report and CLI hook: every headline row listed, verdicts, smoke warning, decisions."""

from __future__ import annotations

import argparse
import math

import pandas as pd
import pytest
import results_data as rd

from mow.results import FIGURES, TABLES, tables
from mow.results import cli as results_cli
from mow.results.collect import load_results
from mow.results.report import Reproduced, param_value, verdict, write_report

REPS = 200
PAPER_DIR = tables.PAPER
HEADLINE_HEADER = "| benchmark | method | metric | paper |"


def parse_headline(report: str) -> pd.DataFrame:
    """The reported-vs-reproduced markdown table as a frame (cells un-escaped)."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(HEADLINE_HEADER))
    header = [c.strip() for c in lines[start].strip("|").split(" | ")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().replace("\\|", "|") for c in line.strip().strip("|").split(" | ")])
    return pd.DataFrame(rows, columns=header)


def build_report(tmp_path, *, scale: str, with_runs: bool = True, params_dict=None):
    raw = tmp_path / "raw"
    if with_runs:
        rd.write_known(raw, "storm", rd.STORM_HNS, scale=scale)
        rd.write_known(raw, "mow", rd.MOW_HNS, scale=scale)
    df = load_results(raw, scale=scale, suite=rd.SUITE, protocol=rd.PROTOCOL)
    summary = tables.atari_summary(df, scale=scale, protocol=rd.PROTOCOL, reps=REPS)
    empty_mw = load_results(raw, scale=scale, suite="metaworld", protocol="metaworld")
    metaworld = tables.metaworld_table(empty_mw, scale=scale, protocol="metaworld", reps=REPS)
    params = tables.params_csv(rd.fake_params_table(extra=True))
    path = write_report(tmp_path / "results", scale=scale, protocol=rd.PROTOCOL, summary=summary,
                        metaworld=metaworld, params=params, params_dict=params_dict, figures=FIGURES,
                        table_files=TABLES, git_commit="abc123", date="2025-01-01", reps=REPS)
    return path.read_text()


def test_report_lists_every_reported_headline_row(tmp_path):
    text = build_report(tmp_path, scale="smoke")
    table = parse_headline(text)
    reported = pd.read_csv(PAPER_DIR / "reported_headline.csv", dtype=str)
    assert len(table) == len(reported)
    for (_, want), (_, got) in zip(reported.iterrows(), table.iterrows()):
        assert (got["benchmark"], got["method"], got["metric"], got["paper"], got["paper source"]) == \
               (want["benchmark"], want["method"], want["metric"], want["value"], want["source"])


def test_smoke_report_warns_and_never_claims_a_match(tmp_path):
    text = build_report(tmp_path, scale="smoke")
    assert "WARNING: this report was produced at the `smoke` scale" in text
    assert "| scale | smoke |" in text and "| protocol | storm_compat |" in text and "| git commit | abc123 |" in text
    table = parse_headline(text).set_index(["method", "metric"])
    mow_mean = table.loc[("MoW", "mean_hns")]
    assert mow_mean["verdict"] == "not comparable (smoke scale)"
    assert mow_mean["reproduced [95 % CI]"].startswith("1.000 [")
    assert mow_mean["produced by"] == "smoke / storm_compat / 3 games x 3 seeds"
    storm = table.loc[("STORM (STORM paper)", "median_hns")]
    assert storm["reproduced [95 % CI]"].startswith("1.000 [") and storm["verdict"] == "not comparable (smoke scale)"
    # scale-free numbers keep a real verdict: the official file's recomputation and the parameter counts
    official = table.loc[("STORM (official per-seed file; computed)", "mean_hns")]
    assert official["reproduced [95 % CI]"].startswith("1.222 [") and official["verdict"] == "within CI"
    assert table.loc[("MoW", "model_size_mib_fp32"), "verdict"] == "differs (> 0.5 %)"
    assert table.loc[("MOORE", "mean_success"), "verdict"] == "not run at this scale"
    assert table.loc[("MoW", "mean_success"), "verdict"] == "not run at this scale"


def test_paper_scale_on_too_few_games_is_not_comparable(tmp_path):
    text = build_report(tmp_path, scale="paper")
    assert "WARNING" not in text
    table = parse_headline(text).set_index(["method", "metric"])
    assert table.loc[("MoW", "mean_hns"), "verdict"] == "not comparable (3 of 26 tasks)"


def test_report_storm_official_section_figures_and_tables(tmp_path):
    text = build_report(tmp_path, scale="smoke", with_runs=False)
    assert "| mean | 122.2 % |" in text and "| median | 42.5 % |" in text
    assert "126.7 %" in text and "58.4 %" in text and "Freeway" in text
    for name in FIGURES:
        assert f"(figures/{name})" in text
    for name in TABLES:
        assert f"]({name})" in text
    table = parse_headline(text).set_index(["method", "metric"])
    assert table.loc[("MoW", "mean_hns"), "verdict"] == "not run at this scale"


def test_decisions_read_from_params(tmp_path):
    params = {"model": {"mow": {"num_experts": 12, "top_k": 2, "sigma_init": 1.0}}, "warmup": {"collect_steps": 5000}}
    text = build_report(tmp_path, scale="smoke", params_dict=params)
    section = text[text.index("## Decisions the paper leaves open"):]
    assert "`model.mow.num_experts` = 12" in section and "`model.mow.top_k` = 2" in section
    assert "`warmup.collect_steps` = 5000" in section and "`model.mow.num_clusters` = n/a" in section
    assert "| Action handling | fixed in code |" in section
    assert param_value(None, "a.b") == "n/a" and param_value({"a": {"b": 0}}, "a.b") == 0


@pytest.mark.parametrize("rep,scale,expected", [
    (None, "paper", "not run at this scale"),
    (Reproduced(1.0, 0.9, 1.2, n_tasks=26), "paper", "within CI"),
    (Reproduced(1.0, 0.9, 1.0, n_tasks=26), "paper", "outside CI"),
    (Reproduced(1.0, 0.9, 1.2, n_tasks=26), "smoke", "not comparable (smoke scale)"),
    (Reproduced(1.0, 0.9, 1.2, n_tasks=2), "paper", "not comparable (2 of 26 tasks)"),
    (Reproduced(1.0, n_tasks=26), "paper", "no CI (one seed)"),
    (Reproduced(1.104, exact=True, scale_free=True), "smoke", "matches (within 0.5 %)"),
    (Reproduced(2.0, exact=True, scale_free=True), "smoke", "differs (> 0.5 %)"),
])
def test_verdicts(rep, scale, expected):
    assert verdict(1.1, rep, benchmark="atari100k", scale=scale) == expected


# ------------------------------------------------------------------ CLI hook
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mow")
    results_cli.add_parsers(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_report_writes_everything(tmp_path, monkeypatch):
    from mow import paramcount

    monkeypatch.setattr(paramcount, "params_table", lambda: rd.fake_params_table())
    rd.write_known(tmp_path / "raw", "storm", {"Pong": [0.5], "Breakout": [1.0]})
    args = parser().parse_args(["report", "--all", "--raw-root", str(tmp_path / "raw"), "--runs-root",
                                str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results"), "--scale", "smoke",
                                "--params", str(rd.REPO / "params.yaml"), "--reps", str(REPS)])
    assert args.func(args) == 0
    assert (tmp_path / "results" / "REPORT.md").exists()
    assert all((tmp_path / "results" / "figures" / f).stat().st_size > 1024 for f in FIGURES)
    table = pd.read_csv(tmp_path / "results" / "atari_table.csv").set_index("game")
    assert table.loc["mean HNS", "hns_storm_repro"] == pytest.approx(0.75) and math.isnan(
        table.loc["mean HNS", "hns_storm_repro_ci_low"])


def test_cli_aggregate_names_bad_raw_file(tmp_path, capsys):
    path = rd.write_raw(tmp_path / "raw", method="storm", task="Pong", seed=1, returns=[1.0],
                        override={"protocol": "atari100k_standard"})
    args = parser().parse_args(["aggregate", "--raw-root", str(tmp_path / "raw"), "--results-dir",
                                str(tmp_path / "results"), "--scale", "smoke",
                                "--params", str(rd.REPO / "params.yaml")])
    assert results_cli.run(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mow: error: ") and str(path) in err and "protocol is 'atari100k_standard'" in err
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("stage", ["figures", "report"])
def test_cli_stage_without_tables_names_the_missing_table(tmp_path, capsys, stage):
    args = parser().parse_args([stage, "--raw-root", str(tmp_path / "raw"), "--results-dir", str(tmp_path / "results"),
                                "--scale", "smoke", "--params", str(rd.REPO / "params.yaml")])
    assert results_cli.run(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mow: error: {tmp_path / 'results' / 'atari_table.csv'}: not found (run `mow aggregate` first)"


def test_stages_one_by_one_write_what_build_all_writes(tmp_path, monkeypatch):
    """The pipeline's aggregate -> figures -> report rules give the same files as one build_all."""
    from mow import paramcount
    from mow.results import aggregate, build_all, draw_figures, outputs, write_report
    from test_results_figures import smoke_params

    monkeypatch.setattr(paramcount, "params_table", lambda: rd.fake_params_table())
    rd.write_known(tmp_path / "raw", "storm", {"Pong": [0.5], "Breakout": [1.0]})
    rd.write_known(tmp_path / "raw", "mow", {"Pong": [0.7], "Breakout": [0.2]})
    common = dict(scale="smoke", protocol=rd.PROTOCOL, params_dict=smoke_params(), reps=REPS, seed=0)
    staged, whole = tmp_path / "staged", tmp_path / "whole"
    aggregate(tmp_path / "raw", tmp_path / "runs", staged, **common)
    draw_figures(tmp_path / "raw", tmp_path / "runs", staged, **common)
    write_report(staged, **common, git_commit="abc", date="2026-01-01")
    build_all(tmp_path / "raw", tmp_path / "runs", whole, **common, git_commit="abc", date="2026-01-01")
    for a, b in zip(outputs(staged), outputs(whole)):
        assert a.exists() and b.exists(), (a, b)
        if a.suffix != ".png":  # PNGs carry matplotlib metadata; their content is the same tables
            assert a.read_text() == b.read_text(), a.name


# --------------------------------------------------------------------------- metrics.json / curves.csv (DVC)
def test_build_all_writes_dvc_metrics_and_curves(tmp_path):
    import json

    from mow.results import SUMMARIES, build_all
    from test_results_figures import smoke_inputs, smoke_params

    results = tmp_path / "results"
    paths = build_all(results_dir=results, scale="smoke", protocol=rd.PROTOCOL, params_dict=smoke_params(),
                      params_table=rd.fake_params_table(extra=True), reps=REPS, **smoke_inputs(tmp_path))
    assert [results / name for name in SUMMARIES] == [p for p in paths if p.name in SUMMARIES]
    data = json.loads((results / "metrics.json").read_text())  # strict JSON: no NaN
    assert data["scale"] == "smoke" and data["atari"]["protocol"] == rd.PROTOCOL
    assert data["atari"]["n_games"] == 2 and sorted(data["atari"]["games"]) == ["Breakout", "Pong"]
    storm, mow = data["atari"]["methods"]["storm_repro"], data["atari"]["methods"]["mow_repro"]
    assert set(storm) == {"n_games", "n_seeds", "mean_hns", "median_hns", "iqm_hns", "optimality_gap"}
    # STORM per seed: Pong (0, 0.5), Breakout (0.5, 1) -> game means 0.25, 0.75; MoW 1.0 everywhere
    assert storm["mean_hns"] == pytest.approx(0.5) and storm["median_hns"] == pytest.approx(0.5)
    assert storm["n_seeds"] == 2 and storm["n_games"] == 2
    assert mow["mean_hns"] == pytest.approx(1.0) and mow["iqm_hns"] == pytest.approx(1.0)
    assert "storm_official" in data["atari"]["methods"]
    assert "no_experts" not in json.dumps(data["atari"]["methods"])  # ablations live in ablations.csv
    # Meta-World ran (MoW, 2 tasks x 2 seeds): mean success 0.5
    assert data["metaworld"] == {"protocol": "metaworld", "n_tasks": 2,
                                 "methods": {"mow_repro": {"mean_success": pytest.approx(0.5), "n_seeds": 2}}}

    curves = pd.read_csv(results / "curves.csv")
    assert list(curves.columns) == ["step", "method", "task", "seed", "return"]
    # rd.write_runs: STORM Pong/Breakout x seeds 1, 2 and one MoW multi-task run per seed, 12 steps each
    assert len(curves) == 2 * 2 * 2 * 12
    assert set(curves["method"]) == {"storm", "mow"} and set(curves["task"]) == {"Pong", "Breakout"}
    mow_pong = curves[(curves["method"] == "mow") & (curves["task"] == "Pong") & (curves["seed"] == 2)]
    assert mow_pong["step"].tolist() == list(range(100, 1300, 100))
    assert mow_pong["return"].tolist() == pytest.approx([s / 50 + 0 + 2 for s in range(100, 1300, 100)])


def test_metrics_json_without_runs_has_nulls_not_nan(tmp_path):
    import json

    from mow.results import build_all
    from test_results_figures import smoke_params

    results = tmp_path / "results"
    build_all(tmp_path / "raw", tmp_path / "runs", results, "smoke", rd.PROTOCOL, smoke_params(),
              params_table=rd.fake_params_table(), reps=REPS)
    text = (results / "metrics.json").read_text()
    data = json.loads(text)
    assert "NaN" not in text and "metaworld" not in data  # Meta-World did not run
    assert "storm_repro" not in data["atari"]["methods"] and "mow_repro" not in data["atari"]["methods"]
    assert pd.read_csv(results / "curves.csv").empty
