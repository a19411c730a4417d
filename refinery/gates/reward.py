"""Reject answers a reward model scores as low quality for their question."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import pyarrow as pa

from refinery.gates.base import Verdicts

log = logging.getLogger(__name__)


class RewardScorer(Protocol):
    """Scores (question, answer) quality; higher is better."""

    def score(self, questions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        """One score per pair; NaN where it could not score."""
        ...


class RewardGate:
    """Reject rows whose reward is below ``min_reward`` (``reward_low``); fail closed (``reward_error``).

    Source: reward-model filtering of synthetic data (seed 000, 003; rejection sampling with a reward
    model as in Llama 2 / RAFT, Dong et al. 2023). The embedded reward head is trained by the
    train_reward stage on preference pairs built from the seed (chosen = human answer).

    Args:
        scorer: the reward model.
        min_reward: the lowest score kept.
    """

    name = "reward"

    def __init__(self, scorer: RewardScorer, min_reward: float):
        self.scorer, self.min_reward = scorer, float(min_reward)
        self.last_error: str | None = None

    def apply(self, rows: pa.Table) -> Verdicts:
        """Judge every row (rows without an answer get ``reward_no_answer``)."""
        n = rows.num_rows
        if n == 0:
            return Verdicts([], [], [])
        q, a = rows.column("question").to_pylist(), rows.column("answer").to_pylist()
        idx = [i for i in range(n) if (a[i] or "").strip() and (q[i] or "").strip()]
        scores = np.full(n, np.nan)
        self.last_error = None
        try:
            if idx:
                scores[idx] = np.asarray(self.scorer.score([q[i] for i in idx], [a[i] for i in idx]), float)
        except Exception as e:  # noqa: BLE001 - fail closed
            self.last_error = f"{type(e).__name__}: {e}"
            log.warning("reward: scorer failed, rejecting all %d rows: %s", n, self.last_error)
            return Verdicts([False] * n, [None] * n, ["reward_error"] * n)
        wanted = set(idx)
        keep, score, reason = [], [], []
        for i, s in enumerate(scores.tolist()):
            if i not in wanted:
                keep.append(False), score.append(None), reason.append("reward_no_answer")
            elif not math.isfinite(s):
                keep.append(False), score.append(None), reason.append("reward_error")
            else:
                ok = s >= self.min_reward
                keep.append(ok), score.append(s), reason.append(None if ok else "reward_low")
        return Verdicts(keep, score, reason)
