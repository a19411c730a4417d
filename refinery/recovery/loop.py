"""Diagnose why a row was rejected, plan a targeted regeneration (or a naive resample), and re-gate the result.

Adaptive recovery (seed 000): map each rejected row's gate verdicts and scores to a failure mode with a
confidence (:func:`diagnose`), answer the mode with its action (a versioned ``prompts/recover_*.txt`` template
at its own temperature), re-gate each candidate with every gate (plus dedup against accepted and already
recovered rows), and on failure diagnose the candidate again to choose the next action. The naive baseline
resamples the row's original strategy template at its original temperature, on the same rows and budget.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from refinery.generation import strategies as strat
from refinery.models.backends.base import GenRequest
from refinery.gates.base import Verdicts
from refinery.generation.calls import Planned, call_seed
from refinery.generation.prompts import Template
from refinery.generation.teacher import Job, cache_key
from refinery.core.text import match_key
from schemas.gated import GATES

QUESTION_STRATEGIES = ("question_rephrasing", "new_question", "evol_depth", "evol_breadth")
RULES_MALFORMED = ("rules_transport_error", "rules_parse_error", "rules_empty", "rules_language", "rules_meta_talk")
RULES_LENGTH = ("rules_too_short", "rules_too_long", "rules_answer_repeats_question")
SEED_CLOSE = ("dedup_exact_seed", "dedup_near_seed", "overlap_ngram", "overlap_embedding")
WITHIN_DUP = ("dedup_exact", "dedup_near", "dedup_exact_accepted", "dedup_near_accepted")

# action -> (template name, output kind: 'answer' keeps the question | 'qa' writes both)
ACTIONS: dict[str, tuple[str, str]] = {
    "strict_grounding": ("recover_grounded", "answer"),
    "resample": (None, "original"),  # the row's own strategy prompt at its own temperature: a fresh draw
    "reanswer_low_temp": (None, "original"),  # the row's own strategy prompt (with its shots) at a lower temperature
    "rewrite_helpfulness": ("recover_rewrite_helpfulness", "answer"),
    "rewrite_length": ("recover_rewrite_length", "answer"),
    "rewrite_fluency": ("recover_rewrite_fluency", "answer"),
    "diversify": ("recover_diversify_answer", "answer"),  # rows without a usable question: recover_diversify (qa)
    "regenerate_question": ("recover_question", "qa"),
    "fix_format": ("recover_format", "qa"),  # a row with a usable question: only the answer (recover_grounded)
    "fix_length": ("recover_short", "answer"),
}
OWN_TEMPERATURE = frozenset({"resample"})  # actions that sample at the row's recorded temperature
TEMPLATES = tuple(sorted({t for t, _ in ACTIONS.values() if t is not None} | {"recover_diversify"}))
# Per mode, the actions in the order they are tried; 'rewrite_weakest' is resolved from the diagnosis detail.
CHAINS: dict[str, tuple[str, ...]] = {
    "malformed": ("fix_format", "regenerate_question"),
    # A truncated row rambled past its token budget. Asking for one short sentence ('fix_length') passed 0 of 9
    # first attempts (demo 0/7, CosmosQA 0/2, SmolLM2 teacher); a new question and answer from the passage, tried
    # later, passed 6 of 8. So the new question comes first; 'fix_length' stays available through recover.chains.
    "truncated": ("regenerate_question", "strict_grounding"),
    "refusal": ("strict_grounding", "regenerate_question"),
    # A marginal row failed by noise near a bound: a fresh draw of its own prompt (the naive baseline's call,
    # same seed) recovered more than re-answering at temperature 0.2 did first (demo 7 vs 5 of 14 rows, CosmosQA
    # 8 of 19 vs 3 of 16), so that comes first. Second, a new question passed 6 of 10 times, the cooler re-answer
    # 2 of 6 (both datasets, full budget, second and third attempts); 'reanswer_low_temp' stays available through
    # recover.chains.
    "threshold_marginal": ("resample", "regenerate_question"),
    "duplicate": ("diversify", "regenerate_question"),
    "too_close_to_seed": ("diversify", "regenerate_question"),
    "question_defect": ("regenerate_question", "diversify"),
    "ungrounded": ("strict_grounding", "regenerate_question"),
    # Rewriting the weakest dimension first passed 3 of 28 times (demo 1/18, CosmosQA 2/10): SmolLM2 mostly copies
    # the answer or shortens it. The strict-grounding answer, tried later, passed 8 of 21, and the naive resample
    # 9 of 28 first calls. So grounding comes first, then a new question; 'rewrite_weakest' stays available through
    # recover.chains for a teacher that rewrites well.
    "low_quality": ("strict_grounding", "regenerate_question"),
}
_PARSE_AS = {"answer": "answer_augmentation", "qa": "evol_depth"}  # strategies whose parser reads each output kind
_ANSWER_STOP = ("\n\n", "\nQuestion:", "\nAnswer:", "\nPassage:", "\nEvidence:")
_QA_STOP = ("\n\n", "\nPassage:", "\nQuestion:", "###")
# A question-and-answer call must reach its answer line: SmolLM2 often ends its turn, or starts another example,
# right after the question (CosmosQA: 21 of 103 new-question candidates had no answer, parse_missing_answer).
_QA_REQUIRE = "Answer:"


@dataclass(frozen=True)
class Diagnosis:
    """A rejected row's failure mode, how sure the rule is (0-1), the evidence, and whether to attempt it."""

    mode: str
    confidence: float
    detail: str
    recoverable: bool


