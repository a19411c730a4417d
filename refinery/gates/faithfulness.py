"""Check each answer against evidence: its exact source passage (grounded), retrieved passages, or none."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import numpy as np
import pyarrow as pa
from pydantic import Field

from refinery.core.params import StageParams
from refinery.gates.base import BaseGate, GateContext, Verdicts
from refinery.models.claims import claim_text

MODES = ("grounded", "retrieved", "ungrounded")


class FaithfulnessParams(StageParams):
    """Faithfulness gate: which judge, which evidence, which bound (``gate.faithfulness``)."""

    judge: Literal["verifier", "llm"]  # trained/HF verifier, or the judge LLM's P(yes)
    verifier: str  # 'trained' (the train_verifier stage's model) or an HF NLI / cross-encoder id or path
    mode: Literal["grounded", "retrieved", "ungrounded"]
    min_support: float | None = Field(default=None, ge=0, le=1)  # null: the verifier's calibrated threshold
    compare_modes: bool = True  # also score the planted errors in all three modes (grounding brief's comparison)
    target_false_rejection: float = Field(ge=0, le=1)  # equal-FRR point for the mode comparison


class Scorer(Protocol):
    """Scores support of claims by passages in [0, 1] (``refinery.models.verifier`` models, the LLM judge, doubles)."""

    def score(self, passages: Sequence[str], claims: Sequence[str]) -> np.ndarray:
        """One probability per pair; NaN where it could not score."""
        ...


class PassageRetriever:
    """Find evidence post hoc: the document sentence window nearest to a claim in embedding space.

    Used by the ``retrieved`` mode, which stands for pipelines that do not keep provenance and must
    search for evidence after generation (the grounding brief's comparison, docs/sources.md).
    """

    def __init__(self, documents: pa.Table, embedder: Any, window_sentences: int = 2):
        from refinery.core.text import sentence_spans

        self.embedder = embedder
        self.windows: list[str] = []
        for text in documents.column("text").to_pylist():
            spans = sentence_spans(text) or [(0, len(text))]
            for i in range(max(len(spans) - window_sentences + 1, 1)):
                self.windows.append(text[spans[i][0]:spans[min(i + window_sentences, len(spans)) - 1][1]])
        self._vecs: np.ndarray | None = None

    def passages(self, claims: Sequence[str]) -> list[str]:
        """Return the best-matching window for each claim."""
        if self._vecs is None:
            self._vecs = np.asarray(self.embedder.embed(self.windows), np.float32)
        q = np.asarray(self.embedder.embed(list(claims)), np.float32)
        # float64 (exact products of float32 numbers): the chosen window does not follow the claims batched with it
        best = (q.astype(np.float64) @ self._vecs.T.astype(np.float64)).argmax(axis=1) if len(q) else np.zeros(0, int)
        return [self.windows[i] for i in best.tolist()]


class FaithfulnessGate(BaseGate):
    """Reject answers their evidence does not support (provenance-grounded faithfulness, grounding brief).

    Modes: ``grounded`` scores (exact source passage recorded by generation, question + answer);
    ``retrieved`` scores against the document window nearest the claim (evidence found post hoc);
    ``ungrounded`` scores the answer against its question alone (a judge without evidence).
    Codes: ``faithfulness_unsupported`` (support below ``min_support``), ``faithfulness_no_evidence``
    (grounded mode, no evidence span), ``faithfulness_no_answer`` (nothing to check),
    ``faithfulness_error`` (the scorer failed or returned NaN: fail closed, never a pass).

    Sources: passage-level NLI for factual consistency (Laban et al. 2022, SummaC: sentence-level
    aggregation by max); FActScore-style grounding in the source (Min et al. 2023); the grounding brief
    (docs/sources.md).

    Args:
        scorer: the verifier or LLM judge.
        documents: documents table (doc_id, text).
        mode: one of MODES.
        min_support: support probability below which a row is rejected.
        retriever: needed by ``retrieved`` mode.
    """

    name = "faithfulness"
    fail_closed = True

    def __init__(self, scorer: Scorer, documents: pa.Table, *, mode: str = "grounded", min_support: float = 0.5,
                 retriever: PassageRetriever | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"faithfulness: unknown mode {mode!r} (one of {', '.join(MODES)})")
        if mode == "retrieved" and retriever is None:
            raise ValueError("faithfulness: retrieved mode needs a retriever")
        if not 0.0 <= min_support <= 1.0:
            raise ValueError(f"faithfulness: min_support must lie in [0, 1], got {min_support}")
        self.scorer, self.mode, self.min_support, self.retriever = scorer, mode, min_support, retriever
        self.texts = dict(zip(documents.column("doc_id").to_pylist(), documents.column("text").to_pylist()))

    @staticmethod
    def scorer_for(judge: str, models: Any) -> Scorer:
        """Return the configured judge: the verifier, or the judge model as an :class:`LLMJudge`."""
        return models.verifier if judge == "verifier" else LLMJudge(models.judge)

    @classmethod
    def calibrate(cls, params: FaithfulnessParams, ctx: GateContext) -> dict[str, Any]:
        """``min_support``: the param, or the verifier's calibrated threshold; the judge and evidence mode."""
        min_support = params.min_support
        if min_support is None:
            min_support = getattr(cls.scorer_for(params.judge, ctx.models), "threshold", None)
            if min_support is None:
                raise ValueError("gate.faithfulness.min_support is null but the verifier records no calibrated "
                                 "threshold: set a number")
        return {"judge": params.judge, "mode": params.mode, "min_support": float(min_support)}

    @classmethod
    def build(cls, bounds: dict[str, Any], ctx: GateContext) -> FaithfulnessGate:
        mode = bounds["mode"]
        retriever = PassageRetriever(ctx.documents, ctx.models.embedder) if mode == "retrieved" else None
        return cls(cls.scorer_for(bounds["judge"], ctx.models), ctx.documents, mode=mode,
                   min_support=float(bounds["min_support"]), retriever=retriever)

    def scores(self, rows: pa.Table) -> tuple[np.ndarray, list[str | None]]:
        """Return support per row (NaN: not scored) and a reason for rows that could not be scored."""
        n = rows.num_rows
        q, a = rows.column("question").to_pylist(), rows.column("answer").to_pylist()
        starts, ends = rows.column("evidence_start").to_pylist(), rows.column("evidence_end").to_pylist()
        docs = rows.column("doc_id").to_pylist()
        pre: list[str | None] = [None] * n
        passages, claims, idx = [], [], []
        for i in range(n):
            if not (a[i] or "").strip():
                pre[i] = "faithfulness_no_answer"
                continue
            claim = claim_text(q[i], a[i])
            if self.mode == "grounded":
                text = self.texts.get(docs[i])
                if text is None or starts[i] is None or ends[i] is None or not 0 <= starts[i] < ends[i] <= len(text):
                    pre[i] = "faithfulness_no_evidence"
                    continue
                passage = text[starts[i]:ends[i]]
            elif self.mode == "ungrounded":
                passage = (q[i] or "").strip() or claim
            else:
                passage = ""  # filled by the retriever below
            passages.append(passage)
            claims.append(claim)
            idx.append(i)
        out = np.full(n, np.nan)
        if idx:
            if self.mode == "retrieved":
                passages = self.retriever.passages(claims)
            out[idx] = np.asarray(self.scorer.score(passages, claims), dtype=float)
        return out, pre

    def judge(self, rows: pa.Table) -> Verdicts:
        """Judge every row; NaN support fails closed (``faithfulness_error``), as a failing scorer does."""
        support, pre = self.scores(rows)
        keep, score, reason = [], [], []
        for s, p in zip(support.tolist(), pre):
            if p is not None:
                keep.append(False), score.append(None), reason.append(p)
            elif s is None or not math.isfinite(s):
                keep.append(False), score.append(None), reason.append("faithfulness_error")
            else:
                ok = s >= self.min_support
                keep.append(ok), score.append(s), reason.append(None if ok else "faithfulness_unsupported")
        return Verdicts(keep, score, reason)


JUDGE_PROMPT = ("Passage: {passage}\nQuestion: {question}\nAnswer: {answer}\n"
                "Is the answer fully supported by the passage? Reply yes or no.\nReply:")


class LLMJudge:
    """Score support with a language model: P(" yes") against P(" no") after a verdict prompt.

    The probability comes from the model's log-likelihoods of the two verdict tokens, never from
    parsing generated text (a peer tool read "1. The answer..." as a grounding score of 1.0).
    """

    def __init__(self, backend: Any):
        self.backend = backend

    def score(self, passages: Sequence[str], claims: Sequence[str]) -> np.ndarray:
        """Return P(yes) / (P(yes) + P(no)) per pair; NaN where the model gave no finite numbers."""
        contexts = [JUDGE_PROMPT.format(passage=p, question="", answer=c).replace("Question: \n", "")
                    for p, c in zip(passages, claims)]
        yes = self.backend.loglikelihood(contexts, [" yes"] * len(contexts))
        no = self.backend.loglikelihood(contexts, [" no"] * len(contexts))
        out = np.full(len(contexts), np.nan)
        for i, ((ly, _), (ln, _)) in enumerate(zip(yes, no)):
            if math.isfinite(ly) and math.isfinite(ln):
                m = max(ly, ln)
                out[i] = math.exp(ly - m) / (math.exp(ly - m) + math.exp(ln - m))
        return out
