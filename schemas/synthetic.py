"""Contract of data/03_generated/synthetic.parquet: one row per teacher sample (parsed or not), with provenance."""

from __future__ import annotations

import pyarrow as pa

from schemas.base import Contract
from schemas.provenance import PROVENANCE_FIELDS, provenance_checks

STRATEGIES = ("answer_augmentation", "question_rephrasing", "new_question", "answer_first", "evol_depth",
              "evol_breadth", "evol_denoise", "critique_revise", "rare_intent", "contaminate_answer",
              "contaminate_paraphrase")

GENERATION_FIELDS = [
    pa.field("question", pa.string(), nullable=True),  # null when the output did not parse
    pa.field("answer", pa.string(), nullable=True),
    pa.field("intent", pa.string(), nullable=True),  # inherited from the parent seed row
    pa.field("evidence", pa.string(), nullable=True),  # document text[evidence_start:evidence_end]
    pa.field("raw_output", pa.string(), nullable=False),  # the teacher's text, unparsed ('' on transport error)
    pa.field("parse_error", pa.string(), nullable=True),  # parse_* reason code; null when parsed
    pa.field("error", pa.string(), nullable=True),  # transport/model error reason; null when the call worked
    pa.field("finish_reason", pa.string(), nullable=False),  # stop | length | error
    pa.field("prompt_tokens", pa.int32(), nullable=False),
    pa.field("completion_tokens", pa.int32(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),  # sampling seed of this sample
    pa.field("sample_index", pa.int32(), nullable=False),  # k-th sample for the same parent and strategy
    pa.field("cache_key", pa.string(), nullable=False),  # content address of the teacher call
]

ARROW = pa.schema(PROVENANCE_FIELDS + GENERATION_FIELDS)


def checks(pda) -> dict[str, list]:
    """Row checks of generated rows."""
    return {
        **provenance_checks(pda),
        "origin": [pda.Check.isin(["synthetic", "contaminated", "recovered", "injected"])],
        "strategy": [pda.Check.isin(list(STRATEGIES))],
        "finish_reason": [pda.Check.isin(["stop", "length", "error"])],
        "prompt_tokens": [pda.Check.ge(0)],
        "completion_tokens": [pda.Check.ge(0)],
        "sample_index": [pda.Check.ge(0)],
        "cache_key": [pda.Check.str_matches(r"^[0-9a-f]{64}$")],
    }


CONTRACT = Contract("synthetic", ARROW, checks, unique=("row_id",))
