"""Export retrieval-grounding data (RAFT-style): each QA row of an arm with its gold passage and distractors.

For every row of the arm's dataset (``raft.arm``, default ``curated``): the gold passage (the window around the
row's evidence span in its document, with the document's id, ``updated_at`` and stale flag) and distractor
passages from other documents: ``hard_negatives`` mined by the embedder (the documents whose passages are most
similar to the question), ``random_negatives`` drawn in a seeded order, and every older, superseded version of the
gold document, marked ``stale_version`` (a retriever must learn to prefer the current page). A candidate that
holds the row's answer or its evidence text (normalised containment) is not a distractor: it is dropped and
counted. The gold document and the documents of its supersedes chain (other than its stale versions) are never
distractors.

A retrieval check on the human test split measures whether the negatives are hard: recall@1 and recall@k of the
embedder as a retriever over gold + hard negatives against gold + random negatives (the same number of each).
Negatives that are "too easy" show as recall@1 near 1 on both.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow as pa
from pydantic import Field

from refinery.core.errors import InputError
from refinery.core.params import StageParams, load_section, params_hash
from refinery.core.text import match_key


class RaftParams(StageParams):
    """Knobs of the raft export."""

    arm: str  # the arm whose dataset is exported (data/06_datasets/<arm>.parquet)
    seed: int  # order of the random negatives and of the passages in the JSONL context
    hard_negatives: int = Field(ge=0)  # most similar other documents per row
    random_negatives: int = Field(ge=0)  # random other documents per row
    window_chars: int = Field(ge=0)  # passage length around the evidence (distractors: the document's head); 0: all
    eval_k: int = Field(ge=1)  # recall@k of the retrieval check (and recall@1)


@dataclass(frozen=True)
class RaftResult:
    """The export rows and the metrics (counts and the retrieval check)."""

    table: pa.Table
    metrics: dict[str, Any]


def chains(documents: list[dict]) -> dict[str, set[str]]:
    """doc_id -> every document linked to it by ``supersedes`` / ``superseded_by``, transitively, itself included."""
    parent = {d["doc_id"]: d["doc_id"] for d in documents}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for d in documents:
        for other in (d.get("supersedes"), d.get("superseded_by")):
            if other in parent:
                parent[find(d["doc_id"])] = find(other)
    groups: dict[str, set[str]] = {}
    for doc_id in parent:
        groups.setdefault(find(doc_id), set()).add(doc_id)
    return {doc_id: groups[find(doc_id)] for doc_id in parent}


def holds_answer(passage: str, answer: str, evidence: str | None) -> bool:
    """A candidate passage that states the row's answer or its evidence text is not a distractor."""
    text = f" {match_key(passage)} "
    return any(f" {match_key(x)} " in text for x in (answer, evidence) if x and match_key(x))


