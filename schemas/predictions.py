"""Contract of data/07_eval/<run>.parquet (base, <arm>-s<seed>): one row per (model, human test row), with its scores."""

from __future__ import annotations

import pyarrow as pa

from schemas.base import Contract

ARROW = pa.schema([
    pa.field("model", pa.string(), nullable=False),  # base | human | contaminated | curated
    pa.field("row_id", pa.string(), nullable=False),  # the test row's stable id (its lineage starts there)
    pa.field("qa_id", pa.string(), nullable=False),
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("question", pa.string(), nullable=False),
    pa.field("reference", pa.string(), nullable=False),  # the human answer
    pa.field("prediction", pa.string(), nullable=False),  # greedy decode; '' when the model said nothing
    pa.field("exact_match", pa.float64(), nullable=False),  # SQuAD EM, 0 or 1
    pa.field("f1", pa.float64(), nullable=False),  # SQuAD token F1
    pa.field("rouge1", pa.float64(), nullable=False),
    pa.field("rouge2", pa.float64(), nullable=False),
    pa.field("rougeL", pa.float64(), nullable=False),
    pa.field("bertscore_f1", pa.float64(), nullable=False),
    pa.field("factual_verifiable", pa.bool_(), nullable=False),  # the reference's facts all appear in the passage
    pa.field("factual_correct", pa.bool_(), nullable=True),  # null when not verifiable
])


def _checks(pda) -> dict[str, list]:
    unit = [pda.Check.in_range(0.0, 1.0)]
    return {"exact_match": [pda.Check.isin([0.0, 1.0])], "f1": unit, "rouge1": unit, "rouge2": unit, "rougeL": unit,
            "bertscore_f1": [pda.Check.in_range(-1.0, 1.0)], "row_id": [pda.Check.str_length(min_value=1)]}


CONTRACT = Contract("predictions", ARROW, _checks, unique=("row_id",))
