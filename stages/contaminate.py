"""Build the AI-contaminated comparison set (experiment brief, model B): human questions, teacher-written answers."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
from pydantic import Field

from refinery.generation import calls as generation
from refinery.generation import strategies as strat
from refinery.models.backends.base import GenRequest
from refinery.core.errors import RefineryError
from refinery.core.params import StageParams, load_section, params_hash
from refinery.generation.prompts import Template
from refinery.generation.teacher import Job, cache_key
from schemas import synthetic as synthetic_schema
from refinery.generation.calls import (Planned, TeacherDtype, call_seed, load_templates, outcome_metrics,
                                 teacher_backend)

STRATEGIES = ("contaminate_answer", "contaminate_paraphrase")


class ContaminateParams(StageParams):
    """Knobs of the contaminate stage."""

    seed: int
    answer_share: float = Field(ge=0, le=1)  # share of questions answered by the teacher; the rest paraphrase
    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    max_new_tokens: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    threads: int = Field(gt=0)
    dtype: TeacherDtype = "auto"  # weights of an in-process teacher
    max_failure_share: float = Field(ge=0, le=1)


def plan(train: pa.Table, templates: dict[str, Template], params: ContaminateParams,
         teacher_id: str) -> list[Planned]:
    """Give each human train question one teacher call: a teacher answer (``answer_share`` of them, chosen
    by seed) or a teacher paraphrase of the human answer (the rest).

    Raises:
        RefineryError: an empty train split.
    """
    rows = train.to_pylist()
    if not rows:
        raise RefineryError("contaminate: the train split is empty")
    rng = np.random.default_rng(params.seed)
    n_answer = round(params.answer_share * len(rows))
    answered = set(rng.permutation(len(rows))[:n_answer].tolist())
    planned = []
    for i, row in enumerate(rows):
        name = STRATEGIES[0] if i in answered else STRATEGIES[1]
        tpl, s = templates[name], strat.STRATEGIES[name]
        prompt = tpl.render({"question": row["question"], "answer": row["answer"], "evidence": row["evidence"],
                             "passage": row["evidence"], "title": ""})
        request = GenRequest(prompt=prompt, max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                             top_p=params.top_p, stop=s.stop, seed=call_seed(params.seed, row["row_id"], name))
        key = cache_key(teacher_id, tpl.ref, request, 0)
        planned.append(Planned(Job(request, key), name, row, (row["evidence_start"], row["evidence_end"]), 0,
                               tpl.ref))
    return planned


@click.command("contaminate")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="Params file; this stage reads its contaminate section.")
@click.option("--train", "train_file", required=True,
              help="Human train split (split's train.parquet): one row per seed QA pair; the answers and "
                   "questions the teacher rewrites.")
@click.option("--documents", "documents_file", required=True,
              help="Source documents (ingest's documents.parquet): one row per document.")
@click.option("--models", "models_dir", required=True,
              help="Provisioned models folder (provision's --out): the teacher role is read from it.")
@click.option("--prompts", "prompts_dir", required=True,
              help="Folder of prompt templates: reads contaminate_answer.txt and contaminate_paraphrase.txt.")
@click.option("--cache", "cache_file", required=True,
              help="Teacher result cache, one SQLite file (content-addressed, shared with generate, created if "
                   "missing).")
@click.option("--out", "out_file", required=True,
              help="Writes the AI-contaminated comparison rows here (Parquet): one row per teacher sample, with "
                   "its provenance.")
@click.option("--metrics", "metrics_file", required=True,
              help="Writes the outcome counts (rows, parsed, failures) here (JSON).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def cli(params_file, train_file, documents_file, models_dir, prompts_dir, cache_file, out_file, metrics_file,
        quiet) -> None:
    """Build the AI-contaminated comparison set from the human train split."""
    from refinery.core.io import atomic_outputs, read_parquet
    from refinery.core.provenance import code_version
    from schemas import documents as documents_schema
    from schemas import split as split_schema

    params = load_section(params_file, "contaminate", ContaminateParams)
    train = split_schema.CONTRACT.validate(read_parquet(train_file), train_file)
    documents = documents_schema.CONTRACT.validate(read_parquet(documents_file), documents_file)
    templates = load_templates(Path(prompts_dir), list(STRATEGIES))
    teacher_id, backend = teacher_backend(models_dir, params.batch_size, params.threads, params.dtype)
    planned = plan(train, templates, params, teacher_id)
    table, stats, seconds = generation.execute(
        planned, backend, cache_file, documents, batch_size=params.batch_size, origin="contaminated",
        teacher_id=teacher_id, phash=params_hash(params),
        code_version=code_version(sys.modules[__name__]), desc="contaminate", quiet=quiet)
    metrics = {"answer_share": params.answer_share, **outcome_metrics(table)}
    with atomic_outputs() as outputs:
        outputs.parquet(table, out_file, synthetic_schema.ARROW)
        outputs.json(metrics, metrics_file)
    click.echo(f"contaminate: {metrics['rows']} rows ({metrics['parsed']} parsed); {stats.calls} model calls, "
               f"{stats.cache_hits} cached in {seconds:.1f} s -> {out_file}", err=True)
    if metrics["failure_share"] > params.max_failure_share:
        raise RefineryError(f"contaminate: {metrics['failure_share']:.1%} of calls failed or did not parse, over "
                            f"contaminate.max_failure_share={params.max_failure_share:.0%}")
