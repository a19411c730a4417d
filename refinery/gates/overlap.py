"""Reject generated rows that copy the seed: shared word 8-grams, or embedding cosine to the nearest seed row."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from refinery.core.params import StageParams
from refinery.gates.base import BaseGate, GateContext, Verdicts
from refinery.gates.dedup import near_dup_texts
from refinery.core.textkernels import ROWS_PER_PASS, Tokens, U64Set, as_strings, mix64, per_row_sum, word_tokens

_U64 = np.uint64
_GRAM_MUL = mix64(np.arange(1, 33, dtype=_U64)) | _U64(1)  # one odd multiplier per gram position
_COSINE_ROWS = 4096  # rows per similarity block (block x seed floats in memory)


class OverlapParams(StageParams):
    """Seed-overlap bounds of the overlap_ngram and overlap_embedding gates: ``gate.overlap`` (experiment brief: an
    8-gram share >= 0.30 or a cosine >= 0.85 is rejected)."""

    ngram: int = Field(gt=0)
    max_ngram_overlap: float = Field(ge=0, le=1)
    max_cosine: float = Field(ge=-1, le=1)


def ngram_hashes(tokens: Tokens, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hash every run of ``n`` consecutive tokens within a row.

    Args:
        tokens: word token hashes with row offsets.
        n: gram length in words.

    Returns:
        (uint64 gram hashes, the row of each gram).
    """
    counts = tokens.counts
    grams = np.maximum(counts - n + 1, 0)
    total = int(grams.sum())
    if total == 0:
        return np.zeros(0, _U64), np.zeros(0, np.int64)
    rows = np.repeat(np.arange(len(counts)), grams)
    starts = tokens.offsets[:-1][rows] + (np.arange(total) - np.repeat(np.cumsum(grams) - grams, grams))
    h = np.zeros(total, _U64)
    with np.errstate(over="ignore"):
        for m in range(n):
            h += tokens.hashes[starts + m] * _GRAM_MUL[m]
    return mix64(h), rows


class NgramOverlapGate(BaseGate):
    """Reject rows whose word 8-grams are mostly found in the seed (copied or lightly edited seed text).

    Score: the share of the row's word n-grams (question + answer, case-folded, punctuation removed, as
    :func:`refinery.core.text.match_key` tokenises) that occur in any seed row's n-grams. Reject at or above
    ``max_ngram_overlap`` → ``overlap_ngram``. Rows shorter than n words have no n-grams, score 0 and pass
    (exact copies of short seed rows are caught by ``dedup_exact_seed``).

    Source: n-gram overlap contamination checks of GPT-3 (Brown et al. 2020, appendix C: 13-gram overlap)
    and of Llama 2 (Touvron et al. 2023, section A.6: share of contaminated tokens); 8-grams and the 0.30
    threshold come from the experiment brief (docs/sources.md; short QA text needs shorter grams than documents).

    Args:
        seed: seed rows (question, answer).
        max_ngram_overlap: the share of shared n-grams (0-1) at which a row is rejected.
        n: gram length in words.
    """

    name = "overlap_ngram"

    def __init__(self, seed: pa.Table, max_ngram_overlap: float = 0.30, n: int = 8):
        super().__init__()
        if not 0.0 < max_ngram_overlap <= 1.0:
            raise ValueError(f"overlap_ngram: max_ngram_overlap must lie in (0, 1], got {max_ngram_overlap}")
        if not 1 <= n <= len(_GRAM_MUL):
            raise ValueError(f"overlap_ngram: n must be 1..{len(_GRAM_MUL)}, got {n}")
        self.max_ngram_overlap, self.n = max_ngram_overlap, n
        grams, _ = ngram_hashes(word_tokens(near_dup_texts(seed.column("question"), seed.column("answer"))), n)
        self._seed_grams = U64Set(grams)

    @classmethod
    def calibrate(cls, params: OverlapParams, ctx: GateContext) -> dict[str, Any]:
        return {"ngram": params.ngram, "max_ngram_overlap": params.max_ngram_overlap}

    @classmethod
    def build(cls, bounds: dict[str, Any], ctx: GateContext) -> NgramOverlapGate:
        return cls(ctx.train, max_ngram_overlap=bounds["max_ngram_overlap"], n=bounds["ngram"])

    def scores(self, rows: pa.Table) -> np.ndarray:
        """Return each row's share of n-grams found in the seed (0 for rows without n-grams).

        Args:
            rows: rows with question and answer.

        Returns:
            float per row.
        """
        out = []
        for lo in range(0, rows.num_rows, ROWS_PER_PASS):
            part = rows.slice(lo, ROWS_PER_PASS)
            tokens = word_tokens(near_dup_texts(part.column("question"), part.column("answer")))
            grams, gram_rows = ngram_hashes(tokens, self.n)
            hits = per_row_sum(gram_rows, self._seed_grams.contains(grams), part.num_rows)
            total = np.bincount(gram_rows, minlength=part.num_rows)
            out.append(np.where(total > 0, hits / np.maximum(total, 1), 0.0))
        return np.concatenate(out) if out else np.zeros(0)

    def judge(self, rows: pa.Table) -> Verdicts:
        """Judge every row.

        Args:
            rows: rows of the synthetic contract (question, answer).

        Returns:
            One verdict per row: score = share of n-grams in the seed, reason ``overlap_ngram`` when rejected.
        """
        score = self.scores(rows)
        keep = score < self.max_ngram_overlap
        return Verdicts(keep.tolist(), score.tolist(), [None if k else "overlap_ngram" for k in keep.tolist()])