@dataclass(frozen=True)
class Bounds:
    """The gate thresholds in force (as the gate stage resolved them) and the margins of ``threshold_marginal``.

    Margins are absolute, except ``perplexity`` (relative to the bound).
    """

    min_support: float
    min_reward: float
    max_perplexity: float
    min_perplexity: float
    max_cosine: float
    max_ngram_overlap: float
    max_jaccard: float
    margins: dict[str, float]
    near_copy_ngram: float = 0.5  # seed 8-gram share at or above which a row is a near copy (not worth recovering)


def _failing(row: dict[str, Any]) -> list[str]:
    return [g for g in GATES if row.get(f"{g}_keep") is False]


def _marginal(row: dict[str, Any], gate: str, b: Bounds) -> float | None:
    """Return how far a failing gate's score is past its bound, as a share of the margin (<= 1: marginal)."""
    s, reason = row.get(f"{gate}_score"), row.get(f"{gate}_reason")
    m = b.margins.get(gate)
    if s is None or m is None or not math.isfinite(s) or m <= 0:
        return None
    if reason == "faithfulness_unsupported":
        return (b.min_support - s) / m
    if reason == "reward_low":
        return (b.min_reward - s) / m
    if reason == "overlap_embedding":
        return (s - b.max_cosine) / m
    if reason == "overlap_ngram":
        return (s - b.max_ngram_overlap) / m
    if reason == "dedup_near_seed" or reason == "dedup_near":
        return (s - b.max_jaccard) / m
    if reason == "perplexity_too_high":
        return (s / b.max_perplexity - 1) / m
    return None


def content_words(text: str | None) -> set[str]:
    """Return the normalised words of ``text`` longer than three characters (a cheap lexical-support cue)."""
    return {w for w in match_key(text or "").split() if len(w) > 3}


