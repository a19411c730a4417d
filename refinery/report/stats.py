"""The experiment's statistics: arms trained over several seeds, compared on the same human test items.

Every comparison is paired over test items and resampled over both items and training seeds (a two-level
bootstrap), so its interval holds the test-set noise and the training noise together. The between-seed sd of one
arm (pooled over arms) is the noise floor; the minimum detectable difference is what a comparison of this size
could tell apart at the report's confidence and 80% power. A question is answered only when its interval excludes
0; otherwise it is "not measurable at this size", with the numbers.
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
            out["questions"][qid] = {"question": text, "a": a, "b": b, "verdict": "not run"}
            continue
        res = compare(arms[a], arms[b], n=n, ci=ci, seed=seed, seed_sd=floor["sd"])
        out["questions"][qid] = {"question": text, "a": a, "b": b, **res}
    return out


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
