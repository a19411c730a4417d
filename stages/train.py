"""Fine-tune the student with LoRA on one assembled dataset, keeping the adapter with the best human val loss."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow as pa

from refinery.core.errors import InputError, RefineryError, require_columns
from refinery.core.params import load_section, params_hash
from refinery.training.student import TrainParams, read_documents, student_path

DATASET_COLUMNS = ("row_id", "doc_id", "question", "answer")
ENVIRONMENT_FILE = "environment.json"
LOG_FILE = "training_log.json"


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


def environment(params: TrainParams, student_id: str, inputs: dict[str, str], code_version: str,
                device: str) -> dict[str, Any]:
    """Describe what a run depended on: package versions, hardware, seeds, config hash, git commit."""
    import importlib.metadata as md

    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    versions = {"python": platform.python_version()}
    for dist in ("refinery", "torch", "transformers", "peft", "numpy", "pyarrow", "tokenizers", "safetensors"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    # the device the student was trained on (where its parameters were), not merely one that is present
    hardware = {"machine": platform.machine(), "system": platform.system(), "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(), "device": device,
                "cuda_present": torch.cuda.is_available()}
    return {"versions": versions, "hardware": hardware, "seeds": {"train": params.seed},
            "config_hash": params_hash(params), "params": params.model_dump(mode="json"), "git_commit": commit,
            "code_version": code_version, "student": student_id, "inputs_sha256": inputs}


def loss_png(log: dict[str, Any], name: str, path: Path) -> None:
    """Plot train loss per step and val loss per evaluation to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([c["step"] for c in log["curve"]], [c["loss"] for c in log["curve"]], label="train", lw=1)
    ax.plot([c["step"] for c in log["val_curve"]], [c["val_loss"] for c in log["val_curve"]], "o-", label="val")
    ax.axvline(log["best_step"], color="grey", ls=":", lw=1, label=f"best (step {log['best_step']})")
    ax.set(xlabel="optimizer step", ylabel="loss per answer token", title=f"LoRA loss: {name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)


def csv_text(rows: list[dict], columns: tuple[str, ...]) -> str:
    """Render rows as CSV (for `dvc plots`)."""
    return ",".join(columns) + "\n" + "".join(",".join(str(r[c]) for c in columns) + "\n" for r in rows)


@click.command("train")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="Params file; this stage reads its train section.")
@click.option("--dataset", "dataset_file", required=True,
              help="An assembled dataset (assemble's <arm>.parquet): one row per training example.")
@click.option("--name", required=True, help="The run's name (<arm>-s<seed>): adapter, metrics and plot files.")
@click.option("--seed", type=int, default=None, help="This run's training seed (default: the first of train.seeds).")
@click.option("--val", "val_file", required=True,
              help="Human validation split (split's val.parquet): one row per seed QA pair; the adapter with the "
                   "best loss on it is kept.")
@click.option("--documents", "documents_file", required=True,
              help="Source documents (ingest's documents.parquet): one row per document; the passages of the "
                   "prompts.")
@click.option("--models", "models_dir", required=True,
              help="Provisioned models folder (provision's --out): the student role is fine-tuned.")
@click.option("--out", "out_dir", required=True,
              help="Writes the LoRA adapter here (a folder: adapter weights, environment.json, training log).")
@click.option("--metrics", "metrics_file", required=True,
              help="Writes the run's train and val losses and its best step here (JSON).")
@click.option("--plots", "plots_dir", required=True,
              help="Writes loss_<name>.png, train_loss_<name>.csv and val_loss_<name>.csv here.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar with ETA on stderr.")
def cli(params_file: str, dataset_file: str, name: str, seed: int | None, val_file: str, documents_file: str,
        models_dir: str, out_dir: str, metrics_file: str, plots_dir: str, progress: bool) -> None:
    """Fine-tune the student with LoRA on one dataset; keep the adapter with the best human val loss."""
    from refinery.core.io import atomic_outputs, read_parquet
    from refinery.core.provenance import code_version
    from schemas import datasets as datasets_schema
    from schemas import split as split_schema
    from refinery.models.resolve import sha256_file

    params = load_section(params_file, "train", TrainParams)
    if seed is not None:
        params = params.model_copy(update={"seed": seed})
    dataset = datasets_schema.CONTRACT.validate(read_parquet(dataset_file, datasets_schema.ARROW), dataset_file)
    if dataset.num_rows == 0:
        raise InputError(dataset_file, "no rows to train on")
    val = split_schema.CONTRACT.validate(read_parquet(val_file), val_file)
    documents = read_documents(documents_file)
    ref, student_id = student_path(models_dir)
    version = code_version(sys.modules[__name__])
    inputs = {"dataset": sha256_file(Path(dataset_file)), "val": sha256_file(Path(val_file)),
              "documents": sha256_file(Path(documents_file))}
    plots = Path(plots_dir)
    with atomic_outputs() as outputs:
        folder = outputs.folder(out_dir)
        result = train_core(dataset, val, documents, params, ref, folder, name=name, progress=progress,
                            log=lambda s: click.echo(s, err=True))
        result.metrics["student"] = student_id
        env = environment(params, student_id, inputs, version, result.metrics["device"])
        (folder / ENVIRONMENT_FILE).write_text(json.dumps(env, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (folder / LOG_FILE).write_text(json.dumps({"metrics": result.metrics, **result.log}, indent=2,
                                                  sort_keys=True) + "\n", encoding="utf-8")
        outputs.json(result.metrics, metrics_file)
        outputs.text(csv_text(result.log["curve"], ("step", "loss")), plots / f"train_loss_{name}.csv")
        outputs.text(csv_text(result.log["val_curve"], ("step", "val_loss")), plots / f"val_loss_{name}.csv")
        loss_png(result.log, name, outputs.path(plots / f"loss_{name}.png"))
    m = result.metrics
    click.echo(f"train {name}: train loss {m['train_loss_before']} -> {m['train_loss_after']}, val loss "
               f"{m['val_loss_initial']} -> best {m['val_loss_best']} (step {m['best_step']}) -> {out_dir}", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