def diagnose(row: dict[str, Any], b: Bounds, docs: dict[str, dict[str, Any]], min_confidence: float) -> Diagnosis:
    """Map one rejected row's gate verdicts and scores to a failure mode.

    Rules, in priority order: ``unrecoverable`` (missing, empty or stale source document, no evidence span);
    ``malformed`` (transport or parse error, empty, meta-talk, not English); ``truncated``; ``refusal``;
    ``threshold_marginal`` (every failing scored gate within its margin of the bound); ``duplicate`` (a
    generated twin); ``too_close_to_seed`` (dedup against the seed, n-gram or embedding overlap);
    (near copies of a seed row are diagnosed but not attempted);
    ``question_defect`` (a generated question that the evidence does not support, sharing few words with it);
    ``ungrounded`` (faithfulness); ``low_quality`` (reward, perplexity, length; detail names the weakest
    dimension). Anything else is ``unrecoverable``.

    Args:
        row: a gated row (synthetic or injected contract + gate columns).
        b: thresholds and margins.
        docs: doc_id -> {text, stale}.
        min_confidence: rows diagnosed with less are not attempted.

    Returns:
        The diagnosis.
    """
    doc = docs.get(row["doc_id"])
    text = (doc or {}).get("text") or ""
    s, e = row.get("evidence_start"), row.get("evidence_end")

    def out(mode: str, conf: float, detail: str, worth: bool = True) -> Diagnosis:
        conf = round(float(min(max(conf, 0.0), 1.0)), 4)
        return Diagnosis(mode, conf, detail, worth and mode != "unrecoverable" and conf >= min_confidence)

    if doc is None or not text.strip():
        return out("unrecoverable", 1.0, "source_document_missing_or_empty")
    if doc.get("stale"):
        return out("unrecoverable", 1.0, "source_document_stale")
    if s is None or e is None or not 0 <= s < e <= len(text) or not text[s:e].strip():
        return out("unrecoverable", 1.0, "no_evidence_span")
    reasons = [r for r in (row.get("gate_reasons") or [])]
    failing = _failing(row)
    if any(r in RULES_MALFORMED for r in reasons) or row.get("error") or row.get("parse_error"):
        first = next((r for r in reasons if r in RULES_MALFORMED), row.get("parse_error") or "error")
        return out("malformed", 0.95, first)
    if "rules_truncated" in reasons:
        return out("truncated", 0.9 if row.get("finish_reason") == "length" else 0.75, "rules_truncated")
    if "rules_refusal" in reasons:
        return out("refusal", 0.95, "rules_refusal")
    margins = {g: _marginal(row, g, b) for g in failing}
    if failing and all(v is not None and v <= 1.0 for v in margins.values()):
        worst = max(margins.values())
        detail = ",".join(f"{g}:{margins[g]:.2f}" for g in failing)
        return out("threshold_marginal", 0.9 - 0.4 * max(worst, 0.0), detail)
    if any(r in WITHIN_DUP for r in reasons):
        return out("duplicate", 0.9, next(r for r in reasons if r in WITHIN_DUP))
    close = [r for r in reasons if r in SEED_CLOSE]
    if close:
        # a near copy of a seed row (MinHash near duplicate, or most of its 8-grams in the seed) holds nothing of
        # its own to keep: not worth a call; a paraphrase that is merely close in meaning is diversified
        copy = any(r in ("dedup_exact_seed", "dedup_near_seed") for r in close) or \
            (row.get("overlap_ngram_score") or 0.0) >= b.near_copy_ngram
        # a strategy that only writes answers keeps its seed row's question, so the row is close to the seed by
        # its question whatever the answer says: a new question (not a reworded answer) is what can differ
        own = strat.STRATEGIES.get(row.get("strategy") or "")
        seed_q = "seed_question:" if own is not None and own.output == "answer" else ""
        detail = ("near_copy_of_seed:" if copy else "") + seed_q + ",".join(close)
        return out("too_close_to_seed", 0.6 + 0.1 * min(len(close), 3), detail, worth=not copy)
    faith = row.get("faithfulness_score")
    if "faithfulness" in failing:
        q_words, ev_words = content_words(row.get("question")), content_words(text[s:e])
        q_support = len(q_words & ev_words) / len(q_words) if q_words else 0.0
        if row.get("strategy") in QUESTION_STRATEGIES and q_support < 0.25:
            return out("question_defect", 0.6 + 0.3 * (1 - q_support / 0.25), f"question_support:{q_support:.2f}")
        gap = (b.min_support - faith) / max(b.min_support, 1e-9) if faith is not None else 1.0
        return out("ungrounded", 0.6 + 0.4 * min(max(gap, 0.0), 1.0),
                   f"faithfulness_score:{faith:.3f}" if faith is not None else "faithfulness_unscored")
    if any(r in RULES_LENGTH for r in reasons):
        return out("low_quality", 0.8, "weakest:length")
    if "perplexity" in failing:
        return out("low_quality", 0.7, "weakest:fluency")
    if "reward" in failing:
        return out("low_quality", 0.7, f"weakest:helpfulness(reward:{row.get('reward_score') or float('nan'):.3f})")
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


