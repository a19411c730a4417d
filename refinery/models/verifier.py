"""Score whether a claim follows from its evidence passage with a cross-encoder or NLI model, and train one."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from refinery.core.errors import ModelResolutionError, RefineryError
from refinery.models.heads import TrainConfig, load_classifier, read_training, train_head
from refinery.planted.corruptions import sentences

PAIR_COLUMNS = ("passage", "claim", "label")


class Verifier(Protocol):
    """Anything that scores how well each claim is supported by its passage."""

    name: str
    threshold: float | None  # the calibrated support threshold, when the model folder records one

    def score(self, passages: Sequence[str], claims: Sequence[str]) -> np.ndarray:
        """Return one support probability in [0, 1] per (passage, claim); NaN marks a row that could not be scored."""
        ...


def passage_windows(passage: str, *, full_max_chars: int, window_sentences: int = 2) -> list[str]:
    """Return the texts a claim is scored against: the passage itself when short, else sentence windows.

    Windows of ``window_sentences`` consecutive sentences with stride 1 cover every sentence and every
    pair of neighbouring sentences, so a claim drawn from two adjacent sentences still finds its support.

    Args:
        passage: the evidence passage.
        full_max_chars: passages up to this many characters are scored whole.
        window_sentences: sentences per window for longer passages.

    Returns:
        One or more texts; the claim's score is the max over them.
    """
    if len(passage) <= full_max_chars:
        return [passage]
    sents = sentences(passage)
    if len(sents) <= window_sentences:
        return [passage]
    return [" ".join(sents[i:i + window_sentences]) for i in range(len(sents) - window_sentences + 1)]


class CrossEncoderVerifier:
    """A Hugging Face sequence-classification model scoring (passage, claim) pairs.

    ``mode`` is ``single`` (one logit, sigmoid: our trained head and cross-encoders) or ``nli``
    (softmax over labels, the entailment column picked from ``config.id2label``).
    """

    def __init__(self, model: Any, tokenizer: Any, *, mode: str, entail_index: int | None, name: str,
                 max_length: int = 256, batch_size: int = 32, threshold: float | None = None,
                 full_max_chars: int | None = None, window_sentences: int = 2):
        if mode not in ("single", "nli"):
            raise ValueError(mode)
        self.model, self.tokenizer, self.mode, self.entail_index = model, tokenizer, mode, entail_index
        self.name, self.max_length, self.batch_size, self.threshold = name, max_length, batch_size, threshold
        self.full_max_chars = full_max_chars if full_max_chars is not None else max(200, (max_length - 48) * 4)
        self.window_sentences = window_sentences
        self.model.eval()

    def score_pairs(self, passages: Sequence[str], claims: Sequence[str]) -> np.ndarray:
        """Score each (passage, claim) pair as given, without windowing.

        Returns:
            float64 probabilities; NaN where the passage or claim is empty or the model returned NaN.
        """
        import torch

        if len(passages) != len(claims):
            raise ValueError(f"{len(passages)} passages but {len(claims)} claims")
        out = np.full(len(passages), np.nan)
        ok = [i for i, (p, c) in enumerate(zip(passages, claims))
              if isinstance(p, str) and isinstance(c, str) and p.strip() and c.strip()]
        order = sorted(ok, key=lambda i: len(passages[i]) + len(claims[i]))  # less padding per batch
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                enc = self.tokenizer([passages[i] for i in idx], [claims[i] for i in idx], truncation="only_first",
                                     max_length=self.max_length, padding=True,
                                     return_tensors="pt").to(self.model.device)
                logits = self.model(**enc).logits.float().cpu()
                if self.mode == "single":
                    probs = torch.sigmoid(logits[:, 0])
                else:
                    probs = torch.softmax(logits, dim=-1)[:, self.entail_index]
                out[idx] = probs.double().numpy()
        return out

    def score(self, passages: Sequence[str], claims: Sequence[str]) -> np.ndarray:
        """Return the support probability of each claim: max over its passage's windows (see passage_windows).

        Args:
            passages: evidence passages, one per claim.
            claims: the claims (``refinery.models.claims.claim_text(question, answer)``).

        Returns:
            float64 array in [0, 1], NaN for rows that could not be scored (empty text, model NaN).
        """
        if len(passages) != len(claims):
            raise ValueError(f"{len(passages)} passages but {len(claims)} claims")
        owners, flat_p, flat_c = [], [], []
        for i, (p, c) in enumerate(zip(passages, claims)):
            windows = passage_windows(p, full_max_chars=self.full_max_chars,
                                      window_sentences=self.window_sentences) if isinstance(p, str) else [p]
            owners += [i] * len(windows)
            flat_p += windows
            flat_c += [c] * len(windows)
        flat = self.score_pairs(flat_p, flat_c)
        out = np.full(len(passages), np.nan)
        for i, s in zip(owners, flat):
            if np.isnan(s):
                continue
            out[i] = s if np.isnan(out[i]) else max(out[i], s)
        return out


def _entailment_index(id2label: dict) -> int | None:
    for i, label in id2label.items():
        if str(label).lower().startswith("entail"):
            return int(i)
    return None


def load_verifier(path_or_id: str | Path, *, batch_size: int = 32, max_length: int | None = None,
                  threads: int | None = None, lexical: bool = True, judge: Any | None = None,
                  embedder: Any | None = None) -> Verifier:
    """Load a verifier from a trained head folder, an HF NLI model or a single-logit cross-encoder.

    Args:
        path_or_id: a local folder (ours has TRAINING.json with the calibrated threshold) or an HF id
            already in the local cache.
        batch_size: pairs per forward pass.
        max_length: tokens per pair; default: the training max_length, else 256.
        threads: torch CPU threads (None leaves torch's default).
        lexical: when the folder holds a COMBINER.json (written by train_verifier), combine the model's
            score with lexical grounding features (refinery.models.grounding); False: the model alone.
        judge: a backend with ``token_logprobs``, required when the combiner was fitted with the judge's
            answer-likelihood features (train_verifier ``likelihood_features``).
        embedder: a ``refinery.models.embed.Embedder``, required when the combiner reads sentence-embedding cosines
            (train_verifier ``embedding_features``).

    Returns:
        A loaded verifier (model in eval mode, loaded once).

    Raises:
        ModelResolutionError: the model cannot be loaded, or it has several labels and none is entailment.
    """
    ref = str(path_or_id)
    tokenizer, model = load_classifier(ref, "verifier", threads)
    training = read_training(ref)
    threshold = training.get("threshold") if training else None
    length = max_length or (training or {}).get("max_length") or 256
    config = model.config
    if config.num_labels == 1:
        mode, entail = "single", None
    else:
        entail = _entailment_index(config.id2label or {})
        if entail is None:
            raise ModelResolutionError(f"verifier '{ref}': {config.num_labels} labels {dict(config.id2label)} and "
                                       f"none names entailment: use an NLI model or a one-logit cross-encoder")
        mode = "nli"
    verifier = CrossEncoderVerifier(model, tokenizer, mode=mode, entail_index=entail, name=ref, max_length=length,
                                    batch_size=batch_size, threshold=threshold)
    if not lexical:
        return verifier
    from refinery.models.grounding.scorer import Combiner, GroundedVerifier

    combiner = Combiner.load(ref) if Path(ref).is_dir() else None
    if combiner is None:
        return verifier
    try:
        return GroundedVerifier(verifier, combiner, judge, embedder)
    except ValueError as e:
        raise ModelResolutionError(str(e)) from None


def check_pairs(pairs: pa.Table, where: str = "verifier pairs") -> None:
    """Fail with one line when a pairs table lacks a column or holds no positive or no negative."""
    missing = [c for c in PAIR_COLUMNS if c not in pairs.column_names]
    if missing:
        raise RefineryError(f"{where}: missing column(s) {', '.join(missing)}")
    labels = pairs.column("label").to_pylist()
    if not any(x >= 0.5 for x in labels) or not any(x < 0.5 for x in labels):
        raise RefineryError(f"{where}: needs both supported (label 1) and unsupported (label 0) pairs")


def train_verifier(pairs: pa.Table, base_path: str | Path, out_dir: str | Path, *, epochs: int, lr: float,
                   batch_size: int, seed: int, max_length: int, threads: int, trainable_layers: int = 6,
                   init_model: Any = None, device: str = "cpu",
                   log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Fine-tune a one-logit cross-encoder on (passage, claim, label) pairs and save it with its tokenizer.

    The loss is binary cross-entropy with the positive class weighted by negatives/positives, so the
    classes count equally whatever the pair mix. The loop is :func:`refinery.models.heads.train_head`.

    Args:
        pairs: table with ``passage``, ``claim`` and ``label`` (1 supported, 0 not).
        base_path: the encoder folder (all-MiniLM-L6-v2) or an already fine-tuned verifier folder.
        out_dir: where to save the HF model and tokenizer (created).
        epochs, lr, batch_size, seed, max_length, threads, trainable_layers: training knobs.
        init_model: a (model, tokenizer) to continue from instead of loading ``base_path`` (SNLI pre-training).
        device: the torch device it trains on (``refinery.core.device.resolve_device``).
        log: progress callback.

    Returns:
        Training metrics: pairs, steps, loss per epoch, first/last-10%-of-steps mean loss, the device used.
    """
    import torch

    check_pairs(pairs)
    passages = pairs.column("passage").to_pylist()
    claims = pairs.column("claim").to_pylist()
    labels = np.asarray(pairs.column("label").to_pylist(), dtype=np.float32)
    n_pos = float((labels >= 0.5).sum())
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([(len(labels) - n_pos) / n_pos]))

    def batch_loss(model: Any, tokenizer: Any, idx: list[int]) -> Any:
        enc = tokenizer([passages[i] for i in idx], [claims[i] for i in idx], truncation="only_first",
                        max_length=max_length, padding=True, return_tensors="pt").to(model.device)
        return loss_fn.to(model.device)(model(**enc).logits[:, 0], torch.from_numpy(labels[idx]).to(model.device))

    cfg = TrainConfig(epochs, lr, batch_size, seed, max_length, threads, trainable_layers, device=device)
    run = train_head(cfg, base_path, out_dir, lengths=[len(p) + len(c) for p, c in zip(passages, claims)],
                     batch_loss=batch_loss, name="verifier", label="supported", init_model=init_model, log=log)
    return {"pairs": len(labels), "positives": int(n_pos), "negatives": int(len(labels) - n_pos), **run}


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Return the ROC AUC (ties count half), or None when a class is absent."""
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def threshold_for_frr(clean_scores: Sequence[float], target_frr: float) -> float:
    """Return the highest threshold that rejects at most ``target_frr`` of clean rows (score < threshold rejects).

    Args:
        clean_scores: scores of supported (clean) rows.
        target_frr: the largest share of clean rows the gate may reject.

    Returns:
        A threshold in [0, 1].
    """
    s = np.sort(np.asarray(clean_scores, dtype=float))
    if len(s) == 0:
        raise RefineryError("threshold_for_frr: no clean scores")
    k = int(math.floor(target_frr * len(s)))  # at most k clean rows may fall below
    return float(s[k]) if k < len(s) else 1.0
