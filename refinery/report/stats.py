"""The experiment's statistics: arms trained over several seeds, compared on the same human test items.

Every comparison is paired over test items and resampled over both items and training seeds (a two-level
bootstrap), so its interval holds the test-set noise and the training noise together. The between-seed sd of one
arm (pooled over arms) is the noise floor; the minimum detectable difference is what a comparison of this size
could tell apart at the report's confidence and 80% power. A question is answered only when its interval excludes
0; otherwise it is "not measurable at this size", with the numbers.

It also derives the report's other numbers: dataset sizes, the contamination gap with paired bootstrap intervals
over test rows, the hypotheses' verdicts, the exact test of adaptive against naive recovery, and sample rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import pyarrow as pa

from refinery.gates.registry import family as gate_family
from refinery.training.arms import BASE

MODELS = ("base", "human", "contaminated", "curated")  # the experiment brief's models the A/B/C sections compare
ADAPTERS = ("human", "contaminated", "curated")
METRICS = (("exact_match", "EM"), ("f1", "F1"), ("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"),
           ("bertscore_f1", "BERTScore"), ("factual_accuracy", "Factual acc."))
NOT_RUN = "not run"

POWER = 0.8  # the power at which the minimum detectable difference is given
NOT_MEASURABLE = "not measurable at this size"

# The seed questions the report answers first: (id, question, arm a, arm b); a difference is a - b in token F1.
QUESTIONS = (
    ("contamination_cost", "Does teacher contamination cost accuracy (A human vs B contaminated)?", "human",
     "contaminated"),
    ("curated_vs_contaminated", "Does curated synthetic data recover what contamination cost (C curated vs B)?",
     "curated", "contaminated"),
    ("curated_vs_human", "Does curated synthetic data add to the human rows (C curated vs A human)?", "curated",
     "human"),
    ("synthetic_only_vs_base", "Is synthetic data worth anything alone (synthetic_only vs the untuned base)?",
     "synthetic_only", BASE),
    ("synthetic_only_vs_human", "Is synthetic data alone as good as the human rows (synthetic_only vs A human)?",
     "synthetic_only", "human"),
    ("filtering", "Does filtering matter (curated vs unfiltered, equal synthetic rows)?", "curated", "unfiltered"),
    ("recovery", "Does recovery matter (curated vs no_recovery)?", "curated", "no_recovery"),
    ("human_vs_base", "Does fine-tuning on the human rows help at all (A human vs the untuned base)?", "human", BASE),
)

HEURISTIC_GATES = gate_family("heuristic")  # text rules and similarity bounds
MODEL_GATES = gate_family("model")  # learned or model-scored gates


@dataclass(frozen=True)
class ArmScores:
    """Per-item token F1 of one arm: one row per training seed, one column per test item (shared order)."""

    seeds: list[int]
    f1: np.ndarray  # shape (seeds, items)
    trained: bool = True  # False for the untuned base: decoded once, greedy, no training noise


def align(tables: dict[int, pa.Table], row_ids: list[str], column: str = "f1") -> np.ndarray:
    """Stack each seed's per-item ``column`` in ``row_ids`` order (seeds in key order).

    Raises:
        ValueError: a table misses a test item (predictions of another test split).
    """
    out = []
    for seed in sorted(tables):
        t = tables[seed]
        value = dict(zip(t.column("row_id").to_pylist(), t.column(column).to_pylist()))
        missing = [r for r in row_ids if r not in value]
        if missing:
            raise ValueError(f"seed {seed}: no prediction for test item {missing[0]} ({len(missing)} missing)")
        out.append([float(value[r] or 0.0) for r in row_ids])
    return np.asarray(out, float).reshape(len(tables), len(row_ids))


def arm_summary(scores: ArmScores) -> dict[str, Any]:
    """Mean F1 per seed, their mean and between-seed sd (None with one seed)."""
    per_seed = scores.f1.mean(axis=1)
    return {"seeds": scores.seeds, "items": int(scores.f1.shape[1]),
            "f1_per_seed": {str(sd): round(float(x), 4) for sd, x in zip(scores.seeds, per_seed)},
            "mean": round(float(per_seed.mean()), 4),
            "sd": round(float(per_seed.std(ddof=1)), 4) if len(per_seed) > 1 else None}


def noise_floor(arms: dict[str, ArmScores]) -> dict[str, Any]:
    """The between-seed sd of an arm's mean F1, pooled over the arms trained with two or more seeds."""
    variances = [(len(a.seeds) - 1, float(a.f1.mean(axis=1).var(ddof=1))) for a in arms.values() if len(a.seeds) > 1]
    if not variances:
        return {"sd": None, "arms": 0, "note": "every arm was trained with one seed"}
    dof = sum(d for d, _ in variances)
    return {"sd": round(math.sqrt(sum(d * v for d, v in variances) / dof), 4), "arms": len(variances),
            "degrees_of_freedom": dof}