def next_action(diag: Diagnosis, tried: list[str], row: Diagnosis | None = None,
                chains: Mapping[str, Sequence[str]] | None = None) -> str:
    """Return the next action for a diagnosis: the first of its chain not tried yet, else the chain's first.

    A row too close to the seed through the seed question it answers (detail ``seed_question``) gets a new
    question first: on CosmosQA, diversified answers to such rows passed 2 of 14 times, new questions 5 of 9.

    Args:
        diag: the diagnosis to act on (the row's own, or a failed candidate's).
        tried: actions this row has taken, in order.
        row: the row's own diagnosis, when ``diag`` is a failed candidate's. Every action runs on the row, not
            on the candidate, so a row whose question is the defect (close to the seed through its seed
            question, or ``question_defect``) keeps getting new questions whatever its candidate failed by: an
            action that keeps the question (a reworded, reformatted or grounded answer) leaves that defect in
            place (on CosmosQA, such later attempts on seed-question rows passed 0 of 38 times; a later new
            question, on any row, 23 of 36).
        chains: per-mode chains replacing the built-in ``CHAINS`` for the modes they name (recover.chains).
    """
    if row is not None and (_close_by_seed_question(row) or row.mode == "question_defect"):
        return "regenerate_question"
    own = chains.get(diag.mode) if chains else None
    chain = [_resolve(a, diag) for a in (own or CHAINS.get(diag.mode, ("strict_grounding",)))]
    if _close_by_seed_question(diag):
        chain = ["regenerate_question"] + [a for a in chain if a != "regenerate_question"]
    return next((a for a in chain if a not in tried), chain[0])


def _close_by_seed_question(diag: Diagnosis) -> bool:
    return diag.mode == "too_close_to_seed" and "seed_question:" in diag.detail


def _resolve(action: str, diag: Diagnosis) -> str:
    if action != "rewrite_weakest":
        return action
    return {"length": "rewrite_length", "fluency": "rewrite_fluency"}.get(
        diag.detail.removeprefix("weakest:").split("(")[0], "rewrite_helpfulness")


# ---- injected errors: ground truth ----

_SWAP = re.compile(r"^(?:word )?'(?P<old>.*)' -> '(?P<new>.*)'$")
_CLAIM = re.compile(r"^corpus sentence: '(?P<s>.*)'$", re.S)


def _has_word(text: str, word: str, case: bool) -> bool:
    flags = 0 if case else re.IGNORECASE
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text, flags) is not None


def _word_share(part: str, whole: str) -> float:
    a, b = content_words(part), content_words(whole)
    return len(a & b) / len(a) if a else 0.0


def injected_error_present(row: dict[str, Any], question: str | None, answer: str | None) -> bool:
    """Say whether a candidate still holds the error planted in ``row`` (checked against the injection's truth).

    Swaps (entity, number, negation; detail ``'old' -> 'new'``): the new value is in the candidate's answer
    (negations case-insensitively) and not in the evidence, unless it was. An unsupported claim: most of the
    planted sentence's content words are in the answer. Other kinds (other document, truncation, refusal,
    copies): the candidate's answer is the planted answer, or holds most of its content words while the
    evidence does not. Clean rows hold no error.
    """
    kind, detail = row.get("injection_kind"), row.get("injection_detail") or ""
    if kind in (None, "clean"):
        return False
    cand = f"{question or ''} {answer or ''}" if row.get("injection_field") != "answer" else (answer or "")
    planted = f"{row.get('question') or ''} {row.get('answer') or ''}" if row.get("injection_field") != "answer" \
        else (row.get("answer") or "")
    evidence = row.get("evidence") or ""
    if match_key(cand) == match_key(planted):
        return True
    m = _SWAP.match(detail)
    if kind in ("entity_swap", "number_change", "negation_flip") and m:
        new, case = m.group("new"), kind != "negation_flip"
        return _has_word(cand, new, case) and not (case and _has_word(evidence, new, case))
    m = _CLAIM.match(detail)
    if kind == "unsupported_claim" and m:
        return _word_share(m.group("s"), cand) >= 0.6
    if kind == "truncation":
        return match_key(cand).startswith(match_key(planted)) or match_key(planted).startswith(match_key(cand))
    if kind == "other_document":
        return _word_share(planted, cand) >= 0.6 and _word_share(planted, evidence) < 0.6
    return _word_share(planted, cand) >= 0.8


