"""Contract of data/03_verifiable/rows.parquet: generated math and code rows and the verifiable gate's verdicts."""

from __future__ import annotations

import pyarrow as pa

from schemas.base import Contract

ARROW = pa.schema([  # one row per teacher call (parsed or not: nothing is dropped)
    pa.field("row_id", pa.string(), nullable=False),  # ver_<hash of the call's cache key>
    pa.field("kind", pa.string(), nullable=False),  # math | code
    pa.field("parent_id", pa.string(), nullable=False),  # the seed item (item_id of math.jsonl / code.jsonl)
    pa.field("sample_index", pa.int32(), nullable=False),
    pa.field("prompt_template", pa.string(), nullable=False),  # name@version
    pa.field("teacher_id", pa.string(), nullable=False),
    pa.field("question", pa.string(), nullable=True),  # math: the new problem; code: the seed task
    pa.field("expression", pa.string(), nullable=True),  # math: the Python expression the row states
    pa.field("answer", pa.string(), nullable=True),  # math: the stated answer
    pa.field("solution", pa.string(), nullable=True),  # code: the generated function
    pa.field("tests", pa.list_(pa.string()), nullable=False),  # code: the generated asserts
    pa.field("seed_tests", pa.list_(pa.string()), nullable=False),  # code: the seed item's asserts (run too)
    pa.field("raw", pa.string(), nullable=False),  # the teacher's text
    pa.field("error", pa.string(), nullable=True),  # the call failed (reason: detail)
    pa.field("parse_error", pa.string(), nullable=True),  # parse_missing_* (strict parsing)
    pa.field("completion_tokens", pa.int64(), nullable=False),
    pa.field("verifiable_keep", pa.bool_(), nullable=False),  # execution agrees with the row
    pa.field("verifiable_reason", pa.string(), nullable=True),  # verifiable_* (or the call / parse error)
    pa.field("verifiable_detail", pa.string(), nullable=True),  # what execution said
    pa.field("value", pa.float64(), nullable=True),  # math: what the expression evaluated to
])


def _checks(pda) -> dict[str, list]:
    return {"kind": [pda.Check.isin(["math", "code"])], "sample_index": [pda.Check.ge(0)]}


CONTRACT = Contract("verifiable", ARROW, _checks, unique=("row_id",))
