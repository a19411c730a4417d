"""Reject answers a reward model scores as low quality for their question."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
from pydantic import Field

from refinery.core.params import StageParams
from refinery.gates.base import BaseGate, GateContext, Verdicts, human_quantile


class RewardParams(StageParams):
    """Reward gate: ``gate.reward``."""

    model: str  # 'trained' (the train_reward stage's model) or an HF reward model id or path
    min_reward: float | None = None  # null: the human_quantile of human val answers' rewards
    human_quantile: float = Field(ge=0, le=1)


class RewardScorer(Protocol):
    """Scores (question, answer) quality; higher is better."""

    def score(self, questions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        """One score per pair; NaN where it could not score."""
        ...


class RewardGate(BaseGate):
    """Reject rows whose reward is below ``min_reward`` (``reward_low``); fail closed (``reward_error``).

    Source: reward-model filtering of synthetic data (grounding and governance briefs, docs/sources.md; rejection
    sampling with a reward model as in Llama 2 / RAFT, Dong et al. 2023). The embedded reward head is trained by the
    train_reward stage on preference pairs built from the seed (chosen = human answer).

    Args:
        scorer: the reward model.
        min_reward: the lowest score kept.
    """

    name = "reward"
    fail_closed = True

    def __init__(self, scorer: RewardScorer, min_reward: float):
        super().__init__()
        self.scorer, self.min_reward = scorer, float(min_reward)

    @classmethod
    def calibrate(cls, params: RewardParams, ctx: GateContext) -> dict[str, Any]:
        """``min_reward``: the param, or the ``human_quantile`` of the human calibration answers' rewards."""
        min_reward = params.min_reward
        if min_reward is None:
            min_reward = human_quantile(ctx.models.reward.score(ctx.calib.column("question").to_pylist(),
                                                                ctx.calib.column("answer").to_pylist()),
                                        params.human_quantile)
        return {"min_reward": float(min_reward)}

    @classmethod
    def build(cls, bounds: dict[str, Any], ctx: GateContext) -> RewardGate:
        return cls(ctx.models.reward, bounds["min_reward"])

    def judge(self, rows: pa.Table) -> Verdicts:
        """Judge every row (rows without an answer get ``reward_no_answer``)."""
        n = rows.num_rows
        q, a = rows.column("question").to_pylist(), rows.column("answer").to_pylist()
        idx = [i for i in range(n) if (a[i] or "").strip() and (q[i] or "").strip()]
        scores = np.full(n, np.nan)
        if idx:
            scores[idx] = np.asarray(self.scorer.score([q[i] for i in idx], [a[i] for i in idx]), float)
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
