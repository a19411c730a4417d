"""The model-collapse check: replace vs accumulate across generations of students trained on their predecessor's
answers.

Generation 0 is the untuned student. Generation g's training data is written by generation g-1's model: it answers
the questions of the human train rows. Arm ``replace`` trains generation g on those answers alone; arm
``accumulate`` on the human train rows plus every generation's answers so far (the non-shrinking human anchor).
Each generation fine-tunes the untuned student afresh (a new LoRA adapter) with the same optimizer steps, and
answers the human test split. Shumailov et al. 2024 ("AI models collapse when trained on recursively generated
data", Nature 631) show rare knowledge vanishing under replacement; Gerstgrasser et al. 2024 ("Is Model Collapse
Inevitable?", arXiv 2404.01413) show accumulation avoiding it. Per generation this module measures, on the human
test split: token F1, factual accuracy on the verifiable items, answer diversity (distinct-2, embedding spread),
and on the rare-intent and rare-cluster test items their F1 and the share answered right (F1 >= ``correct_f1``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from refinery.core.params import StageParams
from refinery.core.text import stable_id

Embed = Callable[[Sequence[str]], np.ndarray]  # texts -> L2-normalised vectors


class CollapseParams(StageParams):
    """Knobs of the collapse stage (train and evaluate knobs come from their own sections)."""

    generations: int = Field(ge=0)  # generations after the untuned student; 0: the stage is off
    arms: list[Literal["replace", "accumulate"]] = Field(min_length=1)
    train_rows: int | None = Field(default=None, ge=1)  # human train rows whose questions are answered (seeded)
    test_rows: int | None = Field(default=None, ge=1)  # human test rows measured (seeded sample); null: all
    max_steps: int | None = Field(default=None, ge=1)  # optimizer steps per generation; null: train.max_steps
    correct_f1: float = Field(gt=0, le=1)  # a test item is answered right at this token F1 or above
    rare_min_rows: int = Field(ge=1)  # an intent with fewer human train rows is rare
    clusters: int = Field(ge=1)  # k-means clusters of the human train questions (embedder role)
    rare_share: float = Field(gt=0, lt=1)  # a cluster holding less than this share of train rows is rare
    seed: int
    bootstrap: int = Field(ge=100)  # resamples of the paired bootstrap intervals
    ci: float = Field(gt=0, lt=1)


def sample(table: pa.Table, size: int | None, seed: int) -> pa.Table:
    """A seeded sample of ``size`` rows in file order (all rows when ``size`` is null or not smaller)."""
    if size is None or table.num_rows <= size:
        return table
    keep = np.sort(np.random.default_rng(seed).permutation(table.num_rows)[:size])
    return table.take(pa.array(keep, pa.int64()))


def rare_intents(train: pa.Table, min_rows: int) -> set[str]:
    """Intents with fewer than ``min_rows`` human train rows (rows without an intent count for none)."""
    if "intent" not in train.column_names:
        return set()
    counts = Counter(v for v in train.column("intent").to_pylist() if v is not None)
    return {k for k, n in counts.items() if n < min_rows}


def clusters_of(train_q: Sequence[str], test_q: Sequence[str], embed: Embed, *, k: int, seed: int,
                rare_share: float) -> tuple[np.ndarray, set[int], dict[str, Any]]:
    """K-means over the train questions; each test question's nearest centroid, and the rare clusters.

    Returns:
        (cluster per test question, rare cluster ids, a summary: train rows per cluster and the rare ones).
    """
    from refinery.validation.diversity import cluster_counts, kmeans_centroids

    tv = np.asarray(embed(list(train_q)), dtype=np.float64)
    centroids = kmeans_centroids(tv, k, seed)
    counts = cluster_counts(tv, centroids)
    rare = {int(c) for c in np.flatnonzero(counts < rare_share * len(train_q))}
    test_c = np.argmax(np.asarray(embed(list(test_q)), dtype=np.float64) @ centroids.T, axis=1)
    return test_c, rare, {"train_rows_per_cluster": counts.tolist(), "rare_clusters": sorted(rare)}


def synthetic_rows(train: pa.Table, answers: Sequence[str], *, arm: str, generation: int,
                   writer: str) -> list[dict[str, Any]]:
    """The rows generation ``generation`` trains on: each train question with ``writer``'s answer; an empty answer
    is kept out of training with its reason (never dropped)."""
    from refinery.training.textmetrics import token_f1

    out = []
    for r, a in zip(train.to_pylist(), answers):
        a = a.strip()
        out.append({"row_id": stable_id("col", arm, str(generation), r["row_id"]), "arm": arm,
                    "generation": generation, "writer": writer, "parent_id": r["row_id"], "question": r["question"],
                    "human_answer": r["answer"], "answer": a, "f1_to_human": round(token_f1(a, r["answer"]), 6),
                    "kept": bool(a), "reason": None if a else "collapse_empty_answer"})
    return out


def training_table(train: pa.Table, synthetic: Sequence[dict[str, Any]], *, with_human: bool) -> pa.Table:
    """A train-stage dataset: the kept synthetic rows as QA rows on their parent's passage (plus the human rows)."""
    by_id = {r["row_id"]: r for r in train.to_pylist()}
    rows = [dict(r) for r in by_id.values()] if with_human else []
    for s in synthetic:
        if s["kept"]:
            rows.append({**by_id[s["parent_id"]], "row_id": s["row_id"], "answer": s["answer"],
                         "origin": "synthetic", "parent_ids": [s["parent_id"]]})
    return pa.Table.from_pylist(rows, schema=train.schema)


