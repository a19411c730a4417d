"""Contract of data/08_raft/raft.parquet: one retrieval-grounding example per QA row of an arm (RAFT-style).

Each row keeps its gold passage (document id, ``updated_at``, stale flag) and distractor passages from other
documents: hard negatives mined by embedding similarity, random ones, and older (stale) versions of the gold
document, each marked with its kind. No distractor is the gold document, and none holds the answer.
"""

from __future__ import annotations

import pyarrow as pa

from schemas.base import Contract

DISTRACTOR_KINDS = ("hard", "random", "stale_version")

ARROW = pa.schema([
    pa.field("row_id", pa.string(), nullable=False),  # the QA row of the arm's dataset
    pa.field("source", pa.string(), nullable=False),  # that row's source (human, accepted, recovered, ...)
    pa.field("question", pa.string(), nullable=False),
    pa.field("answer", pa.string(), nullable=False),
    pa.field("gold_doc_id", pa.string(), nullable=False),
    pa.field("gold_passage", pa.string(), nullable=False),  # the window around the row's evidence span
    pa.field("gold_updated_at", pa.string(), nullable=True),
    pa.field("gold_stale", pa.bool_(), nullable=False),
    pa.field("distractor_doc_ids", pa.list_(pa.string()), nullable=False),
    pa.field("distractor_passages", pa.list_(pa.string()), nullable=False),
    pa.field("distractor_kinds", pa.list_(pa.string()), nullable=False),  # one of DISTRACTOR_KINDS each
    pa.field("distractor_stale", pa.list_(pa.bool_()), nullable=False),
    pa.field("excluded_answer_bearing", pa.int32(), nullable=False),  # candidates dropped: they hold the answer
    pa.field("params_hash", pa.string(), nullable=False),
    pa.field("code_version", pa.string(), nullable=False),
])


def _checks(pda) -> dict[str, list]:
    return {
        "question": [pda.Check.str_length(min_value=1)],
        "answer": [pda.Check.str_length(min_value=1)],
        "gold_doc_id": [pda.Check.str_length(min_value=1)],
        "gold_passage": [pda.Check.str_length(min_value=1)],
        "excluded_answer_bearing": [pda.Check.ge(0)],
    }


CONTRACT = Contract("raft", ARROW, _checks, unique=("row_id",))


def check_dataset(table: pa.Table, where: str) -> None:
    """Dataset-level expectations: every distractor list is aligned, of a known kind, and never the gold document.

    Raises:
        InputError: naming the first offending row and field.
    """
    from refinery.core.errors import InputError

    cols = ("gold_doc_id", "distractor_doc_ids", "distractor_passages", "distractor_kinds", "distractor_stale")
    for i, (gold, ids, passages, kinds, stale) in enumerate(zip(*(table.column(c).to_pylist() for c in cols))):
        if not (len(ids) == len(passages) == len(kinds) == len(stale)):
            raise InputError(where, "distractor lists differ in length (raft contract)", row=i + 1,
                             field="distractor_doc_ids")
        if gold in ids:
            raise InputError(where, f"the gold document {gold} is also a distractor (raft contract)", row=i + 1,
                             field="distractor_doc_ids")
        unknown = [k for k in kinds if k not in DISTRACTOR_KINDS]
        if unknown:
            raise InputError(where, f"unknown distractor kind {unknown[0]!r}", row=i + 1, field="distractor_kinds")
