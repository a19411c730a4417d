"""Contracts of data/09_collapse: the replace-vs-accumulate check (stages/collapse.py).

``answers.parquet``: one row per (arm, generation, human test row): the generation's answer with its scores.
``synthetic.parquet``: one row per (arm, generation, human train row): the answer the previous generation's model
wrote for the row's question, which this generation trains on (empty answers are kept here with a reason).
"""

from __future__ import annotations

import pyarrow as pa

from schemas.base import Contract

ARMS = ("base", "replace", "accumulate")  # base: generation 0, the untuned student both arms start from

ANSWERS_ARROW = pa.schema([
    pa.field("item_id", pa.string(), nullable=False),  # <model>:<row_id>
    pa.field("arm", pa.string(), nullable=False),  # one of ARMS
    pa.field("generation", pa.int64(), nullable=False),  # 0 = the untuned student
    pa.field("model", pa.string(), nullable=False),  # <arm>-g<generation>
    pa.field("row_id", pa.string(), nullable=False),  # the human test row
    pa.field("question", pa.string(), nullable=False),
    pa.field("reference", pa.string(), nullable=False),  # the human answer
    pa.field("prediction", pa.string(), nullable=False),  # greedy decode; '' when the model said nothing
    pa.field("f1", pa.float64(), nullable=False),  # SQuAD token F1
    pa.field("correct", pa.bool_(), nullable=False),  # f1 >= collapse.correct_f1
    pa.field("factual_verifiable", pa.bool_(), nullable=False),  # the reference's facts all appear in the passage
    pa.field("factual_correct", pa.bool_(), nullable=True),  # null when not verifiable
    pa.field("intent", pa.string(), nullable=True),
    pa.field("rare_intent", pa.bool_(), nullable=False),  # its intent has < collapse.rare_min_rows human train rows
    pa.field("cluster", pa.int64(), nullable=False),  # nearest k-means centroid of the human train questions
    pa.field("rare_cluster", pa.bool_(), nullable=False),  # that cluster holds < collapse.rare_share of train rows
])

SYNTHETIC_ARROW = pa.schema([
    pa.field("row_id", pa.string(), nullable=False),  # stable id of (arm, generation, parent)
    pa.field("arm", pa.string(), nullable=False),  # replace | accumulate (generation 1: both share base's answers)
    pa.field("generation", pa.int64(), nullable=False),  # the generation that trains on it
    pa.field("writer", pa.string(), nullable=False),  # the model that wrote the answer: <arm>-g<generation - 1>
    pa.field("parent_id", pa.string(), nullable=False),  # the human train row whose question was answered
    pa.field("question", pa.string(), nullable=False),
    pa.field("human_answer", pa.string(), nullable=False),
    pa.field("answer", pa.string(), nullable=False),  # the writer's answer ('' when it said nothing)
    pa.field("f1_to_human", pa.float64(), nullable=False),  # token F1 of answer against human_answer
    pa.field("kept", pa.bool_(), nullable=False),  # trained on
    pa.field("reason", pa.string(), nullable=True),  # why not (collapse_empty_answer); null when kept
])


def _answers_checks(pda) -> dict[str, list]:
    return {"arm": [pda.Check.isin(list(ARMS))], "f1": [pda.Check.in_range(0.0, 1.0)],
            "generation": [pda.Check.ge(0)]}


def _synthetic_checks(pda) -> dict[str, list]:
    return {"arm": [pda.Check.isin(["replace", "accumulate"])], "generation": [pda.Check.ge(1)],
            "f1_to_human": [pda.Check.in_range(0.0, 1.0)], "reason": [pda.Check.isin(["collapse_empty_answer"])]}


ANSWERS = Contract("collapse_answers", ANSWERS_ARROW, _answers_checks, unique=("item_id",))
SYNTHETIC = Contract("collapse_synthetic", SYNTHETIC_ARROW, _synthetic_checks, unique=("row_id",))
