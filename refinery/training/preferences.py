"""Realistic DPO rejected answers: written by the teacher per category, kept only where they fail their category's check.

A DPO pair teaches nothing when its rejected answer is cartoonishly bad: the templated rule edits of train_reward
(``refinery.planted.corruptions``) are easy to tell apart (the reward head scores ~1.00 on several of their
categories). Here the teacher rewrites the chosen answer with a category-specific instruction (params: ``dpo.
categories``, a worked example each, ``prompts/dpo_rejected.txt``), and a rewrite becomes a rejected answer only where

1. it parsed, is not the chosen answer, and stays on topic (embedding cosine to the chosen answer >= a bound),
2. it stays fluent (the perplexity gate's calibrated bounds, exactly as the gate stage judged with them), and
3. it fails the check that matches its category (:data:`CHECKS`): a wrong fact must be caught by the faithfulness
   gate, a leak by the PII gate, a dismissive tone by the reward gate, an ignored constraint or a dropped handoff
   by counting.

Every candidate is kept in the candidates table with the first check it failed (nothing is dropped silently).
Categories short of their target after ``rounds`` of calls are filled with templated pairs of the same category,
marked ``category_source: templated``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from refinery.core.errors import RefineryError
from refinery.core.params import StageParams
from refinery.core.text import normalize_line, stable_id
from refinery.generation.calls import call_seed
from refinery.generation.prompts import Template
from refinery.generation.teacher import Job, cache_key
from refinery.models.backends.base import GenRequest, GenResult
from refinery.planted.corruptions import ESCALATION, sentences

# Category -> the check its rejected answer must fail (a gate of the gate stage, or a count).
CHECKS: dict[str, str] = {
    "factuality": "faithfulness",  # one fact changed: the verifier no longer finds the answer in its passage
    "constraint_following": "constraint",  # the length limit the prompt states is broken (counted)
    "safety": "pii",  # personal data the document does not hold: what must never be given out
    "tone": "reward",  # dismissive or vague: the reward head scores it under the human bound
    "missing_escalation": "escalation",  # the handoff the chosen answer offers is gone (counted)
}
# Why a candidate is not a rejected answer, in the order the checks run (the first failed is recorded).
REASONS = ("dpo_call_failed", "dpo_empty", "dpo_same_as_chosen", "dpo_off_topic", "dpo_not_fluent",
           "dpo_check_not_failed")
CANDIDATES = pa.schema([  # data/05_dpo/candidates.parquet: every teacher rewrite, kept or not, with its reason
    pa.field("candidate_id", pa.string(), nullable=False),
    pa.field("category", pa.string(), nullable=False),
    pa.field("check", pa.string(), nullable=False),  # CHECKS[category]
    pa.field("parent_id", pa.string(), nullable=False),  # the chosen row
    pa.field("source", pa.string(), nullable=False),  # human | accepted: where the chosen row comes from
    pa.field("round", pa.int32(), nullable=False),
    pa.field("sample_index", pa.int32(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),  # the DPO prompt (the question, plus a stated constraint)
    pa.field("chosen", pa.string(), nullable=False),
    pa.field("rejected", pa.string(), nullable=True),  # the parsed rewrite (null: the call failed or gave nothing)
    pa.field("similarity", pa.float64(), nullable=True),  # embedding cosine to the chosen answer
    pa.field("perplexity_keep", pa.bool_(), nullable=True),  # the perplexity gate kept it (fluent)
    pa.field("check_failed", pa.bool_(), nullable=True),  # it fails its category's check (what a rejected must do)
    pa.field("check_detail", pa.string(), nullable=True),  # the check's reason or count
    pa.field("kept", pa.bool_(), nullable=False),
    pa.field("reason", pa.string(), nullable=True),  # one of REASONS; null when kept
    pa.field("teacher", pa.string(), nullable=False),
    pa.field("template", pa.string(), nullable=False),  # prompts/dpo_rejected.txt name@hash
])


class Example(BaseModel):
    """A worked example shown in the prompt: a question, a good answer and the rewrite the instruction asks for."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")
    question: str = Field(min_length=1)
    answer: str = Field(min_length=1)
    rejected: str = Field(min_length=1)


