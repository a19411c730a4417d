"""Reject answers whose per-token perplexity under a judge model is too high (nonsense) or too low (repetition)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from refinery.core.params import StageParams
from refinery.gates.base import BaseGate, GateContext, Verdicts, human_quantile

CONTEXT = "Question: {question}\nAnswer:"


class PerplexityParams(StageParams):
    """Perplexity gate bounds (filtering brief), under the judge model: ``gate.perplexity``."""

    min_perplexity: float = Field(gt=0)
    max_perplexity: float | None = Field(default=None, gt=0)  # null: max_factor x the human 95th percentile
    max_factor: float = Field(gt=0)


class PerplexityGate(BaseGate):
    """Perplexity of the answer given its question under the judge model (filtering brief).

    Codes: ``perplexity_too_high`` (above ``max_perplexity``: incoherent text), ``perplexity_too_low``
    (below ``min_perplexity``: degenerate repetition), ``perplexity_no_answer``, ``perplexity_error``
    (the model failed or gave a non-finite number: fail closed).

    Source: perplexity filtering of web and synthetic text (Wenzek et al. 2020, CCNet; Marion et al. 2023,
    "When Less is More: Investigating Data Pruning for Pretraining LLMs at Scale"); the filtering brief
    (docs/sources.md).

    Args:
        backend: a model backend with ``loglikelihood(contexts, continuations)``.
        min_perplexity: lowest perplexity kept.
        max_perplexity: highest perplexity kept.
    """

    name = "perplexity"
    fail_closed = True

    def __init__(self, backend, min_perplexity: float, max_perplexity: float):
        super().__init__()
        if not 0 < min_perplexity < max_perplexity:
            raise ValueError("perplexity: need 0 < min_perplexity < max_perplexity")
        self.backend, self.min_perplexity, self.max_perplexity = backend, min_perplexity, max_perplexity

    @classmethod
    def calibrate(cls, params: PerplexityParams, ctx: GateContext) -> dict[str, Any]:
        """``max_perplexity``: the param, or ``max_factor`` x the 95th percentile of the human calibration answers'."""
        max_ppl = params.max_perplexity
        if max_ppl is None:
            probe = cls(ctx.models.judge, params.min_perplexity, 1e9)  # only scores: its bounds are not used
            max_ppl = params.max_factor * human_quantile(probe.perplexities(ctx.calib), 0.95)
        return {"min_perplexity": params.min_perplexity, "max_perplexity": float(max_ppl)}

    @classmethod
    def build(cls, bounds: dict[str, Any], ctx: GateContext) -> PerplexityGate:
        return cls(ctx.models.judge, bounds["min_perplexity"], bounds["max_perplexity"])

    def perplexities(self, rows: pa.Table) -> np.ndarray:
        """Return exp(-mean log-prob per answer token); NaN where there is no answer."""
        q, a = rows.column("question").to_pylist(), rows.column("answer").to_pylist()
        idx = [i for i in range(rows.num_rows) if (a[i] or "").strip()]
        out = np.full(rows.num_rows, np.nan)
        if idx:
            scored = self.backend.loglikelihood([CONTEXT.format(question=q[i] or "") for i in idx],
                                                [" " + a[i].strip() for i in idx])
            for i, (ll, n) in zip(idx, scored):
                out[i] = math.exp(-ll / n) if n > 0 and math.isfinite(ll) else math.nan
        return out

    def judge(self, rows: pa.Table) -> Verdicts:
        """Judge every row (the base class fails closed when the model fails)."""
        answers = rows.column("answer").to_pylist()
        ppl = self.perplexities(rows)
        keep, score, reason = [], [], []
        for ans, p in zip(answers, ppl.tolist()):
            if not (ans or "").strip():
                keep.append(False), score.append(None), reason.append("perplexity_no_answer")
            elif not math.isfinite(p):
                keep.append(False), score.append(None), reason.append("perplexity_error")
            elif p > self.max_perplexity:
                keep.append(False), score.append(p), reason.append("perplexity_too_high")
            elif p < self.min_perplexity:
                keep.append(False), score.append(p), reason.append("perplexity_too_low")
            else:
                keep.append(True), score.append(p), reason.append(None)
        return Verdicts(keep, score, reason)
