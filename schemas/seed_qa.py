"""Contract of data/01_seed/qa.parquet: one row per human-written QA pair, with provenance."""

from __future__ import annotations

import pyarrow as pa

from schemas.base import Contract
from schemas.provenance import PROVENANCE_FIELDS, provenance_checks

# Human seed rows always know their evidence: the span is required here (nullable for synthetic rows).
_REQUIRED_HERE = {"evidence_start", "evidence_end"}

CONTENT_FIELDS = [
    pa.field("qa_id", pa.string(), nullable=False),  # the source's id
    pa.field("question", pa.string(), nullable=False),
    pa.field("answer", pa.string(), nullable=False),
    pa.field("intent", pa.string(), nullable=True),
    pa.field("evidence", pa.string(), nullable=False),  # document text[evidence_start:evidence_end]
    pa.field("source_file", pa.string(), nullable=False),
    pa.field("source_row", pa.int32(), nullable=False),
]

ARROW = pa.schema(
    [f.with_nullable(False) if f.name in _REQUIRED_HERE else f for f in PROVENANCE_FIELDS] + CONTENT_FIELDS
)


def checks(pda) -> dict[str, list]:
    """Row checks of seed QA rows (also used by the split contract)."""
    return {
        **provenance_checks(pda),
        "origin": [pda.Check.isin(["human"])],
        "qa_id": [pda.Check.str_length(min_value=1)],
        "question": [pda.Check.str_length(min_value=1)],
        "answer": [pda.Check.str_length(min_value=1)],
        "evidence": [pda.Check.str_length(min_value=1)],
        "source_row": [pda.Check.ge(1)],
    }


CONTRACT = Contract("seed_qa", ARROW, checks, unique=("row_id", "qa_id"))
