"""Reject answers whose per-token perplexity under a judge model is too high (nonsense) or too low (repetition)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow as pa

from refinery.gates.base import Verdicts

log = logging.getLogger(__name__)

CONTEXT = "Question: {question}\nAnswer:"


class PerplexityGate:
    """Perplexity of the answer given its question under the judge model (seed 002).

    Codes: ``perplexity_too_high`` (above ``max_perplexity``: incoherent text), ``perplexity_too_low``
    (below ``min_perplexity``: degenerate repetition), ``perplexity_no_answer``, ``perplexity_error``
    (the model failed or gave a non-finite number: fail closed).

    Source: perplexity filtering of web and synthetic text (Wenzek et al. 2020, CCNet; Marion et al. 2023,
    "When Less is More: Investigating Data Pruning for Pretraining LLMs at Scale"); seed 002.

    Args:
        backend: a model backend with ``loglikelihood(contexts, continuations)``.
        min_perplexity: lowest perplexity kept.
        max_perplexity: highest perplexity kept.
    """

    name = "perplexity"

    def __init__(self, backend, min_perplexity: float, max_perplexity: float):
        if not 0 < min_perplexity < max_perplexity:
            raise ValueError("perplexity: need 0 < min_perplexity < max_perplexity")
        self.backend, self.min_perplexity, self.max_perplexity = backend, min_perplexity, max_perplexity
        self.last_error: str | None = None

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

    def apply(self, rows: pa.Table) -> Verdicts:
        """Judge every row, failing closed."""
        n = rows.num_rows
        if n == 0:
            return Verdicts([], [], [])
        answers = rows.column("answer").to_pylist()
        self.last_error = None
        try:
            ppl = self.perplexities(rows)
        except Exception as e:  # noqa: BLE001 - fail closed
            self.last_error = f"{type(e).__name__}: {e}"
            log.warning("perplexity: model failed, rejecting all %d rows: %s", n, self.last_error)
            return Verdicts([False] * n, [None] * n, ["perplexity_error"] * n)
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