# ---- dedup against accepted and already recovered rows ----

class PooledDedup:
    """The dedup gate, then (for rows it keeps) a check against a pool of accepted and recovered rows.

    Codes: the base gate's, plus ``dedup_exact_accepted`` / ``dedup_near_accepted`` (same as, or estimated
    Jaccard >= max_jaccard with, a row already accepted or recovered).
    """

    name = "dedup"

    def __init__(self, base: Any, pool: Any | None):
        self.base, self.pool = base, pool

    def apply(self, rows: pa.Table) -> Verdicts:
        v = self.base.apply(rows)
        if self.pool is None or rows.num_rows == 0:
            return v
        p = self.pool.apply(rows)
        keep, score, reason = list(v.keep), list(v.score), list(v.reason)
        for i, (k, r) in enumerate(zip(p.keep, p.reason)):
            if keep[i] and r in ("dedup_exact_seed", "dedup_near_seed"):
                keep[i], reason[i] = False, r.replace("_seed", "_accepted")
            if p.score[i] is not None:
                score[i] = max(score[i] or 0.0, p.score[i])
        return Verdicts(keep, score, reason)


# ---- planning calls ----

@dataclass(frozen=True)
class CallSettings:
    """Sampling settings of recovery calls."""

    seed: int
    temperatures: dict[str, float]  # per action
    top_p: float
    max_new_tokens: dict[str, int]  # per output kind: answer, qa
    naive_temperature: float  # when a rejected row records none (planted rows)
    naive_max_new_tokens: dict[str, int]  # per output kind of the original strategy, when the row records none
    naive_shots: int


def _values(row: dict[str, Any], evidence: str) -> dict[str, str]:
    return {"question": row.get("question") or "", "answer": row.get("answer") or "", "evidence": evidence,
            "passage": evidence, "title": ""}


def plan_adaptive(row: dict[str, Any], action: str, attempt: int, evidence: str, neighbours: list[dict[str, str]],
                  templates: dict[str, Template], cs: CallSettings, teacher_id: str) -> tuple[str, Planned]:
    """Plan one targeted call for a rejected row (an answer-only action on a row without a question fixes format).

    Args:
        row: the rejected row (its question, answer, span).
        action: one of ACTIONS.
        attempt: 1-based attempt number (part of the seed and the cache key).
        evidence: the row's evidence span text.
        neighbours: rows the candidate must differ from (``diversify``): dicts with question and answer.
        templates: loaded templates by name.
        cs: call settings.
        teacher_id: model id + revision.

    Returns:
        The action actually taken and the planned call.
    """
    name, output = ACTIONS[action]
    if name is None:
        raise ValueError(f"{action} resamples the row's own prompt: plan it with plan_naive")
    tpl = templates[name]
    question = row.get("question")
    if action == "fix_format" and (question or "").strip():  # the question survived: answer it, grounded
        name, output = ACTIONS["strict_grounding"][0], "answer"
        tpl = templates[name]
    if output == "answer" and not (question or "").strip():  # nothing to answer: write a question too
        name, output = ("recover_diversify", "qa") if action == "diversify" else (ACTIONS["fix_format"][0], "qa")
        action = action if action == "diversify" else "fix_format"
        tpl = templates[name]
    prompt = tpl.render(_values(row, evidence), [{**_values(n, evidence), **n} for n in neighbours])
    request = GenRequest(prompt=prompt, max_new_tokens=cs.max_new_tokens[output],
                         temperature=cs.temperatures[action], top_p=cs.top_p,
                         stop=_ANSWER_STOP if output == "answer" else _QA_STOP,
                         seed=call_seed(cs.seed, row["row_id"], action, attempt), require_text=True,
                         require=_QA_REQUIRE if output == "qa" else "")
    key = cache_key(teacher_id, tpl.ref, request, attempt)
    parent = {"row_id": row["row_id"], "doc_id": row["doc_id"], "question": question, "answer": row.get("answer"),
              "intent": row.get("intent")}
    return action, Planned(Job(request, key), _PARSE_AS[output], parent,
                           (row["evidence_start"], row["evidence_end"]), attempt, tpl.ref)


