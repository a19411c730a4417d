"""Score (question, answer) quality with a one-logit reward model, and train one with a Bradley-Terry loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from refinery.core.errors import ModelResolutionError, RefineryError
from refinery.models.heads import TrainConfig, load_classifier, read_training, train_head

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


class RewardModel:
    """A one-logit sequence classifier scoring answers to questions; higher is better.

    Our trained head reads (question, answer) as a sentence pair; a tokenizer with a chat template
    (typical of HF reward models) gets a user/assistant conversation instead.
    """

    def __init__(self, model: Any, tokenizer: Any, *, name: str, max_length: int = 256, batch_size: int = 32):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_length, self.batch_size = max_length, batch_size
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.model.eval()

    def _encode(self, questions: Sequence[str], answers: Sequence[str]) -> Any:
        if self.chat:
            texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": q},
                                                         {"role": "assistant", "content": a}], tokenize=False)
                     for q, a in zip(questions, answers)]
            return self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True,
                                  return_tensors="pt", add_special_tokens=False)
        return self.tokenizer(list(questions), list(answers), truncation="longest_first", max_length=self.max_length,
                              padding=True, return_tensors="pt")

    def logits(self, questions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        """Return the raw reward logit per (question, answer); NaN for empty answers or a NaN output."""
        import torch

        if len(questions) != len(answers):
            raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
        out = np.full(len(answers), np.nan)
        ok = [i for i, (q, a) in enumerate(zip(questions, answers)) if isinstance(a, str) and a.strip()
              and isinstance(q, str)]
        order = sorted(ok, key=lambda i: len(questions[i]) + len(answers[i]))
        with torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                enc = self._encode([questions[i] for i in idx], [answers[i] for i in idx]).to(self.model.device)
                out[idx] = self.model(**enc).logits[:, 0].double().cpu().numpy()
        return out

    def score(self, questions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        """Return a quality score in [0, 1] per (question, answer): the sigmoid of the reward logit.

        Args:
            questions: the prompts.
            answers: the answers to score, one per question.

        Returns:
            float64 array; NaN where an answer is empty or the model produced NaN (callers treat NaN as error).
        """
        return 1.0 / (1.0 + np.exp(-self.logits(questions, answers)))


def load_reward(path_or_id: str | Path, *, batch_size: int = 32, max_length: int | None = None,
                threads: int | None = None) -> RewardModel:
    """Load our trained reward head folder or any HF one-logit reward model (id in the local cache, or path).

    Raises:
        ModelResolutionError: the model cannot be loaded or has more than one output.
    """
    ref = str(path_or_id)
    tokenizer, model = load_classifier(ref, "reward model", threads)
    if model.config.num_labels != 1:
        raise ModelResolutionError(f"reward model '{ref}': has {model.config.num_labels} outputs; a reward model "
                                   f"has one logit")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    length = max_length or (read_training(ref) or {}).get("max_length") or 256
    return RewardModel(model, tokenizer, name=ref, max_length=length, batch_size=batch_size)


def train_reward(pairs: pa.Table, base_path: str | Path, out_dir: str | Path, *, epochs: int, lr: float,
                 batch_size: int, seed: int, max_length: int, threads: int, trainable_layers: int = 6,
                 device: str = "cpu", log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Fine-tune a one-logit MiniLM reward head on preference pairs with the Bradley-Terry loss.

    Loss: ``-log sigmoid(r(prompt, chosen) - r(prompt, rejected))`` (Bradley & Terry 1952; as in
    InstructGPT's reward model, Ouyang et al. 2022). The loop is :func:`refinery.models.heads.train_head`.

    Args:
        pairs: table with ``prompt``, ``chosen``, ``rejected``.
        base_path: the encoder folder (all-MiniLM-L6-v2).
        out_dir: where the HF model and tokenizer are saved.
        epochs, lr, batch_size, seed, max_length, threads, trainable_layers: training knobs.
        device: the torch device it trains on (``refinery.core.device.resolve_device``).
        log: progress callback.

    Returns:
        Training metrics: pairs, steps, loss per epoch, first/last-10%-of-steps mean loss, the device used.
    """
    import torch

    missing = [c for c in PAIR_COLUMNS if c not in pairs.column_names]
    if missing:
        raise RefineryError(f"preference pairs: missing column(s) {', '.join(missing)}")
    if pairs.num_rows == 0:
        raise RefineryError("preference pairs: no pairs to train on")
    prompts, chosen, rejected = (pairs.column(c).to_pylist() for c in PAIR_COLUMNS)

    def batch_loss(model: Any, tokenizer: Any, idx: list[int]) -> Any:
        q = [prompts[i] for i in idx]
        enc = tokenizer(q + q, [chosen[i] for i in idx] + [rejected[i] for i in idx], truncation="longest_first",
                        max_length=max_length, padding=True, return_tensors="pt").to(model.device)
        r = model(**enc).logits[:, 0]
        return -torch.nn.functional.logsigmoid(r[:len(idx)] - r[len(idx):]).mean()

    cfg = TrainConfig(epochs, lr, batch_size, seed, max_length, threads, trainable_layers, device=device)
    run = train_head(cfg, base_path, out_dir, lengths=[len(p) + max(len(c), len(r))
                                                       for p, c, r in zip(prompts, chosen, rejected)],
                     batch_loss=batch_loss, name="reward", label="reward", log=log)
    return {"pairs": len(prompts), **run}
