"""Ingest seed documents and human QA pairs into Parquet with stable ids and evidence spans."""

from __future__ import annotations

import dataclasses
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import click
import pyarrow as pa
from pydantic import Field

from refinery.seed import adapters
from refinery.seed.adapters import RawDoc, RawExcluded, RawQA, SeedSource
from refinery.core.errors import InputError
from refinery.core.params import StageParams, load_section, params_hash
from refinery.core.text import find_spans, match_key, normalize_line, normalize_passage, sha256_hex, stable_id
from schemas import documents as documents_schema
from schemas import seed_excluded as excluded_schema
from schemas import seed_qa as qa_schema

_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}([T ][0-9:.+\-Z]*)?$")


class IngestParams(StageParams):
    """Knobs of the ingest stage."""

    input: str  # seed path; dvc.yaml passes it to the command as --input (the command reads the flag)
    format: Literal["refinery", "qa_table", "cosmosqa", "squad", "hf"]
    max_field_chars: int = Field(gt=0)
    hf_split: str = "train"
    # format hf: the dataset id (or a local dataset folder) read with datasets.load_dataset, and the revision (a
    # commit or tag) to pin it to. The DAG's dependency for hf is this params value (`params: ingest`), not a path.
    hf_dataset: str | None = None
    hf_revision: str | None = None
    cosmosqa_drop_none_of_the_above: bool = True
    unknown_columns: Literal["error", "ignore"] = "error"


@dataclass(frozen=True)
class IngestResult:
    """The ingest stage's outputs: documents, QA rows, excluded rows and the counts metrics."""

    documents: pa.Table
    qa: pa.Table
    excluded: pa.Table
    metrics: dict[str, Any]


def _check_lengths(record: RawDoc | RawQA, limit: int) -> None:
    for f in dataclasses.fields(record):
        val = getattr(record, f.name)
        if isinstance(val, str) and f.name != "file" and len(val) > limit:
            raise InputError(record.file, f"{len(val):,} characters, over the limit of {limit:,} "
                                          f"(ingest.max_field_chars)", row=record.row, field=record.column(f.name))


def ingest(source: SeedSource, params: IngestParams, code_version: str) -> IngestResult:
    """Normalise, check and identify seed rows.

    Args:
        source: raw records from an adapter (with their file and row).
        params: the ingest params.
        code_version: stamped on every row.

    Returns:
        Tables that satisfy the documents, seed_qa and seed_excluded contracts, and counts.

    Raises:
        InputError: the first bad record, naming file, row and field.
    """
    phash = params_hash(params)
    where = source.path or params.input  # the input as the command was given it
    if not source.documents:
        raise InputError(where, "no documents")
    docs: dict[str, dict[str, Any]] = {}
    for d in source.documents:
        _check_lengths(d, params.max_field_chars)
        if d.doc_id in docs:
            first = docs[d.doc_id]
            raise InputError(d.file, f"duplicate id '{d.doc_id}' (first at row {first['source_row']})",
                             row=d.row, field=d.column("doc_id"))
        if d.updated_at is not None and not _ISO_DATE.match(d.updated_at.strip()):
            raise InputError(d.file, f"'{d.updated_at}' is not an ISO date (YYYY-MM-DD)", row=d.row,
                             field=d.column("updated_at"))
        text = normalize_passage(d.text)
        docs[d.doc_id] = {
            "doc_id": d.doc_id, "title": normalize_line(d.title) if d.title else None, "text": text,
            "updated_at": d.updated_at.strip() if d.updated_at else None,
            "category": normalize_line(d.category) if d.category else None,
            "supersedes": d.supersedes.strip() if d.supersedes else None, "superseded_by": None,
            "stale": False, "content_hash": sha256_hex(text)[:16], "source_file": d.file, "source_row": d.row,
            "params_hash": phash, "code_version": code_version,
        }
    for d in source.documents:
        old = docs[d.doc_id]["supersedes"]
        if old is None:
            continue
        if old == d.doc_id or old not in docs:
            why = "a document cannot supersede itself" if old == d.doc_id else f"no document with doc_id '{old}'"
            raise InputError(d.file, why, row=d.row, field=d.column("supersedes"))
        docs[old]["superseded_by"] = d.doc_id
        docs[old]["stale"] = True

    rows: list[dict[str, Any]] = []
    excluded: list[RawExcluded] = list(source.excluded)
    seen_ids: dict[str, int] = {}
    seen_content: dict[tuple[str, str, str], RawQA] = {}
    for q in source.qa:
        _check_lengths(q, params.max_field_chars)
        if q.qa_id in seen_ids:
            raise InputError(q.file, f"duplicate id '{q.qa_id}' (first at row {seen_ids[q.qa_id]})", row=q.row,
                             field=q.column("qa_id"))
        seen_ids[q.qa_id] = q.row
        doc = docs.get(q.doc_id)
        if doc is None:
            raise InputError(q.file, f"no document with doc_id '{q.doc_id}'", row=q.row, field=q.column("doc_id"))
        question, answer = normalize_line(q.question), normalize_line(q.answer)
        key = (q.doc_id, match_key(question), match_key(answer))
        if key in seen_content:
            first = seen_content[key]
            excluded.append(RawExcluded(q.file, q.row, "ingest_duplicate_content",
                                        f"same document, question and answer as row {first.row} ({first.qa_id})",
                                        q.qa_id, q.doc_id, question, answer))
            continue
        seen_content[key] = q
        if q.evidence is None:
            span = (0, len(doc["text"]))
        else:
            spans = find_spans(doc["text"], normalize_line(q.evidence))
            if not spans:
                raise InputError(q.file, f"not found verbatim in the text of document '{q.doc_id}'", row=q.row,
                                 field=q.column("evidence"))
            if (len(spans) > 1 and q.evidence_occurrence is None) or \
                    (q.evidence_occurrence is not None and q.evidence_occurrence >= len(spans)):
                at = ", ".join(str(a) for a, _ in spans[:5])
                raise InputError(q.file, f"found {len(spans)} times in the text of document '{q.doc_id}' (at "
                                         f"characters {at}): quote a longer span so it names one place",
                                 row=q.row, field=q.column("evidence"))
            span = spans[q.evidence_occurrence or 0]
        rows.append({
            "row_id": stable_id("qa", "human", q.doc_id, question, answer), "origin": "human", "parent_ids": [],
            "doc_id": q.doc_id, "evidence_start": span[0], "evidence_end": span[1], "strategy": None,
            "teacher": None, "prompt_template": None, "gen_params": None, "attempt": 0, "recovery_action": None,
            "params_hash": phash, "code_version": code_version, "qa_id": q.qa_id, "question": question,
            "answer": answer, "intent": normalize_line(q.intent) if q.intent else None,
            "evidence": doc["text"][span[0]:span[1]], "source_file": q.file, "source_row": q.row,
        })
    if not rows:
        raise InputError(where, "no usable QA rows (every row was excluded or the QA table is empty)")

    excluded_rows = [{**dataclasses.asdict(e), "source_row": e.row, "source_file": e.file, "params_hash": phash,
                      "code_version": code_version} for e in excluded]
    for e in excluded_rows:
        e.pop("row"), e.pop("file")
    documents = pa.Table.from_pylist(list(docs.values()), schema=documents_schema.ARROW)
    qa = pa.Table.from_pylist(rows, schema=qa_schema.ARROW)
    excl = pa.Table.from_pylist(excluded_rows, schema=excluded_schema.ARROW)
    reasons = Counter(e.reason for e in excluded)
    intents = Counter(r["intent"] for r in rows if r["intent"])
    metrics = {
        "format": params.format,
        "documents": documents.num_rows,
        "stale_documents": sum(d["stale"] for d in docs.values()),
        "qa_rows": qa.num_rows,
        "source_qa_rows": len(source.qa) + len(source.excluded),
        "excluded": len(excluded),
        **{f"excluded_{r}": n for r, n in sorted(reasons.items())},
        "intents": dict(sorted(intents.items())),
        "documents_without_qa": len(set(docs) - {r["doc_id"] for r in rows}),
        "ignored_columns": {Path(f).name: cols for f, cols in sorted(source.ignored_columns.items())},
    }
    return IngestResult(documents, qa, excl, metrics)