def build(dataset: pa.Table, documents: pa.Table, embed, params: RaftParams, *, code_version: str) -> list[dict]:
    """Return one export record per dataset row (the raft contract's columns).

    Args:
        dataset: the arm's rows (datasets contract).
        documents: the documents table.
        embed: texts -> L2-normalised vectors (one per text).
        params: the counts, window and seed.
        code_version: stamped on every row.
    """
    from refinery.training.lora import passage_window

    docs = documents.to_pylist()
    by_id = {d["doc_id"]: d for d in docs}
    chain = chains(docs)
    ids = [d["doc_id"] for d in docs]
    heads = [passage_window(d["text"], None, None, None, params.window_chars) for d in docs]
    doc_vecs = embed(heads)
    rows = dataset.to_pylist()
    q_vecs = embed([r["question"] for r in rows]) if rows else np.zeros((0, doc_vecs.shape[1]), np.float32)
    rng = np.random.default_rng(params.seed)
    phash = params_hash(params)
    out = []
    for row, q in zip(rows, q_vecs):
        gold = by_id.get(row["doc_id"])
        if gold is None:
            raise InputError(f"{params.arm} dataset", f"document {row['doc_id']!r} not in the documents table",
                             field="doc_id")
        family = chain[gold["doc_id"]]
        stale_versions = sorted(d for d in family if d != gold["doc_id"] and by_id[d]["stale"])
        excluded = 0
        picked: list[tuple[str, str, str]] = []  # (doc_id, passage, kind)

        def take(candidates, kind: str, n: int) -> None:
            nonlocal excluded
            for i in candidates:
                if n <= 0:
                    break
                doc_id = ids[i]
                if doc_id in family or any(doc_id == p[0] for p in picked):
                    continue
                if holds_answer(heads[i], row["answer"], row.get("evidence")):
                    excluded += 1
                    continue
                picked.append((doc_id, heads[i], kind))
                n -= 1

        for doc_id in stale_versions:
            passage = passage_window(by_id[doc_id]["text"], None, None, None, params.window_chars)
            if holds_answer(passage, row["answer"], row.get("evidence")):
                excluded += 1  # an older version stating the same answer teaches nothing as a distractor
                continue
            picked.append((doc_id, passage, "stale_version"))
        take(np.argsort(-(doc_vecs @ q), kind="stable"), "hard", params.hard_negatives)
        take(rng.permutation(len(ids)), "random", params.random_negatives)
        out.append({
            "row_id": row["row_id"], "source": row["source"], "question": row["question"], "answer": row["answer"],
            "gold_doc_id": gold["doc_id"],
            "gold_passage": passage_window(gold["text"], row.get("evidence"), row.get("evidence_start"),
                                           row.get("evidence_end"), params.window_chars),
            "gold_updated_at": gold.get("updated_at"), "gold_stale": bool(gold["stale"]),
            "distractor_doc_ids": [p[0] for p in picked], "distractor_passages": [p[1] for p in picked],
            "distractor_kinds": [p[2] for p in picked], "distractor_stale": [bool(by_id[p[0]]["stale"]) for p in picked],
            "excluded_answer_bearing": excluded, "params_hash": phash, "code_version": code_version,
        })
    return out


def retrieval_check(test: pa.Table, documents: pa.Table, embed, params: RaftParams) -> dict[str, Any]:
    """Recall@1 and recall@k of the embedder over gold + hard negatives vs gold + random negatives (test rows)."""
    if test.num_rows == 0:
        return {"rows": 0}
    n = max(params.hard_negatives, params.random_negatives, 1)
    probe = params.model_copy(update={"hard_negatives": n, "random_negatives": n})
    records = build(test.append_column("source", pa.array(["human"] * test.num_rows, pa.string())), documents,
                    embed, probe, code_version="check")
    out: dict[str, Any] = {"rows": len(records), "negatives_per_row": n, "k": params.eval_k}
    for kind in ("hard", "random"):
        ranks = []
        for r in records:
            negatives = [p for p, k in zip(r["distractor_passages"], r["distractor_kinds"]) if k == kind]
            if not negatives:
                continue
            vecs = embed([r["question"], r["gold_passage"], *negatives])
            scores = vecs[1:] @ vecs[0]
            ranks.append(int((scores[1:] > scores[0]).sum()) + 1)  # ties go to the gold passage
        ranks = np.asarray(ranks)
        out[kind] = {"rows": int(len(ranks)),
                     "recall_at_1": round(float((ranks <= 1).mean()), 4) if len(ranks) else None,
                     f"recall_at_{params.eval_k}": round(float((ranks <= params.eval_k).mean()), 4)
                     if len(ranks) else None}
    return out


def raft(dataset: pa.Table, documents: pa.Table, test: pa.Table, embed, params: RaftParams, *,
         code_version: str) -> RaftResult:
    """Build the export and run the retrieval check."""
    from schemas import raft as raft_schema

    records = build(dataset, documents, embed, params, code_version=code_version)
    table = pa.Table.from_pylist(records, schema=raft_schema.ARROW)
    kinds = [k for r in records for k in r["distractor_kinds"]]
    metrics = {
        "arm": params.arm, "rows": table.num_rows,
        "distractors_per_row": round(len(kinds) / max(1, table.num_rows), 3),
        "distractors": {k: kinds.count(k) for k in ("hard", "random", "stale_version")},
        "excluded_answer_bearing": int(sum(r["excluded_answer_bearing"] for r in records)),
        "rows_with_stale_distractor": sum("stale_version" in r["distractor_kinds"] for r in records),
        "stale_share": round(sum("stale_version" in r["distractor_kinds"] for r in records)
                             / max(1, table.num_rows), 4),
        "gold_stale": sum(r["gold_stale"] for r in records),
        "retrieval_check": retrieval_check(test, documents, embed, params),
    }
    return RaftResult(table, metrics)


