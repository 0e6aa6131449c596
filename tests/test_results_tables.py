"""mow.results collect + tables: hand-computed answers, pinned literature values, bad input by name."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import results_data as rd

from mow import metrics
from mow.results import ResultsError, tables
from mow.results.collect import load_results

REPS = 200
WHERE = {"scale": rd.SCALE, "protocol": rd.PROTOCOL}


def load(root, **kw) -> pd.DataFrame:
    return load_results(root, scale=rd.SCALE, suite=rd.SUITE, protocol=rd.PROTOCOL, **kw)


@pytest.fixture
def known(tmp_path) -> pd.DataFrame:
    rd.write_known(tmp_path, "storm", rd.STORM_HNS)
    rd.write_known(tmp_path, "mow", rd.MOW_HNS)
    return load(tmp_path)


# ------------------------------------------------------------------ collect
def test_collect_one_row_per_run_with_provenance(known, tmp_path):
    assert len(known) == 2 * 3 * 3
    row = known[(known["method"] == "storm") & (known["task"] == "Pong") & (known["seed"] == 2)].iloc[0]
    assert row["score"] == pytest.approx(rd.score("Pong", 0.5))
    assert row["raw_file"] == str(rd.raw_path(tmp_path, method="storm", task="Pong", seed=2))
    assert row["mlflow_run_id"] == "run-storm-full-Pong-2" and row["git_commit"] == "abc123"
    assert row["protocol"] == rd.PROTOCOL and row["episodes"] == 2


def test_collect_empty_root_gives_empty_frame(tmp_path):
    df = load(tmp_path / "nothing")
    assert df.empty and "score" in df.columns


def test_missing_seed_is_named(tmp_path):
    rd.write_known(tmp_path, "storm", rd.STORM_HNS)
    rd.raw_path(tmp_path, method="storm", task="Breakout", seed=3).unlink()
    with pytest.raises(ResultsError, match=r"storm/full: missing raw file for game Breakout, seed 3"):
        load(tmp_path)


def test_missing_game_is_named(tmp_path):
    rd.write_known(tmp_path, "storm", {"Pong": [0.5]})
    with pytest.raises(ResultsError, match=r"no raw file for game Breakout"):
        load(tmp_path, expected_tasks=["Pong", "Breakout"])


def test_nan_return_is_named(tmp_path):
    path = rd.write_raw(tmp_path, method="storm", task="Pong", seed=1, returns=[1.0, float("nan")])
    with pytest.raises(ResultsError) as err:
        load(tmp_path)
    msg = str(err.value)
    assert str(path) in msg and "game Pong" in msg and "seed 1" in msg and "non-finite" in msg


def test_mismatched_protocol_and_scale_are_named(tmp_path):
    # the file sits in the storm_compat folder but says it was evaluated under another protocol
    path = rd.write_raw(tmp_path, method="storm", task="Pong", seed=1, returns=[1.0],
                        override={"protocol": "atari100k_standard"})
    with pytest.raises(ResultsError, match=rf"{path}.*protocol is 'atari100k_standard', expected 'storm_compat'"):
        load(tmp_path)
    rd.write_raw(tmp_path, method="storm", task="Pong", seed=1, returns=[1.0], override={"scale": "paper"})
    with pytest.raises(ResultsError, match=r"seed1.json \(game Pong, seed 1\): scale is 'paper', expected 'smoke'"):
        load(tmp_path)


def test_misplaced_file_and_missing_keys_are_named(tmp_path):
    path = rd.write_raw(tmp_path, method="storm", task="Pong", seed=1, returns=[1.0])
    path.rename(other := path.with_name("seed2.json"))
    with pytest.raises(ResultsError, match=r"file says storm/full/Pong/seed1 but lies under storm/full/Pong/seed2"):
        load(tmp_path)
    other.write_text('{"suite": "atari"}')
    with pytest.raises(ResultsError, match=r"seed2.json: raw result lacks method"):
        load(tmp_path)


# ------------------------------------------------------------------ atari_table
def test_atari_table_game_rows(known):
    table = tables.atari_table(known, scale=rd.SCALE, protocol=rd.PROTOCOL, reps=REPS).set_index("game")
    assert list(table.index[:3]) == ["Boxing", "Breakout", "Pong"]  # reference-table order
    pong = table.loc["Pong"]
    pong_scores = [rd.score("Pong", h) for h in rd.STORM_HNS["Pong"]]
    assert pong["random"] == pytest.approx(-20.7) and pong["human"] == pytest.approx(14.6)
    assert pong["storm_repro_mean"] == pytest.approx(np.mean(pong_scores))
    assert pong["storm_repro_std"] == pytest.approx(np.std(pong_scores, ddof=1))
    assert pong["storm_repro_seeds"] == 3 and pong["mow_repro_seeds"] == 3
    assert pong["hns_storm_repro"] == pytest.approx(0.5) and pong["hns_mow_repro"] == pytest.approx(1.0)
    official = [20.8, 20.5, -7.4, 20.4, 2.1]  # STORM's official Pong seeds
    assert pong["storm_official_mean"] == pytest.approx(np.mean(official))
    assert pong["hns_storm_official"] == pytest.approx((np.mean(official) + 20.7) / 35.3)
    assert table.loc["Boxing", "hns_storm_repro"] == pytest.approx(2.0)
    assert pong["protocol"] == rd.PROTOCOL and pong["scale"] == rd.SCALE
    assert pong["raw_files"].count(";") == 5 and "storm/full/Pong/seed3.json" in pong["raw_files"]
    assert "run-mow-full-Pong-1" in pong["mlflow_run_ids"] and pong["git_commits"] == "abc123"


def test_atari_table_aggregate_rows(known):
    table = tables.atari_table(known, scale=rd.SCALE, protocol=rd.PROTOCOL, reps=REPS).set_index("game")
    expected = {"mean HNS": 7 / 6, "median HNS": 1.0, "IQM HNS": 1.2, "optimality gap": 2 / 9}
    for row, value in expected.items():
        assert table.loc[row, "hns_storm_repro"] == pytest.approx(value)
        assert table.loc[row, "hns_mow_repro"] == pytest.approx(0.0 if row == "optimality gap" else 1.0)
        lo, hi = table.loc[row, ["hns_storm_repro_ci_low", "hns_storm_repro_ci_high"]]
        assert lo <= value <= hi and lo < hi
        assert table.loc[row, "n_games"] == 3
    assert table.loc["mean HNS", "hns_storm_official"] == pytest.approx(
        np.mean(table.loc[["Boxing", "Breakout", "Pong"], "hns_storm_official"]))


def test_atari_table_method_without_runs_is_empty_not_an_error(tmp_path):
    rd.write_known(tmp_path, "storm", {"Pong": [0.5, 1.0]})
    table = tables.atari_table(load(tmp_path), scale=rd.SCALE, protocol=rd.PROTOCOL, reps=REPS).set_index("game")
    assert list(table.index) == ["Pong", "mean HNS", "median HNS", "IQM HNS", "optimality gap"]
    assert table["mow_repro_mean"].isna().all() and table["hns_mow_repro"].isna().all()
    assert table.loc["Pong", "mow_repro_seeds"] == 0
    assert table.loc["mean HNS", "hns_storm_repro"] == pytest.approx(0.75)


def test_atari_table_nothing_run_keeps_aggregate_rows(tmp_path):
    table = tables.atari_table(load(tmp_path), scale=rd.SCALE, protocol=rd.PROTOCOL, reps=REPS)
    assert list(table["game"]) == ["mean HNS", "median HNS", "IQM HNS", "optimality gap"]
    assert table["hns_storm_repro"].isna().all()


def test_one_seed_has_no_ci_and_no_std(tmp_path):
    rd.write_known(tmp_path, "storm", {"Pong": [0.5], "Breakout": [1.5]})
    table = tables.atari_table(load(tmp_path), scale=rd.SCALE, protocol=rd.PROTOCOL, reps=REPS).set_index("game")
    assert math.isnan(table.loc["Pong", "storm_repro_std"])
    assert table.loc["mean HNS", "hns_storm_repro"] == pytest.approx(1.0)
    assert math.isnan(table.loc["mean HNS", "hns_storm_repro_ci_low"])


def test_methods_on_different_games_are_refused(tmp_path):
    rd.write_known(tmp_path, "storm", {"Pong": [0.5], "Breakout": [1.0]})
    rd.write_known(tmp_path, "mow", {"Pong": [1.0]})
    with pytest.raises(ResultsError, match=r"mow_repro has no run of game Breakout"):
        tables.atari_summary(load(tmp_path), scale=rd.SCALE, protocol=rd.PROTOCOL, reps=REPS)


# ------------------------------------------------------------------ atari_summary
def test_summary_on_run_games(known):
    summary = tables.atari_summary(known, scale=rd.SCALE, protocol=rd.PROTOCOL, reps=REPS)
    value = summary.set_index(["method", "metric"])["value"]
    assert set(summary["method"]) == {"storm_official", "storm_repro", "mow_repro", "SimPLe", "IRIS", "DIAMOND",
                                      "mow_repro vs storm_repro"}
    assert value["storm_repro", "mean_hns"] == pytest.approx(7 / 6)
    assert value["storm_repro", "median_hns"] == pytest.approx(1.0)
    simple = [(12.8 + 20.7) / 35.3, (16.4 - 1.7) / 28.8, (7.8 - 0.1) / 12.0]  # SimPLe on Pong, Breakout, Boxing
    assert value["SimPLe", "mean_hns"] == pytest.approx(np.mean(simple))
    assert value["SimPLe", "median_hns"] == pytest.approx(np.median(simple))
    assert (summary["n_games"] == 3).all() and (summary["games"] == "Boxing;Breakout;Pong").all()
    # P(MoW > STORM) per game, ties counting 1/2, MoW = 1 everywhere: Pong vs (0, .5, 1) -> 5/6,
    # Breakout vs (.5, 1, 1.5) -> 1/2, Boxing vs 2 -> 0; averaged over games -> 4/9
    poi = summary[summary["metric"] == "probability_of_improvement"].iloc[0]
    assert poi["method"] == "mow_repro vs storm_repro"
    assert poi["value"] == pytest.approx(4 / 9)
    assert poi["ci_low"] <= poi["value"] <= poi["ci_high"]


def test_summary_without_runs_pins_literature_values(tmp_path):
    summary = tables.atari_summary(load(tmp_path), scale="paper", protocol=rd.PROTOCOL, reps=REPS)
    value = summary.set_index(["method", "metric"])["value"]
    assert (summary["n_games"] == 26).all()
    assert value["storm_official", "mean_hns"] * 100 == pytest.approx(122.2, abs=0.1)
    assert value["storm_official", "median_hns"] * 100 == pytest.approx(42.5, abs=0.1)
    for method, mean, median in (("SimPLe", 33.2, 13.4), ("IRIS", 104.6, 28.9), ("DIAMOND", 145.9, 37.3)):
        assert value[method, "mean_hns"] * 100 == pytest.approx(mean, abs=0.1)
        assert value[method, "median_hns"] * 100 == pytest.approx(median, abs=0.1)
    assert "storm_repro" not in set(summary["method"])


# ------------------------------------------------------------------ params, ablations, Meta-World
def test_params_csv_iterates_every_column():
    for extra in (False, True):
        table = tables.params_csv(rd.fake_params_table(extra=extra))
        totals = table[table["component"] == "total"].set_index("model")
        assert list(totals.index) == ["STORM x1 (18 act.)", "STORM x26 (minimal)", *(["MoW"] if extra else [])]
        assert totals.loc["STORM x26 (minimal)", "parameters"] == 104_000_000
        assert totals.loc["STORM x26 (minimal)", "mib_fp32"] == pytest.approx(104e6 * 4 / 2**20)
        assert totals.loc["STORM x26 (minimal)", "paper_mib_fp32"] == 1977.5
        assert math.isnan(totals.loc["STORM x1 (18 act.)", "paper_mib_fp32"])
    assert totals.loc["MoW", "paper_mib_fp32"] == 972.5
    assert len(table) == 3 * 3  # 2 components + total, per model


def test_ablations_header_only_without_variants(known):
    table = tables.ablations_table(known, scale=rd.SCALE, protocol=rd.PROTOCOL, reps=REPS)
    assert table.empty and list(table.columns) == list(tables.ABLATION_COLUMNS)


def test_ablations_one_row_per_variant(tmp_path):
    rd.write_known(tmp_path, "mow", rd.MOW_HNS)
    rd.write_known(tmp_path, "mow", {"Pong": [0.0, 0.5], "Breakout": [0.5, 0.5]}, variant="no_experts")
    table = tables.ablations_table(load(tmp_path), scale=rd.SCALE, protocol=rd.PROTOCOL, reps=REPS)
    table = table.set_index("variant")
    assert list(table.index) == ["full", "no_experts"]
    assert table.loc["full", "mean_hns"] == pytest.approx(1.0) and table.loc["full", "n_seeds"] == 3
    assert table.loc["no_experts", "mean_hns"] == pytest.approx((0.25 + 0.5) / 2)
    assert table.loc["no_experts", "median_hns"] == pytest.approx(0.375)
    assert table.loc["no_experts", "n_games"] == 2 and table.loc["no_experts", "n_seeds"] == 2
    assert "mow/no_experts/Pong/seed2.json" in table.loc["no_experts", "raw_files"]


def _metaworld(tmp_path, successes: dict[str, list[list[int]]]) -> pd.DataFrame:
    for task, per_seed in successes.items():
        for seed, succ in enumerate(per_seed, start=1):
            rd.write_raw(tmp_path, method="mow", task=task, seed=seed, returns=[float(s) for s in succ],
                         successes=succ, suite="metaworld", protocol="metaworld")
    return load_results(tmp_path, scale=rd.SCALE, suite="metaworld", protocol="metaworld")


def test_metaworld_table(tmp_path):
    df = _metaworld(tmp_path, {"reach-v2": [[1, 1], [1, 0]], "push-v2": [[0, 0], [1, 0]]})
    table = tables.metaworld_table(df, scale=rd.SCALE, protocol="metaworld", reps=REPS).set_index("task")
    assert table.loc["reach-v2", "mow_repro_success"] == pytest.approx(0.75)
    assert table.loc["push-v2", "mow_repro_success"] == pytest.approx(0.25)
    assert table.loc["mean success", "mow_repro_success"] == pytest.approx(0.5)
    lo, hi = table.loc["mean success", ["mow_repro_ci_low", "mow_repro_ci_high"]]
    assert lo <= 0.5 <= hi
    assert table.loc["mean success", "paper_MoW"] == pytest.approx(0.745)
    assert table.loc["mean success", "paper_MOORE"] == pytest.approx(0.729)
    assert table["storm_repro_success"].isna().all()


def test_metaworld_header_only_and_missing_successes(tmp_path):
    empty = tables.metaworld_table(load_results(tmp_path, scale=rd.SCALE, suite="metaworld", protocol="metaworld"),
                                   scale=rd.SCALE, protocol="metaworld", reps=REPS)
    assert empty.empty and "paper_MoW" in empty.columns
    path = rd.write_raw(tmp_path, method="mow", task="reach-v2", seed=1, returns=[1.0], suite="metaworld",
                        protocol="metaworld")
    df = load_results(tmp_path, scale=rd.SCALE, suite="metaworld", protocol="metaworld")
    with pytest.raises(ResultsError, match=rf"{path}: Meta-World raw result lacks `successes`"):
        tables.metaworld_table(df, scale=rd.SCALE, protocol="metaworld", reps=REPS)


def test_tables_are_deterministic(known):
    a = tables.atari_summary(known, scale=rd.SCALE, protocol=rd.PROTOCOL, reps=REPS, seed=3)
    b = tables.atari_summary(known, scale=rd.SCALE, protocol=rd.PROTOCOL, reps=REPS, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert metrics.load_reference_scores().index[0] == "Alien"
