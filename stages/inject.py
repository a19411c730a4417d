"""Plant known errors with ground-truth labels in held-out seed rows, so quality gates can be measured."""

from __future__ import annotations

import sys
from typing import Any

import click
import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from refinery.planted import corruptions
from refinery.planted.corruptions import FACTUAL_KINDS, Corruption
from refinery.core.errors import RefineryError, require_columns
from refinery.core.params import StageParams, load_section, params_hash
from refinery.core.text import match_key, sha256_hex, stable_id
from schemas import injected as injected_schema
from schemas.injected import CLEAN, KINDS

# Kinds drawn from the val split (held-out human rows with exact evidence), so the overlap and dedup gates,
# which compare against the train split, do not see them as seed copies; these corrupt the answer only.
VAL_KINDS = FACTUAL_KINDS + ("truncation", "refusal")
# Kinds drawn from the train split: they exist to test the dedup / overlap gates; they act on question + answer.
TRAIN_KINDS = ("duplicate", "near_duplicate", "seed_paraphrase")

QA_COLUMNS = ("row_id", "doc_id", "question", "answer", "intent", "evidence", "evidence_start", "evidence_end")
DOCUMENT_COLUMNS = ("doc_id", "text", "supersedes", "superseded_by")


class InjectParams(StageParams):
    """Knobs of the inject stage."""

    seed: int
    kinds: list[str]  # injection kinds to plant (a subset of schemas.injected.KINDS)
    per_kind: int = Field(ge=0)  # rows requested per kind (fewer when too few source rows can take the kind)
    clean_controls: int = Field(ge=0)  # unmodified val rows, to measure false rejections
    # corruption families (refinery.planted.corruptions.FAMILIES) the verifier and the reward head never train on; their
    # planted rows measure the learned gates on error kinds they have not seen (read by train_verifier,
    # train_reward and gate too)
    unseen_families: list[str] = []

    @field_validator("unseen_families")
    @classmethod
    def _check_families(cls, families: list[str]) -> list[str]:
        from refinery.planted.corruptions import kinds_of

        kinds_of(families)  # raises on an unknown name
        return families

    @field_validator("kinds")
    @classmethod
    def _check_kinds(cls, kinds: list[str]) -> list[str]:
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown kind {unknown[0]} (known: {', '.join(KINDS)})")
        if len(set(kinds)) != len(kinds):
            raise ValueError("kinds must not repeat")
        return kinds


def _kind_rng(seed: int, kind: str) -> np.random.Generator:
    """One generator per kind, so adding or dropping a kind leaves the other kinds' rows unchanged."""
    return np.random.default_rng([seed, int(sha256_hex(kind)[:8], 16)])


