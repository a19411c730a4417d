"""Contract of data/04_audit/judge_audit.parquet: one row per sampled gated row, the gates' verdict and the judge's."""

from __future__ import annotations

import pyarrow as pa

from schemas.base import Contract

ARROW = pa.schema([
    pa.field("row_id", pa.string(), nullable=False),  # the gated row (data/04_gated/accepted or rejected)
    pa.field("status", pa.string(), nullable=False),  # accepted | rejected: where the gates put it
    pa.field("gate_keep", pa.bool_(), nullable=False),  # every gate kept the row
    pa.field("gate_reasons", pa.list_(pa.string()), nullable=False),  # every failing gate's reason code
    pa.field("heuristic_keep", pa.bool_(), nullable=True),  # no heuristic gate rejected it (null: not all judged)
    pa.field("model_keep", pa.bool_(), nullable=True),  # no model gate rejected it (null: not all judged)
    pa.field("judge_p_yes", pa.float64(), nullable=True),  # judge's P(yes) / (P(yes) + P(no)); null: no text to judge
    pa.field("judge_keep", pa.bool_(), nullable=True),  # judge_p_yes >= audit_judge.threshold
    pa.field("agree", pa.bool_(), nullable=True),  # judge_keep == gate_keep
    pa.field("judge", pa.string(), nullable=False),  # the audit judge's model id
    pa.field("prompt_template", pa.string(), nullable=False),  # the rubric template name @ content hash
])


def _checks(pda) -> dict[str, list]:
    return {"status": [pda.Check.isin(["accepted", "rejected"])],
            "judge_p_yes": [pda.Check.in_range(0.0, 1.0)]}


CONTRACT = Contract("judge_audit", ARROW, _checks, unique=("row_id",))