def compare(a: ArmScores, b: ArmScores, *, n: int, ci: float, seed: int, seed_sd: float | None) -> dict[str, Any]:
    """Difference of mean F1 (a - b) with a bootstrap interval over test items and seeds, and the MDE.

    Each resample draws the test items with replacement (the same items for both arms: paired) and, for each arm,
    its training seeds with replacement. The minimum detectable difference at level ``1 - ci`` and 80% power is
    ``(z_{1-alpha/2} + z_power) * se``, with ``se^2 = var(item differences) / items + seed_sd^2 (1/k_a + 1/k_b)``
    (an arm evaluated once, like the untuned base, has no seed term).
    """
    rng = np.random.default_rng(seed)
    items = a.f1.shape[1]
    diffs = np.empty(n)
    for i in range(n):
        idx = rng.integers(0, items, items)
        sa = rng.integers(0, len(a.seeds), len(a.seeds))
        sb = rng.integers(0, len(b.seeds), len(b.seeds))
        diffs[i] = a.f1[sa][:, idx].mean() - b.f1[sb][:, idx].mean()
    lo, hi = np.quantile(diffs, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    item_diff = a.f1.mean(axis=0) - b.f1.mean(axis=0)
    var = float(item_diff.var(ddof=1)) / items if items > 1 else 0.0
    if seed_sd is not None:
        var += seed_sd ** 2 * sum(1 / len(x.seeds) for x in (a, b) if x.trained)
    z = NormalDist().inv_cdf(1 - (1 - ci) / 2) + NormalDist().inv_cdf(POWER)
    diff = float(a.f1.mean() - b.f1.mean())
    low, high = float(lo), float(hi)
    return {"diff": round(diff, 4), "low": round(low, 4), "high": round(high, 4),
            "mde": round(z * math.sqrt(var), 4), "seed_noise_in_mde": seed_sd is not None,
            "verdict": ("a > b" if low > 0 else "a < b" if high < 0 else NOT_MEASURABLE)}


def analyse(arms: dict[str, ArmScores], *, n: int, ci: float, seed: int,
            declared: list[str] | None = None) -> dict[str, Any]:
    """Arm summaries, the noise floor, and the seed questions.

    A question whose arms are both ``declared`` (params.yaml names them; the base always is) but not both
    evaluated is "not run"; one naming an arm the project does not declare is left out.
    """
    known = set(declared if declared is not None else arms) | {BASE}
    floor = noise_floor({k: v for k, v in arms.items() if k != BASE})
    out: dict[str, Any] = {"arms": {k: arm_summary(v) for k, v in arms.items()}, "noise_floor": floor,
                           "ci": ci, "power": POWER, "bootstrap": n, "questions": {}}
    for qid, text, a, b in QUESTIONS:
        if a not in known or b not in known:
            continue
        if a not in arms or b not in arms:
            out["questions"][qid] = {"question": text, "a": a, "b": b, "verdict": NOT_RUN}
            continue
        res = compare(arms[a], arms[b], n=n, ci=ci, seed=seed, seed_sd=floor["sd"])
        out["questions"][qid] = {"question": text, "a": a, "b": b, **res}
    return out


def experiment_summary(base: pa.Table | None, arm_tables: dict[str, dict[int, pa.Table]],
                       train: dict[str, list[dict[str, Any]]], *, n: int, ci: float, seed: int,
                       declared: list[str]) -> dict[str, Any] | None:
    """Compare the arms over their seeds (:func:`analyse`), adding each arm's mean human val loss.

    Args:
        base: the untuned base's predictions (their rows are the test items every arm is aligned on), or None.
        arm_tables: arm -> training seed -> that run's predictions (runs not evaluated are absent).
        train: arm -> the train metrics of its runs (``val_loss_initial``, ``val_loss_best``).
        n, ci, seed: bootstrap resamples, confidence level and RNG seed.
        declared: the arms params.yaml declares, in order.

    Returns:
        :func:`analyse`'s summary; None without the base's predictions.
    """
    if base is None:
        return None
    row_ids = base.column("row_id").to_pylist()
    scores = {BASE: ArmScores([0], align({0: base}, row_ids), trained=False)}
    for a in declared:
        if arm_tables.get(a):
            scores[a] = ArmScores(sorted(arm_tables[a]), align(arm_tables[a], row_ids))
    experiment = analyse(scores, n=n, ci=ci, seed=seed, declared=declared)
    for a in declared:
        runs = train.get(a) or []
        if a in experiment["arms"] and runs and all("val_loss_best" in t for t in runs):
            for key in ("val_loss_initial", "val_loss_best"):  # does each adapter learn? human val loss, mean
                experiment["arms"][a][key] = round(float(np.mean([t[key] for t in runs])), 4)
    return experiment


def audit_decision(audits: dict[str, dict[str, Any]], arms: list[str]) -> dict[str, Any] | None:
    """Return the validate decision over every arm: reject when a check failed or an arm has no audit.

    Args:
        audits: arm -> its validate audit (``failed_checks``), for the arms that have one.
        arms: every declared arm.

    Returns:
        decision, failed checks and arms validated; None when no arm was validated.
    """
    if not audits:
        return None
    failed = sum(len(x.get("failed_checks") or []) for x in audits.values())
    return {"decision": "reject" if failed or len(audits) < len(arms) else "accept", "failed_checks": failed,
            "arms_validated": len(audits)}


def gate_families(tables: dict[str, pa.Table]) -> dict[str, Any]:
    """Do the heuristic and the model gates reject different rows? Counted where both families judged the row.

    Args:
        tables: name -> gated rows (``<gate>_keep`` columns; null where a cascade skipped the gate), e.g. the
            generated rows and the planted rows.

    Returns:
        Per table: rows judged by both families, rejected by each, by both, by one only, and the Jaccard overlap of
        the two rejected sets (None when neither rejects).
    """
    out: dict[str, Any] = {"heuristic": list(HEURISTIC_GATES), "model": list(MODEL_GATES)}
    for name, t in tables.items():
        def family(gates: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
            cols = [g for g in gates if f"{g}_keep" in t.column_names]
            keep = [t.column(f"{g}_keep").to_pylist() for g in cols]
            judged = np.array([all(k[i] is not None for k in keep) for i in range(t.num_rows)], bool)
            rejected = np.array([any(k[i] is False for k in keep) for i in range(t.num_rows)], bool)
            return judged, rejected

        jh, rh = family(HEURISTIC_GATES)
        jm, rm = family(MODEL_GATES)
        both = jh & jm
        h, m = rh[both], rm[both]
        union = int((h | m).sum())
        out[name] = {"judged_by_both": int(both.sum()), "rejected_heuristic": int(h.sum()),
                     "rejected_model": int(m.sum()), "rejected_both": int((h & m).sum()),
                     "heuristic_only": int((h & ~m).sum()), "model_only": int((m & ~h).sum()),
                     "jaccard": round(int((h & m).sum()) / union, 4) if union else None}
    return out


def dataset_stats(table: pa.Table) -> dict[str, Any]:
    """Rows, mean question / answer length in words, unique questions, and rows by origin."""
    q = [x or "" for x in table.column("question").to_pylist()]
    a = [x or "" for x in table.column("answer").to_pylist()]
    origin = table.column("origin").to_pylist() if "origin" in table.column_names else ["unknown"] * table.num_rows
    by_origin: dict[str, int] = {}
    for o in origin:
        by_origin[o] = by_origin.get(o, 0) + 1
    return {"rows": table.num_rows,
            "avg_question_words": round(float(np.mean([len(x.split()) for x in q])), 2) if q else None,
            "avg_answer_words": round(float(np.mean([len(x.split()) for x in a])), 2) if a else None,
            "unique_questions": len({" ".join(x.lower().split()) for x in q}),
            "by_origin": dict(sorted(by_origin.items())),
            "synthetic_share": round(1 - by_origin.get("human", 0) / table.num_rows, 4) if table.num_rows else None}


def paired_bootstrap(x: np.ndarray, y: np.ndarray, *, n: int, ci: float, seed: int) -> dict[str, float]:
    """Mean of ``x - y`` over paired rows with a percentile bootstrap interval (Efron & Tibshirani 1993)."""
    rng = np.random.default_rng(seed)
    d = np.asarray(x, float) - np.asarray(y, float)
    if len(d) == 0:
        return {"mean": None, "low": None, "high": None}
    means = d[rng.integers(0, len(d), size=(n, len(d)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return {"mean": round(float(d.mean()), 4), "low": round(float(lo), 4), "high": round(float(hi), 4)}


def gap_analysis(evals: dict[str, dict], preds: dict[str, pa.Table], *, n: int, ci: float,
                 seed: int) -> dict[str, Any]:
    """How much of the performance lost by contamination (A - B) the curated set wins back (C - B), per metric.

    ``recovered_share = (C - B) / (A - B)``; it is None when contamination cost nothing (A - B <= 0), and
    negative when C is below B. F1 differences carry paired bootstrap intervals over the test rows (``n``
    resamples, confidence level ``ci``, RNG seed ``seed``).
    """
    out: dict[str, Any] = {}
    if all(m in evals for m in ("human", "contaminated", "curated")):
        out["metrics"] = {}
        for key, _ in METRICS:
            a, b, c = (evals[m].get(key) for m in ("human", "contaminated", "curated"))
            if a is None or b is None or c is None:
                continue
            lost, won = a - b, c - b
            out["metrics"][key] = {"lost": round(lost, 4), "recovered": round(won, 4),
                                   "recovered_share": round(won / lost, 4) if lost > 0 else None}
    boot = dict(n=n, ci=ci, seed=seed)
    pairs = {"human_minus_contaminated": ("human", "contaminated"),
             "curated_minus_contaminated": ("curated", "contaminated"), "human_minus_base": ("human", "base"),
             "curated_minus_human": ("curated", "human")}
    diffs = {name: paired_bootstrap(aligned_scores(preds, x, "f1"), aligned_scores(preds, y, "f1"), **boot)
             for name, (x, y) in pairs.items() if x in preds and y in preds}
    if diffs:
        out["f1_diff"] = diffs
    return out


def aligned_scores(preds: dict[str, pa.Table], model: str, column: str) -> np.ndarray:
    """Return ``model``'s ``column`` per test row, rows in sorted row_id order of the base (else its own)."""
    ref = sorted(preds["base" if "base" in preds else model].column("row_id").to_pylist())
    table = preds[model]
    by_id = dict(zip(table.column("row_id").to_pylist(), table.column(column).to_pylist()))
    return np.array([by_id[r] for r in ref], dtype=float)


def verdict(diff: dict[str, float] | None, *, want_positive: bool = True) -> str:
    """Turn a bootstrap interval of a difference into a verdict on the hypothesis that it is positive."""
    if not diff or diff.get("mean") is None:
        return NOT_RUN
    lo, hi, m = diff["low"], diff["high"], diff["mean"]
    if not want_positive:
        lo, hi, m = -hi, -lo, -m
    if lo > 0:
        return "supported"
    if hi < 0:
        return "rejected (the opposite holds)"
    return "not supported at this sample size (interval includes 0; point estimate " + \
        ("in the predicted direction)" if m > 0 else "against it)")


def recovery_p_value(adaptive: int, naive: int) -> float:
    """One-sided exact p-value that adaptive recovers more rows than naive at equal call budget.

    Under the null (equal yield per call; both arms spend the same budget), each of the ``adaptive + naive``
    recovered rows is equally likely to come from either arm, so ``adaptive`` ~ Binomial(adaptive + naive, 1/2);
    the p-value is P(X >= adaptive). 1.0 when nothing was recovered.
    """
    total = adaptive + naive
    if total <= 0:
        return 1.0
    return sum(math.comb(total, k) for k in range(adaptive, total + 1)) / 2 ** total


def recovery_verdict(adaptive: int | None, naive: int | None, alpha: float) -> str | None:
    """Turn the rows recovered by each arm at equal budget into a verdict on "adaptive recovers more" (H5).

    Args:
        adaptive, naive: rows recovered by each arm (``<arm>.overall.recovered`` of the recover metrics), or None.
        alpha: the one-sided test's level.

    Returns:
        The verdict (:func:`recovery_p_value` both ways), or None when either count is missing.
    """
    if adaptive is None or naive is None:
        return None
    a, n = int(adaptive), int(naive)
    if recovery_p_value(a, n) < alpha:
        return "supported"
    if recovery_p_value(n, a) < alpha:
        return "rejected (the opposite holds)"
    return "not supported at this sample size (exact binomial test; point estimate " + \
        ("in the predicted direction)" if a > n else "against it)" if a < n else "even)")


def pick_samples(preds: dict[str, pa.Table], right_f1: float) -> dict[str, str | None]:
    """Pick test rows for three cases: all adapters right; B wrong and C right; all wrong (highest-margin first)."""
    if not all(m in preds for m in ADAPTERS):
        return {}
    f1 = {m: aligned_scores(preds, m, "f1") for m in ADAPTERS}
    ids = sorted((preds["base"] if "base" in preds else preds["human"]).column("row_id").to_pylist())
    right = {m: f1[m] >= right_f1 for m in ADAPTERS}
    cases = {
        "all_right": (right["human"] & right["contaminated"] & right["curated"], f1["human"] + f1["curated"]),
        "b_wrong_c_right": (~right["contaminated"] & right["curated"], f1["curated"] - f1["contaminated"]),
        "all_wrong": (~right["human"] & ~right["contaminated"] & ~right["curated"],
                      -(f1["human"] + f1["contaminated"] + f1["curated"])),
    }
    out: dict[str, str | None] = {}
    for name, (mask, score) in cases.items():
        idx = np.flatnonzero(mask)
        out[name] = ids[int(idx[np.argmax(score[idx])])] if len(idx) else None
    return out
