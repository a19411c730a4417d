"""Contract of the preference pairs (data/03_preferences: templated; data/05_dpo: the DPO export): one per pair."""

from __future__ import annotations

import pyarrow as pa

from schemas.base import Contract

# What the rejected answer got wrong.
CATEGORIES = ("factuality", "constraint_following", "tone", "vagueness", "missing_escalation", "off_topic", "safety")
# Who wrote the rejected answer: the teacher with a category instruction, checked (refinery/training/preferences.py),
# or a templated rule edit (refinery/planted/corruptions.py; train_reward's pairs, the dpo stage's fallback).
CATEGORY_SOURCES = ("teacher", "templated")

ARROW = pa.schema([
    pa.field("pair_id", pa.string(), nullable=False),  # stable, content-derived
    pa.field("prompt", pa.string(), nullable=False),  # the question (constraint pairs: plus the limit stated)
    pa.field("chosen", pa.string(), nullable=False),  # the human answer (or a gate-accepted one: dpo.sources)
    pa.field("rejected", pa.string(), nullable=False),  # a realistic degradation of it
    pa.field("category", pa.string(), nullable=False),  # one of CATEGORIES
    pa.field("corruption", pa.string(), nullable=False),  # corruptions kind that made ``rejected``; teacher:<category>
    pa.field("detail", pa.string(), nullable=False),  # what the corruption changed; the check a teacher rewrite failed
    pa.field("parent_id", pa.string(), nullable=False),  # row_id of the seed QA row
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("category_source", pa.string(), nullable=False),  # one of CATEGORY_SOURCES
    pa.field("params_hash", pa.string(), nullable=False),
    pa.field("code_version", pa.string(), nullable=False),
])


def _checks(pda) -> dict[str, list]:
    return {
        "pair_id": [pda.Check.str_matches(r"^pref_[0-9a-f]{16}$")],
        "prompt": [pda.Check.str_length(min_value=1)],
        "chosen": [pda.Check.str_length(min_value=1)],
        "rejected": [pda.Check.str_length(min_value=1)],
        "category": [pda.Check.isin(list(CATEGORIES))],
        "category_source": [pda.Check.isin(list(CATEGORY_SOURCES))],
        "parent_id": [pda.Check.str_length(min_value=1)],
    }


CONTRACT = Contract("preference_pairs", ARROW, _checks, unique=("pair_id",))


def check_dataset(table: pa.Table, where: str) -> None:
    """Dataset-level expectation: a rejected answer never equals its chosen answer.

    Raises:
        InputError: naming the first offending row.
    """
    from refinery.core.errors import InputError

    for i, (c, r) in enumerate(zip(table.column("chosen").to_pylist(), table.column("rejected").to_pylist())):
        if c.strip() == r.strip():
            raise InputError(where, "rejected equals chosen (preference_pairs contract)", row=i + 1,
                             field="rejected")
