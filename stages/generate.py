"""Generate synthetic QA rows from the human train split with a teacher, budget-aware, cached and resumable."""

from __future__ import annotations

import functools
import re
import sys
from collections import Counter
from pathlib import Path
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
from refinery.generation.calls import (Planned, TeacherDtype, call_seed, load_templates, outcome_metrics,
                                 teacher_backend)
from refinery.generation.few_shot import ShotPool, sample_shots, shot_values
from refinery.generation.teacher import Job, cache_key
from refinery.core.text import sentence_spans
from refinery.seed.coverage import priority_order
from schemas import synthetic as synthetic_schema


class TokenBudget(StageParams):
    """max_new_tokens per kind of output."""

    answer: int = Field(gt=0)
    question: int = Field(gt=0)
    qa: int = Field(gt=0)


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
    max_failure_share: float = Field(ge=0, le=1)  # exit non-zero when more calls than this fail or don't parse

    @model_validator(mode="after")
    def _check_mix(self) -> GenerateParams:
        if self.strategy_mix is not None:
            unknown = set(self.strategy_mix) - set(strat.GENERATION_STRATEGIES)
            if unknown:
                raise ValueError(f"unknown strategy {sorted(unknown)[0]} (known: "
                                 f"{', '.join(strat.GENERATION_STRATEGIES)})")
            if any(v < 0 for v in self.strategy_mix.values()) or sum(self.strategy_mix.values()) <= 0:
                raise ValueError("strategy_mix shares must be >= 0 with a positive sum")
        return self


