"""Draw the few-shot seed examples of a prompt, and render them: shared by generation and recovery's resampling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def sample_shots(rows: Sequence[dict[str, Any]], doc_id: str, n: int,
                 rng: np.random.Generator) -> list[dict[str, Any]]:
    """Draw ``n`` seed rows from other documents than ``doc_id`` (the prompt's own passage), without replacement.

    Draws nothing when no other document has rows; otherwise one ``rng.choice`` call (also when ``n`` is 0), so a
    caller that shares ``rng`` with other draws sees the same sequence whatever ``n`` is.

    Args:
        rows: seed rows (split contract) in a fixed order.
        doc_id: the document the prompt is about: its rows are never shots.
        n: shots wanted (fewer when fewer rows qualify).
        rng: the random generator (the caller's seed decides the draw).

    Returns:
        The drawn rows, in draw order.
    """
    others = [r for r in rows if r["doc_id"] != doc_id]
    if not others:
        return []
    return [others[i] for i in rng.choice(len(others), size=min(n, len(others)), replace=False)]


def shot_values(shots: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Return the template values of each shot: its question, answer and evidence (its passage is its evidence)."""
    return [{"question": r["question"], "answer": r["answer"], "evidence": r["evidence"], "passage": r["evidence"],
             "title": ""} for r in shots]
