"""Contracts of data/04_gated/*.parquet: generated (or injected) rows with every gate's verdict, score and reason."""

from __future__ import annotations

import pyarrow as pa

from refinery.gates.registry import GATES
from schemas import injected, synthetic
from schemas.base import Contract


def gate_fields(gates: tuple[str, ...] = GATES) -> list[pa.Field]:
    """Per gate ``<gate>_keep``/``_score``/``_reason``, then ``gate_keep`` and every failing reason in order.

    ``<gate>_keep`` is null only where the gate did not judge the row: in ``gate.mode: cascade`` an earlier
    gate had already rejected it.
    """
    fields = []
    for g in gates:
        fields += [pa.field(f"{g}_keep", pa.bool_(), nullable=True), pa.field(f"{g}_score", pa.float64()),
                   pa.field(f"{g}_reason", pa.string())]
    return fields + [pa.field("gate_keep", pa.bool_(), nullable=False),
                     pa.field("gate_reasons", pa.list_(pa.string()), nullable=False)]


SYNTHETIC_ARROW = pa.schema(list(synthetic.ARROW) + gate_fields())
INJECTED_ARROW = pa.schema(list(injected.ARROW) + gate_fields())


def _reason_checks(pda) -> dict[str, list]:
    return {f"{g}_reason": [pda.Check.str_startswith(g)] for g in GATES}


def _synthetic_checks(pda) -> dict[str, list]:
    return {**synthetic.checks(pda), **_reason_checks(pda)}


def _injected_checks(pda) -> dict[str, list]:
    return {**injected._checks(pda), **_reason_checks(pda)}


CONTRACT = Contract("gated", SYNTHETIC_ARROW, _synthetic_checks, unique=("row_id",))
INJECTED_CONTRACT = Contract("gated_injected", INJECTED_ARROW, _injected_checks, unique=("row_id",))
