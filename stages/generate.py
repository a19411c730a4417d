"""Generate synthetic QA rows from the human train split with a teacher, budget-aware, cached and resumable."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

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


def plan(train: pa.Table, documents: pa.Table, templates: dict[str, Template], params: GenerateParams,
         teacher_id: str) -> tuple[list[Planned], dict[str, Any]]:
    """Decide every teacher call: strategies by budget, parents, passages, few-shot examples, seeds.

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
    ratio, mix = strat.choose_mix(params.budget, len(eligible))
    if params.strategy_mix is not None:
        mix = dict(params.strategy_mix)
    counts = strat.allocate(params.budget, mix)
    missing = [s for s, n in counts.items() if n and s not in templates]
    if missing:
        raise RefineryError(f"generate: no prompt template for strategy {missing[0]}")
    planned: list[Planned] = []
    shots = ShotPool(rows)  # drawn from once per call
    windows: dict[str, list[tuple[int, int]]] = {}  # per document, computed once
    for name in strat.GENERATION_STRATEGIES:
        n = counts.get(name, 0)
        if not n:
            continue
        s, tpl = strat.STRATEGIES[name], templates[name]
        rng = np.random.default_rng(call_seed(params.seed, name))
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
                span = fresh[int(rng.integers(len(fresh)))]
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
               "budget_ratio", "calls_planned": dict(sorted(counts.items()))}
    return planned, metrics


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
@click.option("--quiet", is_flag=True, help="No progress bar.")
def cli(params_file, train_file, documents_file, models_dir, prompts_dir, cache_file, out_file, metrics_file,
        quiet) -> None:
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
    planned, plan_metrics = plan(train, documents, templates, params, teacher_id)
    # engine ray: the teacher batches run on Ray workers (same batches, same cache keys); local: in this process
    with engine_of(params_file) as engine:
        table, stats, seconds = generation.execute(
            planned, backend, cache_file, documents, batch_size=params.batch_size, origin="synthetic",
            teacher_id=teacher_id, phash=params_hash(params),
            code_version=code_version(sys.modules[__name__]), desc="generate", quiet=quiet,
            engine=engine if engine.name != "local" else None)
    metrics = {**plan_metrics, **outcome_metrics(table)}
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
