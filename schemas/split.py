"""Contract of data/02_split/{train,val,test}.parquet: seed QA rows with the split they belong to."""

from __future__ import annotations

import pyarrow as pa

from schemas import seed_qa
from schemas.base import Contract

SPLITS = ("train", "val", "test")

ARROW = seed_qa.ARROW.append(pa.field("split", pa.string(), nullable=False))


def _checks(pda) -> dict[str, list]:
    return {**seed_qa.checks(pda), "split": [pda.Check.isin(list(SPLITS))]}


CONTRACT = Contract("split", ARROW, _checks, unique=("row_id", "qa_id"))
