"""Recovery actions: what each one asks the teacher, the order tried per failure mode, and the planned calls.

Adaptive recovery (grounding brief, docs/sources.md) answers each failure mode with its action (a versioned
``prompts/recover_*.txt`` template at its own temperature) and, on failure, the next action of the mode's chain. The
naive baseline resamples the row's original strategy template at its original temperature, on the same rows and budget.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from refinery.generation import strategies as strat
from refinery.generation.calls import Planned, call_seed
from refinery.generation.few_shot import shot_values
from refinery.generation.prompts import Template
from refinery.generation.teacher import Job, cache_key
from refinery.models.backends.base import GenRequest
from refinery.recovery.diagnose import Diagnosis

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
    # critique -> revise: the gates' diagnosis is the critique; it names the constitution rule broken
    # (recover.revise_rules, prompts/constitution.txt) and prompts/revise.txt rewrites the answer to follow it
    "revise_by_rule": ("revise", "answer"),
}
# failure mode -> the number of the prompts/constitution.txt rule its rows break (recover.revise_rules replaces it)
REVISE_RULES: dict[str, int] = {"ungrounded": 1, "low_quality": 2, "truncated": 3, "refusal": 6}
OWN_TEMPERATURE = frozenset({"resample"})  # actions that sample at the row's recorded temperature
TEMPLATES = tuple(sorted({t for t, _ in ACTIONS.values() if t is not None} | {"recover_diversify"}))
# Per mode, the actions in the order they are tried; 'rewrite_weakest' is resolved from the diagnosis detail.
CHAINS: dict[str, tuple[str, ...]] = {
    "malformed": ("fix_format", "regenerate_question"),
    # A truncated row rambled past its token budget: a small teacher asked for one short sentence ('fix_length')
    # rambles again, while a new question and answer from the passage starts afresh. So the new question comes
    # first; 'fix_length' stays available through recover.chains (docs/measurements.md, recovery chain order).
    "truncated": ("regenerate_question", "strict_grounding"),
    "refusal": ("strict_grounding", "regenerate_question"),
    # A marginal row failed by noise near a bound: a fresh draw of its own prompt (the naive baseline's call, same
    # seed) is the cheapest way past the noise and recovered more rows than a cooler re-answer did, so it comes
    # first; a new question is the second try, where it also passed more often than the cooler re-answer.
    # 'reanswer_low_temp' stays available through recover.chains (docs/measurements.md, recovery chain order).
    "threshold_marginal": ("resample", "regenerate_question"),
    "duplicate": ("diversify", "regenerate_question"),
    "too_close_to_seed": ("diversify", "regenerate_question"),
    "question_defect": ("regenerate_question", "diversify"),
    "ungrounded": ("strict_grounding", "regenerate_question"),
    # Asked to rewrite the weakest dimension, a small teacher mostly copies the answer or shortens it; a fresh
    # answer grounded in the evidence passed more often. So grounding comes first, then a new question;
    # 'rewrite_weakest' stays available through recover.chains for a teacher that rewrites well
    # (docs/measurements.md, recovery chain order).
    "low_quality": ("strict_grounding", "regenerate_question"),
}
_PARSE_AS = {"answer": "answer_augmentation", "qa": "evol_depth"}  # strategies whose parser reads each output kind
_ANSWER_STOP = ("\n\n", "\nQuestion:", "\nAnswer:", "\nPassage:", "\nEvidence:")


def next_action(diag: Diagnosis, tried: list[str], row: Diagnosis | None = None,
                chains: Mapping[str, Sequence[str]] | None = None) -> str:
    """Return the next action for a diagnosis: the first of its chain not tried yet, else the chain's first.

    A row too close to the seed through the seed question it answers (detail ``seed_question``) gets a new
    question first: a reworded answer to the same seed question stays close to the seed by its question.

    Args:
        diag: the diagnosis to act on (the row's own, or a failed candidate's).
        tried: actions this row has taken, in order.
        row: the row's own diagnosis, when ``diag`` is a failed candidate's. Every action runs on the row, not
            on the candidate, so a row whose question is the defect (close to the seed through its seed
            question, or ``question_defect``) keeps getting new questions whatever its candidate failed by: an
            action that keeps the question (a reworded, reformatted or grounded answer) leaves that defect in
            place.
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


def _values(row: dict[str, Any], evidence: str, rule: str = "") -> dict[str, str]:
    return {"question": row.get("question") or "", "answer": row.get("answer") or "", "evidence": evidence,
            "passage": evidence, "title": "", "rule": rule}


def plan_adaptive(row: dict[str, Any], action: str, attempt: int, evidence: str, neighbours: list[dict[str, str]],
                  templates: dict[str, Template], cs: CallSettings, teacher_id: str,
                  rule: str = "") -> tuple[str, Planned]:
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
        rule: the constitution rule the row breaks (``revise_by_rule``: the revise prompt states it).

    Returns:
        The action actually taken and the planned call.
    """
    if action == "revise_by_rule" and not rule:
        raise ValueError("revise_by_rule needs the constitution rule the row breaks")
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
    prompt = tpl.render(_values(row, evidence, rule), [{**_values(n, evidence), **n} for n in neighbours])
    request = GenRequest(prompt=prompt, max_new_tokens=cs.max_new_tokens[output],
                         temperature=cs.temperatures[action], top_p=cs.top_p,
                         stop=_ANSWER_STOP if output == "answer" else strat.QA_STOP,
                         seed=call_seed(cs.seed, row["row_id"], action, attempt), require_text=True,
                         require=strat.QA_REQUIRE if output == "qa" else "")
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
              "evidence": parent.get("evidence") or evidence, "passage": evidence, "title": "",
              # rare_intent's template: the row's intent; no definition, tone or negative examples are recorded
              "intent": row.get("intent") or "", "definition": "", "tone": "plain", "negatives": "(none)"}
    if strategy == "answer_augmentation":
        values["question"] = row.get("question") or values["question"]
    prompt = tpl.render(values, shot_values(shots))
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
