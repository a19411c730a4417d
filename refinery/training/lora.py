"""Fine-tune a causal or seq2seq student with LoRA (peft) on QA chat rows, and generate answers with it."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refinery.training import sft
from refinery.core.errors import ModelResolutionError, RefineryError

IGNORE = -100  # label id the loss skips (prompt tokens, padding)


# --------------------------------------------------------------------------------------------- prompts
def passage_window(document: str, evidence: str | None, start: int | None, end: int | None, window_chars: int) -> str:
    """Return the part of ``document`` a question is asked about: ``window_chars`` centred on its evidence span.

    SQuAD-style reading comprehension gives the paragraph, not the whole article; a window around the
    evidence plays that part and keeps prompts short. The span comes from ``evidence_start/end``, else from
    finding ``evidence`` verbatim, else the document's head is used. ``window_chars <= 0`` keeps the whole
    document. Cuts fall on word boundaries.

    Args:
        document: the source document text.
        evidence: the evidence text (may be None for synthetic rows).
        start, end: the evidence span in ``document`` (None when unknown).
        window_chars: the window's length in characters.
    """
    text = document.strip() if document else ""
    if window_chars <= 0 or len(text) <= window_chars:
        return text
    if start is None or end is None or not (0 <= start < end <= len(document)):
        pos = document.find(evidence) if evidence else -1
        start, end = (pos, pos + len(evidence)) if pos >= 0 else (0, 0)
    span = end - start
    if span >= window_chars:
        lo, hi = start, end
    else:
        lo = max(0, start - (window_chars - span) // 2)
        hi = min(len(document), lo + window_chars)
        lo = max(0, hi - window_chars)
    out = document[lo:hi]
    if lo > 0:
        out = out.split(" ", 1)[-1] if " " in out[:40] else out
    if hi < len(document):
        out = out.rsplit(" ", 1)[0] if " " in out[-40:] else out
    return out.strip()


def prompt_text(tokenizer: Any, messages: list[dict], seq2seq: bool) -> str:
    """Render the system + user turns of :func:`refinery.training.sft.messages` into the model's prompt string.

    Causal models with a chat template get it (ending with the assistant header); seq2seq models and causal
    models without a template get plain text ending in ``Answer:``.
    """
    turns = [m for m in messages if m["role"] != "assistant"]
    if not seq2seq and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in turns) + "\n\nAnswer:"


@dataclass(frozen=True)
class Example:
    """One tokenised training / evaluation example: model input ids and labels (IGNORE on prompt tokens)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def encode(tokenizer: Any, prompt: str, answer: str, *, seq2seq: bool, max_length: int,
           max_answer_tokens: int) -> Example:
    """Tokenise (prompt, answer) for teacher forcing; the loss covers the answer and its end token only.

    Causal: ``prompt + answer + eos`` in one sequence; a prompt too long for ``max_length`` loses its left
    end (the question and the answer, at the right, are kept). Seq2seq: the encoder reads the prompt
    (truncated at the right), the decoder is trained on the answer.
    """
    ans = tokenizer(answer.strip(), add_special_tokens=False)["input_ids"][:max_answer_tokens]
    if seq2seq:
        enc = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        truncated = len(enc) > max_length
        if truncated:
            enc = enc[:max_length - 1] + [tokenizer.eos_token_id]
        return Example(enc, ans + [tokenizer.eos_token_id], truncated)
    special = not getattr(tokenizer, "chat_template", None)
    pr = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    target = ans + [tokenizer.eos_token_id]
    room = max_length - len(target)
    truncated = len(pr) > room
    if truncated:
        pr = pr[len(pr) - room:]
    return Example(pr + target, [IGNORE] * len(pr) + target, truncated)