def _linked(documents: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Map each doc_id to itself and the versions it supersedes or is superseded by (one page, not 'other')."""
    linked = {d["doc_id"]: {d["doc_id"]} for d in documents}
    for d in documents:
        for other in (d["supersedes"], d["superseded_by"]):
            if other is not None and other in linked:
                linked[d["doc_id"]].add(other)
                linked[other].add(d["doc_id"])
    return linked


class _Injector:
    """Apply one kind to one source row, with the passages and texts the corruption needs."""

    def __init__(self, val: list[dict[str, Any]], documents: list[dict[str, Any]]):
        self.texts = {d["doc_id"]: d["text"] for d in documents}
        self.linked = _linked(documents)
        self.val = val
        self.used_answers: set[str] = set()  # other_document answers already planted (each used once)

    def passage(self, row: dict[str, Any]) -> str:
        start, end = row["evidence_start"], row["evidence_end"]
        if start is None or end is None:
            return row["evidence"] or ""
        return self.texts[row["doc_id"]][start:end]

    def other_documents(self, row: dict[str, Any]) -> list[str]:
        same = self.linked.get(row["doc_id"], {row["doc_id"]})
        return [t for d, t in self.texts.items() if d not in same]

    def other_answers(self, row: dict[str, Any]) -> list[str]:
        """Unused answers of val rows of other documents.

        Val, so the new answer is no train seed copy; unused, so two planted rows never share an answer and
        look like duplicates of each other.
        """
        same = self.linked.get(row["doc_id"], {row["doc_id"]})
        return [r["answer"] for r in self.val if r["doc_id"] not in same and r["answer"] not in self.used_answers]

    def apply(self, kind: str, row: dict[str, Any], rng: np.random.Generator) -> tuple[Corruption, str, str, str]:
        """Return (corruption, new question, new answer, field changed)."""
        q, a = row["question"], row["answer"]
        if kind == "duplicate":
            return Corruption(a, True, kind, "exact copy of a train row"), q, a, "both"
        if kind == "near_duplicate":  # 1-5 word edits of the answer, else of the question (one field, few edits)
            c = corruptions.near_duplicate(a, rng=rng)
            if c.applied:
                return c, q, c.text, "answer"
            c = corruptions.near_duplicate(q, rng=rng)
            return c, c.text, a, "question"
        if kind == "seed_paraphrase":
            cq = corruptions.seed_paraphrase(q, rng=rng)
            ca = corruptions.seed_paraphrase(a, rng=rng)
            field = "both" if cq.applied and ca.applied else "question" if cq.applied else "answer"
            detail = "; ".join(f"{name}: {c.detail}" for name, c in (("question", cq), ("answer", ca)) if c.applied)
            return (Corruption(ca.text, cq.applied or ca.applied, kind, detail or ca.detail), cq.text, ca.text,
                    field)
        others = {"entity_swap": self.other_documents, "unsupported_claim": self.other_documents,
                  "other_document": self.other_answers}.get(kind)
        c = corruptions.corrupt(kind, a, passage=self.passage(row), other_texts=others(row) if others else None,
                                rng=rng)
        if kind == "other_document" and c.applied:
            self.used_answers.add(c.text)
        return c, q, c.text, "answer"


def _same(source: dict[str, Any], question: str, answer: str) -> bool:
    """True when an edit changed only case, punctuation or spacing: the row would be an exact copy, not its kind."""
    return match_key(question) == match_key(source["question"]) and match_key(answer) == match_key(source["answer"])


def _row(kind: str, source: dict[str, Any], question: str, answer: str, field: str, detail: str | None,
         params: InjectParams, phash: str, code_version: str) -> dict[str, Any]:
    return {
        "row_id": stable_id("inj", kind, source["row_id"], question, answer), "origin": "injected",
        "parent_ids": [source["row_id"]], "doc_id": source["doc_id"], "evidence_start": source["evidence_start"],
        "evidence_end": source["evidence_end"], "strategy": None, "teacher": None, "prompt_template": None,
        "gen_params": None, "attempt": 0, "recovery_action": None, "params_hash": phash,
        "code_version": code_version, "question": question, "answer": answer, "intent": source["intent"],
        "evidence": source["evidence"], "raw_output": answer, "parse_error": None, "error": None,
        "finish_reason": "stop", "prompt_tokens": 0, "completion_tokens": 0, "seed": params.seed,
        "sample_index": 0, "cache_key": sha256_hex(kind, source["row_id"], question, answer),
        "injection_kind": kind, "injection_source": source["row_id"], "injection_field": field,
        "injection_detail": detail,
    }


def inject(train: pa.Table, val: pa.Table, documents: pa.Table, params: InjectParams,
           code_version: str) -> tuple[pa.Table, dict[str, Any]]:
    """Plant each requested kind of error in source rows, and add unmodified clean controls.

    Factual kinds, truncation, refusal and the clean controls take val rows and corrupt the answer;
    duplicate, near_duplicate and seed_paraphrase take train rows and act on question + answer. Each kind
    walks its source rows in a seeded random order and skips rows the corruption cannot apply to (or where it
    changed only case or punctuation, which would make an exact copy), so a kind yields fewer than
    ``per_kind`` rows only when its source split runs out.

    Args:
        train: human train rows (split contract).
        val: human val rows (split contract), with exact evidence spans.
        documents: rows of the documents contract (evidence passages; other documents' texts).
        params: seed, kinds, rows per kind and clean controls.
        code_version: stamped on every row.

    Returns:
        Rows of the injected contract (kinds in ``schemas.injected.KINDS`` order, clean controls last),
        and metrics: rows requested / produced / not applicable per kind.

    Raises:
        RefineryError: a missing column, a source row whose document is absent, or an empty source split.
    """
    for table, what in ((train, "train"), (val, "val")):
        require_columns(table, QA_COLUMNS, f"inject {what}")
    require_columns(documents, DOCUMENT_COLUMNS, "inject documents")
    sources = {"train": train.to_pylist(), "val": val.to_pylist()}
    docs = documents.select(list(DOCUMENT_COLUMNS)).to_pylist()
    known = {d["doc_id"] for d in docs}
    wanted = {"train": any(k in TRAIN_KINDS for k in params.kinds) and params.per_kind > 0,
              "val": (any(k in VAL_KINDS for k in params.kinds) and params.per_kind > 0) or params.clean_controls > 0}
    for split, rows in sources.items():
        if wanted[split] and not rows:
            raise RefineryError(f"inject: the {split} split is empty: nothing to inject into")
        for r in rows:
            if r["doc_id"] not in known:
                raise RefineryError(f"inject: {split} row {r['row_id']} has no document '{r['doc_id']}' in the "
                                    f"documents table")
    injector = _Injector(sources["val"], docs)
    phash = params_hash(params)
    out: list[dict[str, Any]] = []
    requested, produced, not_applied = {}, {}, {}
    for kind in (k for k in KINDS if k in params.kinds):
        rows = sources["train" if kind in TRAIN_KINDS else "val"]
        rng = _kind_rng(params.seed, kind)
        made = failed = 0
        for i in rng.permutation(len(rows)).tolist():
            if made == params.per_kind:
                break
            c, question, answer, field = injector.apply(kind, rows[i], rng)
            if not c.applied or (kind != "duplicate" and _same(rows[i], question, answer)):
                failed += 1
                continue
            out.append(_row(kind, rows[i], question, answer, field, c.detail, params, phash, code_version))
            made += 1
        requested[kind], produced[kind], not_applied[kind] = params.per_kind, made, failed
    clean_order = _kind_rng(params.seed, CLEAN).permutation(len(sources["val"])).tolist()
    for i in clean_order[:params.clean_controls]:
        r = sources["val"][i]
        out.append(_row(CLEAN, r, r["question"], r["answer"], "answer", None, params, phash, code_version))
    requested[CLEAN], produced[CLEAN] = params.clean_controls, min(params.clean_controls, len(clean_order))
    table = pa.Table.from_pylist(out, schema=injected_schema.ARROW) if out else injected_schema.ARROW.empty_table()
    metrics = {
        "rows": table.num_rows,
        "injected": table.num_rows - produced[CLEAN],
        "requested": requested,
        "produced": produced,
        "not_applied": not_applied,  # source rows tried that the kind could not apply to (or changed trivially)
        "short": sum(requested[k] - produced[k] for k in requested),  # rows requested but not produced
        "source_rows": {split: len(rows) for split, rows in sources.items()},
    }
    return table, metrics


@click.command("inject")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="Params file; this stage reads its inject section.")
@click.option("--train", "train_file", required=True,
              help="Human train split (split's train.parquet): one row per seed QA pair; the duplicate, "
                   "near-duplicate and paraphrase kinds are planted from it.")
@click.option("--val", "val_file", required=True,
              help="Held-out human rows the other kinds and the clean controls come from (split's "
                   "val_control.parquet): one row per seed QA pair.")
@click.option("--documents", "documents_file", required=True,
              help="Source documents (ingest's documents.parquet): one row per document.")
@click.option("--out", "out_file", required=True,
              help="Writes one row per planted error or clean control, with its ground-truth label, here "
                   "(Parquet).")
@click.option("--metrics", "metrics_file", required=True,
              help="Writes the rows requested, produced and not applicable per kind here (JSON).")
def cli(params_file: str, train_file: str, val_file: str, documents_file: str, out_file: str,
        metrics_file: str) -> None:
    """Plant known errors with ground-truth labels in held-out seed rows, to measure the gates."""
    from refinery.core.io import atomic_outputs, read_parquet
    from refinery.core.provenance import code_version
    from schemas import documents as documents_schema
    from schemas import split as split_schema

    params = load_section(params_file, "inject", InjectParams)
    train = split_schema.CONTRACT.validate(read_parquet(train_file), train_file)
    val = split_schema.CONTRACT.validate(read_parquet(val_file), val_file)
    documents = documents_schema.CONTRACT.validate(read_parquet(documents_file), documents_file)
    table, metrics = inject(train, val, documents, params, code_version(sys.modules[__name__]))
    table = injected_schema.CONTRACT.validate(table, out_file)
    with atomic_outputs() as outputs:
        outputs.parquet(table, out_file, injected_schema.ARROW)
        outputs.json(metrics, metrics_file)
    click.echo(f"inject: {metrics['injected']} injected rows over {len(params.kinds)} kinds, "
               f"{metrics['produced'][CLEAN]} clean controls; {metrics['short']} requested rows not produced "
               f"-> {out_file}", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
