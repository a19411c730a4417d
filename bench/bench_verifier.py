"""Print a trained verifier's held-out false-rejection rate, recall per corruption kind and scoring speed.

Usage: python bench/bench_verifier.py --model DIR --split data/02_split/test.parquet \
           --documents data/01_seed/documents.parquet [--threshold T] [--seed 7] [--threads 2] [--models DIR]
The threshold defaults to the one recorded in the model folder's TRAINING.json (calibrated on val). A verifier
whose combiner reads the judge's answer likelihood loads the judge from the provisioned models folder.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refinery.core import dag  # noqa: E402
from refinery.planted import corruptions as corr  # noqa: E402
from refinery.models.verifier import load_verifier, roc_auc, threshold_for_frr  # noqa: E402
from refinery.models.verifier_pairs import build_pairs  # noqa: E402


@click.command()
@click.option("--model", "model_dir", required=True)
@click.option("--split", "split_file", required=True)
@click.option("--documents", "documents_file", required=True)
@click.option("--threshold", type=float, default=None)
@click.option("--seed", type=int, default=7)
@click.option("--threads", type=int, default=2)
@click.option("--lexical/--no-lexical", default=True, show_default=True,
              help="Use the folder's lexical combiner (COMBINER.json) when it has one.")
@click.option("--models", "models_dir", default=dag.default("provision", "--out", needed_for="--models"),
              show_default="the provision stage's --out in dvc.yaml",
              help="Provisioned models (the judge, when the combiner reads its likelihood features).")
def main(model_dir: str, split_file: str, documents_file: str, threshold: float | None, seed: int,
         threads: int, lexical: bool, models_dir: str) -> None:
    """Score clean and corrupted rows of a held-out split and print the gate's figures as JSON."""
    judge = None
    spec = Path(model_dir) / "COMBINER.json"
    if lexical and spec.is_file() and "judge" in json.loads(spec.read_text()):
        from refinery.models.backends.factory import make_backend
        from refinery.models.resolve import backend_spec, load_target

        judge = make_backend(backend_spec(load_target(models_dir, "judge"), batch_size=16, threads=threads))
    embedder = None
    if lexical and spec.is_file() and "answer_passage_cosine" in json.loads(spec.read_text())["features"]:
        from refinery.models.embed import Embedder
        from refinery.models.resolve import load_target

        target = load_target(models_dir, "embedder")
        embedder = Embedder(target["path"], model_id=target["id"])
    verifier = load_verifier(model_dir, batch_size=64, threads=threads, lexical=lexical, judge=judge,
                             embedder=embedder)
    threshold = verifier.threshold if threshold is None else threshold
    pairs = build_pairs(pq.read_table(split_file), pq.read_table(documents_file), seed=seed,
                        negatives_per_positive=len(corr.FACTUAL_KINDS), counterfactual=False,
                        sentence_positives=False)
    t0 = time.perf_counter()
    scores = verifier.score(pairs.column("passage").to_pylist(), pairs.column("claim").to_pylist())
    seconds = time.perf_counter() - t0
    labels = np.asarray(pairs.column("label").to_pylist()) >= 0.5
    kinds = np.asarray(pairs.column("kind").to_pylist())
    reject = np.nan_to_num(scores, nan=0.0) < threshold
    out = {"model": model_dir, "split": split_file, "threshold": threshold, "pairs": len(labels),
           "auc": round(roc_auc(labels, np.nan_to_num(scores)), 4),
           "false_rejection": round(float(reject[labels].mean()), 4),
           "recall_factual": round(float(reject[~labels].mean()), 4),
           "recall_per_kind": {k: round(float(reject[kinds == k].mean()), 4) for k in sorted(set(kinds) - {"clean"})},
           "pairs_per_second": round(len(labels) / seconds, 1), "nan": int(np.isnan(scores).sum())}
    # Threshold-free comparison (model alone vs combined): recall when the threshold is set on this split's own
    # clean rows to reject 10% of them.
    s = np.nan_to_num(scores, nan=0.0)
    t10 = threshold_for_frr(s[labels], 0.10)
    out["recall_factual_at_own_frr_0.10"] = round(float((s[~labels] < t10).mean()), 4)
    out["false_rejection_at_own_threshold"] = round(float((s[labels] < t10).mean()), 4)
    click.echo(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
