"""Fit the grounding combiner: a logistic regression, one per corruption kind, or boosted trees exported to numpy.

The combiner is fitted on held-out training pairs (never on the val rows that calibrate the threshold or the
rows the injection harness plants errors in). One regression per corruption kind, the score being their minimum,
keeps each kind's cue at full weight where one linear score must trade them against each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from refinery.models.grounding.features import FEATURES


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = 1.0, iterations: int = 50,
                 names: Sequence[str] | None = None) -> dict[str, Any]:
    """Fit an L2-regularised logistic regression by Newton's method on standardised features.

    Args:
        x: (n, k) features, finite.
        y: n labels in {0, 1}.
        l2: ridge penalty on the (standardised) weights, not on the intercept.
        iterations: Newton steps (it converges in far fewer on k ≈ 8).
        names: the feature names of x's columns (default FEATURES).

    Returns:
        {"features", "mean", "std", "weights", "bias"} — what ``Combiner`` reads.
    """
    if len(np.unique(y)) < 2:
        raise ValueError("logistic combiner: needs both labels")
    if names is not None and len(names) != x.shape[1]:
        raise ValueError(f"logistic combiner: {len(names)} names for {x.shape[1]} features")
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std < 1e-9] = 1.0
    z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-np.clip(z @ w, -30, 30)))
        grad = z.T @ (p - y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return {"features": list(names or FEATURES), "mean": mean.round(8).tolist(), "std": std.round(8).tolist(),
            "weights": w[:-1].round(8).tolist(), "bias": round(float(w[-1]), 8)}


def linear_logit(m: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """Return the logit of a fitted regression spec ``m`` (mean, std, weights, bias) per row of x."""
    return ((x - np.asarray(m["mean"])) / np.asarray(m["std"])) @ np.asarray(m["weights"]) + float(m["bias"])


def clean_rank(z: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Return the share of clean answers (sorted logits ``ref``) below each logit, strictly increasing in z.

    Between clean logits it interpolates; beyond them it decays exponentially into the outer half-step
    (0 < p < 0.5/n below the lowest, 1 - 0.5/n < p < 1 above the highest), so rows below every clean answer keep
    their order instead of tying at 0, and a threshold can still be set at any false-rejection rate.
    """
    n = len(ref)
    if n == 0:
        return 1 / (1 + np.exp(-np.clip(z, -30, 30)))
    mid = np.interp(z, ref, (np.arange(n) + 0.5) / n)
    low = 0.5 / n * np.exp(np.clip(z - ref[0], -700, 0))
    high = 1 - 0.5 / n * np.exp(np.clip(ref[-1] - z, -700, 0))
    return np.where(np.isnan(z), np.nan, np.where(z < ref[0], low, np.where(z > ref[-1], high, mid)))


def fit_combiner_spec(x: np.ndarray, y: np.ndarray, names: Sequence[str], kinds: Sequence[str] | None = None,
                      *, l2: float = 1.0, min_rows: int = 5, boosted: bool = False, seed: int = 0) -> dict[str, Any]:
    """Fit the combiner: one regression, with ``kinds`` one overall and one per corruption kind, or boosted trees.

    Per kind, the regressions are fitted on clean answers (pairs of kind ``clean``) against that kind's negatives
    (or against all negatives, for the overall one): passage sentences and counterfactual sentences are positives
    of another shape than the answers a gate scores. Each regression's score is then its logit's rank among the
    clean answers' logits (the share of clean answers it scores above), so every detector rejects the same share
    of clean answers at a given threshold and the minimum over them favours none.

    Args:
        x: (n, len(names)) finite features.
        y: labels in {0, 1}.
        names: the feature names.
        kinds: per row, its pair kind (``clean``, ``passage_sentence``, ``counterfactual`` or a corruption kind);
            None: a single regression over all rows.
        l2: ridge penalty.
        min_rows: fewer clean answers than this: all positives stand in for them; fewer negatives of a kind:
            that kind gets no regression of its own.
        boosted: instead of regressions, fit gradient-boosted trees (depth 2, 300 rounds, learning rate 0.05;
            ``fit_boosted``) on the clean answers (by ``kinds``) against every negative. Trees can read a cue
            one way beside one value of another feature and another way beside another, and cut a feature at
            a threshold, which a weighted sum cannot.
        seed: the trees' random state.

    Returns:
        A Combiner spec; with kinds, ``per_kind`` maps each kind to its regression, and every regression holds
        ``clean_logits``, the sorted logits of the clean answers it is ranked against; boosted: ``boosted``.
    """
    neg = y < 0.5
    answers = ~neg
    if kinds is not None:
        kinds = np.asarray(kinds, dtype=object)
        if (~neg & (kinds == "clean")).sum() >= min_rows:
            answers = ~neg & (kinds == "clean")
    if boosted:
        return fit_boosted(x[answers | neg], y[answers | neg], names, seed=seed)
    spec = fit_logistic(x, y, l2=l2, names=names)
    if kinds is None:
        return spec

    def fit(sel: np.ndarray) -> dict[str, Any]:
        m = {k: v for k, v in fit_logistic(x[sel], y[sel], l2=l2, names=names).items() if k != "features"}
        m["clean_logits"] = np.sort(linear_logit(m, x[answers])).round(6).tolist()
        return m

    spec = {"features": list(names), **fit(answers | neg)}
    spec["per_kind"] = {k: fit(answers | (neg & (kinds == k))) for k in sorted({str(v) for v in kinds[neg]})
                        if (neg & (kinds == k)).sum() >= min_rows}
    return spec