# --------------------------------------------------------------------------------------------- models
def load_student(ref: str, threads: int, device: str = "cpu") -> tuple[Any, Any, bool]:
    """Load a causal or seq2seq student (local folder or HF id in the local cache) in fp32 on ``device``.

    ``device`` is a torch device string (:func:`refinery.core.device.resolve_device` of ``train.device`` or
    ``evaluate.device``); batches follow the model to it.

    Returns:
        (model, tokenizer, seq2seq).

    Raises:
        ModelResolutionError: the model cannot be loaded.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    torch.set_num_threads(threads)
    try:
        config = AutoConfig.from_pretrained(ref)
        seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        tokenizer = AutoTokenizer.from_pretrained(ref)
        model = cls.from_pretrained(ref, dtype=torch.float32).to(device)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelResolutionError(f"student '{ref}': cannot load it as a causal or seq2seq LM ({first[:160]})") \
            from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ModelResolutionError(f"student '{ref}': its tokenizer has no end-of-sequence token")
    return model, tokenizer, seq2seq


def num_layers(model: Any) -> int | None:
    """Return the number of transformer blocks (decoder blocks for seq2seq), or None when unknown."""
    c = model.config
    for key in ("num_decoder_layers", "num_hidden_layers", "n_layer"):
        if getattr(c, key, None):
            return int(getattr(c, key))
    return None


def attach_lora(model: Any, *, seq2seq: bool, r: int, alpha: int, dropout: float,
                target_modules: Sequence[str] | None, top_layers: int | None = None, seed: int = 0) -> Any:
    """Wrap ``model`` with fresh LoRA adapters (Hu et al. 2021); ``target_modules=None`` takes peft's default.

    ``top_layers=k`` puts adapters on the last ``k`` blocks only (causal models): the backward pass then
    stops there, which roughly halves a CPU step. None adapts every block. The adapters' A matrices are
    drawn from torch's RNG, seeded here with ``seed``: unseeded, every run starts from other weights (B is
    zero, so the first loss agrees and only later steps drift).
    """
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(seed)
    layers = None
    if top_layers is not None:
        n = num_layers(model)
        if seq2seq or n is None:
            raise RefineryError("train.top_layers works for causal models with a known block count; set it to null")
        layers = list(range(max(0, n - top_layers), n))
    config = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM if seq2seq else TaskType.CAUSAL_LM, r=r, lora_alpha=alpha,
                        lora_dropout=dropout, target_modules=list(target_modules) if target_modules else None,
                        layers_to_transform=layers)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise RefineryError(f"LoRA: {str(e).splitlines()[0][:200]} (set train.target_modules to module names of "
                            f"this architecture)") from None


def collate(batch: Sequence[Example], pad_id: int, seq2seq: bool) -> dict[str, Any]:
    """Pad a batch on the right into tensors (labels padded with IGNORE)."""
    import torch

    n = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, :len(e.input_ids)] = 1
    m = max(len(e.labels) for e in batch)
    labels = torch.full((len(batch), m), IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _token_loss(model: Any, batch: dict[str, Any], seq2seq: bool) -> tuple[Any, int]:
    """Return (sum of answer-token cross-entropies, answer tokens) for a padded batch."""
    import torch

    batch = {k: v.to(model.device) for k, v in batch.items()}
    labels = batch["labels"]
    if seq2seq:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        logits, target = out.logits, labels
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits, target = out.logits[:, :-1], labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")
    return loss, int((target != IGNORE).sum())


def eval_loss(model: Any, examples: Sequence[Example], *, pad_id: int, seq2seq: bool, batch_size: int) -> float:
    """Mean cross-entropy per answer token over ``examples`` (teacher forcing, no dropout)."""
    import torch

    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            loss, n = _token_loss(model, collate([examples[i] for i in order[s:s + batch_size]], pad_id, seq2seq),
                                  seq2seq)
            total, tokens = total + float(loss), tokens + n
    model.train(was_training)
    return total / max(1, tokens)


# --------------------------------------------------------------------------------------------- sampling
def weighted_epoch(weights: Sequence[float], rng: np.random.Generator) -> list[int]:
    """Return one epoch's row indices, each row appearing about ``n * w_i / sum(w)`` times, shuffled.

    Expected counts are rounded stochastically (integer part always; the fractional part as a seeded
    Bernoulli draw), so equal weights give exactly one pass over every row, and a row of weight 2 is seen
    twice as often as a row of weight 1 without resampling noise on the integer part.

    Raises:
        RefineryError: a weight is negative or not finite, or all are zero.
    """
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0:
        return []
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise RefineryError("train: sampling weights must be finite, non-negative and not all zero")
    expected = w * len(w) / w.sum()
    base = np.floor(expected + 1e-9)
    extra = rng.random(len(w)) < (expected - base)
    counts = (base + extra).astype(int)
    idx = np.repeat(np.arange(len(w)), counts)
    return rng.permutation(idx).tolist()


def length_grouped(indices: Sequence[int], lengths: Sequence[int], batch_size: int,
                   rng: np.random.Generator) -> list[list[int]]:
    """Cut shuffled indices into batches of similar length (less padding), batches in a seeded order."""
    chunk = batch_size * 8
    batches = []
    for s in range(0, len(indices), chunk):
        part = sorted(indices[s:s + chunk], key=lambda i: lengths[i])
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    return [batches[b] for b in rng.permutation(len(batches)).tolist()]


# --------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class LoraTrainConfig:
    """Training knobs (mirrors the ``train`` params section)."""

    epochs: int
    lr: float
    batch_size: int
    grad_accum: int
    warmup_steps: int
    seed: int
    threads: int
    eval_every: int  # optimizer steps between validation passes (0: once per epoch)
    max_steps: int | None = None  # stop after this many optimizer steps (None: epochs decide)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    compute_dtype: str = "float32"  # bfloat16: forward passes under CPU autocast (weights and LoRA stay float32)


@dataclass
class TrainResult:
    """What a training run measured; the best adapter is saved by :func:`train_lora`."""

    steps: int
    curve: list[dict] = field(default_factory=list)  # one entry per optimizer step: step, epoch, loss, lr
    val_curve: list[dict] = field(default_factory=list)  # step, val_loss (step 0 = before training)
    best_step: int = 0
    best_val_loss: float = math.nan
    examples_seen: int = 0
    probe_before: float = math.nan  # loss on the probe rows (training rows) before training
    probe_after: float = math.nan  # ... and with the final weights


def train_lora(model: Any, tokenizer: Any, *, seq2seq: bool, train: Sequence[Example], weights: Sequence[float],
               val: Sequence[Example], cfg: LoraTrainConfig, out_dir: Path, probe: Sequence[Example] = (),
               progress: bool = True, log: Callable[[str], None] = lambda s: None) -> TrainResult:
    """:func:`_train_lora` with every forward pass (training steps, val and probe losses) in ``cfg.compute_dtype``.

    bfloat16 runs the matrix products under ``torch.autocast`` on the CPU; the weights, the LoRA parameters, their
    gradients and AdamW's state stay float32, and the loss is taken in float32.
    """
    import contextlib

    import torch

    if cfg.compute_dtype not in ("float32", "bfloat16"):
        raise RefineryError(f"train: compute dtype must be float32 or bfloat16, got {cfg.compute_dtype!r}")
    ctx = torch.autocast(model.device.type, dtype=torch.bfloat16) if cfg.compute_dtype == "bfloat16" \
        else contextlib.nullcontext()
    with ctx:
        return _train_lora(model, tokenizer, seq2seq=seq2seq, train=train, weights=weights, val=val, cfg=cfg,
                           out_dir=out_dir, probe=probe, progress=progress, log=log)


def _train_lora(model: Any, tokenizer: Any, *, seq2seq: bool, train: Sequence[Example], weights: Sequence[float],
                val: Sequence[Example], cfg: LoraTrainConfig, out_dir: Path, probe: Sequence[Example] = (),
                progress: bool = True, log: Callable[[str], None] = lambda s: None) -> TrainResult:
    """Train a peft-wrapped model with AdamW, linear warm-up/decay and gradient accumulation; keep the best.

    Each epoch draws rows by their sampling weights (:func:`weighted_epoch`). The validation loss (mean
    per answer token) is measured before training, every ``eval_every`` optimizer steps and at the end;
    the adapter with the lowest validation loss after training began is saved to ``out_dir``.

    Args:
        model: a peft model (see :func:`attach_lora`).
        tokenizer: its tokenizer (saved beside the adapter).
        seq2seq: whether the model is encoder-decoder.
        train, weights: training examples and their sampling weights.
        val: validation examples.
        cfg: the knobs.
        probe: training examples whose loss is measured before and after training, with the same weights
            and no dropout: a like-for-like check that training lowered the loss (per-step losses are
            measured on different batches, and noisy).
        out_dir: where the best adapter is saved (``save_pretrained``).
        progress: show a progress bar with ETA on stderr.
        log: one-line progress messages.

    Returns:
        The loss curves and the best step.
    """
    import torch

    from refinery.core.progress import progress as progress_bar

    if not train:
        raise RefineryError("train: no training rows")
    if not val:
        raise RefineryError("train: no validation rows")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    pad = tokenizer.pad_token_id
    lengths = [len(e.input_ids) for e in train]
    epochs = [length_grouped(weighted_epoch(weights, rng), lengths, cfg.batch_size, rng) for _ in range(cfg.epochs)]
    per_epoch = [math.ceil(len(b) / cfg.grad_accum) for b in epochs]
    total = sum(per_epoch) if cfg.max_steps is None else min(cfg.max_steps, sum(per_epoch))
    if total < 1:
        raise RefineryError("train: zero optimizer steps (check epochs / max_steps)")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = min(cfg.warmup_steps, max(0, total - 1))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (total - step) / max(1, total - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    result = TrainResult(steps=total)
    if probe:
        result.probe_before = eval_loss(model, probe, pad_id=pad, seq2seq=seq2seq, batch_size=cfg.batch_size)
    first = eval_loss(model, val, pad_id=pad, seq2seq=seq2seq, batch_size=cfg.batch_size)
    result.val_curve.append({"step": 0, "val_loss": round(first, 5)})
    log(f"val loss before training: {first:.4f}")
    best_state: dict | None = None
    eval_every = cfg.eval_every
    bar = progress_bar(total, "train", "step", enabled=progress, file=sys.stderr)
    step = 0
    model.train()
    for epoch, batches in enumerate(epochs):
        if step >= total:
            break
        for g in range(0, len(batches), cfg.grad_accum):
            if step >= total:
                break
            group = batches[g:g + cfg.grad_accum]
            n_tokens = sum(sum(1 for x in train[i].labels[1 if not seq2seq else 0:] if x != IGNORE)
                           for b in group for i in b)
            loss_sum = 0.0
            for b in group:
                loss, _ = _token_loss(model, collate([train[i] for i in b], pad, seq2seq), seq2seq)
                (loss / max(1, n_tokens)).backward()
                loss_sum += float(loss.detach())
                result.examples_seen += len(b)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            train_loss = loss_sum / max(1, n_tokens)
            result.curve.append({"step": step, "epoch": epoch + 1, "loss": round(train_loss, 5), "lr": round(lr, 8)})
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{train_loss:.3f}")
            end_of_epoch = g + cfg.grad_accum >= len(batches)
            if step == total or (eval_every > 0 and step % eval_every == 0) or (eval_every == 0 and end_of_epoch):
                v = eval_loss(model, val, pad_id=pad, seq2seq=seq2seq, batch_size=cfg.batch_size)
                result.val_curve.append({"step": step, "val_loss": round(v, 5)})
                bar.write(f"step {step}/{total}: train loss {train_loss:.4f}, val loss {v:.4f}", file=sys.stderr) \
                    if progress else log(f"step {step}/{total}: val loss {v:.4f}")
                if best_state is None or v < result.best_val_loss:
                    result.best_val_loss, result.best_step = v, step
                    best_state = {k: t.detach().clone() for k, t in model.state_dict().items() if "lora_" in k}
    bar.close()
    if probe:
        result.probe_after = eval_loss(model, probe, pad_id=pad, seq2seq=seq2seq, batch_size=cfg.batch_size)
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    model.eval()
    model.save_pretrained(out_dir)
    _sorted_target_modules(Path(out_dir) / "adapter_config.json")
    tokenizer.save_pretrained(out_dir)
    return result


def _sorted_target_modules(config_file: Path) -> None:
    """Rewrite peft's adapter config with ``target_modules`` sorted: peft keeps them as a set, so their order
    (and the file's bytes) changed with Python's hash seed from run to run."""
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


# --------------------------------------------------------------------------------------------- generation
def generate(model: Any, tokenizer: Any, prompts: Sequence[str], *, seq2seq: bool, max_new_tokens: int,
             batch_size: int, progress: bool = False) -> list[str]:
    """Greedy-decode an answer per prompt (batched; causal prompts are left-padded).

    Returns:
        The decoded answers, stripped, in input order.
    """
    import torch

    from refinery.core.progress import progress as progress_bar

    model.eval()
    out: list[str] = [""] * len(prompts)
    special = seq2seq or not getattr(tokenizer, "chat_template", None)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    side = tokenizer.padding_side
    tokenizer.padding_side = "right" if seq2seq else "left"
    try:
        with torch.inference_mode():
            bar = progress_bar(math.ceil(len(order) / batch_size), "generate", "batch", enabled=progress,
                               file=sys.stderr)
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                                add_special_tokens=special).to(model.device)
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                if not seq2seq:
                    gen = gen[:, enc["input_ids"].shape[1]:]
                for i, g in zip(idx, gen):
                    out[i] = tokenizer.decode(g, skip_special_tokens=True).strip()
                bar.update(1)
            bar.close()
    finally:
        tokenizer.padding_side = side
    return out


def messages_for(row: dict, documents: dict[str, str], window_chars: int, with_answer: bool) -> list[dict]:
    """Build :func:`refinery.training.sft.messages` for a QA row, its passage cut by :func:`passage_window`."""
    doc = documents.get(row["doc_id"])
    if doc is None:
        raise RefineryError(f"row {row.get('row_id')}: document '{row['doc_id']}' is not in the documents table")
    passage = passage_window(doc, row.get("evidence"), row.get("evidence_start"), row.get("evidence_end"),
                             window_chars)
    return sft.messages(passage, row["question"], row["answer"] if with_answer else None,
                        max_passage_chars=max(len(passage), 1))
