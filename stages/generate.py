"""Generate synthetic QA rows from the human train split with a teacher, budget-aware, cached and resumable."""

from __future__ import annotations

import functools
import itertools
import re
import sys
import time
from collections import Counter
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Literal

import click
import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from refinery.engine.base import engine_of
from refinery.generation import calls as generation
from refinery.generation import strategies as strat
from refinery.models.backends.base import GenRequest
from refinery.core.errors import RefineryError
from refinery.core.params import StageParams, load_section, params_hash
from refinery.generation.prompts import Template
from refinery.generation.calls import (OUTCOME_COLUMNS, Planned, TeacherDtype, call_seed, load_templates,
                                       outcome_metrics, teacher_backend, write_run_log)
from refinery.generation.few_shot import ShotPool, sample_shots, shot_values
from refinery.generation.teacher import GenerationCache, Job, cache_key, run_jobs
from refinery.core.text import sentence_spans
from refinery.seed.coverage import priority_order
from schemas import synthetic as synthetic_schema


class TokenBudget(StageParams):
    """max_new_tokens per kind of output."""

    answer: int = Field(gt=0)
    question: int = Field(gt=0)
    qa: int = Field(gt=0)


class RareExpansion(StageParams):
    """Targeted rare-class expansion (refinery/generation/rare.py)."""

    min_rows: int = Field(ge=0)  # a class with fewer seed train rows is rare (= assemble.arms' rare_intent_min)
    factor: float = Field(ge=0)  # calls per row a rare class lacks (~5x: the gates keep a share)
    tones: list[str] = Field(min_length=1)  # tone variations, one per call in turn
    definitions: dict[str, str] = {}  # intent -> one-sentence definition shown in the prompt
    negatives: int = Field(default=3, ge=0)  # questions of other classes shown as "not this intent"


class GenerateParams(StageParams):
    """Knobs of the generate stage."""

    seed: int
    budget: int = Field(ge=0)  # total teacher calls
    strategy_mix: dict[str, float] | None = None  # overrides the budget-aware mix when set
    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    shots: int = Field(ge=0)  # few-shot seed examples per prompt (for templates with a shot section)
    max_new_tokens: TokenBudget
    batch_size: int = Field(gt=0)
    threads: int = Field(gt=0)
    dtype: TeacherDtype = "auto"  # weights of an in-process teacher
    skip_stale: bool = True  # do not generate from documents superseded by newer ones
    window_sentences: int = Field(gt=0)  # sentences per passage window for new_question
    evol_rounds: int = Field(default=1, ge=1)  # Evol-Instruct rounds: round r rewrites round r-1's parsed evol rows
    allocation: Literal["plain", "coverage"] = "plain"  # coverage: parents least-covered cluster first (coverage stage)
    rare_expansion: RareExpansion | None = None  # extra calls for rare intents, beyond the budget; None: off
    max_failure_share: float = Field(ge=0, le=1)  # exit non-zero when more calls than this fail or don't parse

    @model_validator(mode="after")
    def _check_mix(self) -> GenerateParams:
        if self.strategy_mix is not None:
            unknown = set(self.strategy_mix) - set(strat.MIX_STRATEGIES)
            if unknown:
                raise ValueError(f"unknown strategy {sorted(unknown)[0]} (known: "
                                 f"{', '.join(strat.MIX_STRATEGIES)})")
            if any(v < 0 for v in self.strategy_mix.values()) or sum(self.strategy_mix.values()) <= 0:
                raise ValueError("strategy_mix shares must be >= 0 with a positive sum")
        return self


def _windows(text: str, size: int) -> list[tuple[int, int]]:
    spans = sentence_spans(text)
    if not spans:
        return [(0, len(text))]
    return [(spans[i][0], spans[min(i + size, len(spans)) - 1][1]) for i in range(0, max(len(spans) - size + 1, 1))]


def uncovered_windows(eligible: list[dict[str, Any]], docs: dict[str, dict[str, Any]],
                      covered: dict[str, list[tuple[int, int]]], targeted: dict[str, list[tuple[int, int]]],
                      window_sentences: int, rng: np.random.Generator) -> list[tuple[str, tuple[int, int]]]:
    """Coverage allocation: (doc_id, window) for every passage window of the eligible rows' documents, cut as the
    coverage audit cuts them, that no seed evidence span and no earlier call touches, in a seeded order."""
    from refinery.seed.coverage import overlapping, passage_windows

    out = []
    for d in sorted({r["doc_id"] for r in eligible}):
        taken = covered.get(d, []) + targeted.get(d, [])
        out += [(d, w) for w in passage_windows(docs[d]["text"], window_sentences) if not overlapping(w, taken)]
    return [out[i] for i in rng.permutation(len(out))]


_FACT = re.compile(r"\d|(?<=\S )[A-Z][\w&'-]+")  # a number, or a capitalised word after the first: a name
ANSWER_SPAN_WORDS = (6, 60)  # an answer_first sentence's words, at least and at most


