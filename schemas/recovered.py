"""Contracts of data/05_recovered/*.parquet: recovered rows, and every rejected row with its diagnosis and outcome."""

from __future__ import annotations

import pyarrow as pa

from schemas import gated
from schemas.base import Contract

MODES = ("malformed", "truncated", "refusal", "threshold_marginal", "duplicate", "too_close_to_seed",
         "question_defect", "ungrounded", "low_quality", "unrecoverable")
METHODS = ("adaptive", "naive")
ACTIONS = ("strict_grounding", "reanswer_low_temp", "rewrite_helpfulness", "rewrite_length", "rewrite_fluency",
           "diversify", "regenerate_question", "fix_format", "fix_length", "resample", "revise_by_rule")
# Outcome of a rejected row under one method: recovered; failed (every attempt was rejected); laundered (planted
# rows only: the gates recovered it with a candidate that still holds the planted error: an error let through,
# measured with the injection's ground truth after the gates decided); not_attempted
# (diagnosed unrecoverable); budget_exhausted (recoverable, but the global call budget ran out first); off (the
# naive baseline is switched off).
OUTCOMES = ("recovered", "failed", "laundered", "not_attempted", "budget_exhausted", "off")

RECOVERY_FIELDS = [
    pa.field("diagnosis", pa.string(), nullable=False),  # failure mode of the rejected parent (one of MODES)
    pa.field("diagnosis_confidence", pa.float64(), nullable=False),  # 0-1
    pa.field("recovery_method", pa.string(), nullable=False),  # adaptive | naive
    pa.field("recovery_calls", pa.int32(), nullable=False),  # teacher calls spent on the parent up to this row
    pa.field("recovery_tokens", pa.int64(), nullable=False),  # prompt + completion tokens of those calls
]

DIAGNOSIS_FIELDS = [
    pa.field("diagnosis", pa.string(), nullable=False),
    pa.field("diagnosis_confidence", pa.float64(), nullable=False),
    pa.field("diagnosis_detail", pa.string(), nullable=False),  # the evidence for the mode (gates, scores, margins)
    pa.field("recoverable", pa.bool_(), nullable=False),  # attempted by both methods when budget allows
    pa.field("outcome", pa.string(), nullable=False),  # adaptive method's outcome (one of OUTCOMES)
    pa.field("recovered_row_id", pa.string(), nullable=True),  # the adaptive recovered row, when recovered
    pa.field("actions", pa.list_(pa.string()), nullable=False),  # adaptive actions tried, in order
    pa.field("attempts", pa.int32(), nullable=False),
    pa.field("calls", pa.int32(), nullable=False),
    pa.field("tokens", pa.int64(), nullable=False),
    pa.field("naive_outcome", pa.string(), nullable=False),
    pa.field("naive_recovered_row_id", pa.string(), nullable=True),
    pa.field("naive_attempts", pa.int32(), nullable=False),
    pa.field("naive_calls", pa.int32(), nullable=False),
    pa.field("naive_tokens", pa.int64(), nullable=False),
    pa.field("failure_reasons", pa.list_(pa.string()), nullable=False),  # adaptive: last candidate's gate reasons
]
INJECTION_CHECK_FIELDS = [
    pa.field("error_survives", pa.bool_(), nullable=True),  # adaptive: the recovered candidate holds the error
    pa.field("naive_error_survives", pa.bool_(), nullable=True),  # null: no candidate passed every gate
]

ROW_SETS = ("generated", "planted")
ATTEMPT_FIELDS = [
    pa.field("recovery_method", pa.string(), nullable=False),  # adaptive | naive
    pa.field("row_set", pa.string(), nullable=False),  # generated (rejected rows) | planted (rejected planted rows)
    pa.field("diagnosis", pa.string(), nullable=False),  # failure mode of the rejected parent
    pa.field("counted", pa.bool_(), nullable=False),  # recovered its row: passed every gate
]

RECOVERED_ARROW = pa.schema(list(gated.SYNTHETIC_ARROW) + RECOVERY_FIELDS)
DIAGNOSED_ARROW = pa.schema(list(gated.SYNTHETIC_ARROW) + DIAGNOSIS_FIELDS)
DIAGNOSED_INJECTED_ARROW = pa.schema(list(gated.INJECTED_ARROW) + DIAGNOSIS_FIELDS + INJECTION_CHECK_FIELDS)
# every candidate a recovery call produced, with every gate's verdict: the rejected ones are kept with their reasons
ATTEMPT_ARROW = pa.schema(list(gated.SYNTHETIC_ARROW) + ATTEMPT_FIELDS)


def _recovered_checks(pda) -> dict[str, list]:
    return {
        **gated._synthetic_checks(pda),
        "origin": [pda.Check.isin(["recovered"])],
        "attempt": [pda.Check.ge(1)],
        "recovery_action": [pda.Check.isin(list(ACTIONS))],
        "gate_keep": [pda.Check.isin([True])],  # every recovered row passed every gate again
        "parent_ids": [pda.Check(lambda s: s.map(len) == 1, element_wise=False, name="one_parent")],
        "diagnosis": [pda.Check.isin(list(MODES))],
        "diagnosis_confidence": [pda.Check.in_range(0, 1)],
        "recovery_method": [pda.Check.isin(list(METHODS))],
        "recovery_calls": [pda.Check.ge(1)],
        "recovery_tokens": [pda.Check.ge(0)],
    }


def _diagnosis_checks(pda) -> dict[str, list]:
    return {
        "diagnosis": [pda.Check.isin(list(MODES))],
        "diagnosis_confidence": [pda.Check.in_range(0, 1)],
        "outcome": [pda.Check.isin(list(OUTCOMES))],
        "naive_outcome": [pda.Check.isin(list(OUTCOMES))],
        "gate_keep": [pda.Check.isin([False])],  # only rejected rows are diagnosed
        "attempts": [pda.Check.ge(0)], "calls": [pda.Check.ge(0)], "naive_attempts": [pda.Check.ge(0)],
        "naive_calls": [pda.Check.ge(0)],
    }


def _attempt_checks(pda) -> dict[str, list]:
    return {
        **gated._synthetic_checks(pda),
        "origin": [pda.Check.isin(["recovered"])],
        "attempt": [pda.Check.ge(1)],
        "recovery_action": [pda.Check.isin(list(ACTIONS))],
        "parent_ids": [pda.Check(lambda s: s.map(len) == 1, element_wise=False, name="one_parent")],
        "recovery_method": [pda.Check.isin(list(METHODS))],
        "row_set": [pda.Check.isin(list(ROW_SETS))],
        "diagnosis": [pda.Check.isin(list(MODES))],
    }


CONTRACT = Contract("recovered", RECOVERED_ARROW, _recovered_checks, unique=("row_id",))
DIAGNOSED_CONTRACT = Contract("diagnosed", DIAGNOSED_ARROW,
                              lambda pda: {**gated._synthetic_checks(pda), **_diagnosis_checks(pda)},
                              unique=("row_id",))
DIAGNOSED_INJECTED_CONTRACT = Contract("diagnosed_injected", DIAGNOSED_INJECTED_ARROW,
                                       lambda pda: {**gated._injected_checks(pda), **_diagnosis_checks(pda)},
                                       unique=("row_id",))
# no unique row_id: adaptive's "resample" action makes the naive method's own call, so both methods log that row
ATTEMPT_CONTRACT = Contract("recovery_attempts", ATTEMPT_ARROW, _attempt_checks)
