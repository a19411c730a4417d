"""Measure quality gates on rows with planted errors: recall, false rejections, precision, overlap."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from refinery.planted.corruptions import FACTUAL_KINDS
from refinery.core.errors import RefineryError
from refinery.gates.base import Gate, Verdicts
from schemas.injected import CLEAN, KINDS

CASCADE = "cascade"  # a row is rejected by the cascade when any gate rejects it


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


def _share(num: int, den: int) -> float | None:
    return _r(num / den) if den else None


def rejected_matrix(table: pa.Table, gates: Sequence[str]) -> np.ndarray:
    """Return a (rows, gates) bool array, True where the gate rejected the row (``<gate>_keep`` is False).

    Raises:
        RefineryError: no gates, a missing ``<gate>_keep`` column, or a null verdict.
    """
    if not gates:
        raise RefineryError("injection: no gates to evaluate")
    if len(set(gates)) != len(gates):
        raise RefineryError("injection: gate names repeat")
    missing = [f"{g}_keep" for g in gates if f"{g}_keep" not in table.column_names]
    if missing:
        raise RefineryError(f"injection: the verdict table has no column(s) {', '.join(missing)}")
    cols = []
    for g in gates:
        col = table.column(f"{g}_keep")
        if col.null_count:
            raise RefineryError(f"injection: {g}_keep has {col.null_count} null verdict(s); every gate must judge "
                                f"every row")
        cols.append(~np.asarray(col.to_numpy(), dtype=bool))
    return np.stack(cols, axis=1)


def _kinds(labels: np.ndarray) -> list[str]:
    present = set(labels.tolist()) - {CLEAN}
    return [k for k in KINDS if k in present] + sorted(present - set(KINDS))


def wilson(hits: int, n: int, z: float = 1.959964) -> dict[str, float] | None:
    """Return the 95% Wilson score interval ``{low, high}`` of a share ``hits / n`` (None when n is 0)."""
    if n == 0:
        return None
    p = hits / n
    centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return {"low": round(float((centre - half) / (1 + z * z / n)), 4),
            "high": round(float((centre + half) / (1 + z * z / n)), 4)}


def _gate_scores(rejected: np.ndarray, labels: np.ndarray, kinds: list[str],
                 unseen: Sequence[str] = ()) -> dict[str, Any]:
    clean = labels == CLEAN
    factual = np.isin(labels, FACTUAL_KINDS)
    injected = ~clean
    n_rej, n_rej_inj, n_rej_clean = int(rejected.sum()), int((rejected & injected).sum()), int((rejected & clean).sum())

    def family(members: list[str]) -> dict[str, Any]:
        rows = np.isin(labels, members)
        hits, n = int((rejected & rows).sum()), int(rows.sum())
        return {"kinds": members, "planted": n, "rejected": hits, "recall": _share(hits, n), "ci95": wilson(hits, n)}

    factual_present = [k for k in FACTUAL_KINDS if k in kinds]
    return {
        "recall": {k: _share(int((rejected & (labels == k)).sum()), int((labels == k).sum())) for k in kinds},
        "recall_ci95": {k: wilson(int((rejected & (labels == k)).sum()), int((labels == k).sum())) for k in kinds},
        # leave-families-out: factual kinds the learned gates trained on, and those they never saw
        "families": {"seen": family([k for k in factual_present if k not in unseen]),
                     "unseen": family([k for k in factual_present if k in unseen])},
        "recall_factual": _share(int((rejected & factual).sum()), int(factual.sum())),
        "recall_injected": _share(n_rej_inj, int(injected.sum())),
        "false_rejection_rate": _share(n_rej_clean, int(clean.sum())),
        "precision": _share(n_rej_inj, n_rej),
        "rejected": n_rej,
        "rejected_injected": n_rej_inj,
        "rejected_clean": n_rej_clean,
    }


def evaluate_injection(table: pa.Table, gates: list[str], unseen: Sequence[str] = ()) -> dict[str, Any]:
    """Score each gate and the cascade of all gates on injected rows and clean controls.

    Args:
        table: rows with ``injection_kind`` (a kind or 'clean') and a bool ``<gate>_keep`` per gate.
        gates: gate names, e.g. ``['rules', 'dedup', 'faithfulness']``; the cascade rejects a row when any does.
        unseen: corruption kinds the learned gates never trained on (``inject.unseen_families``): each gate's
            ``families`` block gives recall over the seen and the unseen factual kinds, with 95% intervals.

    Returns:
        JSON-ready dict (plain ints; floats rounded to 4 decimals; null where a share has no denominator)::

            {"rows": n, "counts": {kind: n, ..., "clean": n}, "factual_kinds": [...],
             "gates": {gate: {"recall": {kind: r}, "recall_ci95": {kind: {low, high}},
                              "families": {"seen" | "unseen": {"kinds", "planted", "rejected", "recall", "ci95"}},
                              "recall_factual": r, "recall_injected": r,
                              "false_rejection_rate": r, "precision": p,
                              "rejected": n, "rejected_injected": n, "rejected_clean": n}},
             "cascade": {... same keys ...},
             "caught_by": {kind or 'clean': {gate: {"rejected": n, "only": n}}},
             "missed": {kind or 'clean': rows no gate rejected}}

        Precision counts rejected clean controls as false positives. ``only`` counts rows of that kind that
        this gate rejected and no other gate did.

    Raises:
        RefineryError: a missing ``injection_kind`` or ``<gate>_keep`` column, or a null value in them.
    """
    if "injection_kind" not in table.column_names:
        raise RefineryError("injection: the verdict table has no column injection_kind")
    if table.column("injection_kind").null_count:
        raise RefineryError("injection: injection_kind has null values")
    rejected = rejected_matrix(table, gates)
    labels = np.asarray(table.column("injection_kind").to_pylist(), dtype=object)
    kinds = _kinds(labels)
    any_rejected = rejected.any(axis=1)
    n_rejecting = rejected.sum(axis=1)
    caught_by, missed = {}, {}
    for k in kinds + [CLEAN]:
        rows = labels == k
        if not rows.any():
            continue
        caught_by[k] = {g: {"rejected": int((rejected[:, j] & rows).sum()),
                            "only": int((rejected[:, j] & rows & (n_rejecting == 1)).sum())}
                        for j, g in enumerate(gates)}
        missed[k] = int((rows & ~any_rejected).sum())
    counts = {k: int((labels == k).sum()) for k in kinds + [CLEAN]}
    return {
        "rows": int(table.num_rows),
        "counts": counts,
        "factual_kinds": [k for k in FACTUAL_KINDS if k in kinds],
        "unseen_kinds": [k for k in FACTUAL_KINDS if k in unseen],
        "gates": {g: _gate_scores(rejected[:, j], labels, kinds, unseen) for j, g in enumerate(gates)},
        CASCADE: _gate_scores(any_rejected, labels, kinds, unseen),
        "caught_by": caught_by,
        "missed": missed,
    }


def gate_overlap(table: pa.Table, gates: list[str]) -> dict[str, Any]:
    """Compare the sets of rows each gate rejects (works on any table with ``<gate>_keep`` columns).

    Args:
        table: rows with a bool ``<gate>_keep`` per gate (injected or synthetic rows alike).
        gates: gate names, in the order of the matrix.

    Returns:
        JSON-ready dict::

            {"gates": [...], "rows": n, "rejected": {gate: n},
             "jaccard": {gate: {gate: |A & B| / |A | B|, or null when both reject nothing}},
             "intersection": {gate: {gate: |A & B|}},
             "only": {gate: rows rejected by this gate and no other},
             "rejected_by_none": n, "rejected_by_any": n}

    Raises:
        RefineryError: a missing ``<gate>_keep`` column or a null verdict.
    """
    rejected = rejected_matrix(table, gates)
    n_rejecting = rejected.sum(axis=1)
    jaccard: dict[str, dict[str, float | None]] = {}
    intersection: dict[str, dict[str, int]] = {}
    for i, a in enumerate(gates):
        jaccard[a], intersection[a] = {}, {}
        for j, b in enumerate(gates):
            both = int((rejected[:, i] & rejected[:, j]).sum())
            either = int((rejected[:, i] | rejected[:, j]).sum())
            intersection[a][b] = both
            jaccard[a][b] = _share(both, either)
    return {
        "gates": list(gates),
        "rows": int(table.num_rows),
        "rejected": {g: int(rejected[:, j].sum()) for j, g in enumerate(gates)},
        "jaccard": jaccard,
        "intersection": intersection,
        "only": {g: int((rejected[:, j] & (n_rejecting == 1)).sum()) for j, g in enumerate(gates)},
        "rejected_by_none": int((n_rejecting == 0).sum()),
        "rejected_by_any": int((n_rejecting > 0).sum()),
    }


def apply_by_kind(gate: Gate, table: pa.Table) -> Verdicts:
    """Apply a gate to each injection kind on its own, so rows made from the same source row never meet.

    An injected table holds siblings: the clean control and the entity_swap, number_change... rows of one
    val row differ by a word, so a gate that compares rows within the set (dedup's ``dedup_near``) would
    reject them as duplicates of each other, an artefact of the harness. Each kind holds at most one row
    per source row, so judging kind by kind removes it; comparisons with the seed are unchanged.

    Args:
        gate: any gate (``apply(rows) -> Verdicts``).
        table: injected rows with ``injection_kind``.

    Returns:
        One verdict per row of ``table``, in its row order.
    """
    if "injection_kind" not in table.column_names:
        raise RefineryError("injection: the table has no column injection_kind")
    labels = np.asarray(table.column("injection_kind").to_pylist(), dtype=object)
    keep: list[bool] = [True] * table.num_rows
    score: list[float | None] = [None] * table.num_rows
    reason: list[str | None] = [None] * table.num_rows
    for kind in dict.fromkeys(labels.tolist()):
        idx = np.flatnonzero(labels == kind)
        part = gate.apply(table.take(pa.array(idx, pa.int64())))
        for i, k, s, r in zip(idx.tolist(), part.keep, part.score, part.reason):
            keep[i], score[i], reason[i] = k, s, r
    return Verdicts(keep, score, reason)


def recall_at_frr(clean_scores: Sequence[float] | np.ndarray, injected_scores: Sequence[float] | np.ndarray,
                  target_frr: float) -> tuple[float, float, float]:
    """Pick the reject threshold that keeps false rejections of clean rows at or under a target, and report recall.

    A row is rejected when its score is below the threshold (low = reject, e.g. a support probability) or is
    NaN (fail closed). The threshold is the highest one at which at most ``floor(target_frr * n_clean)`` clean
    rows are rejected; clean rows tied at the threshold stay kept, so a tie block is never cut. When the NaN
    clean rows alone exceed the target, the threshold rejects no finite clean score and ``achieved_frr`` shows
    the excess. When every clean row may be rejected, the threshold lies just above every finite score.

    Args:
        clean_scores: scores of clean control rows.
        injected_scores: scores of injected rows (e.g. the factual kinds).
        target_frr: the false-rejection rate allowed on clean rows, in [0, 1].

    Returns:
        (threshold, recall on injected rows, achieved false-rejection rate on clean rows); ``inf`` threshold
        only when no score is finite.

    Raises:
        ValueError: no clean or no injected scores, or a target outside [0, 1].
    """
    if not 0 <= target_frr <= 1:
        raise ValueError(f"target_frr must be in [0, 1], got {target_frr}")
    clean = np.asarray(clean_scores, dtype=float)
    bad = np.asarray(injected_scores, dtype=float)
    if clean.size == 0 or bad.size == 0:
        raise ValueError("recall_at_frr needs at least one clean and one injected score")
    finite = np.sort(clean[~np.isnan(clean)])
    n_nan = int(clean.size - finite.size)
    allowed = math.floor(target_frr * clean.size + 1e-9) - n_nan  # finite clean rows that may be rejected
    allowed = max(allowed, 0)
    if allowed < finite.size:
        threshold = float(finite[allowed])  # rejects exactly the finite clean scores strictly below it
    else:
        every = np.concatenate([finite, bad[~np.isnan(bad)]])
        threshold = float(np.nextafter(every.max(), np.inf)) if every.size else math.inf
    rejected_clean = n_nan + int((finite < threshold).sum())
    rejected_bad = int((np.isnan(bad) | (bad < threshold)).sum())
    return threshold, rejected_bad / bad.size, rejected_clean / clean.size


def plot_overlap(overlap: dict[str, Any], path: str | Path) -> Path:
    """Draw the gates' pairwise Jaccard matrix as a heatmap PNG, each cell labelled with its value.

    Args:
        overlap: the dict :func:`gate_overlap` returns.
        path: the PNG file to write (the caller chooses it; its folder must exist).

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gates = list(overlap["gates"])
    n = len(gates)
    values = np.array([[np.nan if overlap["jaccard"][a][b] is None else overlap["jaccard"][a][b] for b in gates]
                       for a in gates], dtype=float).reshape(n, n)
    size = 1.2 + 0.9 * max(n, 1)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    try:
        image = ax.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(n), labels=gates, rotation=45, ha="right")
        ax.set_yticks(range(n), labels=gates)
        for i in range(n):
            for j in range(n):
                v = values[i, j]
                ax.text(j, i, "–" if np.isnan(v) else f"{v:.2f}", ha="center", va="center",
                        color="black" if not np.isnan(v) and v > 0.6 else "white" if not np.isnan(v) else "gray")
        fig.colorbar(image, ax=ax, label="Jaccard of rejected rows")
        ax.set_title(f"Gate overlap ({overlap['rows']} rows, {overlap['rejected_by_any']} rejected)")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return Path(path)