def jsonl(table: pa.Table, seed: int) -> str:
    """One JSON line per row: question, answer, oracle passage and the context documents (gold shuffled in)."""
    rng = np.random.default_rng(seed)
    lines = []
    for r in table.to_pylist():
        docs = [{"doc_id": r["gold_doc_id"], "text": r["gold_passage"], "role": "gold", "stale": r["gold_stale"],
                 "updated_at": r["gold_updated_at"]}]
        docs += [{"doc_id": d, "text": p, "role": k, "stale": s} for d, p, k, s in
                 zip(r["distractor_doc_ids"], r["distractor_passages"], r["distractor_kinds"], r["distractor_stale"])]
        order = rng.permutation(len(docs))
        lines.append(json.dumps({"id": r["row_id"], "question": r["question"], "answer": r["answer"],
                                 "oracle_context": r["gold_passage"], "documents": [docs[i] for i in order]},
                                ensure_ascii=False) + "\n")
    return "".join(lines)


@click.command("raft")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="Params file; this stage reads its raft section.")
@click.option("--datasets", "datasets_dir", required=True,
              help="Assemble's output folder: reads <raft.arm>.parquet (one row per training example).")
@click.option("--documents", "documents_file", required=True,
              help="Source documents (ingest's documents.parquet): one row per document; gold passages and "
                   "distractors.")
@click.option("--test", "test_file", required=True,
              help="Human test split (split's test.parquet): one row per seed QA pair; the retrieval check.")
@click.option("--models", "models_dir", required=True,
              help="Provisioned models folder (provision's --out): the embedder role is read from it.")
@click.option("--cache", "cache_dir", required=True, help="Embedding cache folder (created if missing).")
@click.option("--out", "out_dir", required=True,
              help="Writes raft.parquet (one retrieval-grounding example per row of the arm) and raft.jsonl here.")
@click.option("--metrics", "metrics_file", required=True,
              help="Writes the row and distractor counts and the retrieval check here (JSON).")
def cli(params_file, datasets_dir, documents_file, test_file, models_dir, cache_dir, out_dir, metrics_file) -> None:
    """Export an arm's rows with gold passages and distractors (RAFT-style), with a retrieval check."""
    from refinery.models.embed import Embedder
    from refinery.core.io import atomic_outputs, read_parquet
    from refinery.models.resolve import load_target
    from refinery.core.provenance import code_version
    from schemas import datasets as datasets_schema
    from schemas import documents as documents_schema
    from schemas import raft as raft_schema
    from schemas import split as split_schema

    params = load_section(params_file, "raft", RaftParams)
    path = Path(datasets_dir) / f"{params.arm}.parquet"
    if not path.is_file():
        raise InputError(str(path), f"no dataset for raft.arm '{params.arm}' (an arm of assemble.arms?)")
    dataset = datasets_schema.CONTRACT.validate(read_parquet(path), str(path))
    documents = documents_schema.CONTRACT.validate(read_parquet(documents_file), documents_file)
    test = split_schema.CONTRACT.validate(read_parquet(test_file), test_file)
    target = load_target(models_dir, "embedder")
    embed = Embedder(target["path"], cache_dir=cache_dir, model_id=target["id"]).embed
    result = raft(dataset, documents, test, embed, params, code_version=code_version(sys.modules[__name__]))
    out = Path(out_dir)
    table = raft_schema.CONTRACT.validate(result.table, str(out / "raft.parquet"))
    raft_schema.check_dataset(table, str(out / "raft.parquet"))
    with atomic_outputs() as outputs:
        outputs.parquet(table, out / "raft.parquet", raft_schema.ARROW)
        outputs.text(jsonl(table, params.seed), out / "raft.jsonl")
        outputs.json(result.metrics, metrics_file)
    m, rc = result.metrics, result.metrics["retrieval_check"]
    click.echo(f"raft: {m['rows']} rows of {params.arm}, {m['distractors_per_row']} distractors per row "
               f"({m['excluded_answer_bearing']} answer-bearing candidates dropped); retrieval recall@1 hard "
               f"{(rc.get('hard') or {}).get('recall_at_1')} vs random {(rc.get('random') or {}).get('recall_at_1')} "
               f"-> {out}", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