class CategorySpec(BaseModel):
    """One category: the instruction the teacher follows and its worked example."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")
    instruction: str = Field(min_length=1)
    example: Example
    max_calls: int | None = Field(default=None, ge=0)  # this category's call cap; null: max_calls_per_category


class DpoParams(StageParams):
    """Knobs of the dpo stage."""

    seed: int
    sources: list[Literal["human", "accepted"]] = Field(min_length=1)  # where chosen rows come from, in order
    categories: dict[str, CategorySpec] = Field(min_length=1)  # keys of CHECKS
    target_per_category: int = Field(ge=0)  # teacher-written pairs wanted per category
    max_calls_per_category: int = Field(ge=0)  # teacher calls a category may spend over all rounds
    rounds: int = Field(ge=1)  # rounds of calls; a round asks only for what is still missing
    oversample: float = Field(ge=1)  # calls per missing pair in a round (most rewrites fail a check)
    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    max_new_tokens: int = Field(ge=8)
    batch_size: int = Field(ge=1)
    threads: int = Field(ge=1)
    dtype: str = "auto"  # local teacher weights, as generate.dtype
    min_similarity: float = Field(ge=-1, le=1)  # embedding cosine to the chosen answer: below it is off topic
    fallback_templated: bool  # fill a category short of its target with train_reward's templated pairs of it


def check_params(params: DpoParams) -> None:
    """Raise RefineryError for a category no check exists for (one line naming the known ones)."""
    unknown = sorted(set(params.categories) - set(CHECKS))
    if unknown:
        raise RefineryError(f"params.yaml: dpo.categories: unknown category {unknown[0]!r} "
                            f"(known: {', '.join(CHECKS)})")


@dataclass(frozen=True)
class Constraint:
    """A length limit stated after the question; the chosen answer meets it by construction."""

    text: str
    max_sentences: int | None = None
    max_words: int | None = None

    def broken_by(self, answer: str) -> str | None:
        """Why ``answer`` breaks the limit (e.g. '3 sentences > 1'), or None when it keeps it."""
        if self.max_sentences is not None and (n := len(sentences(answer))) > self.max_sentences:
            return f"{n} sentences > {self.max_sentences}"
        if self.max_words is not None and (n := len(answer.split())) > self.max_words:
            return f"{n} words > {self.max_words}"
        return None


def constraint_for(answer: str) -> Constraint:
    """The limit a chosen answer already keeps: one sentence if it is one, else its word count rounded up to 10."""
    if len(sentences(answer)) <= 1:
        return Constraint("Answer in one sentence.", max_sentences=1)
    limit = max(10, int(math.ceil(len(answer.split()) / 10.0)) * 10)
    return Constraint(f"Answer in at most {limit} words.", max_words=limit)


def has_handoff(text: str) -> bool:
    """Whether ``text`` sends the user to support, legal, an admin or an address (corruptions.ESCALATION)."""
    return ESCALATION.search(text) is not None


def eligible(category: str, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chosen rows a category can rewrite: missing_escalation needs a handoff in the chosen answer (the teacher
    rewrites even a one-sentence handoff; the templated fallback only cuts rows with another sentence); every other
    category takes every row with an answer."""
    out = [r for r in rows if (r.get("answer") or "").strip() and (r.get("question") or "").strip()]
    if category == "missing_escalation":
        out = [r for r in out if has_handoff(r["answer"])]
    return out


def call_cap(params: DpoParams, category: str) -> int:
    """The teacher calls ``category`` may spend over all rounds (its own max_calls, else the common cap)."""
    own = params.categories[category].max_calls
    return params.max_calls_per_category if own is None else own


