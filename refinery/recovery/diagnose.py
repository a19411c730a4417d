"""Diagnose why a row was rejected: map its gate verdicts and scores to a failure mode with a confidence.

What each reason code means comes from the gate registry (:mod:`refinery.gates.registry`); how far a failing
score is past its bound uses the bounds the gates judged with (``data/04_gated/thresholds.json``) and the margins
of ``recover.margins``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from refinery.core.text import content_words
from refinery.gates.registry import BY_NAME, GATES, UnknownReasonError, failure
from refinery.generation import strategies as strat
from schemas.thresholds import Thresholds, review_copy

QUESTION_STRATEGIES = ("question_rephrasing", "new_question", "answer_first", "evol_depth", "evol_breadth",
                       "evol_denoise", "rare_intent")
# A row with at least this share of its word 8-grams in the seed is a near copy of a seed row (not worth a call).
NEAR_COPY_NGRAM = 0.5
# Within low_quality, the dimension named when several failed, with the rule's confidence.
LOW_QUALITY = (("length", 0.8), ("fluency", 0.7), ("helpfulness", 0.7))


@dataclass(frozen=True)
class Diagnosis:
    """A rejected row's failure mode, how sure the rule is (0-1), the evidence, and whether to attempt it."""

    mode: str
    confidence: float
    detail: str
    recoverable: bool


@dataclass(frozen=True)
class Bounds:
    """The bounds the gates judged with, and the margins of ``threshold_marginal`` (per gate, ``recover.margins``).

    Build it with :meth:`from_thresholds`. Distances are measured from the bounds at the precision the gate
    metrics report them (4 decimals), as recovery always has; the gates themselves judge with the exact values.
    """

    thresholds: Mapping[str, Mapping[str, Any]]
    margins: Mapping[str, float]

    @classmethod
    def from_thresholds(cls, thresholds: Thresholds, margins: Mapping[str, float]) -> Bounds:
        """Return the bounds of validated thresholds (``schemas.thresholds``) and the recover margins."""
        return cls(review_copy(thresholds), dict(margins))

    def bound(self, gate: str, name: str) -> float:
        """Return one gate's bound by its name (``bound('faithfulness', 'min_support')``)."""
        return self.thresholds[gate][name]


def failing_gates(row: dict[str, Any]) -> list[str]:
    """Return the gates that rejected ``row`` (``<gate>_keep`` False), in GATES order."""
    return [g for g in GATES if row.get(f"{g}_keep") is False]


def marginal(row: dict[str, Any], gate: str, b: Bounds) -> float | None:
    """Return how far a failing gate's score is past its bound, as a share of the margin (<= 1: marginal).

    None where the gate's reason has no margin in the registry, the gate has no margin in ``recover.margins``,
    or the row has no finite score.
    """
    s, reason, m = row.get(f"{gate}_score"), row.get(f"{gate}_reason"), b.margins.get(gate)
    spec = BY_NAME[gate].margins.get(reason) if reason is not None else None
    if s is None or m is None or spec is None or not math.isfinite(s) or m <= 0:
        return None
    bound = b.bound(gate, spec.bound)
    if spec.relative:
        past = s / bound - 1 if spec.side == "max" else 1 - s / bound
    else:
        past = s - bound if spec.side == "max" else bound - s
    return past / m


