"""Contract of data/03_generated/injected.parquet: one row per planted error or clean control, with its label."""

from __future__ import annotations

import pyarrow as pa

from refinery.planted.corruptions import FACTUAL_KINDS
from schemas import synthetic
from schemas.base import Contract

# Injection kinds, in output order. Factual kinds contradict or leave the evidence; the rest test form and
# copying. 'duplicate' is an exact copy of a train row (it needs no corruption function).
KINDS = FACTUAL_KINDS + ("truncation", "refusal", "duplicate", "near_duplicate", "seed_paraphrase")
CLEAN = "clean"  # label of unmodified control rows
FIELDS = ("answer", "question", "both")

INJECTION_FIELDS = [
    pa.field("injection_kind", pa.string(), nullable=False),  # one of KINDS, or 'clean' for an unmodified control
    pa.field("injection_source", pa.string(), nullable=False),  # row_id of the seed row it was made from
    pa.field("injection_field", pa.string(), nullable=False),  # what was changed: answer | question | both
    # (clean controls: 'answer', the field their matched val-sourced injections change)
    pa.field("injection_detail", pa.string(), nullable=True),  # what changed ("'14' -> '21'"); null for clean rows
]

ARROW = pa.schema(list(synthetic.ARROW) + INJECTION_FIELDS)


def _checks(pda) -> dict[str, list]:
    return {
        **synthetic.checks(pda),
        "origin": [pda.Check.isin(["injected"])],
        "injection_kind": [pda.Check.isin(list(KINDS) + [CLEAN])],
        "injection_source": [pda.Check.str_length(min_value=1)],
        "injection_field": [pda.Check.isin(list(FIELDS))],
    }


CONTRACT = Contract("injected", ARROW, _checks, unique=("row_id",))