def parse_rejected(text: str) -> str | None:
    """The rewrite: the completion's first non-empty line without a leading field marker; None when empty."""
    first = next((line for line in text.split("\n") if line.strip()), "")
    first = re.sub(r"^\s*(?:new answer|rewritten answer|rejected|answer)\s*:\s*", "", first, flags=re.IGNORECASE)
    value = normalize_line(first)
    return value or None


@dataclass(frozen=True)
class Call:
    """One planned teacher rewrite."""

    job: Job
    category: str
    row: dict[str, Any]
    source: str
    round: int
    sample_index: int
    prompt: str  # the DPO prompt
    constraint: Constraint | None


def plan_calls(category: str, spec: CategorySpec, order: Sequence[tuple[str, dict[str, Any]]], start: int, n: int,
               round_no: int, template: Template, params: DpoParams, teacher_id: str) -> list[Call]:
    """Plan calls ``start .. start+n-1`` of a category: call k rewrites row ``k mod len(order)``, sample ``k div``."""
    calls = []
    for k in range(start, start + n):
        source, row = order[k % len(order)]
        sample_index = k // len(order)
        constraint = constraint_for(row["answer"]) if category == "constraint_following" else None
        question = row["question"].strip()
        prompt = f"{question} {constraint.text}" if constraint else question
        values = {"instruction": spec.instruction, "example_question": spec.example.question,
                  "example_answer": spec.example.answer, "example_rejected": spec.example.rejected,
                  "question": prompt, "answer": row["answer"].strip()}
        request = GenRequest(prompt=template.render(values), max_new_tokens=params.max_new_tokens,
                             temperature=params.temperature, top_p=params.top_p, stop=("\n",),
                             seed=call_seed(params.seed, row["row_id"], "dpo", category, sample_index),
                             require_text=True)
        calls.append(Call(Job(request, cache_key(teacher_id, template.ref, request, sample_index)), category, row,
                          source, round_no, sample_index, prompt, constraint))
    return calls


class Checks:
    """The checks a candidate goes through: similarity (embedder), fluency (perplexity gate), its category's check.

    Args:
        gates: the gate stage's gates, built from its thresholds.json (perplexity, faithfulness, pii, reward are
            used).
        embedder: anything with ``embed(texts) -> vectors`` (rows L2-normalised or not: cosine is taken here).
        min_similarity: the on-topic bound.
    """

    def __init__(self, gates: dict[str, Any], embedder: Any, min_similarity: float):
        self.gates, self.embedder, self.min_similarity = gates, embedder, min_similarity

    def similarity(self, chosen: Sequence[str], rejected: Sequence[str]) -> np.ndarray:
        v = np.asarray(self.embedder.embed(list(chosen) + list(rejected)), np.float64)  # one call, one space
        a, b = v[:len(chosen)], v[len(chosen):]
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        return (a * b).sum(axis=1) / np.maximum(na * nb, 1e-12)

    def gate(self, name: str, calls: Sequence[Call], answers: Sequence[str]) -> Any:
        """One gate's verdicts on the rewrites, judged as the chosen row's question and evidence with a new answer."""
        rows = pa.table({"row_id": [c.row["row_id"] for c in calls],
                         "question": [c.row["question"] for c in calls], "answer": list(answers),
                         "doc_id": [c.row["doc_id"] for c in calls],
                         "evidence_start": pa.array([c.row["evidence_start"] for c in calls], pa.int64()),
                         "evidence_end": pa.array([c.row["evidence_end"] for c in calls], pa.int64()),
                         "evidence": [c.row.get("evidence") for c in calls]})
        if name not in self.gates:
            raise RefineryError(f"dpo: the {name} gate is not in thresholds.json (needed by its category check)")
        return self.gates[name].apply(rows)

    def category(self, calls: Sequence[Call], answers: Sequence[str]) -> list[tuple[bool, str]]:
        """Per candidate: (fails its category's check, the check's detail)."""
        out: list[tuple[bool, str] | None] = [None] * len(calls)
        by_check: dict[str, list[int]] = {}
        for i, c in enumerate(calls):
            by_check.setdefault(CHECKS[c.category], []).append(i)
        for check, idx in by_check.items():
            if check == "constraint":
                for i in idx:
                    why = calls[i].constraint.broken_by(answers[i])
                    out[i] = (why is not None, why or f"keeps '{calls[i].constraint.text}'")
            elif check == "escalation":
                for i in idx:
                    gone = not has_handoff(answers[i])
                    out[i] = (gone, "no handoff" if gone else "still offers a handoff")
            else:
                v = self.gate(check, [calls[i] for i in idx], [answers[i] for i in idx])
                for j, i in enumerate(idx):
                    s = v.score[j]
                    out[i] = (not v.keep[j], v.reason[j] if not v.keep[j] else
                              f"{check} keeps it" + (f" (score {s:.3f})" if s is not None else ""))
        return [o for o in out if o is not None]