def _windows(text: str, size: int) -> list[tuple[int, int]]:
    spans = sentence_spans(text)
    if not spans:
        return [(0, len(text))]
    return [(spans[i][0], spans[min(i + size, len(spans)) - 1][1]) for i in range(0, max(len(spans) - size + 1, 1))]


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
    """Decide every call of round 1: strategies by budget, parents, passages, few-shot examples, seeds.

    With ``evol_rounds`` > 1, round 1 holds its share of the evol calls; :func:`plan_round` plans the others
    from the rows round 1 returns (``metrics['calls_per_round']``).

    ``allocation: plain`` draws each strategy's parents in a seeded random order. ``allocation: coverage`` (needs
    ``cluster_of``, seed row_id -> cluster, from the coverage stage) orders them least-covered first
    (:func:`refinery.seed.coverage.priority_order`: one row of each cluster in turn, smallest cluster first, the
    rarest intent first within one), and a new_question call takes a passage window no seed evidence touches
    whenever its document has one. The budget-ratio strategy mix is the same under both.

    Args:
        train: human train rows (split contract).
        documents: the documents table.
        templates: loaded templates by strategy name.
        params: generate params.
        teacher_id: model id + revision, part of every cache key.

    Returns:
        The planned calls in a deterministic order, and the plan's metrics (ratio, mix, counts).

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
    planned: list[Planned] = []
    shots = ShotPool(rows)  # drawn from once per call
    windows: dict[str, list[tuple[int, int]]] = {}  # per document, computed once
    covered: dict[str, list[tuple[int, int]]] = {}  # per document, the seed's evidence spans
    for r in rows:
        covered.setdefault(r["doc_id"], []).append((r["evidence_start"], r["evidence_end"]))
    used_spans: set[tuple[str, int, int]] = set()  # answer_first sentences already taken
    for name in strat.GENERATION_STRATEGIES:
        n = per_round[0].get(name, 0)
        if not n:
            continue
        s, tpl = strat.STRATEGIES[name], templates[name]
        rng = np.random.default_rng(call_seed(params.seed, name))
        if params.allocation == "coverage":
            order = priority_order(eligible, cluster_of or {}, rng)
        else:
            order = [eligible[i] for i in rng.permutation(len(eligible))]
        for k in range(n):
            parent, sample_index = order[k % len(order)], k // len(order)
            doc = docs[parent["doc_id"]]
            span = (parent["evidence_start"], parent["evidence_end"])
            if s.passage == "window":
                doc_windows = windows.get(doc["doc_id"])
                if doc_windows is None:
                    doc_windows = windows[doc["doc_id"]] = _windows(doc["text"], params.window_sentences)
                fresh = [w for w in doc_windows if w[1] <= span[0] or w[0] >= span[1]] or doc_windows
                if params.allocation == "coverage":
                    seen = covered.get(doc["doc_id"], [])
                    fresh = [w for w in fresh if not any(w[0] < e and b < w[1] for b, e in seen)] or fresh
                span = fresh[int(rng.integers(len(fresh)))]
            elif s.passage == "span":
                span = _answer_span(doc, covered.get(doc["doc_id"], []), used_spans, rng) or span
            shot_rows = sample_shots(shots, parent["doc_id"], params.shots, rng) if tpl.shot else []
            values = {"question": parent["question"], "answer": parent["answer"], "title": doc["title"] or "",
                      "evidence": parent["evidence"], "passage": doc["text"][span[0]:span[1]]}
            prompt = tpl.render(values, shot_values(shot_rows))
            request = GenRequest(prompt=prompt, max_new_tokens=getattr(params.max_new_tokens, s.token_budget),
                                 temperature=params.temperature, top_p=params.top_p, stop=s.stop,
                                 seed=call_seed(params.seed, parent["row_id"], name, sample_index))
            key = cache_key(teacher_id, tpl.ref, request, sample_index)
            planned.append(Planned(Job(request, key), name, parent, span, sample_index, tpl.ref))
    metrics = {"budget": params.budget, "seed_rows": len(rows), "eligible_seed_rows": len(eligible),
               "skipped_stale_rows": len(rows) - len(eligible), "ratio": round(ratio, 4),
               "mix": {k: round(v, 4) for k, v in mix.items()}, "mix_source": "param" if params.strategy_mix else
               "budget_ratio", "calls_planned": dict(sorted(counts.items())), "evol_rounds": params.evol_rounds,
               "calls_per_round": [dict(sorted((k, v) for k, v in c.items() if v)) for c in per_round],
               "allocation": params.allocation}
    if cluster_of is not None:
        per_cluster = Counter(cluster_of.get(p.parent["row_id"], -1) for p in planned)
        metrics["calls_per_seed_cluster"] = {str(k): v for k, v in sorted(per_cluster.items())}
    return planned, metrics


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


def plan_round(previous: pa.Table, counts: dict[str, int], train: pa.Table, templates: dict[str, Template],
               params: GenerateParams, teacher_id: str, round_no: int) -> tuple[list[Planned], int]:
    """Plan Evol-Instruct round ``round_no`` (2, 3, ...): each call rewrites a parsed evol row of the round before.

    The new row keeps its seed row's document and evidence span; its ``parent_ids`` are the seed row (first, as for
    every generated row) and the row it rewrites. When the round before parsed no evol row, the calls start from
    seed rows as in round 1 (counted: the second value returned).

    Returns:
        The planned calls, and how many of them fell back to seed rows.
    """
    rows = [r for r in previous.to_pylist() if r["strategy"] in strat.EVOL_STRATEGIES and r["error"] is None
            and r["parse_error"] is None and r["question"] and r["answer"]]
    seed_rows = {r["row_id"]: r for r in train.to_pylist()}
    shots = ShotPool(list(seed_rows.values()))
    planned: list[Planned] = []
    fallback = 0
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
            fallback += root is None
            lineage = (root,) if root is not None else ()
            span = (parent["evidence_start"], parent["evidence_end"])
            shot_rows = sample_shots(shots, parent["doc_id"], params.shots, rng) if tpl.shot else []
            values = {"question": parent["question"], "answer": parent["answer"], "title": "",
                      "evidence": parent["evidence"], "passage": parent["evidence"]}
            prompt = tpl.render(values, shot_values(shot_rows))
            request = GenRequest(prompt=prompt, max_new_tokens=getattr(params.max_new_tokens, s.token_budget),
                                 temperature=params.temperature, top_p=params.top_p, stop=s.stop,
                                 seed=call_seed(params.seed, parent["row_id"], name, sample_index, "round", round_no))
            key = cache_key(teacher_id, tpl.ref, request, sample_index)
            planned.append(Planned(Job(request, key), name, parent, span, sample_index, tpl.ref, lineage))
    return planned, fallback


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
@click.option("--quiet", is_flag=True, help="No progress bar.")
def cli(params_file, train_file, documents_file, models_dir, prompts_dir, cache_file, out_file, metrics_file,
        coverage_dir, quiet) -> None:
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
    planned, plan_metrics = plan(train, documents, templates, params, teacher_id, cluster_of)
    # engine ray: the teacher batches run on Ray workers (same batches, same cache keys); local: in this process
    with engine_of(params_file) as engine:
        if engine.name == "local":  # one in-process teacher for every round
            backend = functools.cache(backend)
        run = {"batch_size": params.batch_size, "origin": "synthetic", "teacher_id": teacher_id,
               "phash": params_hash(params), "code_version": code_version(sys.modules[__name__]), "quiet": quiet,
               "engine": engine if engine.name != "local" else None}
        table, stats, seconds = generation.execute(planned, backend, cache_file, documents, desc="generate", **run)
        tables, fallbacks = [table], []
        for round_no, counts in enumerate(plan_metrics["calls_per_round"][1:], start=2):
            more, fallback = plan_round(tables[-1], counts, train, templates, params, teacher_id, round_no)
            got, more_stats, more_seconds = generation.execute(more, backend, cache_file, documents,
                                                               desc=f"generate-round{round_no}", **run)
            tables.append(got)
            fallbacks.append(fallback)
            stats, seconds = stats.merged(more_stats), seconds + more_seconds
        table = pa.concat_tables(tables)
    metrics = {**plan_metrics, **outcome_metrics(table)}
    if params.evol_rounds > 1:
        metrics["per_round"] = [{**outcome_metrics(t), "seed_parent_fallbacks": f}
                                for t, f in zip(tables, [0, *fallbacks])]
        for m in metrics["per_round"]:
            m.pop("per_strategy"), m.pop("call_errors_by_reason")
    with atomic_outputs() as outputs:
        outputs.parquet(table, out_file, synthetic_schema.ARROW)
        outputs.json(metrics, metrics_file)
    click.echo(f"generate: {metrics['rows']} rows ({metrics['parsed']} parsed, failure share "
               f"{metrics['failure_share']:.1%}); {stats.calls} model calls, {stats.cache_hits} cached; "
               f"{metrics['completion_tokens']} tokens in {seconds:.1f} s -> {out_file}", err=True)
    if metrics["failure_share"] > params.max_failure_share:
        raise RefineryError(f"generate: {metrics['failure_share']:.1%} of calls failed or did not parse, over "
                            f"generate.max_failure_share={params.max_failure_share:.0%} (rows kept in {out_file} "
                            f"with their reasons)")