def plan_naive(row: dict[str, Any], seed_row: dict[str, Any] | None, attempt: int, evidence: str,
               shots: list[dict[str, Any]], templates: dict[str, Template], cs: CallSettings,
               teacher_id: str, temperature: float | None = None, tag: str = "resample") -> Planned:
    """Plan one plain resample: the row's original strategy template at its original sampling params.

    Planted rows (no strategy) resample with answer_augmentation at ``naive_temperature``. With
    ``temperature`` (and a ``tag`` for the seed), the same prompt at another temperature (``reanswer_low_temp``).
    """
    strategy = row.get("strategy") or "answer_augmentation"
    s, tpl = strat.STRATEGIES[strategy], templates[strategy]
    gp = json.loads(row["gen_params"]) if row.get("gen_params") else {}
    parent = seed_row or row
    values = {"question": parent.get("question") or "", "answer": parent.get("answer") or "",
              "evidence": parent.get("evidence") or evidence, "passage": evidence, "title": ""}
    if strategy == "answer_augmentation":
        values["question"] = row.get("question") or values["question"]
    prompt = tpl.render(values, [{"question": r["question"], "answer": r["answer"], "evidence": r["evidence"],
                                  "passage": r["evidence"], "title": ""} for r in shots])
    request = GenRequest(prompt=prompt,
                         max_new_tokens=int(gp.get("max_new_tokens") or cs.naive_max_new_tokens[s.token_budget]),
                         temperature=float(temperature if temperature is not None
                                           else gp.get("temperature", cs.naive_temperature)),
                         top_p=float(gp.get("top_p", cs.top_p)), stop=tuple(gp.get("stop") or s.stop),
                         seed=call_seed(cs.seed, row["row_id"], tag, attempt))
    key = cache_key(teacher_id, tpl.ref, request, attempt)
    p = {"row_id": row["row_id"], "doc_id": row["doc_id"], "question": row.get("question") if s.output == "answer"
         else parent.get("question"), "answer": parent.get("answer"), "intent": row.get("intent")}
    return Planned(Job(request, key), strategy, p, (row["evidence_start"], row["evidence_end"]), attempt, tpl.ref)


# ---- the attempt loop ----

@dataclass
class RowState:
    """What one method did with one rejected row."""

    diagnosis: Diagnosis
    outcome: str = "not_attempted"
    actions: list[str] = field(default_factory=list)
    attempts: int = 0
    calls: int = 0
    tokens: int = 0
    recovered: dict[str, Any] | None = None
    last_reasons: list[str] = field(default_factory=list)
    error_survives: bool | None = None  # planted rows: the candidate the gates recovered still holds the error
    next: str | None = None
    cap: int = 0  # calls this row may use (0: not admitted yet)


Execute = Callable[[list[Planned], list[str]], pa.Table]  # planned calls, actions -> stamped candidate rows
Regate = Callable[[pa.Table, pa.Table], pa.Table]  # candidates, pool -> candidates with every gate's columns
PlanFn = Callable[[dict[str, Any], RowState, int], tuple[str, Planned]]


