"""Fine-tune the student with LoRA on one dataset, keeping the adapter with the best human val loss (the train
stage's work; :mod:`stages.train` adds the command, its files and plots; the collapse stage trains with it too)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from refinery.core.errors import InputError, RefineryError, require_columns
from refinery.training.student import TrainParams

DATASET_COLUMNS = ("row_id", "doc_id", "question", "answer")


@dataclass(frozen=True)
class TrainOutcome:
    """Metrics, the training log (loss curves) and per-dataset facts of one run."""

    metrics: dict[str, Any]
    log: dict[str, Any]


def dataset_weights(table: pa.Table, where: str) -> np.ndarray:
    """Return the rows' sampling weights (the ``weight`` column; 1.0 for every row when it is absent)."""
    if "weight" not in table.column_names:
        return np.ones(table.num_rows)
    w = np.asarray(table.column("weight").to_pylist(), dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(w) | (w < 0))
    if len(bad):
        raise InputError(where, f"weight must be a finite number >= 0, got {w[bad[0]]}", row=int(bad[0]) + 1,
                         field="weight")
    return w


def build_examples(rows: pa.Table, documents: dict[str, str], tokenizer: Any, *, seq2seq: bool,
                   params: TrainParams, where: str) -> list:
    """Tokenise QA rows into training examples with the shared chat shape (:mod:`refinery.training.sft`)."""
    from refinery.training import lora

    require_columns(rows, DATASET_COLUMNS, where)
    out = []
    for r in rows.to_pylist():
        msgs = lora.messages_for(r, documents, params.window_chars, with_answer=True)
        out.append(lora.encode(tokenizer, lora.prompt_text(tokenizer, msgs, seq2seq), r["answer"], seq2seq=seq2seq,
                               max_length=params.max_length, max_answer_tokens=params.max_answer_tokens))
    return out


def compute_dtype(choice: str) -> str:
    """float32 or bfloat16 for a ``train.dtype`` choice ('auto': bfloat16 where the CPU computes it natively)."""
    from refinery.models.backends.local import resolve_dtype

    dtype = resolve_dtype(choice)
    if dtype not in ("float32", "bfloat16"):
        raise RefineryError(f"train.dtype: {choice!r} is not float32, bfloat16 or auto")
    return dtype


def _mean_window(values: list[float], first: bool) -> float:
    k = max(1, len(values) // 10)
    return float(np.mean(values[:k] if first else values[-k:]))


def train_core(dataset: pa.Table, val: pa.Table, documents: dict[str, str], params: TrainParams, student_ref: str,
               out_dir: Path, *, name: str, progress: bool = True,
               log: Callable[[str], None] = lambda s: None) -> TrainOutcome:
    """Train a LoRA adapter on ``dataset`` (honouring its sampling weights), validated on the human val split.

    Args:
        dataset: an assembled dataset (row_id, doc_id, question, answer, optional evidence span and weight).
        val: the human val split.
        documents: doc_id -> document text.
        params: the stage params.
        student_ref: the student's local folder or HF id (causal or seq2seq).
        out_dir: an empty folder the best adapter and tokenizer are saved into.
        name: the dataset's name (human, contaminated, curated), for messages and metrics.
        progress: show a progress bar with ETA.
        log: one-line progress messages.

    Returns:
        Metrics (counts, losses, whether the loss decreased) and the training log (loss curves).

    Raises:
        InputError: a required column is missing or a weight is invalid.
        RefineryError: the train loss did not decrease and ``check_loss_decrease`` is set.
    """
    from refinery.training import lora

    require_columns(dataset, DATASET_COLUMNS, name)
    weights = dataset_weights(dataset, name)
    from refinery.core.device import device_of, resolve_device

    model, tokenizer, seq2seq = lora.load_student(student_ref, params.threads,
                                                  resolve_device(params.device, "train.device"))
    device = device_of(model)
    train_ex = build_examples(dataset, documents, tokenizer, seq2seq=seq2seq, params=params, where=name)
    if params.val_rows is not None and val.num_rows > params.val_rows:
        keep = np.sort(np.random.default_rng(0).permutation(val.num_rows)[:params.val_rows])
        val = val.take(pa.array(keep, pa.int64()))
    val_ex = build_examples(val, documents, tokenizer, seq2seq=seq2seq, params=params, where="val")
    model = lora.attach_lora(model, seq2seq=seq2seq, r=params.r, alpha=params.alpha, dropout=params.dropout,
                             target_modules=params.target_modules, top_layers=params.top_layers, seed=params.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    cfg = lora.LoraTrainConfig(epochs=params.epochs, lr=params.lr, batch_size=params.batch_size,
                               grad_accum=params.grad_accum, warmup_steps=params.warmup_steps, seed=params.seed,
                               threads=params.threads, eval_every=params.eval_every, max_steps=params.max_steps,
                               compute_dtype=compute_dtype(params.dtype))
    log(f"train {name}: {len(train_ex)} rows, {len(val_ex)} val rows, {'seq2seq' if seq2seq else 'causal'} "
        f"student, {trainable:,} trainable of {total:,} parameters")
    pick = np.random.default_rng(params.seed).permutation(len(train_ex))[:params.probe_rows]
    probe = [train_ex[i] for i in sorted(pick.tolist())]
    res = lora.train_lora(model, tokenizer, seq2seq=seq2seq, train=train_ex, weights=weights, val=val_ex, cfg=cfg,
                          out_dir=out_dir, probe=probe, progress=progress, log=log)
    losses = [c["loss"] for c in res.curve]
    first, last = _mean_window(losses, True), _mean_window(losses, False)
    val_initial = res.val_curve[0]["val_loss"]
    metrics = {
        "name": name,
        "architecture": "seq2seq" if seq2seq else "causal",
        "rows": dataset.num_rows,
        "val_rows": val.num_rows,
        "seed": params.seed,
        "dtype": compute_dtype(params.dtype),
        "device": device,
        "examples_seen": res.examples_seen,
        "steps": res.steps,
        "effective_batch": params.batch_size * params.grad_accum,
        "truncated_rows": sum(e.truncated for e in train_ex),
        "trainable_params": trainable,
        "total_params": total,
        "weights": {"min": round(float(weights.min()), 4), "max": round(float(weights.max()), 4),
                    "mean": round(float(weights.mean()), 4), "rows_not_1": int(np.sum(weights != 1.0))},
        "train_loss_first_10pct": round(first, 5),
        "train_loss_last_10pct": round(last, 5),
        "probe_rows": len(probe),
        "train_loss_before": round(res.probe_before, 5),
        "train_loss_after": round(res.probe_after, 5),
        "loss_decreased": bool(res.probe_after < res.probe_before),
        "val_loss_initial": val_initial,
        "val_loss_best": round(res.best_val_loss, 5),
        "val_loss_final": res.val_curve[-1]["val_loss"],
        "val_loss_improved": bool(res.best_val_loss < val_initial),
        "best_step": res.best_step,
    }
    if params.check_loss_decrease and not metrics["loss_decreased"]:
        raise RefineryError(f"train {name}: the train loss did not decrease (on {len(probe)} training rows: "
                            f"{res.probe_before:.4f} before, {res.probe_after:.4f} after); raise train.lr or "
                            f"train.max_steps, or set check_loss_decrease: false")
    return TrainOutcome(metrics, {"curve": res.curve, "val_curve": res.val_curve, "best_step": res.best_step})