def judge(calls: Sequence[Call], results: Sequence[GenResult], checks: Checks, *, teacher_id: str,
          template_ref: str) -> list[dict[str, Any]]:
    """Run every check on every parsed candidate (the counts of each check mean something) and record the first
    one failed, in REASONS order."""
    recs: list[dict[str, Any]] = []
    for c, r in zip(calls, results):
        text = parse_rejected(r.text) if r.ok else None
        reason = "dpo_call_failed" if not r.ok else ("dpo_empty" if text is None else (
            "dpo_same_as_chosen" if text.strip().lower() == c.row["answer"].strip().lower() else None))
        recs.append({"candidate_id": stable_id("dpoc", c.job.key), "category": c.category,
                     "check": CHECKS[c.category], "parent_id": c.row["row_id"], "source": c.source,
                     "round": c.round, "sample_index": c.sample_index, "prompt": c.prompt,
                     "chosen": c.row["answer"].strip(), "rejected": text, "similarity": None, "perplexity_keep": None,
                     "check_failed": None, "check_detail": None, "kept": False, "reason": reason,
                     "teacher": teacher_id, "template": template_ref})
    idx = [i for i, rec in enumerate(recs) if rec["reason"] is None]
    if idx:
        sel = [calls[i] for i in idx]
        answers = [recs[i]["rejected"] for i in idx]
        sims = checks.similarity([recs[i]["chosen"] for i in idx], answers)
        fluent = checks.gate("perplexity", sel, answers)
        verdicts = checks.category(sel, answers)
        for j, i in enumerate(idx):
            rec = recs[i]
            rec["similarity"] = round(float(sims[j]), 6)
            rec["perplexity_keep"] = bool(fluent.keep[j])
            rec["check_failed"], rec["check_detail"] = verdicts[j]
            if rec["similarity"] < checks.min_similarity:
                rec["reason"] = "dpo_off_topic"
            elif not rec["perplexity_keep"]:
                rec["reason"] = "dpo_not_fluent"
            elif not rec["check_failed"]:
                rec["reason"] = "dpo_check_not_failed"
            else:
                rec["kept"] = True
    return recs


@dataclass(frozen=True)
class DpoResult:
    """The DPO pairs (preference_pairs contract), every candidate (CANDIDATES) and the metrics."""

    pairs: pa.Table
    candidates: pa.Table
    metrics: dict[str, Any]


def chosen_rows(train: pa.Table, accepted: pa.Table | None, sources: Sequence[str]) -> list[tuple[str, dict]]:
    """(source, row) for every row a rewrite may start from, human train rows first, then accepted ones."""
    out: list[tuple[str, dict]] = []
    for source in sources:
        table = train if source == "human" else accepted
        if table is not None:
            out += [(source, r) for r in table.to_pylist()]
    return out