def run_method(rows: list[dict[str, Any]], states: list[RowState], plan: PlanFn, execute: Execute, regate: Regate,
               pool: pa.Table, *, budget: int, max_attempts: int, rediagnose: Callable[[dict], Diagnosis] | None,
               check_error: Callable[[dict, dict], bool] | None,
               group_of: Callable[[dict], str] | None = None,
               trail: list[pa.Table] | None = None,
               chains: Mapping[str, Sequence[str]] | None = None) -> pa.Table | None:
    """Attempt recoverable rows in rounds (one call per row per round) within per-row and global budgets.

    Rows are admitted in priority order while their whole per-row budget (``max_attempts`` calls) still fits
    in the global one; a recovered row gives back what it did not use, so later rounds admit further rows.

    A candidate is recovered when it passes every gate: the gates alone decide, as they would in a real run.
    On planted rows ``check_error`` then measures whether the recovered candidate still holds the planted
    error (outcome ``laundered``): ground truth measures what the gates let through, and never refuses a
    candidate. A failed candidate is diagnosed again (``rediagnose``, adaptive) to choose the next action.

    Args:
        rows: the rejected rows, in priority order.
        states: one state per row (diagnosis set; updated in place).
        plan: (row, state, attempt) -> (action, planned call).
        execute: runs planned calls (through the cache) and returns candidate rows.
        regate: gates candidates against the pool of accepted and recovered rows.
        pool: question/answer rows a candidate must not duplicate (accepted rows).
        budget: global teacher calls for this method.
        max_attempts: calls per row.
        rediagnose: diagnoses a failed candidate (None: keep the row's diagnosis, as the naive method does).
        check_error: (rejected row, candidate) -> the planted error is still there (planted rows only; a
            measurement of the recovered candidate, not a filter).
        group_of: when set, candidates are gated one group at a time (planted rows: one injection kind at a
            time, so twins planted from the same source are never deduplicated against each other).
        trail: when given, every gated candidate (recovered or not) is appended to it, one table per round,
            with a ``counted`` column (True where it passed every gate and so recovered its row).
        chains: per-mode action chains replacing the built-in ones (``next_action``).

    Returns:
        The recovered rows (gated contract columns), in the order they were recovered.
    """
    used = reserved = 0  # calls made; calls still reserved by admitted rows that are not finished
    for s in states:
        if s.diagnosis.recoverable:
            s.outcome = "budget_exhausted"
    recovered: list[pa.Table] = []
    base_pool = pool_of(pool)
    pool = base_pool
    while True:
        todo, planned = [], []
        for i, (row, s) in enumerate(zip(rows, states)):
            if not s.diagnosis.recoverable or s.recovered is not None or (s.cap and s.attempts >= s.cap):
                continue
            if s.cap == 0:  # admit a new row only if its whole per-row budget still fits in the global one
                s.cap = min(max_attempts, budget - used - reserved)
                if s.cap <= 0:
                    s.cap = 0
                    continue
                reserved += s.cap
            action, p = plan(row, s, s.attempts + 1)
            todo.append(i), planned.append(p)
            s.actions.append(action)
            used += 1
            reserved -= 1
        if not planned:
            break
        cands = execute(planned, [states[i].actions[-1] for i in todo])
        gated = _regate_groups(cands, pool, regate, [group_of(rows[i]) for i in todo] if group_of else None)
        counted = []
        for k, (i, cand) in enumerate(zip(todo, gated.to_pylist())):
            s = states[i]
            s.attempts += 1
            s.calls += 1
            s.tokens += int(cand["prompt_tokens"]) + int(cand["completion_tokens"])
            s.outcome = "failed"
            s.last_reasons = list(cand["gate_reasons"])
            counted.append(bool(cand["gate_keep"]))
            if cand["gate_keep"]:  # the gates alone decide, as in a real run
                s.outcome, s.recovered = "recovered", cand
                if check_error is not None:  # planted rows: measure (never filter) whether the error got through
                    s.error_survives = bool(check_error(rows[i], cand))
                    if s.error_survives:
                        s.outcome = "laundered"
                recovered.append(gated.slice(k, 1))
                reserved -= s.cap - s.attempts  # release what this row no longer needs
                continue
            s.next = next_action(rediagnose(cand), s.actions, s.diagnosis, chains) if rediagnose is not None else None
        if trail is not None:
            trail.append(gated.append_column("counted", pa.array(counted, pa.bool_())))
        if recovered:
            pool = pool_of(base_pool, *recovered)
    return pa.concat_tables(recovered) if recovered else None


