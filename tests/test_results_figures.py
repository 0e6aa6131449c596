"""mow.results figures and build_all: every fixed output is written, non-empty, a real PNG / CSV."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import results_data as rd

from mow.results import FIGURES, REPORT, SUMMARIES, TABLES, ResultsError, build_all, figures, outputs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPS = 200


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 1024, f"{path} is only {len(data)} bytes"


def smoke_params() -> dict:
    """The resolved smoke parameters the pipeline passes (only the keys build_all reads)."""
    return {"scale": "smoke", "protocol": rd.PROTOCOL, "suites": {"atari": {"tasks": ["Pong", "Breakout"]}},
            "protocols": {rd.PROTOCOL: {"suite": "atari"}}, "model": {"mow": {"num_experts": 12, "top_k": 2}}}


def smoke_inputs(tmp_path) -> dict:
    raw, runs = tmp_path / "raw", tmp_path / "runs"
    two_games = {g: rd.STORM_HNS[g][:2] for g in ("Pong", "Breakout")}
    rd.write_known(raw, "storm", two_games)
    rd.write_known(raw, "mow", {g: rd.MOW_HNS[g][:2] for g in ("Pong", "Breakout")})
    rd.write_known(raw, "mow", {"Pong": [0.2, 0.4], "Breakout": [0.1, 0.3]}, variant="no_experts")
    for task, per_seed in {"reach-v2": [[1, 0], [1, 1]], "push-v2": [[0, 0], [0, 1]]}.items():
        for seed, succ in enumerate(per_seed, start=1):
            rd.write_raw(raw, method="mow", task=task, seed=seed, returns=[float(s) for s in succ], successes=succ,
                         suite="metaworld", protocol="metaworld")
    rd.write_runs(runs)
    clusters, routing, imagination = rd.write_side_files(tmp_path / "side", tasks=("Pong", "Breakout"))
    return {"raw_root": raw, "runs_root": runs, "clusters_json": clusters, "routing_json": routing,
            "imagination_npz": imagination}


def test_build_all_writes_every_output(tmp_path):
    results = tmp_path / "results"
    paths = build_all(results_dir=results, scale="smoke", protocol=rd.PROTOCOL, params_dict=smoke_params(),
                      params_table=rd.fake_params_table(extra=True), reps=REPS, **smoke_inputs(tmp_path))
    assert paths == outputs(results)
    assert [p.name for p in paths] == [*TABLES, *SUMMARIES, *FIGURES, REPORT]
    for name in FIGURES:
        assert_png(results / "figures" / name)
    for name in TABLES:
        assert not pd.read_csv(results / name).empty, name
    assert (results / REPORT).stat().st_size > 1024
    assert not list(results.rglob(".*.tmp"))  # atomic writes leave no temporary files behind


def test_build_all_with_nothing_run_gives_placeholders(tmp_path):
    results = tmp_path / "results"
    paths = build_all(tmp_path / "raw", tmp_path / "runs", results, "smoke", rd.PROTOCOL, smoke_params(),
                      params_table=rd.fake_params_table(), reps=REPS)
    assert [p.name for p in paths] == [*TABLES, *SUMMARIES, *FIGURES, REPORT]
    for name in FIGURES:
        assert_png(results / "figures" / name)
    assert pd.read_csv(results / "ablations.csv").empty and pd.read_csv(results / "metaworld_table.csv").empty
    atari = pd.read_csv(results / "atari_table.csv")
    assert list(atari["game"]) == ["mean HNS", "median HNS", "IQM HNS", "optimality gap"]


def test_build_all_reports_a_missing_game_by_name(tmp_path):
    rd.write_known(tmp_path / "raw", "storm", {"Pong": [0.5]})
    with pytest.raises(ResultsError, match="no raw file for game Breakout"):
        build_all(tmp_path / "raw", tmp_path / "runs", tmp_path / "results", "smoke", rd.PROTOCOL, smoke_params(),
                  params_table=rd.fake_params_table(), reps=REPS)


def test_learning_curve_data_from_single_and_multi_task_runs(tmp_path):
    rd.write_runs(tmp_path, games=("Pong", "Breakout"), seeds=(1, 2))
    curves = figures.run_curves(tmp_path, scale=rd.SCALE, suite=rd.SUITE, protocol=rd.PROTOCOL)
    assert set(curves) == {"Pong", "Breakout"}
    assert set(curves["Pong"]) == {"storm_repro", "mow_repro"} and len(curves["Pong"]["mow_repro"]) == 2
    steps, values = curves["Breakout"]["mow_repro"][0]
    assert steps[0] == 100 and values[0] == pytest.approx(100 / 50 + 1 + 1)  # game index 1, seed 1
    sig = figures.run_curves(tmp_path, scale=rd.SCALE, suite=rd.SUITE, protocol=rd.PROTOCOL, key="wm/sigma")
    assert set(sig["Pong"]) == {"mow_repro"}


def test_band_mean_and_range_over_seeds():
    runs = [(np.array([0.0, 10.0]), np.array([0.0, 10.0])), (np.array([0.0, 10.0]), np.array([2.0, 12.0]))]
    x, mean, lo, hi = figures._band(runs)
    assert x[0] == 0 and x[-1] == 10
    np.testing.assert_allclose(mean, x + 1)
    np.testing.assert_allclose(lo, x) and np.testing.assert_allclose(hi, x + 2)


def test_torn_metrics_line_is_skipped_but_corruption_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "episode/return": 2.0}\n{"step": 2, "episo')
    assert figures.read_metrics(path) == [{"step": 1, "episode/return": 2.0}]
    path.write_text('{"step": 1\n{"step": 2}\n')
    with pytest.raises(ResultsError, match=r"metrics.jsonl:1: not a JSON line"):
        figures.read_metrics(path)


def test_bad_side_files_are_named(tmp_path):
    clusters, routing, imagination = rd.write_side_files(tmp_path, tasks=("Pong", "Breakout"))
    doc = json.loads(clusters.read_text())
    doc["similarity"] = [[1.0]]
    clusters.write_text(json.dumps(doc))
    with pytest.raises(ResultsError, match=rf"{clusters}: similarity \(1, 1\)"):
        figures.similarity_matrix(clusters, tmp_path / "s.png", scale="smoke")
    routing.write_text(json.dumps({"tasks": ["Pong"]}))
    with pytest.raises(ResultsError, match=r"routing.json: lacks field\(s\) \['num_experts', 'weights'\]"):
        figures.expert_usage(routing, tmp_path / "e.png", scale="smoke")
    np.savez(imagination, real=np.zeros((2, 4, 64, 64, 3), np.uint8), imagined=np.zeros((2, 3, 64, 64, 3), np.uint8),
             tasks=np.array(["Pong", "Breakout"]))
    with pytest.raises(ResultsError, match=r"imagination.npz: real .* and imagined"):
        figures.imagination(imagination, tmp_path / "i.png", scale="smoke")


def test_placeholder_names_the_scale(tmp_path):
    path = figures.sigma(tmp_path / "no-runs", tmp_path / "sigma.png", scale="smoke", suite=rd.SUITE,
                         protocol=rd.PROTOCOL)
    assert_png(path)
    assert path.read_bytes() != figures.placeholder(tmp_path / "other.png", "MoW task uncertainty sigma_k",
                                                    "paper").read_bytes()


def test_side_files_default_to_the_mow_run_folder(tmp_path):
    from mow.results import mow_side_file

    assert mow_side_file(tmp_path, "smoke", rd.PROTOCOL, "routing") is None
    base = tmp_path / "smoke" / "atari" / rd.PROTOCOL / "mow" / "full" / "all"
    for seed in (10, 2):
        _, routing, _ = rd.write_side_files(base / f"seed{seed}" / "warmup", tasks=("Pong", "Breakout"))
        routing.rename(base / f"seed{seed}" / "routing.json")
    assert mow_side_file(tmp_path, "smoke", rd.PROTOCOL, "clusters") == base / "seed2" / "warmup" / "clusters.json"
    assert mow_side_file(tmp_path, "smoke", rd.PROTOCOL, "routing") == base / "seed2" / "routing.json"
    assert mow_side_file(tmp_path, "smoke", rd.PROTOCOL, "imagination") is None
