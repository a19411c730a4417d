"""Draw the few-shot seed examples of a prompt, and render them: shared by generation and recovery's resampling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class ShotPool:
    """Seed rows indexed by document, so a draw of shots from other documents costs O(shots), not O(rows).

    Args:
        rows: seed rows (split contract) in a fixed order; the pool keeps this order.
    """

    def __init__(self, rows: Sequence[dict[str, Any]]):
        self.rows = list(rows)
        positions: dict[Any, list[int]] = {}
        for i, r in enumerate(self.rows):
            positions.setdefault(r["doc_id"], []).append(i)
        # per document, each of its rows' position minus the rows of that document before it: the number of other
        # documents' rows that precede it
        self._before = {d: np.asarray(p, np.int64) - np.arange(len(p)) for d, p in positions.items()}
        self._none = np.zeros(0, np.int64)

    def sample(self, doc_id: str, n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
        """Draw ``n`` rows from other documents than ``doc_id``, without replacement (see :func:`sample_shots`)."""
        before = self._before.get(doc_id, self._none)
        others = len(self.rows) - len(before)
        if not others:
            return []
        picks = rng.choice(others, size=min(n, others), replace=False)
        # the k-th row of the other documents sits after every row of doc_id that fewer than k + 1 others precede
        return [self.rows[i] for i in (picks + np.searchsorted(before, picks, side="right")).tolist()]


def sample_shots(rows: Sequence[dict[str, Any]] | ShotPool, doc_id: str, n: int,
                 rng: np.random.Generator) -> list[dict[str, Any]]:
    """Draw ``n`` seed rows from other documents than ``doc_id`` (the prompt's own passage), without replacement.

    Draws nothing when no other document has rows; otherwise one ``rng.choice`` call (also when ``n`` is 0), so a
    caller that shares ``rng`` with other draws sees the same sequence whatever ``n`` is. The draw is the same as
    ``rng.choice`` over the list of other documents' rows in ``rows`` order.

    Args:
        rows: seed rows (split contract) in a fixed order, or a :class:`ShotPool` of them (callers that draw many
            times build one pool: a list costs a pass over every row per draw).
        doc_id: the document the prompt is about: its rows are never shots.
        n: shots wanted (fewer when fewer rows qualify).
        rng: the random generator (the caller's seed decides the draw).

    Returns:
        The drawn rows, in draw order.
    """
    pool = rows if isinstance(rows, ShotPool) else ShotPool(rows)
    return pool.sample(doc_id, n, rng)


def shot_values(shots: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Return the template values of each shot: its question, answer and evidence (its passage is its evidence)."""
    return [{"question": r["question"], "answer": r["answer"], "evidence": r["evidence"], "passage": r["evidence"],
             "title": ""} for r in shots]