@click.command("ingest")
@click.option("--input", "input_path", required=True,
              help="Seed file or folder in the format of ingest.format (dvc.yaml passes ${ingest.input}).")
@click.option("--out", "out_dir", required=True,
              help="Writes documents.parquet (one row per source document), qa.parquet (one row per human QA "
                   "pair) and excluded.parquet (one row per source row left out, with its reason) here.")
@click.option("--metrics", "metrics_file", required=True,
              help="Writes the counts of documents, QA rows and excluded rows here (JSON).")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="Params file; this stage reads its ingest section.")
def cli(input_path: str, out_dir: str, metrics_file: str, params_file: str) -> None:
    """Read seed documents and QA pairs into Parquet with stable ids."""
    from refinery.core.io import atomic_outputs
    from refinery.core.provenance import code_version

    params = load_section(params_file, "ingest", IngestParams)
    if params.format == "hf" and params.hf_dataset is not None:
        input_path = f"hf:{params.hf_dataset}"  # --input (a tracked path) is not read for hf
    source = adapters.read_source(params.format, input_path, hf_split=params.hf_split, hf_revision=params.hf_revision,
                                  drop_none_of_the_above=params.cosmosqa_drop_none_of_the_above,
                                  unknown_columns=params.unknown_columns)
    result = ingest(source, params, code_version(sys.modules[__name__]))
    out = Path(out_dir)
    documents = documents_schema.CONTRACT.validate(result.documents, str(out / "documents.parquet"))
    qa = qa_schema.CONTRACT.validate(result.qa, str(out / "qa.parquet"))
    excluded = excluded_schema.CONTRACT.validate(result.excluded, str(out / "excluded.parquet"))
    with atomic_outputs() as outputs:
        outputs.parquet(documents, out / "documents.parquet", documents_schema.ARROW)
        outputs.parquet(qa, out / "qa.parquet", qa_schema.ARROW)
        outputs.parquet(excluded, out / "excluded.parquet", excluded_schema.ARROW)
        outputs.json(result.metrics, metrics_file)
    m = result.metrics
    click.echo(f"ingest: {m['documents']} documents ({m['stale_documents']} stale), {m['qa_rows']} QA rows, "
               f"{m['excluded']} excluded -> {out}", err=True)
