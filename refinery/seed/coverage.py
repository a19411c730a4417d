"""Audit the seed's coverage before generating, aim generation at the gaps, and measure which gaps a dataset closed.

"Audit your seeds for coverage before generating at scale: you cannot recover diversity later." The audit
embeds the seed train rows (question and answer) and the passage windows of their documents, clusters the rows
with k-means, and counts seed rows per cluster, intent and document category; a passage window is *covered* when
a seed row's evidence span overlaps it. Generation (``generate.allocation: coverage``) then takes its parents
from the least-covered clusters first (round robin over clusters, smallest first; within one, the rarest intent
first) and its new passages from windows no seed row covers; validate counts the windows a dataset's synthetic
rows reached (gaps closed) and those still open.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from refinery.core.text import sentence_spans
from schemas.coverage import GROUPS_ARROW, PASSAGES_ARROW, ROWS_ARROW

Embed = Callable[[Sequence[str]], np.ndarray]


def passage_windows(text: str, size: int) -> list[tuple[int, int]]:
    """Cut a document into consecutive, non-overlapping windows of ``size`` sentences (the last may be shorter)."""
    spans = sentence_spans(text)
    if not spans:
        return [(0, len(text))] if text.strip() else []
    return [(spans[i][0], spans[min(i + size, len(spans)) - 1][1]) for i in range(0, len(spans), size)]


def overlapping(window: tuple[int, int], spans: Sequence[tuple[int, int]]) -> int:
    """Count the spans that share at least one character with ``window``."""
    return sum(1 for s, e in spans if s < window[1] and window[0] < e)


def row_text(question: str | None, answer: str | None) -> str:
    """The text a row is embedded and clustered by (as validate's diversity does)."""
    return f"{question or ''} {answer or ''}".strip()


@dataclass(frozen=True)
class CoverageAudit:
    """The audit's tables (contracts in schemas/coverage.py) and metrics."""

    rows: pa.Table
    groups: pa.Table
    passages: pa.Table
    centroids: np.ndarray  # unit-norm k-means centroids of the seed rows (validate assigns synthetic rows to them)
    metrics: dict[str, Any]


def audit(train: pa.Table, documents: pa.Table, embed: Embed, *, clusters: int, seed: int, window_sentences: int,
          rare_share: float) -> CoverageAudit:
    """Measure the seed train split's coverage of topics (clusters), intents, categories and passages.

    Args:
        train: the human train split (split contract): the rows generation starts from.
        documents: the documents table; only the documents of train rows hold candidate passages (the others
            belong to held-out splits, or have no seed row, and generation never reads them).
        embed: texts -> unit-norm vectors (the embedder role).
        clusters: k of the k-means over seed rows (capped at the row count).
        seed: the k-means seed.
        window_sentences: sentences per passage window.
        rare_share: a cluster, intent or category holding less than this share of the seed rows is a gap.

    Returns:
        The audit: rows (per seed row its cluster and map position), groups (per cluster, intent and category),
        passages (per window of a train document: covered or not, nearest cluster, map position) and metrics.
    """
    from sklearn.decomposition import PCA

    from refinery.validation.diversity import kmeans_centroids

    rows = train.select(["row_id", "doc_id", "question", "answer", "intent", "evidence_start",
                         "evidence_end"]).to_pylist()
    docs = {d["doc_id"]: d for d in documents.to_pylist()}
    vecs = np.asarray(embed([row_text(r["question"], r["answer"]) for r in rows]), np.float32)
    centroids = kmeans_centroids(vecs, clusters, seed)
    cluster_of = np.argmax(vecs @ centroids.T, axis=1) if len(rows) else np.zeros(0, np.int64)
    spans: dict[str, list[tuple[int, int]]] = {}
    for r in rows:
        spans.setdefault(r["doc_id"], []).append((r["evidence_start"], r["evidence_end"]))
    passages = []
    for doc_id in sorted(spans):
        d = docs[doc_id]
        for start, end in passage_windows(d["text"], window_sentences):
            passages.append({"doc_id": doc_id, "start": start, "end": end, "category": d["category"],
                             "stale": bool(d["stale"]), "seed_rows": overlapping((start, end), spans[doc_id])})
    pvecs = (np.asarray(embed([docs[p["doc_id"]]["text"][p["start"]:p["end"]] for p in passages]), np.float32)
             if passages else np.zeros((0, vecs.shape[1]), np.float32))
    p_cluster = np.argmax(pvecs @ centroids.T, axis=1) if passages else np.zeros(0, np.int64)
    both = np.concatenate([vecs, pvecs])
    xy = (PCA(n_components=2, random_state=seed).fit_transform(both) if len(both) >= 2
          else np.zeros((len(both), 2)))
    row_xy, p_xy = xy[:len(rows)], xy[len(rows):]
    category_of = {r["row_id"]: docs[r["doc_id"]]["category"] for r in rows}
    rows_out = pa.table({
        "row_id": [r["row_id"] for r in rows], "doc_id": [r["doc_id"] for r in rows],
        "intent": [r["intent"] for r in rows], "category": [category_of[r["row_id"]] for r in rows],
        "cluster": pa.array(cluster_of.astype(np.int32), pa.int32()),
        "x": pa.array(row_xy[:, 0], pa.float64()), "y": pa.array(row_xy[:, 1], pa.float64())}, schema=ROWS_ARROW)
    passages_out = pa.Table.from_pylist(passages) if passages else None
    n = max(len(rows), 1)
    groups = []

    def add(kind: str, keys: list[Any], members: Callable[[Any], list[dict[str, Any]]],
            windows: Callable[[Any], list[dict[str, Any]]]) -> None:
        for key in keys:
            got, ws = members(key), windows(key)
            share = len(got) / n
            groups.append({"kind": kind, "key": str(key), "seed_rows": len(got),
                           "documents": len({r["doc_id"] for r in got}), "share": round(share, 4),
                           "passages": len(ws), "uncovered_passages": sum(1 for w in ws if w["seed_rows"] == 0),
                           "gap": share < rare_share})

    by_cluster = Counter(cluster_of.tolist())
    add("cluster", list(range(len(centroids))), lambda c: [r for r, k in zip(rows, cluster_of) if k == c],
        lambda c: [p for p, k in zip(passages, p_cluster) if k == c])
    intents = sorted({r["intent"] for r in rows if r["intent"] is not None})
    add("intent", intents, lambda i: [r for r in rows if r["intent"] == i], lambda i: [])
    categories = sorted({category_of[r["row_id"]] for r in rows if category_of[r["row_id"]] is not None})
    add("category", categories, lambda c: [r for r in rows if category_of[r["row_id"]] == c],
        lambda c: [p for p in passages if p["category"] == c])
    groups_out = pa.Table.from_pylist(groups, schema=GROUPS_ARROW)
    if passages_out is None:
        passages_out = pa.Table.from_pylist([], schema=PASSAGES_ARROW)
    else:
        passages_out = pa.table({
            **{c: passages_out.column(c) for c in ("doc_id", "start", "end", "category", "stale", "seed_rows")},
            "covered": pa.array([p["seed_rows"] > 0 for p in passages], pa.bool_()),
            "cluster": pa.array(p_cluster.astype(np.int32), pa.int32()),
            "x": pa.array(p_xy[:, 0], pa.float64()), "y": pa.array(p_xy[:, 1], pa.float64())}, schema=PASSAGES_ARROW)
    fresh = [p for p in passages if not p["stale"]]
    metrics = {
        "seed_rows": len(rows), "clusters": len(centroids),
        "cluster_rows": [int(by_cluster.get(c, 0)) for c in range(len(centroids))],
        "smallest_cluster_share": round(min(by_cluster.get(c, 0) for c in range(len(centroids))) / n, 4)
        if len(centroids) else None,
        "gap_clusters": [g["key"] for g in groups if g["kind"] == "cluster" and g["gap"]],
        "intents": {g["key"]: g["seed_rows"] for g in groups if g["kind"] == "intent"},
        "rare_intents": [g["key"] for g in groups if g["kind"] == "intent" and g["gap"]],
        "categories": {g["key"]: g["seed_rows"] for g in groups if g["kind"] == "category"},
        "rare_categories": [g["key"] for g in groups if g["kind"] == "category" and g["gap"]],
        "train_documents": len(spans), "documents_outside_train": len(docs) - len(spans),
        "passages": len(fresh), "passages_covered": sum(p["seed_rows"] > 0 for p in fresh),
        "passages_uncovered": sum(p["seed_rows"] == 0 for p in fresh),
        "passage_coverage": round(sum(p["seed_rows"] > 0 for p in fresh) / len(fresh), 4) if fresh else None,
        "stale_passages": len(passages) - len(fresh),
        "window_sentences": window_sentences, "rare_share": rare_share,
    }
    return CoverageAudit(rows_out, groups_out, passages_out, centroids, metrics)


def priority_order(rows: Sequence[dict[str, Any]], cluster_of: dict[str, int], rng: np.random.Generator
                   ) -> list[dict[str, Any]]:
    """Order parent rows least-covered first: round robin over clusters, smallest first; within one, rarest intent.

    Each pass takes one row of every cluster that has rows left, so a budget smaller than the seed reaches every
    cluster, and small clusters get as many calls as large ones (more per seed row). Ties break by ``rng``.
    Rows without a cluster (not in the audit) come last, in ``rng`` order.
    """
    intent_rows = Counter(r.get("intent") for r in rows)
    groups: dict[int, list[dict[str, Any]]] = {}
    unknown = []
    for i in rng.permutation(len(rows)):
        r = rows[int(i)]
        c = cluster_of.get(r["row_id"])
        (unknown if c is None else groups.setdefault(c, [])).append(r)
    for c in groups:  # stable sort on the shuffled order: equal intents keep their random order
        groups[c].sort(key=lambda r: intent_rows[r.get("intent")])
    queues = [groups[c] for c in sorted(groups, key=lambda c: (len(groups[c]), c))]
    out = []
    for depth in range(max((len(q) for q in queues), default=0)):
        out += [q[depth] for q in queues if depth < len(q)]
    return out + unknown


def centroids_table(centroids: np.ndarray) -> pa.Table:
    """The centroids as a table: one row per cluster, its unit-norm vector."""
    return pa.table({"cluster": pa.array(np.arange(len(centroids), dtype=np.int32), pa.int32()),
                     "vector": pa.array([c.astype(np.float32).tolist() for c in centroids],
                                        pa.list_(pa.float32()))})


def read_centroids(table: pa.Table) -> np.ndarray:
    """Inverse of :func:`centroids_table`."""
    order = np.argsort(table.column("cluster").to_numpy())
    return np.asarray([table.column("vector")[int(i)].as_py() for i in order], np.float32)


def gaps_closed(dataset: pa.Table, passages: pa.Table, centroids: np.ndarray | None = None,
                embed: Embed | None = None) -> dict[str, Any]:
    """Count the seed's uncovered passage windows a dataset's synthetic rows reach (closed) or not (still open).

    A synthetic row reaches a window when its evidence span overlaps it. Stale windows are not counted (generation
    skips stale documents). With ``centroids`` and ``embed``: the synthetic rows per seed cluster, and the clusters
    reached by at least one.
    """
    syn = [r for r in dataset.select(["source", "doc_id", "evidence_start", "evidence_end", "question",
                                      "answer"]).to_pylist() if r["source"] != "human"]
    spans: dict[str, list[tuple[int, int]]] = {}
    for r in syn:
        if r["evidence_start"] is not None:
            spans.setdefault(r["doc_id"], []).append((r["evidence_start"], r["evidence_end"]))
    windows = [p for p in passages.to_pylist() if not p["stale"]]
    reached = [p for p in windows if overlapping((p["start"], p["end"]), spans.get(p["doc_id"], []))]
    open_before = [p for p in windows if not p["covered"]]
    closed = [p for p in open_before if overlapping((p["start"], p["end"]), spans.get(p["doc_id"], []))]
    out: dict[str, Any] = {
        "synthetic_rows": len(syn), "passages": len(windows), "passages_reached_by_synthetic": len(reached),
        "uncovered_before": len(open_before), "closed": len(closed), "still_open": len(open_before) - len(closed),
        "passage_coverage_before": round(1 - len(open_before) / len(windows), 4) if windows else None,
        "passage_coverage_after": round(1 - (len(open_before) - len(closed)) / len(windows), 4) if windows else None}
    if centroids is not None and embed is not None and len(centroids):
        counts = np.zeros(len(centroids), np.int64)
        if syn:
            vecs = np.asarray(embed([row_text(r["question"], r["answer"]) for r in syn]), np.float32)
            counts = np.bincount(np.argmax(vecs @ centroids.T, axis=1), minlength=len(centroids))
        out["synthetic_rows_per_cluster"] = counts.astype(int).tolist()
        out["clusters_reached_by_synthetic"] = int((counts > 0).sum())
    return out
