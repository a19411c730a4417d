"""Contract of data/01_seed/documents.parquet: one row per source document."""

from __future__ import annotations

import pyarrow as pa

from schemas.base import Contract

ARROW = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False),  # stable id: as given, or content-derived
    pa.field("title", pa.string(), nullable=True),
    pa.field("text", pa.string(), nullable=False),  # NFC-normalised passage; evidence spans index into it
    pa.field("updated_at", pa.string(), nullable=True),  # ISO date
    pa.field("category", pa.string(), nullable=True),
    pa.field("supersedes", pa.string(), nullable=True),  # doc_id of the older document this one replaces
    pa.field("superseded_by", pa.string(), nullable=True),  # doc_id of the newer document replacing this one
    pa.field("stale", pa.bool_(), nullable=False),  # superseded by a newer document
    pa.field("content_hash", pa.string(), nullable=False),  # sha256 of text, 16 hex chars
    pa.field("source_file", pa.string(), nullable=False),
    pa.field("source_row", pa.int32(), nullable=False),
    pa.field("params_hash", pa.string(), nullable=False),
    pa.field("code_version", pa.string(), nullable=False),
])


def _checks(pda) -> dict[str, list]:
    return {
        "doc_id": [pda.Check.str_length(min_value=1)],
        "text": [pda.Check.str_length(min_value=1)],
        "updated_at": [pda.Check.str_matches(r"^\d{4}-\d{2}-\d{2}")],
        "content_hash": [pda.Check.str_matches(r"^[0-9a-f]{16}$")],
        "source_row": [pda.Check.ge(1)],
    }


CONTRACT = Contract("documents", ARROW, _checks, unique=("doc_id",))