def fit_boosted(x: np.ndarray, y: np.ndarray, names: Sequence[str], *, max_depth: int = 2, rounds: int = 300,
                learning_rate: float = 0.05, l2: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """Fit gradient-boosted trees (scikit-learn's histogram booster) and export them as node arrays.

    The defaults were chosen by 5-fold cross-validation on the CosmosQA combiner holdout (docs/measurements.md,
    "Boosted combiner defaults").

    Args:
        x: (n, len(names)) finite features.
        y: labels in {0, 1}, both present.
        names: the feature names.
        max_depth, rounds, learning_rate, l2: the booster's knobs.
        seed: its random state (no early stopping, so the fit is deterministic).

    Returns:
        {"features", "boosted": {"baseline", "trees", "settings", "importance"}}: ``baseline`` is the raw log-odds
        before the first tree; each tree holds per node its feature, threshold (left when x <= threshold), side for
        a missing value, children, leaf flag and value (the learning rate already applied).
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    if len(np.unique(y)) < 2:
        raise ValueError("boosted combiner: needs both labels")
    if len(names) != x.shape[1]:
        raise ValueError(f"boosted combiner: {len(names)} names for {x.shape[1]} features")
    model = HistGradientBoostingClassifier(max_depth=max_depth, max_iter=rounds, learning_rate=learning_rate,
                                           l2_regularization=l2, early_stopping=False, random_state=seed).fit(x, y)
    trees, gain = [], np.zeros(x.shape[1])
    # scikit-learn keeps the fitted trees in private attributes; tests check the export against its predictions
    for (predictor,) in model._predictors:
        nodes = predictor.nodes
        trees.append({"feature": nodes["feature_idx"].tolist(), "threshold": nodes["num_threshold"].tolist(),
                      "missing_left": nodes["missing_go_to_left"].astype(bool).tolist(),
                      "left": nodes["left"].tolist(), "right": nodes["right"].tolist(),
                      "leaf": nodes["is_leaf"].astype(bool).tolist(), "value": nodes["value"].tolist()})
        inner = ~nodes["is_leaf"].astype(bool)
        np.add.at(gain, nodes["feature_idx"][inner], nodes["gain"][inner])
    importance = gain / gain.sum() if gain.sum() > 0 else gain
    return {"features": list(names), "boosted": {
        "baseline": float(np.ravel(model._baseline_prediction)[0]), "trees": trees,
        "settings": {"max_depth": max_depth, "rounds": rounds, "learning_rate": learning_rate, "l2": l2,
                     "seed": seed},
        "importance": dict(zip(names, np.round(importance, 4).tolist()))}}


class BoostedTrees:
    """Boosted trees from a spec's ``boosted`` entry, evaluated with numpy."""

    def __init__(self, boosted: dict[str, Any], n_features: int):
        self.baseline = float(boosted["baseline"])
        self.trees = []
        for t in boosted["trees"]:
            arrays = tuple(np.asarray(t[k]) for k in ("feature", "threshold", "missing_left", "left", "right",
                                                       "leaf", "value"))
            feature, _, _, left, right, leaf, _ = arrays
            inner = ~leaf.astype(bool)
            if len({len(a) for a in arrays}) != 1 or (feature[inner] >= n_features).any() or \
                    (left[inner] >= len(leaf)).any() or (right[inner] >= len(leaf)).any():
                raise ValueError(f"combiner: a boosted tree does not fit its {n_features} features")
            self.trees.append(arrays[:5] + (leaf.astype(bool), arrays[6].astype(float)))

    def raw(self, x: np.ndarray) -> np.ndarray:
        """Return the raw log-odds per row."""
        out = np.full(len(x), self.baseline)
        rows = np.arange(len(x))
        for feature, threshold, missing_left, left, right, leaf, value in self.trees:
            node = np.zeros(len(x), dtype=int)
            for _ in range(len(leaf)):  # a path is at most as long as the tree has nodes
                if leaf[node].all():
                    break
                v = x[rows, feature[node]]
                go_left = np.where(np.isnan(v), missing_left[node].astype(bool), v <= threshold[node])
                node = np.where(leaf[node], node, np.where(go_left, left[node], right[node]))
            else:
                if not leaf[node].all():
                    raise ValueError("combiner: a boosted tree has a cycle (no leaf is reached)")
            out += value[node]
        return out
