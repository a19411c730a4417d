"""The experiment's statistics: arms over seeds, paired bootstrap over items and seeds, noise floor, MDE."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from refinery.report.stats import NOT_MEASURABLE, ArmScores, align, analyse, compare, gate_families, noise_floor


def arm(mean: float, seeds: int, items: int = 300, seed_sd: float = 0.0, item_sd: float = 0.2, rng_seed: int = 0,
        base_items: np.ndarray | None = None) -> ArmScores:
    """Per-item F1 = a shared item difficulty + this arm's mean + a per-seed shift + per-item noise."""
    rng = np.random.default_rng(rng_seed)
    difficulty = base_items if base_items is not None else np.zeros(items)
    shifts = rng.normal(0, seed_sd, seeds)
    f1 = np.clip(difficulty + mean + shifts[:, None] + rng.normal(0, item_sd, (seeds, items)), 0, 1)
    return ArmScores(list(range(seeds)), f1)


def test_a_clear_difference_is_called_and_no_difference_is_not_measurable():
    items = np.random.default_rng(9).uniform(0, 0.4, 300)
    better, worse = arm(0.35, 3, base_items=items, rng_seed=1), arm(0.15, 3, base_items=items, rng_seed=2)
    same = arm(0.15, 3, base_items=items, rng_seed=3)
    res = compare(better, worse, n=400, ci=0.95, seed=0, seed_sd=0.01)
    assert res["verdict"] == "a > b" and res["low"] > 0 and res["diff"] == pytest.approx(0.2, abs=0.03)
    assert compare(worse, better, n=400, ci=0.95, seed=0, seed_sd=0.01)["verdict"] == "a < b"
    res = compare(same, worse, n=400, ci=0.95, seed=0, seed_sd=0.01)
    assert res["verdict"] == NOT_MEASURABLE and res["low"] < 0 < res["high"]


def test_seed_noise_widens_the_interval_and_the_minimum_detectable_difference():
    items = np.random.default_rng(9).uniform(0, 0.4, 300)
    quiet = [arm(m, 3, base_items=items, seed_sd=0.0, rng_seed=r) for m, r in ((0.3, 1), (0.25, 2))]
    noisy = [arm(m, 3, base_items=items, seed_sd=0.08, rng_seed=r) for m, r in ((0.3, 1), (0.25, 2))]
    q = compare(*quiet, n=400, ci=0.95, seed=0, seed_sd=noise_floor({"a": quiet[0], "b": quiet[1]})["sd"])
    z = compare(*noisy, n=400, ci=0.95, seed=0, seed_sd=noise_floor({"a": noisy[0], "b": noisy[1]})["sd"])
    assert z["high"] - z["low"] > 1.5 * (q["high"] - q["low"])
    assert z["mde"] > q["mde"]


def test_the_noise_floor_pools_the_between_seed_variance_of_each_arm():
    a, b = arm(0.3, 3, seed_sd=0.05, rng_seed=1), arm(0.2, 4, seed_sd=0.05, rng_seed=2)
    va, vb = a.f1.mean(axis=1).var(ddof=1), b.f1.mean(axis=1).var(ddof=1)
    expected = np.sqrt((2 * va + 3 * vb) / 5)
    floor = noise_floor({"a": a, "b": b, "single": arm(0.1, 1)})
    assert floor["sd"] == pytest.approx(expected, abs=1e-4) and floor["arms"] == 2
    assert noise_floor({"a": arm(0.1, 1)})["sd"] is None


def test_more_test_items_buy_a_smaller_minimum_detectable_difference():
    small = compare(arm(0.3, 3, items=100, rng_seed=1), arm(0.3, 3, items=100, rng_seed=2), n=200, ci=0.95, seed=0,
                    seed_sd=0.01)
    large = compare(arm(0.3, 3, items=900, rng_seed=1), arm(0.3, 3, items=900, rng_seed=2), n=200, ci=0.95, seed=0,
                    seed_sd=0.01)
    assert large["mde"] < small["mde"]


def test_analyse_answers_only_the_questions_of_declared_arms():
    arms = {"base": ArmScores([0], arm(0.1, 1).f1, trained=False), "human": arm(0.3, 2), "contaminated": arm(0.2, 2)}
    out = analyse(arms, n=100, ci=0.95, seed=0, declared=["human", "contaminated", "curated"])
    assert out["questions"]["contamination_cost"]["verdict"] == "a > b"
    assert out["questions"]["curated_vs_contaminated"]["verdict"] == "not run"  # declared, not evaluated
    assert "filtering" not in out["questions"]  # unfiltered is not an arm of this project
    assert out["arms"]["human"]["seeds"] == [0, 1] and out["arms"]["human"]["sd"] is not None


def test_align_refuses_predictions_of_another_test_split():
    t = pa.table({"row_id": ["a", "b"], "f1": [0.5, 1.0]})
    assert align({1: t}, ["b", "a"]).tolist() == [[1.0, 0.5]]
    with pytest.raises(ValueError, match="no prediction for test item c"):
        align({1: t}, ["a", "c"])


def test_gate_families_count_rows_rejected_by_each_family_where_both_judged():
    t = pa.table({"rules_keep": [False, True, True, False, None], "dedup_keep": [True, True, True, True, None],
                  "faithfulness_keep": [True, False, True, False, None], "reward_keep": [True, True, True, True, True]})
    out = gate_families({"planted": t})["planted"]
    assert out == {"judged_by_both": 4, "rejected_heuristic": 2, "rejected_model": 2, "rejected_both": 1,
                   "heuristic_only": 1, "model_only": 1, "jaccard": round(1 / 3, 4)}
