"""Load, train and save one-logit MiniLM heads (the verifier and the reward model) with one training loop."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refinery.core.errors import ModelResolutionError, RefineryError

TRAINING_FILE = "TRAINING.json"


def _torch():
    import torch

    return torch


def seed_everything(seed: int, threads: int) -> None:
    """Seed torch and fix its thread count so that two runs give the same numbers."""
    torch = _torch()
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def load_classifier(ref: str, what: str, threads: int | None) -> tuple[Any, Any]:
    """Load a tokenizer and a float32 sequence-classification model, failing with one line naming ``what``.

    Args:
        ref: a local folder or an HF id already in the local cache.
        what: the role in error messages ('verifier', 'reward model').
        threads: torch CPU threads (None leaves torch's default).
    """
    torch = _torch()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref)
        model = AutoModelForSequenceClassification.from_pretrained(ref, dtype=torch.float32)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelResolutionError(f"{what} '{ref}': cannot load a sequence-classification model "
                                   f"({first[:200]})") from None
    return tokenizer, model


def read_training(folder: str | Path) -> dict[str, Any] | None:
    """Return a model folder's TRAINING.json, or None when it has none (e.g. an HF id)."""
    path = Path(folder) / TRAINING_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def load_base(base_path: str | Path, *, trainable_layers: int) -> tuple[Any, Any]:
    """Load a BERT-style encoder folder as a one-logit sequence classifier with frozen lower layers.

    Word embeddings and all but the top ``trainable_layers`` transformer layers are frozen: training is
    cheaper on CPU and the small seed cannot wash out what the base model knows.

    Returns:
        (model, tokenizer).
    """
    torch = _torch()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not Path(base_path).is_dir():
        raise RefineryError(f"{base_path}: base model folder not found (run `refinery provision`)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the fresh classifier head is expected, not news
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(base_path), num_labels=1,
                                                                   dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    encoder = getattr(model, model.config.model_type, None) or model.base_model
    for p in encoder.embeddings.parameters():
        p.requires_grad = False
    layers = encoder.encoder.layer
    for layer in layers[:max(0, len(layers) - trainable_layers)]:
        for p in layer.parameters():
            p.requires_grad = False
    return model, tokenizer


def length_batches(lengths: Sequence[int], batch_size: int, rng: np.random.Generator) -> Iterator[list[int]]:
    """Yield shuffled batches of indices of similar length (less padding), in a seeded random order."""
    order = rng.permutation(len(lengths))
    chunk = batch_size * 16
    batches = []
    for s in range(0, len(order), chunk):
        part = sorted(order[s:s + chunk].tolist(), key=lambda i: (lengths[i], i))
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    for b in rng.permutation(len(batches)).tolist():
        yield batches[b]


@dataclass(frozen=True)
class TrainConfig:
    """Training knobs shared by the verifier and the reward head."""

    epochs: int
    lr: float
    batch_size: int
    seed: int
    max_length: int
    threads: int
    trainable_layers: int = 6
    warmup_fraction: float = 0.1
    device: str = "cpu"  # a torch device string (refinery.core.device.resolve_device)


def make_optimizer(model: Any, cfg: TrainConfig, steps: int) -> tuple[Any, Any]:
    """Return AdamW over trainable parameters and a linear warm-up / decay schedule."""
    torch = _torch()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    warm = max(1, int(steps * cfg.warmup_fraction))

    def factor(step: int) -> float:
        return (step + 1) / warm if step < warm else max(0.0, (steps - step) / max(1, steps - warm))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def save_model(model: Any, tokenizer: Any, out_dir: str | Path, *, label: str) -> None:
    """Save a one-logit model and its tokenizer as a plain HF folder (safetensors)."""
    model.config.id2label = {0: label}
    model.config.label2id = {label: 0}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


BatchLoss = Callable[[Any, Any, list[int]], Any]  # (model, tokenizer, row indices) -> the batch's scalar loss tensor


def train_head(cfg: TrainConfig, base_path: str | Path, out_dir: str | Path, *, lengths: Sequence[int],
               batch_loss: BatchLoss, name: str, label: str, init_model: tuple[Any, Any] | None = None,
               log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Fine-tune a one-logit head on rows of training data and save it with its tokenizer.

    The order of every random draw is fixed: torch is seeded (``seed_everything``), then the base is loaded (its
    fresh head drawn from torch's RNG), then batches come from ``numpy.random.default_rng(cfg.seed)``
    (``length_batches``). Each step back-propagates ``batch_loss``, clips the gradient norm to 1 and steps AdamW
    with a linear warm-up and decay (``make_optimizer``).

    Args:
        cfg: the training knobs.
        base_path: the encoder folder (all-MiniLM-L6-v2) to start from.
        out_dir: where to save the HF model and tokenizer (created).
        lengths: one length per training row (characters; batches group rows of similar length).
        batch_loss: returns the loss of a batch of row indices, computed with the model and tokenizer.
        name: the head's name in log lines ('verifier', 'reward').
        label: the name of the one logit, saved in the model config ('supported', 'reward').
        init_model: a (model, tokenizer) to continue from instead of loading ``base_path``.
        log: progress callback.

    Returns:
        steps, loss per epoch, and the mean loss of the first and last 10% of steps.
    """
    torch = _torch()
    seed_everything(cfg.seed, cfg.threads)
    model, tokenizer = init_model or load_base(base_path, trainable_layers=cfg.trainable_layers)
    model = model.to(cfg.device)
    steps = cfg.epochs * math.ceil(len(lengths) / cfg.batch_size)
    opt, sched = make_optimizer(model, cfg, steps)
    rng = np.random.default_rng(cfg.seed)
    step_losses: list[float] = []
    epoch_losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for epoch in range(cfg.epochs):
        losses = []
        for idx in length_batches(lengths, cfg.batch_size, rng):
            loss = batch_loss(model, tokenizer, idx)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        step_losses += losses
        epoch_losses.append(float(np.mean(losses)))
        log(f"{name} epoch {epoch + 1}/{cfg.epochs}: loss {epoch_losses[-1]:.4f} ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    from refinery.core.device import device_of

    device = device_of(model)
    save_model(model.to("cpu"), tokenizer, out_dir, label=label)
    k = max(1, len(step_losses) // 10)
    return {"device": device, "steps": steps, "loss_per_epoch": [round(x, 5) for x in epoch_losses],
            "loss_first_10pct": round(float(np.mean(step_losses[:k])), 5),
            "loss_last_10pct": round(float(np.mean(step_losses[-k:])), 5)}
