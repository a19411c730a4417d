"""Train the embedded faithfulness verifier from seed QA and realistic corruptions, and calibrate its threshold."""

from __future__ import annotations

import gzip
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow as pa
from pydantic import Field

from refinery.planted import corruptions as corr
from refinery.core.device import resolve_device
from refinery.core.errors import RefineryError
from refinery.core.params import StageParams, load_section, params_hash, read_key
from refinery.models.verifier_pairs import COUNTERFACTUAL_KINDS, PAIRS_ARROW, build_pairs


class TrainVerifierParams(StageParams):
    """Knobs of the train_verifier stage."""

    seed: int
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    max_length: int = Field(ge=32, le=512)  # tokens per (passage, claim) pair
    negatives_per_positive: int = Field(ge=1, le=len(corr.FACTUAL_KINDS))  # corrupted answers per seed answer
    counterfactual: bool = True  # add sentence-level counterfactual pairs (edited passage supports edited sentence)
    max_train_pairs: int | None = Field(default=None, ge=10)  # cap on training pairs (seeded sample); null: all
    trainable_layers: int = Field(default=6, ge=0, le=24)  # top encoder layers fine-tuned; the rest frozen
    snli_path: str | None = None  # SNLI *.jsonl(.gz) (premise, hypothesis, label) to pre-train on; null: off
    snli_max_pairs: int = Field(default=2000, ge=0)
    target_false_rejection: float = Field(gt=0, lt=1)  # share of clean val rows the calibrated threshold rejects
    lexical_combiner: bool = True  # combine the model with lexical grounding features (refinery.models.grounding)
    combiner_holdout: float = Field(default=0.2, gt=0, lt=1)  # share of train documents held out to fit it
    likelihood_features: bool = False  # the combiner also reads the judge's answer-token log-probs given the passage
    embedding_features: bool = False  # ... and the answer's embedding cosine with its passage and its question
    combiner_per_kind: bool = False  # one regression per corruption kind too; the score is the minimum over them
    combiner_boosted: bool = False  # gradient-boosted trees over the same features instead of regressions
    threads: int = Field(ge=1)
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")  # training; auto: CUDA, MPS, else CPU


@dataclass(frozen=True)
class VerifierResult:
    """What the stage core produced: the pairs it trained on and the metrics (the model is in out_dir)."""

    train_pairs: pa.Table
    val_pairs: pa.Table
    threshold: float
    metrics: dict[str, Any]


