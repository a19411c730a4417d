"""Build small tables of generated rows (synthetic contract) and seed rows for gate tests."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from refinery.core.text import stable_id
from schemas import synthetic

ROOT = Path(__file__).resolve().parents[2]


def rows(pairs: list[tuple[str | None, str | None]], **columns: list) -> pa.Table:
    """Return generated rows of the synthetic contract, one per (question, answer), row_ids in input order.

    Args:
        pairs: (question, answer) per row.
        columns: per-column value lists that replace the defaults (error, parse_error, finish_reason, row_id).
    """
    n = len(pairs)
    base = {
        "row_id": [f"qa_{i:016x}" for i in range(n)], "origin": ["synthetic"] * n, "parent_ids": [[]] * n,
        "doc_id": ["d1"] * n, "evidence_start": [None] * n, "evidence_end": [None] * n,
        "strategy": ["new_question"] * n, "teacher": ["fake@1"] * n, "prompt_template": ["t@1"] * n,
        "gen_params": ["{}"] * n, "attempt": [0] * n, "recovery_action": [None] * n, "params_hash": ["p"] * n,
        "code_version": ["c"] * n, "question": [q for q, _ in pairs], "answer": [a for _, a in pairs],
        "intent": [None] * n, "evidence": [None] * n, "raw_output": [f"{q}\n{a}" for q, a in pairs],
        "parse_error": [None] * n, "error": [None] * n, "finish_reason": ["stop"] * n, "prompt_tokens": [1] * n,
        "completion_tokens": [1] * n, "seed": [0] * n, "sample_index": [0] * n,
        "cache_key": [stable_id("k", str(i), length=64)[2:] for i in range(n)],
    }
    base.update(columns)
    return pa.Table.from_pydict(base, schema=synthetic.ARROW)


def seed_rows(pairs: list[tuple[str, str]]) -> pa.Table:
    """Return seed rows with the columns gates read from the split contract (question, answer)."""
    return pa.table({"question": [q for q, _ in pairs], "answer": [a for _, a in pairs]})


@pytest.fixture(scope="session")
def minilm_path(minilm_dir) -> Path:
    """The embedded MiniLM folder (from its package, so a fresh clone runs these tests too)."""
    return minilm_dir
