"""Contract of data/01_seed/excluded.parquet: one row per source row left out on purpose, with its reason."""

from __future__ import annotations

import pyarrow as pa

from schemas.base import Contract

REASONS = ("ingest_duplicate_content", "ingest_no_reference_answer", "ingest_unanswerable")

ARROW = pa.schema([
    pa.field("source_file", pa.string(), nullable=False),
    pa.field("source_row", pa.int32(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),  # stable reason code
    pa.field("detail", pa.string(), nullable=False),
    pa.field("qa_id", pa.string(), nullable=True),
    pa.field("doc_id", pa.string(), nullable=True),
    pa.field("question", pa.string(), nullable=True),
    pa.field("answer", pa.string(), nullable=True),
    pa.field("params_hash", pa.string(), nullable=False),
    pa.field("code_version", pa.string(), nullable=False),
])


def _checks(pda) -> dict[str, list]:
    return {"reason": [pda.Check.isin(list(REASONS))], "source_row": [pda.Check.ge(1)]}


CONTRACT = Contract("seed_excluded", ARROW, _checks)