def diagnose(row: dict[str, Any], b: Bounds, docs: dict[str, dict[str, Any]], min_confidence: float) -> Diagnosis:
    """Map one rejected row's gate verdicts and scores to a failure mode.

    Rules, in priority order: ``unrecoverable`` (missing, empty or stale source document, no evidence span);
    ``malformed`` (transport or parse error, empty, meta-talk, not English); ``truncated``; ``refusal``;
    ``threshold_marginal`` (every failing scored gate within its margin of the bound); ``duplicate`` (a
    generated twin); ``too_close_to_seed`` (dedup against the seed, n-gram or embedding overlap);
    (near copies of a seed row are diagnosed but not attempted);
    ``question_defect`` (a generated question that the evidence does not support, sharing few words with it);
    ``ungrounded`` (faithfulness, or content the source does not hold); ``low_quality`` (reward, perplexity,
    length; detail names the weakest dimension). Anything else is ``unrecoverable``. Each reason code's mode
    is its registry entry's.

    Args:
        row: a gated row (synthetic or injected contract + gate columns).
        b: bounds and margins.
        docs: doc_id -> {text, stale}.
        min_confidence: rows diagnosed with less are not attempted.

    Returns:
        The diagnosis.

    Raises:
        UnknownReasonError: the row holds a reason code that no gate declares.
    """
    reasons = list(row.get("gate_reasons") or [])
    try:
        fails = [failure(r) for r in reasons]
    except UnknownReasonError as e:
        raise UnknownReasonError(f"row {row.get('row_id')}: {e}") from None
    doc = docs.get(row["doc_id"])
    text = (doc or {}).get("text") or ""
    s, e = row.get("evidence_start"), row.get("evidence_end")

    def out(mode: str, conf: float, detail: str, worth: bool = True) -> Diagnosis:
        conf = round(float(min(max(conf, 0.0), 1.0)), 4)
        return Diagnosis(mode, conf, detail, worth and mode != "unrecoverable" and conf >= min_confidence)

    def of(mode: str) -> list[str]:
        return [r for r, f in zip(reasons, fails) if f.mode == mode]

    if doc is None or not text.strip():
        return out("unrecoverable", 1.0, "source_document_missing_or_empty")
    if doc.get("stale"):
        return out("unrecoverable", 1.0, "source_document_stale")
    if s is None or e is None or not 0 <= s < e <= len(text) or not text[s:e].strip():
        return out("unrecoverable", 1.0, "no_evidence_span")
    failing = failing_gates(row)
    if of("malformed") or row.get("error") or row.get("parse_error"):
        return out("malformed", 0.95, next(iter(of("malformed")), row.get("parse_error") or "error"))
    if of("truncated"):
        return out("truncated", 0.9 if row.get("finish_reason") == "length" else 0.75, of("truncated")[0])
    if of("refusal"):
        return out("refusal", 0.95, of("refusal")[0])
    margins = {g: marginal(row, g, b) for g in failing}
    if failing and all(v is not None and v <= 1.0 for v in margins.values()):
        worst = max(margins.values())
        detail = ",".join(f"{g}:{margins[g]:.2f}" for g in failing)
        return out("threshold_marginal", 0.9 - 0.4 * max(worst, 0.0), detail)
    if of("duplicate"):
        return out("duplicate", 0.9, of("duplicate")[0])
    close = of("too_close_to_seed")
    if close:
        # a near copy of a seed row (MinHash near duplicate, or most of its 8-grams in the seed) holds nothing of
        # its own to keep: not worth a call; a paraphrase that is merely close in meaning is diversified
        copy = any(f.copy for f in fails) or (row.get("overlap_ngram_score") or 0.0) >= NEAR_COPY_NGRAM
        # a strategy that only writes answers keeps its seed row's question, so the row is close to the seed by
        # its question whatever the answer says: a new question (not a reworded answer) is what can differ
        own = strat.STRATEGIES.get(row.get("strategy") or "")
        seed_q = "seed_question:" if own is not None and own.output == "answer" else ""
        detail = ("near_copy_of_seed:" if copy else "") + seed_q + ",".join(close)
        return out("too_close_to_seed", 0.6 + 0.1 * min(len(close), 3), detail, worth=not copy)
    if "faithfulness" in failing:  # the scored grounding gate: a defective question, or how far below the bound
        faith = row.get("faithfulness_score")
        q_words, ev_words = content_words(row.get("question")), content_words(text[s:e])
        q_support = len(q_words & ev_words) / len(q_words) if q_words else 0.0
        if row.get("strategy") in QUESTION_STRATEGIES and q_support < 0.25:
            return out("question_defect", 0.6 + 0.3 * (1 - q_support / 0.25), f"question_support:{q_support:.2f}")
        min_support = b.bound("faithfulness", "min_support")
        gap = (min_support - faith) / max(min_support, 1e-9) if faith is not None else 1.0
        return out("ungrounded", 0.6 + 0.4 * min(max(gap, 0.0), 1.0),
                   f"faithfulness_score:{faith:.3f}" if faith is not None else "faithfulness_unscored")
    if of("ungrounded"):  # a rule found content the source does not hold (personal data)
        return out("ungrounded", 0.9, of("ungrounded")[0])
    dimensions = {f.dimension for f in fails if f.mode == "low_quality"}
    for dimension, conf in LOW_QUALITY:
        if dimension in dimensions:
            detail = f"weakest:{dimension}"
            if dimension == "helpfulness":
                detail += f"(reward:{row.get('reward_score') or float('nan'):.3f})"
            return out("low_quality", conf, detail)
    return out("unrecoverable", 0.5, "unknown:" + ",".join(reasons))


_QUESTION_LINE = re.compile(r"^\s*(?:Q(?:uestion)?\s*[:.]\s*)?(?P<q>[^\n?]{6,}\?)")


def salvage_question(row: dict[str, Any], seed_row: dict[str, Any] | None) -> str | None:
    """Return the usable question of a malformed row, or None.

    The row's own question when it has one; for a strategy that only writes answers (answer augmentation), the
    seed question it answered; otherwise a question on the first line of the raw output (a ``new_question``
    call that wrote its question and then no "Answer:" line). ``fix_format`` then regenerates only the answer.
    """
    question = (row.get("question") or "").strip()
    if question:
        return question
    s = strat.STRATEGIES.get(row.get("strategy") or "")
    if s is not None and s.output == "answer":
        return (seed_row or {}).get("question") or None
    m = _QUESTION_LINE.match(row.get("raw_output") or "")
    if m and len(m.group("q").split()) >= 3:
        return " ".join(m.group("q").split())
    return None
