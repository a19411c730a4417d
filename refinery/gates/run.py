"""Calibrate the quality gates' bounds, build the gates from them, and run them on rows: shared by gate and recover.

Which gates exist, their params sections, reason codes and cascade order come from :mod:`refinery.gates.registry`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, create_model

from refinery.core.params import StageParams
from refinery.gates.base import Gate, GateContext, Verdicts
from refinery.gates.registry import CASCADE, GATES, SPECS

# This module imports every registered gate's class and params model by the registry's dotted paths: their modules
# count as its imports in each stage's code fingerprint (refinery.core.codehash).
__resolves__ = "refinery.gates.registry"

FACTUAL = ("entity_swap", "number_change", "negation_flip", "unsupported_claim", "other_document")


class GateKnobs(StageParams):
    """The gate stage's own knobs (each gate's section is added from the registry: see :data:`GateParams`)."""

    batch_size: int = Field(gt=0)
    threads: int = Field(gt=0)
    mode: Literal["full", "cascade"] = "full"  # full: every verdict on every row; cascade: see run_gates


# Knobs of the gate stage: ``batch_size``, ``threads``, ``mode`` and one sub-section per registry section
# (``gate.rules``, ``gate.dedup``, ``gate.overlap``, ...), each validated by its gate's params model.
_SECTIONS = {s.section: s.params_model() for s in SPECS}
if any(s.params_model() is not _SECTIONS[s.section] for s in SPECS):
    raise ValueError("gate registry: gates that share a params section must share its params model")
GateParams = create_model("GateParams", __base__=GateKnobs, __module__=__name__,
                          **{section: (model, ...) for section, model in _SECTIONS.items()})
GateParams.__doc__ = "Knobs of the gate stage, one sub-section per gate section of the registry."


def run_gates(rows: pa.Table, gates: dict[str, Gate], mode: str = "full") -> pa.Table:
    """Apply the gates to the rows and append their columns, ``gate_keep`` and ``gate_reasons``.

    Args:
        rows: rows of the synthetic (or injected) contract.
        gates: name -> gate, for every name of ``schemas.gated.GATES``.
        mode: ``full``: every gate judges every row (every verdict is measured; reasons in GATES order).
            ``cascade``: gates run in ``CASCADE`` order and each judges only the rows every earlier gate
            kept, so a model scores a row at most once and never one already rejected; a gate's columns
            are null on rows it did not judge, and ``gate_reasons`` holds the one reason that stopped a row.

    Returns:
        ``rows`` with the gate columns (in GATES order); no row is dropped.
    """
    if mode not in ("full", "cascade"):
        raise ValueError(f"gate mode must be 'full' or 'cascade', got {mode!r}")
    n = rows.num_rows
    keep_all = np.ones(n, bool)
    reasons: list[list[str]] = [[] for _ in range(n)]
    columns: dict[str, dict[str, pa.Array]] = {}
    for name in GATES if mode == "full" else CASCADE:
        idx = np.arange(n) if mode == "full" else np.flatnonzero(keep_all)
        sub = rows if len(idx) == n else rows.take(pa.array(idx, pa.int64()))
        verdicts = gates[name].apply(sub) if len(idx) else Verdicts([], [], [])
        keep: list[bool | None] = [None] * n
        score: list[float | None] = [None] * n
        reason: list[str | None] = [None] * n
        for j, i in enumerate(idx):
            keep[i], score[i], reason[i] = verdicts.keep[j], verdicts.score[j], verdicts.reason[j]
            if verdicts.reason[j] is not None:
                reasons[i].append(verdicts.reason[j])
        keep_all[idx] &= np.asarray(verdicts.keep, bool)
        columns[name] = {f"{name}_keep": pa.array(keep, pa.bool_()), f"{name}_score": pa.array(score, pa.float64()),
                         f"{name}_reason": pa.array(reason, pa.string())}
    for name in GATES:
        for col, arr in columns[name].items():
            rows = rows.append_column(col, arr)
    rows = rows.append_column(pa.field("gate_keep", pa.bool_(), nullable=False), pa.array(keep_all, pa.bool_()))
    return rows.append_column(pa.field("gate_reasons", pa.list_(pa.string()), nullable=False),
                              pa.array(reasons, pa.list_(pa.string())))


def judged_rows(gated: pa.Table) -> dict[str, int]:
    """Rows each gate judged (its model's calls, for the model gates): all rows in full mode."""
    return {g: gated.num_rows - gated.column(f"{g}_keep").null_count for g in GATES}


class _ByKind:
    """Wrap a gate so it judges planted rows one injection kind at a time (``refinery.planted.measure.apply_by_kind``)."""

    def __init__(self, gate: Gate):
        self.gate, self.name = gate, gate.name

    def apply(self, rows: pa.Table):
        from refinery.planted.measure import apply_by_kind

        return apply_by_kind(self.gate, rows)


def run_gates_by_kind(injected: pa.Table, gates: dict[str, Gate]) -> pa.Table:
    """Gate planted rows kind by kind, so a variant is never deduplicated against its twin from the same source."""
    return run_gates(injected, {name: _ByKind(g) for name, g in gates.items()})


def reason_counts(gated: pa.Table) -> dict[str, Any]:
    """Count rows kept and rejected, per first reason and per gate (a row may fail several gates)."""
    total = gated.num_rows
    kept = int(pc.sum(gated.column("gate_keep")).as_py() or 0) if total else 0
    first = Counter(r[0] for r in gated.column("gate_reasons").to_pylist() if r)
    every = Counter(x for r in gated.column("gate_reasons").to_pylist() for x in r)
    per_gate = {g: int(pc.sum(pc.invert(gated.column(f"{g}_keep"))).as_py() or 0) if total else 0 for g in GATES}
    return {"total": total, "kept": kept, "rejected": total - kept,
            **{f"dropped_{k}": v for k, v in sorted(first.items())},
            "rejected_by_gate": per_gate, "reasons_all": dict(sorted(every.items()))}


@dataclass
class Models:
    """Everything the model gates need, loaded once per stage."""

    verifier: Any
    reward: Any
    judge: Any  # backend with loglikelihood (perplexity gate, LLM judge)
    embedder: Any


def calibrate(params: Any, ctx: GateContext) -> dict[str, dict[str, Any]]:
    """Resolve every gate's bounds: params as set, null ones calibrated on ``ctx.calib`` (human val rows).

    The gate stage alone calibrates, and writes the result as ``data/04_gated/thresholds.json``; recovery reads it.

    Args:
        params: the gate stage's params (:data:`GateParams`).
        ctx: train, documents, calibration rows and the loaded models.

    Returns:
        ``{gate: {bound: value}}`` for every gate of GATES, each with the names its registry entry declares.
    """
    out = {}
    for s in SPECS:
        bounds = s.gate_class().calibrate(getattr(params, s.section), ctx)
        if set(bounds) != set(s.bounds):
            raise ValueError(f"gate {s.name}: calibrate returned {sorted(bounds)}, the registry declares "
                             f"{sorted(s.bounds)}")
        out[s.name] = {k: bounds[k] for k in s.bounds}
    return out


def build_gates(thresholds: dict[str, dict[str, Any]], ctx: GateContext) -> dict[str, Gate]:
    """Build every gate from its resolved bounds (as :func:`calibrate` returned them) and the context.

    Args:
        thresholds: ``{gate: {bound: value}}`` (thresholds.json, validated by ``schemas.thresholds``).
        ctx: train (the seed of dedup and overlap), documents, the loaded models, the cache folder.

    Returns:
        The gates by name, in GATES order.
    """
    return {s.name: s.gate_class().build(thresholds[s.name], ctx) for s in SPECS}


def compare_modes(injected_gated: pa.Table, gates: dict[str, Gate], documents: pa.Table, models: Models,
                  target_frr: float, *, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Score planted rows in grounded, retrieved and ungrounded modes, for two judges, at equal FRR.

    Both the trained verifier and the LLM judge score the same planted rows in the three evidence modes (the
    provenance claim is that the exact source passage helps judges, the stronger ones most). Each mode's
    threshold keeps the clean controls' false rejections at ``target_frr``; recall on the factual errors
    carries a 95% Wilson interval, and the differences grounded - retrieved and grounded - ungrounded a
    paired bootstrap interval over the planted rows (thresholds re-picked in every resample).

    Returns:
        ``{mode: {...}}`` for the configured judge (as before), ``judge`` (its name), and ``by_judge``:
        ``{verifier|llm: {modes: {mode: {...}}, differences: {name: {mean, low, high}}}}``.
    """
    from refinery.gates.faithfulness import MODES, FaithfulnessGate, LLMJudge, PassageRetriever
    from refinery.planted.measure import recall_at_frr, wilson

    kinds = np.asarray(injected_gated.column("injection_kind").to_pylist())
    measured = np.flatnonzero((kinds == "clean") | np.isin(kinds, FACTUAL))  # only these rows enter the figures
    injected_gated, kinds = injected_gated.take(pa.array(measured, pa.int64())), kinds[measured]
    clean, factual = kinds == "clean", np.isin(kinds, FACTUAL)
    configured = gates["faithfulness"].scorer
    judges = {"verifier": models.verifier, "llm": LLMJudge(models.judge)}
    name_of = next((n for n, j in judges.items() if j is configured), None)
    if name_of is None:  # the configured judge is an LLM judge built by build_gates
        name_of = "llm" if isinstance(configured, LLMJudge) else "verifier"
        judges[name_of] = configured
    rng = np.random.default_rng(seed)
    draws = [(rng.integers(0, clean.sum(), clean.sum()), rng.integers(0, factual.sum(), factual.sum()))
             for _ in range(bootstrap)] if clean.any() and factual.any() else []
    by_judge: dict[str, Any] = {}
    for judge_name, scorer in judges.items():
        modes, support_by_mode = {}, {}
        for mode in MODES:
            retriever = PassageRetriever(documents, models.embedder) if mode == "retrieved" else None
            support, _ = FaithfulnessGate(scorer, documents, mode=mode, retriever=retriever).scores(injected_gated)
            support_by_mode[mode] = support
            threshold, recall, frr = recall_at_frr(support[clean], support[factual], target_frr)
            per_kind = {k: round(float(np.mean(np.nan_to_num(support[kinds == k], nan=-1.0) < threshold)), 4)
                        for k in FACTUAL if (kinds == k).any()}
            hits = int(round(recall * factual.sum()))
            # the clean-control count is the resolution of the false-rejection rate (20 controls: steps of 0.05)
            modes[mode] = {"threshold": round(float(threshold), 4), "recall_factual": round(float(recall), 4),
                           "recall_ci95": wilson(hits, int(factual.sum())), "false_rejection": round(float(frr), 4),
                           "recall_per_kind": per_kind, "clean_controls": int(clean.sum()),
                           "factual_rows": int(factual.sum())}
        diffs = {}
        for other in ("retrieved", "ungrounded"):
            g, o = support_by_mode["grounded"], support_by_mode[other]
            gc, gf, oc, of = g[clean], g[factual], o[clean], o[factual]
            boot = [recall_at_frr(gc[ci], gf[fi], target_frr)[1] - recall_at_frr(oc[ci], of[fi], target_frr)[1]
                    for ci, fi in draws]
            point = modes["grounded"]["recall_factual"] - modes[other]["recall_factual"]
            diffs[f"grounded_minus_{other}"] = {
                "mean": round(float(point), 4),
                "low": round(float(np.quantile(boot, 0.025)), 4) if boot else None,
                "high": round(float(np.quantile(boot, 0.975)), 4) if boot else None}
        by_judge[judge_name] = {"modes": modes, "differences": diffs}
    return {**by_judge[name_of]["modes"], "judge": name_of, "by_judge": by_judge}


def load_models(params: GateParams, models_dir: str, verifier_dir: str, reward_dir: str, cache_dir: Path) -> Models:
    """Load the verifier, reward model, judge backend and embedder once for the stage."""
    from refinery.models.backends.factory import make_backend
    from refinery.models.embed import Embedder
    from refinery.models.resolve import backend_spec, load_target
    from refinery.models.reward import load_reward
    from refinery.models.verifier import load_verifier

    verifier_ref = verifier_dir if params.faithfulness.verifier == "trained" else params.faithfulness.verifier
    reward_ref = reward_dir if params.reward.model == "trained" else params.reward.model
    embed = load_target(models_dir, "embedder")
    judge = make_backend(backend_spec(load_target(models_dir, "judge"), batch_size=params.batch_size,
                                      threads=params.threads))
    embedder = Embedder(embed["path"], batch_size=params.batch_size, cache_dir=cache_dir, model_id=embed["id"])
    return Models(
        verifier=load_verifier(verifier_ref, batch_size=params.batch_size, threads=params.threads, judge=judge,
                               embedder=embedder),
        reward=load_reward(reward_ref, batch_size=params.batch_size, threads=params.threads),
        judge=judge,
        embedder=embedder,
    )