class TextEmbedder(Protocol):
    """Anything that turns texts into L2-normalised vectors (:class:`refinery.models.embed.Embedder`, test doubles)."""

    def embed(self, texts: list[str]) -> np.ndarray:
        """Return float (texts, dim) vectors."""
        ...


def embedding_texts(question: pa.Array | pa.ChunkedArray, answer: pa.Array | pa.ChunkedArray) -> pa.StringArray:
    """Return the text embedded for a row: question, newline, answer (nulls as '')."""
    return pc.binary_join_element_wise(as_strings(question), as_strings(answer), "\n")


class EmbeddingOverlapGate(BaseGate):
    """Reject rows too close in meaning to a seed row: cosine similarity to the nearest seed example.

    Score: the highest cosine similarity between the row's embedding (question + answer) and any seed
    row's. Reject at or above ``max_cosine`` → ``overlap_embedding``. Fail closed: if embedding raises, or a
    similarity is not a finite number (NaN vectors from the model or the seed), the row is rejected with
    ``overlap_embedding_error`` and no score; it never passes.

    Source: embedding-based decontamination and semantic deduplication (Abbas et al. 2023, "SemDeDup";
    Yang et al. 2023, "Rethinking Benchmark and Contamination for Language Models with Rephrased Samples",
    which shows n-gram checks miss paraphrases); all-MiniLM-L6-v2 sentence embeddings (Reimers & Gurevych
    2019); the 0.85 threshold comes from the experiment brief (docs/sources.md).

    Args:
        seed: seed rows (question, answer).
        embedder: the embedding block (:class:`refinery.models.embed.Embedder`, or a test double with ``embed``).
        max_cosine: the cosine similarity (-1..1) at which a row is rejected.
    """

    name = "overlap_embedding"
    fail_closed = True

    def __init__(self, seed: pa.Table, embedder: TextEmbedder, max_cosine: float = 0.85):
        super().__init__()
        if not -1.0 <= max_cosine <= 1.0:
            raise ValueError(f"overlap_embedding: max_cosine must lie in [-1, 1], got {max_cosine}")
        self.embedder, self.max_cosine = embedder, max_cosine
        self._seed_texts = embedding_texts(seed.column("question"), seed.column("answer")).to_pylist()
        self._seed_vecs: np.ndarray | None = None

    @classmethod
    def calibrate(cls, params: OverlapParams, ctx: GateContext) -> dict[str, Any]:
        return {"max_cosine": params.max_cosine}

    @classmethod
    def build(cls, bounds: dict[str, Any], ctx: GateContext) -> EmbeddingOverlapGate:
        return cls(ctx.train, ctx.models.embedder, max_cosine=bounds["max_cosine"])

    def nearest(self, rows: pa.Table) -> np.ndarray:
        """Return each row's highest cosine similarity to a seed row (NaN where it is not a number).

        Args:
            rows: rows with question and answer.

        Returns:
            float per row (-inf when the seed is empty).

        Raises:
            Whatever the embedder raises.
        """
        if self._seed_vecs is None:
            self._seed_vecs = np.asarray(self.embedder.embed(self._seed_texts), np.float32)
        vecs = np.asarray(self.embedder.embed(embedding_texts(rows.column("question"),
                                                              rows.column("answer")).to_pylist()), np.float32)
        if len(self._seed_vecs) == 0:
            return np.full(len(vecs), -np.inf)
        # float64: products of float32 numbers are exact there, so a row's score no longer moves in its last bits with
        # how many rows share its matrix product (a Ray block against the whole table; docs/measurements.md)
        seed = self._seed_vecs.astype(np.float64).T
        out = np.empty(len(vecs))
        for lo in range(0, len(vecs), _COSINE_ROWS):
            sims = (vecs[lo:lo + _COSINE_ROWS].astype(np.float64) @ seed).astype(np.float32)
            out[lo:lo + _COSINE_ROWS] = sims.max(axis=1)  # NaN propagates: a NaN vector gives a NaN score
        return out

    def judge(self, rows: pa.Table) -> Verdicts:
        """Judge every row (the base class fails closed when the model fails).

        Args:
            rows: rows of the synthetic contract (question, answer).

        Returns:
            One verdict per row: ``overlap_embedding`` at or above max_cosine, ``overlap_embedding_error``
            when the model failed or gave no number.
        """
        n = rows.num_rows
        best = self.nearest(rows)
        if len(best) != n:
            raise ValueError(f"embedder returned {len(best)} vectors for {n} rows")
        keep, score, reason = [], [], []
        for s in best.tolist():
            if np.isnan(s):
                keep.append(False), score.append(None), reason.append("overlap_embedding_error")
            elif s >= self.max_cosine:
                keep.append(False), score.append(s), reason.append("overlap_embedding")
            else:
                keep.append(True), score.append(s if np.isfinite(s) else None), reason.append(None)
        return Verdicts(keep, score, reason)