def spread(vectors: np.ndarray) -> float:
    """Embedding spread: the mean cosine distance of the answers to their centroid (0 when all are the same)."""
    if len(vectors) == 0:
        return 0.0
    c = vectors.mean(axis=0)
    c = c / max(float(np.linalg.norm(c)), 1e-12)
    return float(np.mean(1.0 - vectors @ c))


def measure(rows: Sequence[dict[str, Any]], embed: Embed) -> dict[str, Any]:
    """One generation's figures on its test answers (ANSWERS contract rows)."""
    from refinery.validation.diversity import distinct_n

    preds = [r["prediction"] for r in rows]
    verifiable = [r["factual_correct"] for r in rows if r["factual_verifiable"]]
    rare_i = [r for r in rows if r["rare_intent"]]
    rare_c = [r for r in rows if r["rare_cluster"]]
    vecs = np.asarray(embed([p or " " for p in preds]), dtype=np.float64)

    def share(xs: list) -> float | None:
        return round(sum(bool(x) for x in xs) / len(xs), 4) if xs else None

    def f1(xs: list[dict[str, Any]]) -> float | None:
        return round(float(np.mean([r["f1"] for r in xs])), 4) if xs else None

    return {"test_rows": len(rows), "f1": round(float(np.mean([r["f1"] for r in rows])), 4) if rows else None,
            "correct_share": share([r["correct"] for r in rows]),
            "factual_items": len(verifiable), "factual_accuracy": share(verifiable),
            "distinct_2": round(distinct_n(preds, 2), 4), "embedding_spread": round(spread(vecs), 4),
            "empty_answers": sum(1 for p in preds if not p.strip()),
            "rare_intent_items": len(rare_i), "rare_intent_f1": f1(rare_i),
            "rare_intent_correct_share": share([r["correct"] for r in rare_i]),
            "rare_cluster_items": len(rare_c), "rare_cluster_f1": f1(rare_c),
            "rare_cluster_correct_share": share([r["correct"] for r in rare_c])}


def compare(answers: pa.Table, a: str, b: str, *, n: int, ci: float, seed: int) -> dict[str, Any]:
    """Paired bootstrap of model ``a`` minus model ``b`` over the test rows both answered: F1 and correct share."""
    from refinery.report.stats import paired_bootstrap

    rows = answers.to_pylist()
    fa = {r["row_id"]: r for r in rows if r["model"] == a}
    fb = {r["row_id"]: r for r in rows if r["model"] == b}
    ids = sorted(set(fa) & set(fb))
    out = {"rows": len(ids)}
    for col in ("f1", "correct"):
        out[col] = paired_bootstrap(np.array([float(fa[i][col]) for i in ids]),
                                    np.array([float(fb[i][col]) for i in ids]), n=n, ci=ci, seed=seed)
    return out


def plot(curves: dict[str, list[dict[str, Any]]], path: Any, note: str | None = None) -> None:
    """Six panels against the generation, one line per arm (generation 0, the untuned student, is shared); with
    ``note`` (the stage is off), a figure that says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if note is not None:
        fig, ax = plt.subplots(figsize=(7, 1.5), dpi=100)
        ax.axis("off")
        ax.text(0.5, 0.5, note, ha="center", va="center", fontsize=8, wrap=True)
        fig.savefig(path, format="png", metadata={"Software": None})
        plt.close(fig)
        return
    panels = [("f1", "token F1"), ("factual_accuracy", "factual accuracy (verifiable items)"),
              ("distinct_2", "distinct-2 of answers"), ("rare_intent_f1", "token F1 on rare-intent items"),
              ("embedding_spread", "embedding spread of answers"),
              ("rare_cluster_f1", "token F1 on rare-cluster items")]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), dpi=100)
    for ax, (key, title) in zip(axes.flat, panels):
        for arm, points in curves.items():
            xs = [p["generation"] for p in points if p.get(key) is not None]
            ys = [p[key] for p in points if p.get(key) is not None]
            ax.plot(xs, ys, marker="o", label=arm)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("generation")
        ax.set_xticks(sorted({p["generation"] for ps in curves.values() for p in ps}))
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
