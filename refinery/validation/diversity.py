"""Measure dataset diversity: seed-cluster coverage in embedding space, DCScore, distinct-n, concept coverage.

Sources: distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models");
DCScore (Zhu et al. 2025, "Measuring Diversity in Synthetic Datasets", arXiv 2502.08512: diversity as
sample classification, the trace of the row-wise softmax of a kernel similarity matrix); embedding-space coverage
of the seed's k-means clusters (generation brief, docs/sources.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Embed = Callable[[Sequence[str]], np.ndarray]  # texts -> L2-normalised vectors (rows, dim)


def sample_indices(n: int, size: int, seed: int) -> np.ndarray:
    """Return a sorted, seeded sample of ``min(n, size)`` row indices (all rows when ``n <= size``)."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Return distinct word n-grams / all word n-grams over ``texts`` (0.0 when there are none).

    Words are those of :func:`refinery.core.text.match_key` (case-folded, punctuation removed), hashed vectorised.
    """
    import pyarrow as pa

    from refinery.core.textkernels import match_keys, word_tokens

    tokens = word_tokens(match_keys(pa.array(list(texts), pa.string())))
    h, off = tokens.hashes, tokens.offsets
    pos = np.arange(len(h))
    valid = pos + n - 1 < off[tokens.rows + 1]  # n-grams never cross rows
    pos = pos[valid]
    grams = np.zeros(len(pos), np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            grams = (grams * np.uint64(0x100000001B3)) ^ h[pos + k]
    return float(len(np.unique(grams)) / len(grams)) if len(grams) else 0.0


def dcscore(vectors: np.ndarray, temperature: float = 1.0) -> float:
    """Return DCScore / rows: the mean probability that a row is classified as itself.

    Kernel: the inner product of L2-normalised vectors (cosine); each row's similarities go through a softmax
    with ``temperature``; DCScore is the trace of that matrix. Divided by the row count it lies in
    (1/rows, 1]: 1 when every row is its own class (all distinct), 1/rows when all rows are the same.

    Args:
        vectors: (rows, dim) L2-normalised embeddings.
        temperature: softmax temperature (the paper's tau).
    """
    n = len(vectors)
    if n == 0:
        return 0.0
    k = (vectors @ vectors.T) / temperature
    k -= k.max(axis=1, keepdims=True)
    p = np.exp(k)
    return float(np.mean(np.diag(p) / p.sum(axis=1)))


def kmeans_centroids(vectors: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster seed vectors with k-means (seeded, k capped at the row count) and return unit-norm centroids."""
    from sklearn.cluster import KMeans

    k = max(1, min(k, len(vectors)))
    km = KMeans(n_clusters=k, random_state=seed, n_init=4).fit(vectors)
    c = km.cluster_centers_
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def cluster_counts(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Count rows per centroid, each row assigned to its most similar centroid."""
    if len(vectors) == 0:
        return np.zeros(len(centroids), np.int64)
    return np.bincount(np.argmax(vectors @ centroids.T, axis=1), minlength=len(centroids))


def coverage(values: Sequence[str | None], reference: Sequence[str | None]) -> float:
    """Return the share of distinct non-null reference values that occur in ``values`` (1.0 for no reference)."""
    ref = {v for v in reference if v is not None}
    return len(ref & {v for v in values if v is not None}) / len(ref) if ref else 1.0


@dataclass(frozen=True)
class Diversity:
    """Diversity of one dataset (on a seeded sample of at most ``rows`` rows)."""

    rows: int
    cluster_coverage: float
    synthetic_cluster_coverage: float | None
    cluster_counts: list[int]
    dcscore: float
    distinct_1: float
    distinct_2: float

    def as_dict(self) -> dict:
        """Plain, rounded values for metrics and the audit log."""
        r = lambda x: None if x is None else round(float(x), 4)  # noqa: E731
        return {"rows_sampled": self.rows, "cluster_coverage": r(self.cluster_coverage),
                "synthetic_cluster_coverage": r(self.synthetic_cluster_coverage),
                "cluster_counts": self.cluster_counts, "dcscore": r(self.dcscore),
                "distinct_1": r(self.distinct_1), "distinct_2": r(self.distinct_2)}


def measure(texts: Sequence[str], synthetic: np.ndarray, centroids: np.ndarray, embed: Embed, sample: int,
            seed: int, temperature: float) -> Diversity:
    """Measure one dataset's diversity against the seed clusters.

    Args:
        texts: one text per row (question and answer).
        synthetic: bool per row, True for rows not written by humans.
        centroids: unit-norm seed k-means centroids (:func:`kmeans_centroids`).
        embed: the embedding function (cached Embedder, or a test double).
        sample: rows sampled for embeddings, DCScore and distinct-n (equal sizes compare fairly).
        seed: sampling seed.
        temperature: DCScore softmax temperature.
    """
    idx = sample_indices(len(texts), sample, seed)
    chosen = [texts[i] for i in idx]
    vecs = embed(chosen) if len(chosen) else np.zeros((0, centroids.shape[1]), np.float32)
    counts = cluster_counts(vecs, centroids)
    syn = np.asarray(synthetic, bool)[idx]
    syn_cov = float((cluster_counts(vecs[syn], centroids) > 0).mean()) if syn.any() else None
    return Diversity(len(idx), float((counts > 0).mean()) if len(centroids) else 0.0, syn_cov,
                     counts.astype(int).tolist(), dcscore(vecs, temperature), distinct_n(chosen, 1),
                     distinct_n(chosen, 2))


class HashingEmbedder:
    """A deterministic, model-free embedder: L2-normalised hashed word uni- and bigram counts.

    The test double of :class:`refinery.models.embed.Embedder` for diversity metrics (and a fast fallback).
    """

    def __init__(self, dim: int = 256):
        self.dim = dim

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        from sklearn.feature_extraction.text import HashingVectorizer

        vec = HashingVectorizer(n_features=self.dim, ngram_range=(1, 2), alternate_sign=False, norm="l2")
        return vec.transform(list(texts)).toarray().astype(np.float32)