def read_snli(path: str, *, max_pairs: int, seed: int) -> pa.Table:
    """Read SNLI JSONL(.gz) into balanced pairs: entailment is supported; neutral and contradiction are not.

    Args:
        path: a ``.jsonl`` or ``.jsonl.gz`` file with premise, hypothesis, label.
        max_pairs: pairs kept (a seeded sample, half supported).
        seed: the sample's seed.
    """
    p = Path(path)
    if not p.is_file():
        raise RefineryError(f"train_verifier.snli_path: {path}: file not found")
    opener = gzip.open if p.suffix == ".gz" else open
    by_label: dict[str, list[tuple[str, str]]] = defaultdict(list)
    with opener(p, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                obj = json.loads(line)
                if obj.get("label") in ("entailment", "neutral", "contradiction"):
                    by_label[obj["label"]].append((obj["premise"], obj["hypothesis"]))
    rng = np.random.default_rng(seed)
    quota = {"entailment": max_pairs // 2, "neutral": max_pairs // 4, "contradiction": max_pairs - max_pairs // 2
             - max_pairs // 4}
    out = []
    for label, n in quota.items():
        items = by_label[label]
        for i in sorted(rng.choice(len(items), size=min(n, len(items)), replace=False).tolist()):
            out.append({"passage": items[i][0], "claim": items[i][1], "label": float(label == "entailment"),
                        "kind": f"snli_{label}", "doc_id": "snli", "detail": ""})
    return pa.Table.from_pylist(out, schema=PAIRS_ARROW)


def sample_pairs(pairs: pa.Table, max_pairs: int | None, seed: int) -> pa.Table:
    """Return at most ``max_pairs`` rows, a seeded sample in the original order (all rows when None)."""
    if max_pairs is None or pairs.num_rows <= max_pairs:
        return pairs
    keep = np.sort(np.random.default_rng(seed).choice(pairs.num_rows, size=max_pairs, replace=False))
    return pairs.take(pa.array(keep))


def holdout_by_document(pairs: pa.Table, share: float, seed: int) -> tuple[pa.Table, pa.Table | None]:
    """Split pairs by document: (pairs to train the model on, pairs of held-out documents to fit the combiner).

    The held-out documents are a seeded sample of ``share`` of the documents; None is returned for the
    second part when fewer than two documents exist or it would lack a label.
    """
    docs = sorted(set(pairs.column("doc_id").to_pylist()))
    n_out = int(round(share * len(docs)))
    if len(docs) < 2 or n_out == 0:
        return pairs, None
    held = set(np.asarray(docs)[np.random.default_rng(seed).permutation(len(docs))[:n_out]].tolist())
    mask = np.array([d in held for d in pairs.column("doc_id").to_pylist()])
    out = pairs.filter(pa.array(mask))
    labels = set(out.column("label").to_pylist())
    if len(labels) < 2:
        return pairs, None
    return pairs.filter(pa.array(~mask)), out


def fit_combiner(model_only: Any, holdout: pa.Table, val_pairs: pa.Table, out_dir: Path, *,
                 judge: Any | None = None, judge_id: str | None = None, embedder: Any | None = None,
                 per_kind: bool = False, boosted: bool = False, seed: int = 0) -> dict[str, Any]:
    """Fit the lexical combiner on held-out training pairs and save it beside the model (COMBINER.json).

    With ``judge`` (a backend with ``token_logprobs``, and ``token_offsets`` for the word features), the combiner
    also reads LIKELIHOOD_FEATURES; with ``embedder``, EMBEDDING_FEATURES. With ``per_kind``, it also fits one
    regression per corruption kind of the holdout, and scores by the minimum over them (``Combiner``). With
    ``boosted``, it fits gradient-boosted trees (seeded by ``seed``) on the holdout's clean answers and negatives.

    Returns:
        Its weights (boosted: the tree count and each feature's share of the split gain), the pairs it was fitted
        on, and the val AUC of the model alone and combined.
    """
    from refinery.models.grounding.features import EMBEDDING_FEATURES, FEATURES, LIKELIHOOD_FEATURES, OFFSET_FEATURES
    from refinery.models.grounding.learners import fit_combiner_spec
    from refinery.models.grounding.scorer import Combiner, combiner_matrix
    from refinery.models.verifier import roc_auc

    likelihood = () if judge is None else LIKELIHOOD_FEATURES if callable(getattr(judge, "token_offsets", None)) \
        else tuple(n for n in LIKELIHOOD_FEATURES if n not in OFFSET_FEATURES)  # no offsets: no word features
    names = FEATURES + likelihood + (EMBEDDING_FEATURES if embedder is not None else ())
    layout = Combiner({"features": list(names), "mean": [0.0] * len(names), "std": [1.0] * len(names),
                       "weights": [0.0] * len(names), "bias": 0.0})

    def matrix(t: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        passages, claims = t.column("passage").to_pylist(), t.column("claim").to_pylist()
        probs = np.asarray(model_only.score(passages, claims), dtype=float)
        x = combiner_matrix(layout, passages, claims, probs, judge=judge, embedder=embedder)
        return x, np.asarray(t.column("label").to_pylist()) >= 0.5

    x, y = matrix(holdout)
    ok = np.isfinite(x).all(axis=1)
    kinds = np.asarray(holdout.column("kind").to_pylist(), dtype=object)[ok] if per_kind or boosted else None
    combiner = Combiner(fit_combiner_spec(x[ok], y[ok].astype(float), names, kinds, boosted=boosted, seed=seed))
    xv, yv = matrix(val_pairs)
    okv = np.isfinite(xv).all(axis=1)
    model_auc = roc_auc(yv[okv], xv[okv, 0])
    combined_auc = roc_auc(yv[okv], combiner.predict(xv[okv]))
    metrics = {"fit_pairs": int(ok.sum()), "fit_documents": len(set(holdout.column("doc_id").to_pylist())),
               "val_auc_model_only": _r(model_auc), "val_auc_combined": _r(combined_auc),
               "per_kind": sorted(combiner.spec.get("per_kind") or {})}
    if boosted:
        metrics["boosted_trees"] = len(combiner.spec["boosted"]["trees"])
        metrics["importance"] = combiner.spec["boosted"]["importance"]
    else:
        metrics["weights"] = dict(zip(combiner.spec["features"], combiner.spec["weights"]))
    combiner.save(out_dir, {"fit_pairs": metrics["fit_pairs"], **({"judge": judge_id} if judge is not None else {})})
    return metrics


def evaluate(verifier: Any, val_pairs: pa.Table, target_frr: float, *,
             aggregation_sample: int = 300) -> tuple[float, dict[str, Any]]:
    """Score val pairs, pick the threshold for ``target_frr`` on clean rows, and measure recall per kind.

    Args:
        verifier: a loaded verifier.
        val_pairs: pairs from the val split (clean rows labelled 1, corruptions 0).
        target_frr: the largest share of clean val rows the threshold may reject.
        aggregation_sample: pairs (a fixed sample) rescored whole-passage and windows-only to compare aggregations.

    Returns:
        (threshold, metrics): AUC, accuracy and balanced accuracy at the threshold, false-rejection rate,
        recall per corruption kind, and the AUC of scoring whole passages against sentence windows.
    """
    from refinery.models.verifier import roc_auc, threshold_for_frr

    passages = val_pairs.column("passage").to_pylist()
    claims = val_pairs.column("claim").to_pylist()
    labels = np.asarray(val_pairs.column("label").to_pylist()) >= 0.5
    kinds = val_pairs.column("kind").to_pylist()
    scores = verifier.score(passages, claims)
    nan = int(np.isnan(scores).sum())
    scores = np.nan_to_num(scores, nan=0.0)
    threshold = threshold_for_frr(scores[labels], target_frr)
    accept = scores >= threshold
    recall = {}
    for kind in sorted(set(kinds) - {"clean"}):
        mask = np.array([k == kind for k in kinds])
        recall[kind] = {"n": int(mask.sum()), "recall": round(float((~accept[mask]).mean()), 4)}
    neg = ~labels
    full = windows = None
    sub = np.sort(np.random.default_rng(0).permutation(len(labels))[:aggregation_sample])
    sp, sc, sl = [passages[i] for i in sub], [claims[i] for i in sub], labels[sub]
    if hasattr(verifier, "full_max_chars"):  # aggregation design check: whole passage vs max over windows
        saved = verifier.full_max_chars
        try:
            verifier.full_max_chars = 10 ** 9
            full = roc_auc(sl, np.nan_to_num(verifier.score(sp, sc)))
            verifier.full_max_chars = 0
            windows = roc_auc(sl, np.nan_to_num(verifier.score(sp, sc)))
        finally:
            verifier.full_max_chars = saved
    metrics = {
        "pairs": len(labels), "clean": int(labels.sum()), "corrupted": int(neg.sum()), "nan_scores": nan,
        "auc": _r(roc_auc(labels, scores)), "threshold": round(threshold, 6),
        "target_false_rejection": target_frr,
        "false_rejection": round(float((~accept[labels]).mean()), 4),
        "recall_factual": round(float((~accept[neg]).mean()), 4) if neg.any() else None,
        "accuracy": round(float((accept == labels).mean()), 4),
        "balanced_accuracy": round(float(((~accept[neg]).mean() + accept[labels].mean()) / 2), 4),
        "recall_per_kind": recall,
        "aggregation_auc": {"auto": _r(roc_auc(sl, scores[sub])), "full_passage": _r(full),
                            "sentence_windows_max": _r(windows), "sample": min(aggregation_sample, len(labels))},
    }
    return threshold, metrics


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def train_verifier_core(train: pa.Table, val: pa.Table, documents: pa.Table, params: TrainVerifierParams,
                        base_path: str, out_dir: Path, *, snli: pa.Table | None = None, judge: Any | None = None,
                        judge_id: str | None = None, embedder: Any | None = None,
                        unseen_kinds: Sequence[str] = (),
                        log: Callable[[str], None] = lambda s: None) -> VerifierResult:
    """Build pairs, (optionally pre-train on SNLI,) train, save into ``out_dir`` and evaluate on val.

    Args:
        train, val: split-contract tables.
        documents: documents-contract table.
        params: the stage params.
        base_path: the encoder folder to start from.
        out_dir: an empty folder the model and tokenizer are saved into.
        snli: SNLI pairs to pre-train on first (read by the command), or None.
        judge: the judge backend whose answer likelihood the combiner reads (``likelihood_features``), or None.
        judge_id: its provenance id (recorded in COMBINER.json).
        embedder: the sentence embedder whose cosines the combiner reads (``embedding_features``), or None.
        unseen_kinds: corruption kinds left out of every training pair (leave-families-out).
        log: progress callback.

    Returns:
        Train and val pairs, the calibrated threshold and the metrics.
    """
    from refinery.models.heads import load_base, seed_everything
    from refinery.models.verifier import load_verifier, train_verifier

    if params.likelihood_features and not params.lexical_combiner:
        raise RefineryError("train_verifier: likelihood_features needs lexical_combiner: true (the combiner reads them)")
    if params.likelihood_features and judge is None:
        raise RefineryError("train_verifier: likelihood_features is on but no judge model was given")
    for knob in ("embedding_features", "combiner_per_kind", "combiner_boosted"):
        if getattr(params, knob) and not params.lexical_combiner:
            raise RefineryError(f"train_verifier: {knob} needs lexical_combiner: true (it is part of the combiner)")
    if params.combiner_per_kind and params.combiner_boosted:
        raise RefineryError("train_verifier: combiner_per_kind and combiner_boosted are two combiners: turn one off")
    if params.embedding_features and embedder is None:
        raise RefineryError("train_verifier: embedding_features is on but no embedder was given")
    embedder = embedder if params.embedding_features else None
    from refinery.models.grounding.features import Likelihood

    # one memory of judge scores for the combiner fit, the calibration and the aggregation check
    judge = Likelihood(judge) if params.likelihood_features else None

    seen = tuple(k for k in corr.FACTUAL_KINDS if k not in unseen_kinds)
    if not seen:
        raise RefineryError("inject.unseen_families leaves the verifier no corruption kind to train on")
    # leave-families-out: no training pair (nor combiner holdout pair) of an unseen kind; val pairs hold every
    # kind, so the val metrics show how the verifier does on the kinds it never saw
    all_train = build_pairs(train, documents, seed=params.seed, negatives_per_positive=params.negatives_per_positive,
                            counterfactual=params.counterfactual, kinds=seen,
                            counterfactual_kinds=tuple(k for k in COUNTERFACTUAL_KINDS if k not in unseen_kinds),
                            where="train")
    holdout = None
    if params.lexical_combiner:
        all_train, holdout = holdout_by_document(all_train, params.combiner_holdout, params.seed)
    train_pairs = sample_pairs(all_train, params.max_train_pairs, params.seed)
    val_pairs = build_pairs(val, documents, seed=params.seed + 1, negatives_per_positive=len(corr.FACTUAL_KINDS),
                            counterfactual=False, sentence_positives=False, where="val")
    knobs = dict(epochs=params.epochs, lr=params.lr, batch_size=params.batch_size, seed=params.seed,
                 max_length=params.max_length, threads=params.threads, trainable_layers=params.trainable_layers,
                 device=resolve_device(params.device, "train_verifier.device"))
    snli_metrics = None
    init = None
    if snli is not None and snli.num_rows:
        seed_everything(params.seed, params.threads)
        init = load_base(base_path, trainable_layers=params.trainable_layers)
        snli_metrics = train_verifier(snli, base_path, out_dir, **{**knobs, "epochs": 1}, init_model=init, log=log)
    train_metrics = train_verifier(train_pairs, base_path, out_dir, **knobs, init_model=init, log=log)
    model_only = load_verifier(out_dir, batch_size=64, max_length=params.max_length, threads=params.threads,
                               lexical=False)
    combiner_metrics = None
    if holdout is not None:
        combiner_metrics = fit_combiner(model_only, holdout, val_pairs, out_dir, judge=judge, judge_id=judge_id,
                                        embedder=embedder, per_kind=params.combiner_per_kind,
                                        boosted=params.combiner_boosted, seed=params.seed)
        log(f"lexical combiner: val AUC model {combiner_metrics['val_auc_model_only']} -> "
            f"combined {combiner_metrics['val_auc_combined']}")
    verifier = load_verifier(out_dir, batch_size=64, max_length=params.max_length, threads=params.threads,
                             judge=judge, embedder=embedder)
    threshold, val_metrics = evaluate(verifier, val_pairs, params.target_false_rejection)
    metrics = {
        "train_pairs": train_pairs.num_rows, "train_pairs_built": all_train.num_rows,
        "train_pairs_per_kind": dict(sorted(Counter(train_pairs.column("kind").to_pylist()).items())),
        "val_pairs_per_kind": dict(sorted(Counter(val_pairs.column("kind").to_pylist()).items())),
        "snli_pretrain": snli_metrics, "train": train_metrics, "lexical_combiner": combiner_metrics,
        "val": val_metrics, "unseen_kinds": list(unseen_kinds),
    }
    return VerifierResult(train_pairs, val_pairs, threshold, metrics)


def training_record(params: TrainVerifierParams, result: VerifierResult, *, inputs: dict[str, str], base_id: str,
                    code_version: str, task: str) -> dict[str, Any]:
    """Return the TRAINING.json record stored beside a trained head (params, data hashes, metrics, versions)."""
    import importlib.metadata as md

    versions = {d: md.version(d) for d in ("torch", "transformers", "numpy", "pyarrow")}
    return {"task": task, "base": base_id, "params": params.model_dump(mode="json"),
            "params_hash": params_hash(params), "seed": params.seed, "max_length": params.max_length,
            "threshold": result.threshold, "target_false_rejection": getattr(params, "target_false_rejection", None),
            "inputs_sha256": inputs, "metrics": result.metrics, "code_version": code_version, "versions": versions}


@click.command("train-verifier")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="Params file; this stage reads its train_verifier section and "
                   "inject.unseen_families.")
@click.option("--train", "train_file", required=True,
              help="Human train split (split's train.parquet): one row per seed QA pair; "
                   "the verifier's training pairs are built from it.")
@click.option("--val", "val_file", required=True,
              help="Held-out human rows that calibrate the verifier's threshold (split's val_calibration.parquet): "
                   "one row per seed QA pair.")
@click.option("--documents", "documents_file", required=True,
              help="Source documents (ingest's documents.parquet): one row per document; "
                   "the evidence passages of the pairs.")
@click.option("--base", "base_dir", required=True,
              help="Provisioned models folder (provision's --out): the embedder role is the verifier's base, and "
                   "the judge role gives the likelihood features when they are on.")
@click.option("--out", "out_dir", required=True,
              help="Writes the trained verifier here (a folder: head weights, combiner, calibrated threshold and "
                   "training record).")
@click.option("--metrics", "metrics_file", required=True,
              help="Writes the pair counts and the validation AUC, threshold and error rates here (JSON).")
def cli(params_file: str, train_file: str, val_file: str, documents_file: str, base_dir: str, out_dir: str,
        metrics_file: str) -> None:
    """Train the embedded faithfulness verifier (MiniLM cross-encoder) and calibrate its threshold."""
    from refinery.core.io import atomic_outputs, read_parquet
    from refinery.core.provenance import code_version
    from refinery.models.resolve import base_model_path, sha256_file
    from refinery.models.heads import TRAINING_FILE
    from schemas import documents as documents_schema
    from schemas import split as split_schema

    params = load_section(params_file, "train_verifier", TrainVerifierParams)
    unseen = corr.unseen_kinds(read_key(params_file, "inject.unseen_families", []), params_file)
    train = split_schema.CONTRACT.validate(read_parquet(train_file), train_file)
    val = split_schema.CONTRACT.validate(read_parquet(val_file), val_file)
    documents = documents_schema.CONTRACT.validate(read_parquet(documents_file), documents_file)
    base_path, base_id = base_model_path(base_dir)
    judge = judge_id = None
    if params.likelihood_features:
        from refinery.models.backends.factory import make_backend
        from refinery.models.resolve import backend_spec, load_target

        target = load_target(base_dir, "judge")
        judge, judge_id = make_backend(backend_spec(target, batch_size=params.batch_size, threads=params.threads)), \
            target["id"]
        if not callable(getattr(judge, "token_logprobs", None)):
            raise RefineryError(f"train_verifier.likelihood_features: the judge {judge_id} cannot return token "
                                f"log-probs (an endpoint): provision a local judge model or turn it off")
    embedder = None
    if params.embedding_features:
        from refinery.models.embed import Embedder
        from refinery.models.resolve import load_target

        target = load_target(base_dir, "embedder")
        embedder = Embedder(target["path"], model_id=target["id"])
    snli = read_snli(params.snli_path, max_pairs=params.snli_max_pairs, seed=params.seed) if params.snli_path else None
    inputs = {"train": sha256_file(train_file), "val": sha256_file(val_file), "documents": sha256_file(documents_file)}
    if params.snli_path:
        inputs["snli"] = sha256_file(params.snli_path)
    with atomic_outputs() as outputs:
        folder = outputs.folder(out_dir)
        result = train_verifier_core(train, val, documents, params, base_path, folder, snli=snli, judge=judge,
                                     judge_id=judge_id, embedder=embedder, unseen_kinds=unseen,
                                     log=lambda s: click.echo(s, err=True))
        record = training_record(params, result, inputs=inputs, base_id=base_id, task="faithfulness_verifier",
                                 code_version=code_version(sys.modules[__name__]))
        (folder / TRAINING_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        outputs.json(result.metrics, metrics_file)
    v = result.metrics["val"]
    click.echo(f"train_verifier: {result.metrics['train_pairs']} pairs, val AUC {v['auc']}, threshold "
               f"{v['threshold']:.3f} (FRR {v['false_rejection']}), factual recall {v['recall_factual']} -> {out_dir}",
               err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
