"""mow.metrics: pinned literature numbers, hand-checkable aggregates, determinism, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mow import metrics as m

PAPER = Path(__file__).resolve().parents[1] / "paper"


@pytest.fixture(scope="module")
def ref() -> pd.DataFrame:
    return m.load_reference_scores()


@pytest.fixture(scope="module")
def storm_hns(ref) -> np.ndarray:
    df = pd.read_csv(PAPER / "storm_official_per_seed.csv")
    games = list(ref.index)
    return m.normalize_matrix(m.score_matrix(df, games), games, ref)


# ------------------------------------------------------------------ reference data
def test_reference_table_loads_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ref = m.load_reference_scores()
    assert len(ref) == 26 and {"random", "human"} <= set(ref.columns)
    assert ref.at["Alien", "random"] == pytest.approx(227.8) and ref.at["Alien", "human"] == pytest.approx(7127.7)


def test_human_normalized_formula_and_shape(ref):
    out = m.human_normalized({"Alien": 7127.7, "Pong": np.array([-20.7, 14.6])}, ref)
    assert isinstance(out["Alien"], float) and out["Alien"] == pytest.approx(1.0)
    assert out["Pong"].shape == (2,)
    np.testing.assert_allclose(out["Pong"], [0.0, 1.0], atol=1e-12)  # Pong random -20.7, human 14.6


# ------------------------------------------------------------------ pinned literature values
def test_storm_official_mean_median_iqm(storm_hns):
    assert storm_hns.shape == (5, 26)
    agg = m.aggregate(storm_hns, reps=500, seed=0)
    assert agg["mean"] * 100 == pytest.approx(122.2, abs=0.1)
    assert agg["median"] * 100 == pytest.approx(42.5, abs=0.1)
    assert agg["iqm"] == pytest.approx(0.561, abs=0.005)
    # Guard against the wrong median definition (median over all 130 run x game cells).
    assert np.median(storm_hns) * 100 != pytest.approx(42.5, abs=0.1)
    for name in m.AGGREGATES:
        lo, hi = agg[f"{name}_ci"]
        assert lo <= agg[name] <= hi and all(isinstance(v, float) for v in (agg[name], lo, hi))


@pytest.mark.parametrize("method,mean,median", [("SimPLe", 33.2, 13.4), ("IRIS", 104.6, 28.9),
                                                ("DIAMOND", 145.9, 37.3)])
def test_baseline_mean_median(ref, method, mean, median):
    table = pd.read_csv(PAPER / "atari_baselines_mean.csv").set_index("game")
    games = list(table.index)
    hns = m.human_normalized(table[method].to_dict(), ref)
    agg = m.aggregate(np.array([[hns[g] for g in games]]), reps=10)  # one "run" of per-game means
    assert agg["mean"] * 100 == pytest.approx(mean, abs=0.1)
    assert agg["median"] * 100 == pytest.approx(median, abs=0.1)


# ------------------------------------------------------------------ synthetic, known answers
def test_constant_matrix_collapses():
    agg = m.aggregate(np.full((5, 4), 0.5), reps=200)
    for name, want in [("mean", 0.5), ("median", 0.5), ("iqm", 0.5), ("optimality_gap", 0.5)]:
        assert agg[name] == pytest.approx(want)
        assert agg[f"{name}_ci"] == pytest.approx([want, want])


def test_iqm_and_optimality_gap_hand_checked():
    x = np.arange(16, dtype=float).reshape(4, 4) / 8  # cells 0/8 .. 15/8
    agg = m.aggregate(x, reps=50)
    assert agg["iqm"] == pytest.approx(np.mean(np.arange(4, 12)) / 8)  # middle 8 of 16 sorted -> 0.9375
    assert agg["optimality_gap"] == pytest.approx(1 - (28 / 8 + 8) / 16)  # clip at 1 -> 0.28125


def test_fast_iqm_equals_rliables_on_odd_and_even_sizes():
    from rliable import metrics as rl

    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 3), (3, 5), (5, 26), (7, 13), (2, 2)]:
        x = rng.normal(size=shape) * 10
        assert m._iqm(x) == pytest.approx(rl.aggregate_iqm(x), rel=1e-12, abs=1e-12), shape


def test_median_is_over_per_game_means_not_cells():
    x = np.array([[0, 0, 5], [0, 0, 5], [0, 3, 5]], dtype=float)  # per-game means 0, 1, 5
    agg = m.aggregate(x, reps=50)
    assert agg["median"] == pytest.approx(1.0)  # the cell median would be 0
    assert agg["mean"] == pytest.approx(2.0)


def test_probability_of_improvement_extremes():
    rng = np.random.RandomState(3)
    y = rng.rand(5, 3)
    x = y + 1.0  # every x beats every y on each task
    assert m.probability_of_improvement(x, y, reps=100, seed=0) == pytest.approx((1.0, 1.0, 1.0))
    assert m.probability_of_improvement(y, x, reps=100, seed=0) == pytest.approx((0.0, 0.0, 0.0))
    point, lo, hi = m.probability_of_improvement(y, y.copy(), reps=100, seed=0)
    assert point == pytest.approx(0.5) and lo <= 0.5 <= hi


def test_performance_profile_constant():
    taus = [0.0, 0.25, 0.5, 1.0]
    out = m.performance_profile({"a": np.full((3, 4), 0.5), "b": np.full((3, 4), 2.0)}, taus, reps=50)
    prof, lo, hi = out["a"]
    np.testing.assert_allclose(prof, [1, 1, 0, 0])  # fraction of scores strictly above tau
    np.testing.assert_allclose(lo, prof) and np.testing.assert_allclose(hi, prof)
    np.testing.assert_allclose(out["b"][0], [1, 1, 1, 1])


def test_mean_success():
    s = np.array([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.5, 0.5]])
    out = m.mean_success(s, reps=500, seed=0)
    assert out["mean"] == pytest.approx(0.5)
    assert out["per_task"] == pytest.approx([0.625, 0.375])
    lo, hi = out["mean_ci"]
    assert 0.0 <= lo < 0.5 < hi <= 1.0
    assert m.mean_success(s, reps=500, seed=0) == out
    assert m.mean_success(np.full((3, 5), 0.8), reps=100)["mean_ci"] == pytest.approx([0.8, 0.8])


# ------------------------------------------------------------------ determinism
def test_bootstrap_is_seeded(storm_hns):
    state = np.random.get_state()
    a = m.aggregate(storm_hns, reps=300, seed=1)
    b = m.aggregate(storm_hns, reps=300, seed=1)
    c = m.aggregate(storm_hns, reps=300, seed=2)
    assert a == b
    assert a["iqm_ci"] != c["iqm_ci"] and a["mean_ci"] != c["mean_ci"]
    assert a["iqm"] == c["iqm"]  # point estimates do not depend on the seed
    np.testing.assert_array_equal(np.random.get_state()[1], state[1])  # global RNG left as found

    rng = np.random.RandomState(0)
    x, y = rng.rand(5, 4), rng.rand(5, 4)  # overlapping, so the PoI bootstrap is non-degenerate
    assert m.probability_of_improvement(x, y, reps=100, seed=1) == m.probability_of_improvement(x, y, reps=100, seed=1)
    assert m.probability_of_improvement(x, y, reps=100, seed=1) != m.probability_of_improvement(x, y, reps=100, seed=2)
    p1 = m.performance_profile({"s": storm_hns}, [0.5], reps=100, seed=1)["s"]
    p2 = m.performance_profile({"s": storm_hns}, [0.5], reps=100, seed=1)["s"]
    assert all(np.array_equal(u, v) for u, v in zip(p1, p2))


# ------------------------------------------------------------------ bad input
def _records():
    return [{"game": g, "seed": s, "score": 100.0 + s} for g in ("Alien", "Pong") for s in (1, 2, 3)]


def test_score_matrix_builds_runs_by_games():
    out = m.score_matrix(_records(), ["Pong", "Alien"])
    np.testing.assert_array_equal(out, [[101, 101], [102, 102], [103, 103]])
    assert m.score_matrix(pd.DataFrame(_records()), ["Alien"]).shape == (3, 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_score_names_game_and_seed(bad):
    recs = _records()
    recs[4]["score"] = bad  # Pong, seed 2
    with pytest.raises(ValueError, match=r"'Pong'.*seed 2"):
        m.score_matrix(recs, ["Alien", "Pong"])


def test_missing_seed_names_game_and_seed():
    recs = [r for r in _records() if not (r["game"] == "Alien" and r["seed"] == 3)]
    with pytest.raises(ValueError, match=r"missing.*'Alien'.*seed 3"):
        m.score_matrix(recs, ["Alien", "Pong"])


def test_missing_game_names_it():
    with pytest.raises(ValueError, match=r"missing.*'Breakout'"):
        m.score_matrix(_records(), ["Alien", "Pong", "Breakout"])


def test_duplicate_cell_rejected():
    with pytest.raises(ValueError, match=r"duplicate.*'Alien'.*seed 1"):
        m.score_matrix(_records() + [{"game": "Alien", "seed": 1, "score": 5.0}], ["Alien", "Pong"])


def test_unknown_game_names_it(ref):
    with pytest.raises(ValueError, match="NotAGame"):
        m.human_normalized({"Alien": 1.0, "NotAGame": 2.0}, ref)


def test_aggregate_rejects_nan():
    x = np.full((3, 3), 0.5)
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match="run 1, task 2"):
        m.aggregate(x, reps=10)
