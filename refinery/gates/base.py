"""Define the gate interface, its batch verdicts (CONVENTIONS 5: keep / score / reason) and the shared base class."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)


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

    @classmethod
    def rejecting(cls, n: int, reason: str) -> Verdicts:
        """Reject ``n`` rows with one reason and no score."""
        return cls([False] * n, [None] * n, [reason] * n)

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


@dataclass(frozen=True)
class GateContext:
    """What gates are calibrated and built from, besides their params: data and the stage's loaded models.

    Attributes:
        train: human train rows (the seed that dedup and overlap compare against).
        documents: documents (doc_id, text): evidence for faithfulness, the source that PII must come from.
        models: the loaded models (``refinery.gates.run.Models``), or None where no gate needs one.
        cache_dir: the signature and embedding cache (None: in memory).
        calib: human rows that calibrate null bounds (the gate stage only; recovery never calibrates).
    """

    train: pa.Table
    documents: pa.Table
    models: Any = None
    cache_dir: Path | None = None
    calib: pa.Table | None = None


def human_quantile(values: np.ndarray, q: float) -> float:
    """Return the q-quantile of finite values (a bound calibrated on human answers)."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        raise ValueError("no finite score on the human calibration rows")
    return float(np.quantile(finite, q))


@dataclass
class GateStats:
    """What one gate object did: rows judged and kept, rejections per reason, batches it failed closed on."""

    judged: int = 0
    kept: int = 0
    failed_batches: int = 0
    reasons: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"judged": self.judged, "kept": self.kept, "failed_batches": self.failed_batches,
                "reasons": dict(sorted(self.reasons.items()))}


class BaseGate:
    """A gate: ``judge`` gives the verdicts, ``apply`` adds the empty-batch case, fail-closed handling and stats.

    A gate with ``fail_closed`` (every gate that calls a model) never lets a row through when its model fails:
    whatever ``judge`` raises rejects every row of the batch with ``<name>_error`` and no score, and the
    message is kept in ``last_error``. Gates without it let exceptions propagate (a bug in a text rule must
    stop the run, not reject everything).

    A subclass also says how its thresholds are resolved and how it is built from them:
    :meth:`calibrate` (the gate stage only: params, where null, calibrated on human rows) returns the values
    that ``data/04_gated/thresholds.json`` records for it, and :meth:`build` makes the gate from exactly those
    values (the gate stage, and recovery when it re-gates candidates).
    """

    name: ClassVar[str]
    fail_closed: ClassVar[bool] = False

    def __init__(self) -> None:
        self.last_error: str | None = None
        self.stats = GateStats()

    @classmethod
    def calibrate(cls, params: Any, ctx: GateContext) -> dict[str, Any]:
        """Return every bound the gate uses, resolved (JSON values): the gate's entry in thresholds.json."""
        raise NotImplementedError

    @classmethod
    def build(cls, bounds: dict[str, Any], ctx: GateContext) -> BaseGate:
        """Build the gate from its resolved bounds (as :meth:`calibrate` returned them) and the context."""
        raise NotImplementedError

    def judge(self, rows: pa.Table) -> Verdicts:
        """Judge a non-empty batch (subclasses)."""
        raise NotImplementedError

    def apply(self, rows: pa.Table) -> Verdicts:
        """Judge every row; reject the whole batch with ``<name>_error`` if a fail-closed gate's model fails."""
        n = rows.num_rows
        if n == 0:
            return Verdicts([], [], [])
        self.last_error = None
        if not self.fail_closed:
            verdicts = self.judge(rows)
        else:
            try:
                verdicts = self.judge(rows)
            except Exception as e:  # noqa: BLE001 - fail closed: whatever the model raised, no row may pass
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("%s: the model failed, rejecting all %d rows: %s", self.name, n, self.last_error)
                self.stats.failed_batches += 1
                verdicts = Verdicts.rejecting(n, f"{self.name}_error")
        self.stats.judged += n
        self.stats.kept += sum(verdicts.keep)
        self.stats.reasons.update(r for r in verdicts.reason if r is not None)
        return verdicts
