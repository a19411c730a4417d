"""Score predicted answers against references: EM, token F1, ROUGE, BERTScore and a passage-grounded fact check."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower-case, drop punctuation and articles, collapse white space.

    Source: the official SQuAD evaluation script (Rajpurkar et al. 2016), ``normalize_answer``.
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0 (SQuAD EM)."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall after SQuAD normalisation (SQuAD F1).

    Two empty strings score 1.0; one empty string scores 0.0.
    """
    p, r = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures per pair, with Porter stemming (Lin 2004; ``rouge-score``)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    out: dict[str, list[float]] = {"rouge1": [], "rouge2": [], "rougeL": []}
    for p, r in zip(predictions, references, strict=True):
        s = scorer.score(r, p)
        for k in out:
            out[k].append(float(s[k].fmeasure))
    return out


@dataclass(frozen=True)
class BertScoreResult:
    """Per-pair BERTScore F1 and how it was computed."""

    f1: list[float]
    info: dict[str, Any]


def bertscore(predictions: Sequence[str], references: Sequence[str], *, model_path: str | Path, model_id: str,
              num_layers: int, batch_size: int = 32) -> BertScoreResult:
    """BERTScore F1 per pair (Zhang et al. 2020; ``bert-score``) with a local encoder, without baseline rescaling.

    Args:
        predictions, references: the pairs.
        model_path: a local Hugging Face encoder folder (e.g. the embedder role's all-MiniLM-L6-v2).
        model_id: the id recorded beside the scores.
        num_layers: which hidden layer's embeddings are matched (MiniLM-L6: 6, its last).
        batch_size: pairs per forward pass.

    Returns:
        F1 per pair (an empty prediction scores 0.0) and a record of the model and settings used.
    """
    from bert_score import BERTScorer

    scorer = BERTScorer(model_type=str(model_path), num_layers=num_layers, batch_size=batch_size, idf=False,
                        rescale_with_baseline=False, device="cpu")
    f1 = [0.0] * len(predictions)
    idx = [i for i, p in enumerate(predictions) if p.strip()]
    if idx:
        _, _, f = scorer.score([predictions[i] for i in idx], [references[i] for i in idx], verbose=False)
        for i, v in zip(idx, f.tolist()):
            f1[i] = float(v)
    info = {"model": model_id, "num_layers": num_layers, "idf": False, "rescale_with_baseline": False,
            "package": "bert-score", "empty_predictions_scored_0": len(predictions) - len(idx)}
    return BertScoreResult(f1, info)


# ----------------------------------------------------------------------------------- factual accuracy
_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9'\-]*")
_STOP = frozenset("""a an the and or but if then so of to in on at by for from with without into onto over under
is are was were be been being do does did done has have had can could will would shall should may might must
it its this that these those there here you your yours we our they their them he she his her i me my not no yes
as than also just only any all each every some more most less least very too up down out off about after before
what when where which who whom why how please one""".split())


def facts(text: str) -> set[str]:
    """Return the checkable facts of a text: its numbers and its capitalised words not opening a sentence.

    Numbers are kept as written (``30``, ``2.5``, ``10:00``); capitalised words (product names, plan names,
    menu items) keep their case, so the label ``Restore`` is not matched by the verb "restore". Stop words
    are never facts.
    """
    out = {n.rstrip(".,:") for n in _NUMBER.findall(text)}
    for sent in re.split(r"(?<=[.!?])\s+|\n+", text):
        for k, m in enumerate(_WORD.finditer(sent)):
            w = m.group(0)
            if k > 0 and w[0].isupper() and w.lower() not in _STOP:
                out.add(w)
    return {f for f in out if f}


def _contains(haystack: str, fact: str) -> bool:
    if fact[0].isdigit():
        return re.search(rf"(?<![\d.]){re.escape(fact)}(?![\d])", haystack) is not None
    return re.search(rf"\b{re.escape(fact)}\b", haystack) is not None


def factual_check(prediction: str, reference: str, passage: str, *, min_facts: int = 1) -> tuple[bool, bool | None]:
    """Judge a prediction against the passage-verifiable facts of its reference answer.

    An item is *verifiable* when its reference states at least ``min_facts`` facts (see :func:`facts`) and
    every one of them appears in the passage. A prediction on a verifiable item is *factually accurate*
    when it states every such fact and every number it states appears in the passage (no invented or
    changed figures). Lexical, so a paraphrased fact ("two weeks" for "14 days") counts as missing: it
    under-credits, never over-credits, numbers.

    Returns:
        (verifiable, accurate); accurate is None when the item is not verifiable.
    """
    ref_facts = facts(reference)
    if len(ref_facts) < min_facts or not all(_contains(passage, f) for f in ref_facts):
        return False, None
    stated_all = all(_contains(prediction, f) for f in ref_facts)
    invented = [n for n in _NUMBER.findall(prediction) if not _contains(passage, n.rstrip(".,:"))]
    return True, bool(stated_all and not invented)


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the non-null values, rounded to 4 decimals; None when there are none."""
    vals = [v for v in values if v is not None]
    return round(float(np.mean(vals)), 4) if vals else None