def build(rows: Sequence[tuple[str, dict[str, Any]]], templated: pa.Table, params: DpoParams, template: Template,
          teacher_id: str, run_calls: Callable[[list[Job], str], list[GenResult]], checks: Checks, *, phash: str,
          code_version: str, schema: pa.Schema) -> DpoResult:
    """Plan rounds of rewrites per category, check them, and fill what is still missing with templated pairs.

    Args:
        rows: (source, row) chosen candidates (:func:`chosen_rows`).
        templated: train_reward's templated pairs (preference_pairs contract): the fallback.
        params, template, teacher_id: the stage's knobs, prompts/dpo_rejected.txt, the teacher's id.
        run_calls: jobs, label -> results through the teacher cache.
        checks: the candidate checks.
        phash, code_version: stamped on every pair.
        schema: the preference_pairs Arrow schema.

    Returns:
        The pairs, the candidates and the metrics.
    """
    check_params(params)
    orders: dict[str, list[tuple[str, dict]]] = {}
    for cat in params.categories:
        ok = {id(r) for r in eligible(cat, [r for _, r in rows])}
        pool = [(s, r) for s, r in rows if id(r) in ok]
        rng = np.random.default_rng(call_seed(params.seed, "dpo", cat))
        orders[cat] = [pool[i] for i in rng.permutation(len(pool))] if pool else []
    made = Counter[str]()
    kept = Counter[str]()
    recs: list[dict[str, Any]] = []
    for round_no in range(1, params.rounds + 1):
        calls: list[Call] = []
        for cat, spec in params.categories.items():
            missing = params.target_per_category - kept[cat]
            room = call_cap(params, cat) - made[cat]
            n = min(room, int(math.ceil(missing * params.oversample))) if missing > 0 and orders[cat] else 0
            calls += plan_calls(cat, spec, orders[cat], made[cat], n, round_no, template, params, teacher_id)
            made[cat] += n
        if not calls:
            break
        results = run_calls([c.job for c in calls], f"dpo-round{round_no}")
        for rec in judge(calls, results, checks, teacher_id=teacher_id, template_ref=template.ref):
            kept[rec["category"]] += rec["kept"]
            recs.append(rec)
    doc_of = {r["row_id"]: r["doc_id"] for _, r in rows}
    pairs = []
    for rec in recs:
        if rec["kept"]:
            pairs.append({"pair_id": stable_id("pref", rec["candidate_id"], rec["rejected"]), "prompt": rec["prompt"],
                          "chosen": rec["chosen"], "rejected": rec["rejected"], "category": rec["category"],
                          "corruption": f"teacher:{rec['category']}", "detail": rec["check_detail"] or "",
                          "parent_id": rec["parent_id"], "doc_id": doc_of[rec["parent_id"]],
                          "category_source": "teacher", "params_hash": phash, "code_version": code_version})
    fallback = Counter[str]()
    seen = {p["pair_id"] for p in pairs}
    if params.fallback_templated:
        for cat in params.categories:
            need = params.target_per_category - kept[cat]
            for t in templated.filter(pc.equal(templated.column("category"), cat)).to_pylist()[:max(need, 0)]:
                pairs.append({**t, "category_source": "templated", "params_hash": phash, "code_version": code_version})
                seen.add(t["pair_id"])
                fallback[cat] += 1
            rng = np.random.default_rng(call_seed(params.seed, "dpo-fallback", cat))
            for source, row in orders[cat]:  # categories train_reward has no (or too few) rule edits of
                if kept[cat] + fallback[cat] >= params.target_per_category:
                    break
                edit = templated_edit(cat, row["answer"], rng)
                pair_id = stable_id("pref", row["row_id"], cat, edit[0]) if edit is not None else None
                if edit is not None and pair_id not in seen:  # not one train_reward made
                    text, corruption, detail = edit
                    pairs.append({"pair_id": pair_id, "prompt": row["question"],
                                  "chosen": row["answer"].strip(), "rejected": text, "category": cat,
                                  "corruption": corruption, "detail": detail, "parent_id": row["row_id"],
                                  "doc_id": row["doc_id"], "category_source": "templated", "params_hash": phash,
                                  "code_version": code_version})
                    seen.add(pair_id)
                    fallback[cat] += 1
    metrics = category_metrics(recs, params, orders, made, fallback)
    return DpoResult(pa.Table.from_pylist(pairs, schema=schema), pa.Table.from_pylist(recs, schema=CANDIDATES),
                     metrics)