def answer_spans(text: str, covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Return a document's sentences that can be an answer_first answer, those no seed evidence touches first.

    A candidate is a declarative sentence (it ends with '.') of 6-60 words stating a fact: it holds a number or a
    name (a capitalised word after its first), or has 10 words or more (a claim).
    """
    found = []
    for start, end in sentence_spans(text):
        sentence = text[start:end]
        words = len(sentence.split())
        if not (ANSWER_SPAN_WORDS[0] <= words <= ANSWER_SPAN_WORDS[1] and sentence.endswith(".")):
            continue
        if _FACT.search(sentence) or words >= 10:
            found.append((start, end))
    fresh = [s for s in found if not any(s[0] < e and b < s[1] for b, e in covered)]
    return fresh + [s for s in found if s not in fresh]


def round_counts(counts: dict[str, int], rounds: int) -> list[dict[str, int]]:
    """Split each evol strategy's calls over ``rounds`` rounds (earlier rounds take the remainder); round 1 also
    holds every other strategy's calls."""
    out = [dict(counts)] + [{} for _ in range(rounds - 1)]
    for name in strat.EVOL_STRATEGIES:
        n = counts.get(name, 0)
        if rounds > 1 and n:
            share = strat.allocate(n, {f"{r:04d}": 1.0 for r in range(rounds)})
            for r in range(rounds):
                out[r][name] = share[f"{r:04d}"]
    return out


def plan(train: pa.Table, documents: pa.Table, templates: dict[str, Template], params: GenerateParams,
         teacher_id: str, cluster_of: dict[str, int] | None = None) -> tuple[list[Planned], dict[str, Any]]:
    """Return every call of round 1 as a list, and the plan's metrics: :func:`plan_calls`, whole."""
    calls, metrics = plan_calls(train, documents, templates, params, teacher_id, cluster_of)
    return list(calls), metrics


def plan_calls(train: pa.Table, documents: pa.Table, templates: dict[str, Template], params: GenerateParams,
               teacher_id: str, cluster_of: dict[str, int] | None = None) -> tuple[Iterator[Planned], dict[str, Any]]:
    """Decide every call of round 1: strategies by budget, parents, passages, few-shot examples, seeds.

    The calls come from an iterator, each decided when it is read, so a streaming run never holds the plan (each
    call's prompt) whole; the bad inputs fail here, before the first call.

    With ``evol_rounds`` > 1, round 1 holds its share of the evol calls; :func:`plan_round` plans the others
    from the rows round 1 returns (``metrics['calls_per_round']``).

    ``allocation: plain`` draws each strategy's parents in a seeded random order. ``allocation: coverage`` (needs
    ``cluster_of``, seed row_id -> cluster, from the coverage stage) orders them least-covered first
    (:func:`refinery.seed.coverage.priority_order`: one row of each cluster in turn, smallest cluster first, the
    rarest intent first within one); a new_question call goes passage first: each call takes a passage window
    (cut as the coverage audit cuts them) that no seed evidence and no earlier call touches, in a seeded order, with a
    seed row of its document as the parent, until no such window is left; then the parents' order decides again.
    The budget-ratio strategy mix is the same under both.

    Args:
        train: human train rows (split contract).
        documents: the documents table.
        templates: loaded templates by strategy name.
        params: generate params.
        teacher_id: model id + revision, part of every cache key.

    Returns:
        The planned calls in a deterministic order, and the plan's metrics (ratio, mix, counts; the counts of the
        calls decided, ``uncovered_passage_calls`` and ``calls_per_seed_cluster``, once the iterator is exhausted).

    Raises:
        RefineryError: an empty train split, a seed row without its document, a missing template.
    """
    rows = train.to_pylist()
    if not rows:
        raise RefineryError("generate: the train split is empty: nothing to generate from")
    docs = {d["doc_id"]: d for d in documents.to_pylist()}
    for r in rows:
        if r["doc_id"] not in docs:
            raise RefineryError(f"generate: seed row {r['row_id']} (qa_id {r['qa_id']}) has no document "
                                f"'{r['doc_id']}' in the documents table")
    eligible = [r for r in rows if not (params.skip_stale and docs[r["doc_id"]]["stale"])]
    if not eligible:
        raise RefineryError("generate: every train row comes from a stale document (set generate.skip_stale: false)")
    if params.allocation == "coverage" and cluster_of is None:
        raise RefineryError("generate: generate.allocation is coverage but no coverage audit was given (--coverage)")
    ratio, mix = strat.choose_mix(params.budget, len(eligible))
    if params.strategy_mix is not None:
        mix = dict(params.strategy_mix)
    counts = strat.allocate(params.budget, mix)
    missing = [s for s, n in counts.items() if n and s not in templates]
    if missing:
        raise RefineryError(f"generate: no prompt template for strategy {missing[0]}")
    per_round = round_counts(counts, params.evol_rounds)
    shots = ShotPool(rows)  # drawn from once per call
    windows: dict[str, list[tuple[int, int]]] = {}  # per document, computed once
    covered: dict[str, list[tuple[int, int]]] = {}  # per document, the seed's evidence spans
    for r in rows:
        covered.setdefault(r["doc_id"], []).append((r["evidence_start"], r["evidence_end"]))
    used_spans: set[tuple[str, int, int]] = set()  # answer_first sentences already taken
    targeted: dict[str, list[tuple[int, int]]] = {}  # coverage: per document, the windows earlier calls were given
    gap_calls: Counter[str] = Counter()  # coverage: calls given a passage no seed row covers, per strategy

    def round_one() -> Iterator[Planned]:
        for name in strat.MIX_STRATEGIES:
            n = per_round[0].get(name, 0)
            if not n:
                continue
            s, tpl = strat.STRATEGIES[name], templates[name]
            rng = np.random.default_rng(call_seed(params.seed, name))
            if params.allocation == "coverage":
                order = priority_order(eligible, cluster_of or {}, rng)
            else:
                order = [eligible[i] for i in rng.permutation(len(eligible))]
            gaps = (uncovered_windows(eligible, docs, covered, targeted, params.window_sentences, rng)
                    if params.allocation == "coverage" and s.passage == "window" else [])
            of_doc: dict[str, list[dict]] = {}
            for r in order:
                of_doc.setdefault(r["doc_id"], []).append(r)
            uses: Counter[str] = Counter()
            for k in range(n):
                gap = gaps[k] if k < len(gaps) else None  # coverage: passage first, then a seed row of its document
                if gap is not None:
                    mates = of_doc[gap[0]]
                    parent = mates[uses[gap[0]] % len(mates)]
                    sample_index = uses[gap[0]] // len(mates)
                    uses[gap[0]] += 1
                else:
                    parent, sample_index = order[k % len(order)], k // len(order)
                doc = docs[parent["doc_id"]]
                span = (parent["evidence_start"], parent["evidence_end"])
                if gap is not None:
                    span = gap[1]
                    targeted.setdefault(doc["doc_id"], []).append(span)
                    gap_calls[name] += 1
                elif s.passage == "window":
                    doc_windows = windows.get(doc["doc_id"])
                    if doc_windows is None:
                        doc_windows = windows[doc["doc_id"]] = _windows(doc["text"], params.window_sentences)
                    fresh = [w for w in doc_windows if w[1] <= span[0] or w[0] >= span[1]] or doc_windows
                    if params.allocation == "coverage":  # passages no seed row covers, and of them those no earlier
                        # call was given. Reusing the name gaps is safe: this branch runs only once k is past the end
                        # of the passage-first list, which holds every document's gaps, so never fewer than these
                        seen = covered.get(doc["doc_id"], [])
                        gaps = [w for w in fresh if not any(w[0] < e and b < w[1] for b, e in seen)]
                        untaken = [w for w in gaps if w not in targeted.get(doc["doc_id"], [])]
                        fresh = untaken or gaps or fresh
                    span = fresh[int(rng.integers(len(fresh)))]
                    if params.allocation == "coverage":
                        targeted.setdefault(doc["doc_id"], []).append(span)
                elif s.passage == "span":
                    span = _answer_span(doc, covered.get(doc["doc_id"], []), used_spans, rng) or span
                shot_rows = sample_shots(shots, parent["doc_id"], params.shots, rng) if tpl.shot else []
                values = {"question": parent["question"], "answer": parent["answer"], "title": doc["title"] or "",
                          "evidence": parent["evidence"], "passage": doc["text"][span[0]:span[1]]}
                prompt = tpl.render(values, shot_values(shot_rows))
                request = GenRequest(prompt=prompt, max_new_tokens=getattr(params.max_new_tokens, s.token_budget),
                                     temperature=params.temperature, top_p=params.top_p, stop=s.stop, require=s.require,
                                     seed=call_seed(params.seed, parent["row_id"], name, sample_index))
                key = cache_key(teacher_id, tpl.ref, request, sample_index)
                yield Planned(Job(request, key), name, parent, span, sample_index, tpl.ref)

    metrics = {"budget": params.budget, "seed_rows": len(rows), "eligible_seed_rows": len(eligible),
               "uncovered_passage_calls": {},
               "skipped_stale_rows": len(rows) - len(eligible), "ratio": round(ratio, 4),
               "mix": {k: round(v, 4) for k, v in mix.items()}, "mix_source": "param" if params.strategy_mix else
               "budget_ratio", "calls_planned": dict(sorted(counts.items())), "evol_rounds": params.evol_rounds,
               "calls_per_round": [dict(sorted((k, v) for k, v in c.items() if v)) for c in per_round],
               "allocation": params.allocation}
    rare, metrics["rare_expansion"] = plan_rare(eligible, docs, templates, params, teacher_id)

    def calls() -> Iterator[Planned]:
        per_cluster: Counter[int] = Counter()
        for p in itertools.chain(round_one(), rare):
            if cluster_of is not None:
                per_cluster[cluster_of.get(p.parent["row_id"], -1)] += 1
            yield p
        metrics["uncovered_passage_calls"] = dict(sorted(gap_calls.items()))
        if cluster_of is not None:
            metrics["calls_per_seed_cluster"] = {str(k): v for k, v in sorted(per_cluster.items())}

    return calls(), metrics


def _answer_span(doc: dict[str, Any], covered: list[tuple[int, int]], used: set[tuple[str, int, int]],
                 rng: np.random.Generator) -> tuple[int, int] | None:
    """Draw an answer_first sentence of ``doc``: one no seed evidence touches and not yet taken, if any is left."""
    spans = answer_spans(doc["text"], covered)
    if not spans:
        return None
    fresh = [sp for sp in spans if (doc["doc_id"], *sp) not in used and not any(sp[0] < e and b < sp[1]
                                                                                 for b, e in covered)]
    pool = fresh or [sp for sp in spans if (doc["doc_id"], *sp) not in used] or spans
    span = pool[int(rng.integers(len(pool)))]
    used.add((doc["doc_id"], *span))
    return span


def _around(text: str, span: tuple[int, int]) -> tuple[int, int]:
    """The sentences overlapping ``span`` with one more sentence before and after (within the document)."""
    spans = sentence_spans(text)
    hit = [i for i, (s, e) in enumerate(spans) if s < span[1] and span[0] < e]
    if not hit:
        return span
    lo, hi = max(hit[0] - 1, 0), min(hit[-1] + 1, len(spans) - 1)
    return min(spans[lo][0], span[0]), max(spans[hi][1], span[1])


def plan_rare(eligible: list[dict[str, Any]], docs: dict[str, dict[str, Any]], templates: dict[str, Template],
              params: GenerateParams, teacher_id: str) -> tuple[Iterator[Planned], dict[str, Any] | None]:
    """Plan the rare-class expansion: ``factor`` x the rows each rare class lacks, with the rare_intent prompt.

    Each call takes a seed row of the class as parent (cycled in a seeded order); the passage is its evidence with
    a sentence either side; the examples are other rows of the class (``shots``), the negatives questions of other
    classes, the tone the next of ``tones``. Returns the calls (an iterator: each decided when it is read) and their
    metrics (None when off).
    """
    from refinery.generation.rare import class_of, rare_classes

    rx = params.rare_expansion
    if rx is None:
        return iter(()), None
    classes = rare_classes(eligible, rx.min_rows, rx.factor)
    if any(info["calls"] for info in classes.values()) and "rare_intent" not in templates:
        raise RefineryError("generate: no prompt template for strategy rare_intent")
    use_intent = any(r.get("intent") for r in eligible)
    s = strat.STRATEGIES["rare_intent"]

    def calls() -> Iterator[Planned]:
        for c, info in classes.items():
            tpl = templates["rare_intent"]
            members = [r for r in eligible if class_of(r, use_intent) == c]
            others = [r for r in eligible if class_of(r, use_intent) != c]
            rng = np.random.default_rng(call_seed(params.seed, "rare_intent", c))
            order = [members[i] for i in rng.permutation(len(members))]
            for k in range(info["calls"]):
                parent, sample_index = order[k % len(order)], k // len(order)
                doc = docs[parent["doc_id"]]
                span = _around(doc["text"], (parent["evidence_start"], parent["evidence_end"]))
                pool = [m for m in members if m["row_id"] != parent["row_id"]]
                shots = [pool[i] for i in rng.permutation(len(pool))[:params.shots]]
                negatives = [others[i]["question"] for i in rng.permutation(len(others))[:rx.negatives]]
                values = {"question": parent["question"], "answer": parent["answer"], "title": doc["title"] or "",
                          "evidence": parent["evidence"], "passage": doc["text"][span[0]:span[1]], "intent": c,
                          "definition": rx.definitions.get(c, ""), "tone": rx.tones[k % len(rx.tones)],
                          "negatives": "\n".join(f"- {q}" for q in negatives) or "(none)"}
                prompt = tpl.render(values, shot_values(shots))
                request = GenRequest(prompt=prompt, max_new_tokens=getattr(params.max_new_tokens, s.token_budget),
                                     temperature=params.temperature, top_p=params.top_p, stop=s.stop, require=s.require,
                                     seed=call_seed(params.seed, parent["row_id"], "rare_intent", sample_index, k))
                key = cache_key(teacher_id, tpl.ref, request, sample_index)
                yield Planned(Job(request, key), "rare_intent", parent, span, sample_index, tpl.ref)

    return calls(), {"min_rows": rx.min_rows, "factor": rx.factor, "class_source": "intent" if use_intent
                     else "question_wh_word", "classes": classes,
                     "calls": sum(info["calls"] for info in classes.values())}


# what a rewrite reads of the row it rewrites, and what the generated row keeps of it (calls.to_rows)
_REWRITE_FIELDS = ("row_id", "parent_ids", "doc_id", "evidence_start", "evidence_end", "evidence", "question",
                   "answer", "intent")


def _evol_parsed(table: pa.Table) -> pa.Table:
    """Return the parsed evol rows of a round (non-empty question and answer), in table order, with the fields a
    rewrite reads and those this filter reads."""
    import pyarrow.compute as pc

    def filled(column: str) -> pa.ChunkedArray:
        return pc.fill_null(pc.greater(pc.utf8_length(table.column(column)), 0), False)

    keep = pc.and_(pc.and_(pc.is_in(table.column("strategy"), value_set=pa.array(strat.EVOL_STRATEGIES)),
                           pc.and_(pc.is_null(table.column("error")), pc.is_null(table.column("parse_error")))),
                   pc.and_(filled("question"), filled("answer")))
    return table.filter(keep).select(list(_REWRITE_FIELDS) + ["strategy", "error", "parse_error"])


def _rewritable(table: pa.Table) -> list[dict[str, Any]]:
    """Return the parsed evol rows of a round (non-empty question and answer), in table order, as dicts of the
    fields a rewrite reads: filtered and selected in Arrow first, so no other row or field becomes Python objects."""
    return _evol_parsed(table).select(list(_REWRITE_FIELDS)).to_pylist()


class StreamedRows:
    """Where generate's rows go as each block of calls is answered, so that no round is ever one table in memory.

    A block's rows are written to the output in plan order, except the critique_revise drafts when their chains
    are to run (``hold_drafts``): those are held back (one strategy's share of the rows) and their outcomes
    written after every round, where the unstreamed stage put them. Kept beside the file: the columns the metrics
    count (per round and for the output), each round's parsed evol rows (what the next round rewrites) and the
    row_ids written, to check their uniqueness across blocks.
    """

    def __init__(self, write: Any, hold_drafts: bool):
        self._write, self._hold = write, hold_drafts
        self._row_ids: set[str] = set()
        self._written = 0
        self.rounds: list[list[pa.Table]] = []  # per round, the metrics' columns of every row it produced
        self.evol: list[pa.Table] = []  # the round being run: its parsed evol rows
        self.drafts: list[pa.Table] = []  # critique_revise drafts held back
        self.output: list[pa.Table] = []  # the metrics' columns of the rows written, in order

    def new_round(self) -> None:
        """Start taking the rows of the next round."""
        self.rounds.append([])
        self.evol = []

    def __call__(self, table: pa.Table) -> None:
        """Take one block of a round's rows."""
        import pyarrow.compute as pc

        self.rounds[-1].append(table.select(list(OUTCOME_COLUMNS)))
        evol = _evol_parsed(table)
        if evol.num_rows:
            self.evol.append(evol)
        if self._hold:
            is_draft = pc.equal(table.column("strategy"), "critique_revise")
            drafts = table.filter(is_draft)
            if drafts.num_rows:
                self.drafts.append(drafts)
                table = table.filter(pc.invert(is_draft))
        self.write(table)

    def write(self, table: pa.Table) -> None:
        """Write rows to the output, after checking that no row_id was written before."""
        for i, row_id in enumerate(table.column("row_id").to_pylist()):
            if row_id in self._row_ids:
                raise RefineryError(f"generate: output row {self._written + i + 1}: row_id {row_id} is not unique "
                                    f"(two calls with the same cache key)")
            self._row_ids.add(row_id)
        self._written += table.num_rows
        self.output.append(table.select(list(OUTCOME_COLUMNS)))
        self._write(table)

    @staticmethod
    def joined(tables: list[pa.Table], columns: tuple[str, ...] | None = None) -> pa.Table:
        """Return ``tables`` as one table (empty, with the synthetic schema's columns, when there is none)."""
        if tables:
            return pa.concat_tables(tables)
        names = list(columns or synthetic_schema.ARROW.names)
        return pa.schema([synthetic_schema.ARROW.field(n) for n in names]).empty_table()


def plan_round(previous: pa.Table, counts: dict[str, int], train: pa.Table, templates: dict[str, Template],
               params: GenerateParams, teacher_id: str, round_no: int) -> tuple[Iterator[Planned], int]:
    """Plan Evol-Instruct round ``round_no`` (2, 3, ...): each call rewrites a parsed evol row of the round before.

    The new row keeps its seed row's document and evidence span; its ``parent_ids`` are the seed row (first, as for
    every generated row) and the row it rewrites. When the round before parsed no evol row, the calls start from
    seed rows as in round 1 (counted: the second value returned).

    Returns:
        The planned calls (an iterator: each decided when it is read), and how many of them fell back to seed rows.
    """
    rows = _rewritable(previous)
    seed_rows = {r["row_id"]: r for r in train.to_pylist()}
    shots = ShotPool(list(seed_rows.values()))
    fallback = 0 if rows else sum(counts.get(name, 0) for name in strat.EVOL_STRATEGIES)

    def calls() -> Iterator[Planned]:
        for name in strat.EVOL_STRATEGIES:
            n = counts.get(name, 0)
            if not n:
                continue
            s, tpl = strat.STRATEGIES[name], templates[name]
            rng = np.random.default_rng(call_seed(params.seed, name, "round", round_no))
            pool = rows or [r for r in seed_rows.values()]
            order = [pool[i] for i in rng.permutation(len(pool))]
            for k in range(n):
                parent, sample_index = order[k % len(order)], k // len(order)
                root = parent["parent_ids"][0] if rows else None
                lineage = (root,) if root is not None else ()
                span = (parent["evidence_start"], parent["evidence_end"])
                shot_rows = sample_shots(shots, parent["doc_id"], params.shots, rng) if tpl.shot else []
                values = {"question": parent["question"], "answer": parent["answer"], "title": "",
                          "evidence": parent["evidence"], "passage": parent["evidence"]}
                prompt = tpl.render(values, shot_values(shot_rows))
                request = GenRequest(prompt=prompt, max_new_tokens=getattr(params.max_new_tokens, s.token_budget),
                                     temperature=params.temperature, top_p=params.top_p, stop=s.stop, require=s.require,
                                     seed=call_seed(params.seed, parent["row_id"], name, sample_index, "round",
                                                    round_no))
                key = cache_key(teacher_id, tpl.ref, request, sample_index)
                yield Planned(Job(request, key), name, parent, span, sample_index, tpl.ref, lineage)

    return calls(), fallback


def critique_revise(table: pa.Table, train: pa.Table, templates: dict[str, Template], critic: Template,
                    reviser: Template, constitution: Any, params: GenerateParams, teacher_id: str,
                    run_calls: Any, execute: Any) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """Critique each critique_revise draft against the constitution, revise those that break a rule.

    Args:
        table: every generated row; the critique_revise rows are the drafts.
        train: the seed rows (the drafts' parents).
        templates, critic, reviser, constitution: the templates and the loaded constitution.
        params, teacher_id: as for generation (sampling, cache keys).
        run_calls: jobs -> results through the teacher cache (the critique calls).
        execute: planned calls -> synthetic rows through the teacher cache (the revisions).

    Returns:
        The rows with each draft replaced by its outcome (a revision; the draft when no rule is broken; the draft
        failing closed with ``critique_unparseable`` / ``critique_failed``), the chains table, and metrics.
    """
    from refinery.generation.critique import CHAINS, parse_critique

    is_cr = np.asarray([s == "critique_revise" for s in table.column("strategy").to_pylist()], bool)
    drafts = table.filter(pa.array(is_cr)).to_pylist()
    if not drafts:
        return table, CHAINS.empty_table(), {"chains": 0}
    seeds = {r["row_id"]: r for r in train.to_pylist()}
    ok = [d for d in drafts if d["error"] is None and d["parse_error"] is None and d["answer"]]
    jobs = []
    for d in ok:
        prompt = critic.render({"constitution": constitution.text, "passage": d["evidence"],
                                "question": d["question"], "answer": d["answer"]})
        request = GenRequest(prompt=prompt, max_new_tokens=8, temperature=0.0, top_p=1.0, stop=("\n",),
                             seed=call_seed(params.seed, d["row_id"], "critique"))
        jobs.append(Job(request, cache_key(teacher_id, critic.ref, request, 0)))
    critiques = dict(zip((d["row_id"] for d in ok), run_calls(jobs, "generate-critique")))
    verdicts = {k: (parse_critique(r.text, len(constitution.rules)) if r.ok else None) for k, r in critiques.items()}
    revise = []
    s = strat.STRATEGIES["critique_revise"]
    for d in ok:
        rule = verdicts[d["row_id"]]
        if rule:
            prompt = reviser.render({"rule": constitution.rule(rule), "passage": d["evidence"],
                                     "question": d["question"], "answer": d["answer"]})
            request = GenRequest(prompt=prompt, max_new_tokens=params.max_new_tokens.answer,
                                 temperature=params.temperature, top_p=params.top_p, stop=s.stop, require=s.require,
                                 seed=call_seed(params.seed, d["row_id"], "revise"))
            parent = seeds[d["parent_ids"][0]]
            revise.append(Planned(Job(request, cache_key(teacher_id, reviser.ref, request, d["sample_index"])),
                                  "critique_revise", parent, (d["evidence_start"], d["evidence_end"]),
                                  d["sample_index"], reviser.ref))
    revised = execute(revise, "generate-revise").to_pylist() if revise else []
    by_draft = dict(zip((p.job.key for p in revise), revised))
    revise_key = {d["row_id"]: p.job.key for d, p in zip([d for d in ok if verdicts[d["row_id"]]], revise)}
    final, chains = [], []
    for d in drafts:
        rule = verdicts.get(d["row_id"])
        critique = critiques.get(d["row_id"])
        row, revision = d, None
        if d["row_id"] not in critiques:
            outcome = "draft_unparsed"
        elif not critique.ok:
            outcome, row = "critique_failed", {**d, "parse_error": "critique_failed"}
        elif rule is None:
            outcome, row = "critique_unparseable", {**d, "parse_error": "critique_unparseable"}
        elif rule == 0:
            outcome = "no_rule_broken"
        else:
            row = by_draft[revise_key[d["row_id"]]]
            revision = row["answer"]
            outcome = "revised" if row["error"] is None and row["parse_error"] is None else "revise_failed"
        final.append(row)
        chains.append({"row_id": row["row_id"], "draft_row_id": d["row_id"], "parent_id": d["parent_ids"][0],
                       "draft": d["answer"], "critique": critique.text if critique is not None else None,
                       "rule": rule, "rule_text": constitution.rule(rule) if rule else None, "revision": revision,
                       "outcome": outcome, "constitution": constitution.ref, "critique_template": critic.ref,
                       "revise_template": reviser.ref})
    out = pa.concat_tables([table.filter(pa.array(~is_cr)),
                            pa.Table.from_pylist(final, schema=table.schema)])
    outcomes = Counter(c["outcome"] for c in chains)
    metrics = {"chains": len(chains), "constitution": constitution.ref, "outcomes": dict(sorted(outcomes.items())),
               "rules_named": {str(k): v for k, v in sorted(Counter(c["rule"] for c in chains
                                                                    if c["rule"] is not None).items())},
               "teacher_calls": {"draft": len(drafts), "critique": len(jobs), "revise": len(revise)}}
    return out, pa.Table.from_pylist(chains, schema=CHAINS), metrics


@click.command("generate")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="Params file; this stage reads its generate and engine sections.")
@click.option("--train", "train_file", required=True,
              help="Human train split (split's train.parquet): one row per seed QA pair; the examples and "
                   "passages the teacher starts from.")
