"""Define the gate interface and its batch verdicts (CONVENTIONS 5: keep / score / reason)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa


@dataclass(frozen=True)
class Verdicts:
    """One gate's decision on every row of a batch, in row order.

    keep: True to keep the row. score: the gate's number for the row (None when it has none).
    reason: a stable snake_case code prefixed by the gate name (``rules_refusal``,
    ``dedup_near_seed``) for every rejected row; None for kept rows.
    """

    keep: list[bool]
    score: list[float | None]
    reason: list[str | None]

    def __post_init__(self) -> None:
        if not (len(self.keep) == len(self.score) == len(self.reason)):
            raise ValueError("keep, score and reason must have one entry per row")
        for k, r in zip(self.keep, self.reason):
            if k != (r is None):
                raise ValueError("a rejected row needs a reason and a kept row has none")

    def to_columns(self, gate: str) -> dict[str, pa.Array]:
        """Return ``<gate>_keep``, ``<gate>_score``, ``<gate>_reason`` columns."""
        return {f"{gate}_keep": pa.array(self.keep, pa.bool_()),
                f"{gate}_score": pa.array(self.score, pa.float64()),
                f"{gate}_reason": pa.array(self.reason, pa.string())}


class Gate(Protocol):
    """A quality gate. ``name`` prefixes its reason codes; thresholds are named by their bound."""

    name: str

    def apply(self, rows: pa.Table) -> Verdicts:
        """Judge every row of ``rows`` (synthetic contract columns) and return one verdict per row."""
        ...