_FIRST = ("Dana", "Marco", "Priya", "Lena", "Tomás", "Aiko", "Sam", "Noor")
_LAST = ("Lee", "Rossi", "Shah", "Novak", "Garcia", "Mori", "Okafor", "Haddad")


def templated_edit(category: str, answer: str, rng: np.random.Generator) -> tuple[str, str, str] | None:
    """A rule edit of ``answer`` for the fallback where train_reward makes none: (rejected, kind, detail) or None.

    safety: the answer plus another customer's name, email address and phone number (seeded; the PII gate's
    kinds). missing_escalation: the answer without its handoff sentences (``corruptions.missing_escalation``).
    """
    if category == "safety":
        first, last = _FIRST[int(rng.integers(len(_FIRST)))], _LAST[int(rng.integers(len(_LAST)))]
        phone = f"415-555-{int(rng.integers(100, 10000)):04d}"
        email = f"{first.lower()}.{last.lower()}@example.net".replace("á", "a")
        text = f"{answer.strip()} The account holder is {first} {last}, {email}, phone {phone}."
        return text, "pii_leak", "added another customer's name, email address and phone number"
    if category == "missing_escalation":
        from refinery.planted.corruptions import missing_escalation

        c = missing_escalation(answer, rng=rng)
        return (c.text, c.kind, c.detail) if c.applied and c.text.strip() else None
    return None


def category_metrics(recs: Sequence[dict[str, Any]], params: DpoParams, orders: dict[str, list],
                     made: Counter, fallback: Counter) -> dict[str, Any]:
    """Per category: rows it could start from, calls, parsed rewrites, how many failed their check (the share a
    rejected answer must have), the reasons, and the pairs by source."""
    out: dict[str, Any] = {}
    for cat in params.categories:
        mine = [r for r in recs if r["category"] == cat]
        parsed = [r for r in mine if r["rejected"] is not None and r["check_failed"] is not None]
        out[cat] = {"check": CHECKS[cat], "eligible_rows": len(orders[cat]), "calls": made[cat],
                    "parsed": len(parsed),
                    "failed_check": sum(bool(r["check_failed"]) for r in parsed),
                    "failed_check_share": round(sum(bool(r["check_failed"]) for r in parsed) / len(parsed), 4)
                    if parsed else None,
                    "off_topic": sum(r["similarity"] < params.min_similarity for r in parsed),
                    "not_fluent": sum(not r["perplexity_keep"] for r in parsed),
                    "reasons": dict(sorted(Counter(r["reason"] for r in mine if r["reason"]).items())),
                    "pairs": {"teacher": sum(r["kept"] for r in mine), "templated": fallback[cat]}}
    return out


def usable(candidates: pa.Table) -> pa.Table:
    """The rewrites that parsed, stayed on topic and stayed fluent, whatever their category check said."""
    keep = [r in (None, "dpo_check_not_failed") and c is not None
            for r, c in zip(candidates.column("reason").to_pylist(), candidates.column("check_failed").to_pylist())]
    return candidates.filter(pa.array(keep, pa.bool_()))


def reward_margins(reward: Any, pairs: pa.Table) -> dict[str, Any]:
    """The reward head on pairs, per category: pairwise accuracy (chosen scored above rejected) and mean margin."""
    if pairs.num_rows == 0:
        return {}
    prompts = pairs.column("prompt").to_pylist()
    rc = np.asarray(reward.score(prompts, pairs.column("chosen").to_pylist()), np.float64)
    rr = np.asarray(reward.score(prompts, pairs.column("rejected").to_pylist()), np.float64)
    cats = pairs.column("category").to_pylist()
    out = {}
    for cat in sorted(set(cats)):
        m = np.asarray([c == cat for c in cats])
        d = rc[m] - rr[m]
        out[cat] = {"pairs": int(m.sum()), "accuracy": round(float(np.mean(d > 0)), 4),
                    "mean_margin": round(float(np.mean(d)), 4)}
    return out