@click.option("--documents", "documents_file", required=True,
              help="Source documents (ingest's documents.parquet): one row per document; the passages rows are "
                   "grounded in.")
@click.option("--models", "models_dir", required=True,
              help="Provisioned models folder (provision's --out): the teacher role is read from it.")
@click.option("--prompts", "prompts_dir", required=True,
              help="Folder of prompt templates: one <strategy>.txt per generation strategy.")
@click.option("--cache", "cache_file", required=True,
              help="Teacher result cache, one SQLite file (content-addressed, kept across runs, created if "
                   "missing).")
@click.option("--out", "out_file", required=True,
              help="Writes the generated rows here (Parquet): one row per teacher sample, parsed or not, with its "
                   "provenance.")
@click.option("--metrics", "metrics_file", required=True,
              help="Writes the generation plan and its outcome counts (rows, parsed, failures, tokens) here "
                   "(JSON).")
@click.option("--coverage", "coverage_dir", default=None,
              help="The coverage stage's folder (rows.parquet: each seed row's cluster); read when "
                   "generate.allocation is coverage.")
@click.option("--critiques", "critiques_file", default=None,
              help="Writes the critique_revise chains here (Parquet): one row per draft, its critique, the rule it "
                   "names and the revision. Needed when the mix holds critique_revise calls.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def cli(params_file, train_file, documents_file, models_dir, prompts_dir, cache_file, out_file, metrics_file,
        coverage_dir, critiques_file, quiet) -> None:
    """Generate synthetic QA rows from the human train split with the teacher."""
    from refinery.core.io import atomic_outputs, read_parquet
    from refinery.core.provenance import code_version
    from schemas import documents as documents_schema
    from schemas import split as split_schema

    params = load_section(params_file, "generate", GenerateParams)
    train = split_schema.CONTRACT.validate(read_parquet(train_file), train_file)
    documents = documents_schema.CONTRACT.validate(read_parquet(documents_file), documents_file)
    templates = load_templates(Path(prompts_dir), list(strat.GENERATION_STRATEGIES))
    # an absolute models path: a Ray worker builds the same teacher from wherever it runs
    teacher_id, backend = teacher_backend(str(Path(models_dir).resolve()), params.batch_size, params.threads,
                                          params.dtype)
    cluster_of = None
    if params.allocation == "coverage":
        from schemas import coverage as coverage_schema

        if coverage_dir is None:
            raise RefineryError("generate: generate.allocation is coverage: pass the coverage stage's folder "
                                "(--coverage data/02_coverage)")
        rows_file = str(Path(coverage_dir) / "rows.parquet")
        audit_rows = coverage_schema.ROWS.validate(read_parquet(rows_file), rows_file)
        cluster_of = dict(zip(audit_rows.column("row_id").to_pylist(), audit_rows.column("cluster").to_pylist()))
    planned, plan_metrics = plan_calls(train, documents, templates, params, teacher_id, cluster_of)
    chains_needed = plan_metrics["calls_planned"].get("critique_revise", 0) > 0
    if chains_needed:
        from refinery.generation.critique import load_constitution
        from refinery.generation.prompts import load_template

        if critiques_file is None:
            raise RefineryError("generate: the strategy mix holds critique_revise calls: pass --critiques FILE "
                                "(where each draft, critique and revision is kept)")
        critic, reviser = load_template(Path(prompts_dir) / "critique.txt"), load_template(Path(prompts_dir) /
                                                                                         "revise.txt")
        constitution = load_constitution(Path(prompts_dir) / "constitution.txt")
    # engine ray: the teacher batches run on Ray workers (same batches, same cache keys); local: in this process.
    # The rows stream to the output file block by block (StreamedRows); it is put in place only on success.
    with engine_of(params_file) as engine, atomic_outputs() as outputs, \
            outputs.parquet_stream(out_file, synthetic_schema.ARROW) as write:
        if engine.name == "local":  # one in-process teacher for every round
            backend = functools.cache(backend)
        rows = StreamedRows(write, hold_drafts=chains_needed)
        run = {"batch_size": params.batch_size, "origin": "synthetic", "teacher_id": teacher_id,
               "phash": params_hash(params), "code_version": code_version(sys.modules[__name__]), "quiet": quiet,
               "engine": engine if engine.name != "local" else None}
        t0 = time.perf_counter()
        rows.new_round()
        rare = (plan_metrics["rare_expansion"] or {}).get("calls", 0)
        _, stats, seconds = generation.execute(planned, backend, cache_file, documents, desc="generate", write=rows,
                                               total=sum(plan_metrics["calls_per_round"][0].values()) + rare, **run)
        fallbacks = []
        for round_no, counts in enumerate(plan_metrics["calls_per_round"][1:], start=2):
            previous = rows.joined(rows.evol)
            rows.new_round()
            more, fallback = plan_round(previous, counts, train, templates, params, teacher_id, round_no)
            del previous  # plan_round keeps the fields a rewrite reads
            _, more_stats, more_seconds = generation.execute(more, backend, cache_file, documents, write=rows,
                                                             desc=f"generate-round{round_no}",
                                                             total=sum(counts.values()), **run)
            del more
            fallbacks.append(fallback)
            stats, seconds = stats.merged(more_stats), seconds + more_seconds
        chains, cr_metrics = None, None
        if chains_needed:
            def run_calls(jobs: list[Job], desc: str) -> list:
                nonlocal stats
                cache = GenerationCache(cache_file)
                try:
                    results, more = run_jobs(jobs, backend, cache, batch_size=params.batch_size, desc=desc,
                                             quiet=quiet, engine=run["engine"])
                finally:
                    cache.close()
                stats = stats.merged(more)
                return results

            def execute_rows(more: list[Planned], desc: str) -> pa.Table:
                nonlocal stats
                got, more_stats, _ = generation.execute(more, backend, cache_file, documents, desc=desc, **run)
                stats = stats.merged(more_stats)
                return got

            drafts = rows.joined(rows.drafts)
            rows.drafts = []
            outcomes, chains, cr_metrics = critique_revise(drafts, train, templates, critic, reviser, constitution,
                                                           params, teacher_id, run_calls, execute_rows)
            del drafts
            rows.write(outcomes)
        if fallbacks or chains_needed:  # the stage's run log covers every pass (each pass also logs its own)
            seconds = time.perf_counter() - t0
            write_run_log(Path(cache_file).parent / "runs" / "generate.json",
                          {"stage": "generate", "teacher": teacher_id, "seconds": round(seconds, 2),
                           "passes": 1 + len(fallbacks) + 2 * chains_needed, **stats.summary()})
        metrics = {**plan_metrics, **outcome_metrics(rows.joined(rows.output, OUTCOME_COLUMNS)),
                   "critique_revise": cr_metrics}
        if params.evol_rounds > 1:
            metrics["per_round"] = [{**outcome_metrics(rows.joined(t, OUTCOME_COLUMNS)), "seed_parent_fallbacks": f}
                                    for t, f in zip(rows.rounds, [0, *fallbacks])]
            for m in metrics["per_round"]:
                m.pop("per_strategy"), m.pop("call_errors_by_reason")
        if critiques_file is not None:
            from refinery.generation.critique import CHAINS

            outputs.parquet(chains if chains is not None else CHAINS.empty_table(), critiques_file, CHAINS)
        outputs.json(metrics, metrics_file)
    click.echo(f"generate: {metrics['rows']} rows ({metrics['parsed']} parsed, failure share "
               f"{metrics['failure_share']:.1%}); {stats.calls} model calls, {stats.cache_hits} cached; "
               f"{metrics['completion_tokens']} tokens in {seconds:.1f} s -> {out_file}", err=True)
    if metrics["failure_share"] > params.max_failure_share:
        raise RefineryError(f"generate: {metrics['failure_share']:.1%} of calls failed or did not parse, over "
                            f"generate.max_failure_share={params.max_failure_share:.0%} (rows kept in {out_file} "
                            f"with their reasons)")
