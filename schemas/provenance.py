"""Declare the provenance columns every QA-row artifact carries (ARCHITECTURE: every row carries its provenance)."""

from __future__ import annotations

import pyarrow as pa

ORIGINS = ("human", "synthetic", "contaminated", "injected", "recovered")
ROW_ID_PATTERN = r"^[a-z]+_[0-9a-f]{16}$"

PROVENANCE_FIELDS: list[pa.Field] = [
    pa.field("row_id", pa.string(), nullable=False),  # stable, content-derived
    pa.field("origin", pa.string(), nullable=False),  # one of ORIGINS
    pa.field("parent_ids", pa.list_(pa.string()), nullable=False),  # rows this one was made from
    pa.field("doc_id", pa.string(), nullable=False),  # source document
    pa.field("evidence_start", pa.int32(), nullable=True),  # evidence span in the document text, [start, end)
    pa.field("evidence_end", pa.int32(), nullable=True),
    pa.field("strategy", pa.string(), nullable=True),  # generation strategy; null for human rows
    pa.field("teacher", pa.string(), nullable=True),  # model id @ revision/hash
    pa.field("prompt_template", pa.string(), nullable=True),  # template name @ content hash
    pa.field("gen_params", pa.string(), nullable=True),  # sampling params as canonical JSON
    pa.field("attempt", pa.int32(), nullable=False),  # 0 for the first try
    pa.field("recovery_action", pa.string(), nullable=True),
    pa.field("params_hash", pa.string(), nullable=False),  # hash of the writing stage's params
    pa.field("code_version", pa.string(), nullable=False),  # refinery version + stage code hash
]
PROVENANCE_NAMES = tuple(f.name for f in PROVENANCE_FIELDS)


def provenance_checks(pda) -> dict[str, list]:
    """Row checks on the provenance columns shared by every QA-row contract."""
    return {
        "row_id": [pda.Check.str_matches(ROW_ID_PATTERN)],
        "origin": [pda.Check.isin(list(ORIGINS))],
        "doc_id": [pda.Check.str_length(min_value=1)],
        "evidence_start": [pda.Check.ge(0)],
        "evidence_end": [pda.Check.ge(0)],
        "attempt": [pda.Check.ge(0)],
        "params_hash": [pda.Check.str_length(min_value=1)],
        "code_version": [pda.Check.str_length(min_value=1)],
    }