def _regate_groups(cands: pa.Table, pool: pa.Table, regate: Regate, groups: list[str] | None) -> pa.Table:
    if groups is None:
        return regate(cands, pool)
    parts, order = [], []
    for g in sorted(set(groups)):
        idx = [i for i, x in enumerate(groups) if x == g]
        parts.append(regate(cands.take(pa.array(idx, pa.int64())), pool))
        order += idx
    out = pa.concat_tables(parts)
    return out.take(pa.array(np.argsort(order, kind="stable"), pa.int64()))


def stamp(cands: pa.Table, planned: list[Planned], parents: dict[str, dict[str, Any]], actions: list[str],
          phash: str, code_version: str) -> pa.Table:
    """Give candidate rows their recovery provenance: original strategy, attempt, action, this stage's hashes."""
    strategies = [parents[p.parent["row_id"]].get("strategy") for p in planned]
    cols = {"strategy": pa.array(strategies, pa.string()),
            "attempt": pa.array([p.sample_index for p in planned], pa.int32()),
            "recovery_action": pa.array(actions, pa.string()),
            "params_hash": pa.array([phash] * len(planned), pa.string()),
            "code_version": pa.array([code_version] * len(planned), pa.string())}
    for name, arr in cols.items():
        cands = cands.set_column(cands.schema.get_field_index(name), cands.schema.field(name), arr)
    return cands


MODE_RANK = ("threshold_marginal", "truncated", "malformed", "refusal", "low_quality", "ungrounded",
             "question_defect", "duplicate", "too_close_to_seed")


def priority(diags: list[Diagnosis], *, interleave: bool = True) -> np.ndarray:
    """Order rows for the budget (both methods take rows from this one queue, so they see the same rows).

    Within a mode, rows go by confidence (stable). ``interleave`` (round robin) takes one row of each mode in
    ``MODE_RANK`` order, then the second of each, and so on, so a small budget reaches every failure mode and
    the per-mode table measures each; otherwise every row of a mode goes before the next mode's.
    """
    rank = {m: i for i, m in enumerate(MODE_RANK)}
    keys = [(rank.get(d.mode, len(rank)), -d.confidence) for d in diags]
    by_mode = sorted(range(len(diags)), key=lambda i: keys[i])
    # rows that are never attempted (unrecoverable, or below min_confidence) go last, so they take no turn
    later = [i for i in by_mode if not diags[i].recoverable]
    by_mode = [i for i in by_mode if diags[i].recoverable]
    if not interleave:
        return np.array(by_mode + later, dtype=np.int64)
    seen: dict[int, int] = {}
    turn = []
    for i in by_mode:  # the k-th row of its mode goes in round k
        m = keys[i][0]
        turn.append((seen.get(m, 0), m, i))
        seen[m] = seen.get(m, 0) + 1
    return np.array([i for _, _, i in sorted(turn)] + later, dtype=np.int64)


def pool_of(*tables: pa.Table) -> pa.Table:
    """Stack the row_id/question/answer columns of tables (rows a recovered candidate must not duplicate)."""
    parts = [t.select(["row_id", "question", "answer"]).cast(pa.schema([("row_id", pa.string()),
                                                                         ("question", pa.string()),
                                                                         ("answer", pa.string())]))
             for t in tables if t is not None]
    out = pa.concat_tables(parts) if parts else pa.table({"row_id": pa.array([], pa.string()),
                                                           "question": pa.array([], pa.string()),
                                                           "answer": pa.array([], pa.string())})
    return out.filter(pc.is_valid(out.column("answer")))
