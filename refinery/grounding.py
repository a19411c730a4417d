"""Combine a verifier's score with lexical grounding evidence (novel numbers, entities, words, negation).

A small cross-encoder trained on a few hundred seed pairs misses edits a reader spots at once: a number the
passage never states, a name from nowhere, a "not" the passage lacks, a claim whose word pairs the passage
never uses. Those cues are cheap to compute and complementary to the model, so the embedded verifier is
the model's logit and these features combined by a logistic regression fitted on held-out training pairs
(never on the val rows that calibrate the threshold or the rows the injection harness plants errors in).

With a judge language model (the pipeline's perplexity judge), two more features read how likely the judge
finds each answer token given the exact evidence passage and the question: the mean and the minimum token
log-probability. A swapped-in word or an answer written for another passage holds tokens the passage makes
improbable, which word overlap cannot see (conditional likelihood as a faithfulness score: Yuan et al. 2021,
BARTScore).

Sources: lexical-overlap baselines for factual consistency (Kryscinski et al. 2020, FactCC; Laban et al.
2022, SummaC report n-gram overlap as a strong baseline); number / entity hallucination checks
(Nan et al. 2021, entity-level factual consistency).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from refinery.corruptions import STOPWORDS, entities

COMBINER_FILE = "COMBINER.json"
FEATURES = ("model_logit", "novel_number", "novel_entity_share", "novel_word_share", "bigram_support",
            "claim_negation", "passage_negation", "negation_not_in_passage",
            # the answer alone (the claim after its question), so a grounded question does not dilute it
            "answer_novel_word_share", "max_sentence_novel_word_share", "answer_bigram_support",
            "min_sentence_bigram_support", "answer_sentences_gt1", "answer_words_in_question")

LIKELIHOOD_FEATURES = ("answer_logprob_mean", "answer_logprob_min")
LIKELIHOOD_CONTEXT = "Passage: {passage}\nQuestion: {question}\nAnswer:"

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_NEGATION = re.compile(r"\b(?:not|no|never|none|nobody|nothing|neither|nor|cannot|without|no longer)\b|n't\b",
                       re.IGNORECASE)


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s", "ly"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[:-len(suffix)]
    return word


def _numbers(text: str) -> set[str]:
    found = {m.group(0).replace(",", "").rstrip(".") for m in _NUMBER.finditer(text)}
    found |= {_NUMBER_WORDS[w] for w in _WORD.findall(text.lower()) if w in _NUMBER_WORDS and w not in ("one",)}
    return found


def _content(words: Sequence[str]) -> list[str]:
    return [w for w in words if w not in STOPWORDS and len(w) > 2]


def features(passage: str, claim: str, model_prob: float) -> list[float]:
    """Return the FEATURES vector of one (passage, claim) pair given the model's support probability.

    The claim is the question then the answer (``refinery.verifier.claim_text``); the answer-level features
    read the text after the claim's last "?" (the whole claim when there is none). An appended sentence of
    unsupported detail shows as one answer sentence with many novel words and few passage word pairs, and an
    answer to another question shares few words with its question.
    """
    p = min(max(float(model_prob), 1e-6), 1 - 1e-6)
    lp, lc = passage.lower(), claim.lower()
    pw, cw = _WORD.findall(lp), _WORD.findall(lc)
    p_stems = {_stem(w) for w in pw}
    p_bigrams = set(zip(pw, pw[1:]))

    def novel(words: list[str]) -> float:
        content = _content(words)
        return sum(_stem(w) not in p_stems for w in content) / max(1, len(content))

    def support(words: list[str]) -> float:
        pairs = list(zip(words, words[1:]))
        return sum(b in p_bigrams for b in pairs) / max(1, len(pairs))

    claim_numbers = _numbers(claim)
    novel_number = float(bool(claim_numbers - _numbers(passage)))
    ents = {t.lower() for _, _, t in entities(claim)}
    novel_entities = sum(e not in lp for e in ents) / max(1, len(ents))
    neg_c = float(bool(_NEGATION.search(claim)))
    neg_p = float(bool(_NEGATION.search(passage)))

    question, mark, rest = lc.rpartition("?")
    answer = rest if mark and rest.strip() else lc
    aw = _WORD.findall(answer)
    sentences = [w for w in (_WORD.findall(s) for s in _SENTENCE_END.split(answer)) if len(_content(w)) >= 2] or [aw]
    q_stems = {_stem(w) for w in _content(_WORD.findall(question))} if mark else set()
    a_content = _content(aw)
    in_question = sum(_stem(w) in q_stems for w in a_content) / max(1, len(a_content))
    return [math.log(p / (1 - p)), novel_number, novel_entities, novel(cw), support(cw), neg_c, neg_p,
            neg_c * (1 - neg_p),
            novel(aw), max(novel(w) for w in sentences), support(aw), min(support(w) for w in sentences),
            float(len(sentences) > 1), in_question]


def split_claim(claim: str) -> tuple[str, str]:
    """Split a claim (``claim_text``: question, then answer) into (question, answer) at its last "?"."""
    question, mark, answer = claim.rpartition("?")
    if mark and answer.strip():
        return (question + mark).strip(), answer.strip()
    return "", claim.strip()


def likelihood_matrix(judge: Any, passages: Sequence[str], claims: Sequence[str]) -> np.ndarray:
    """Return an (n, 2) matrix of LIKELIHOOD_FEATURES: the judge's answer-token log-probs given passage + question.

    Args:
        judge: a backend with ``token_logprobs(contexts, continuations)`` (the local transformers backend), or a
            :class:`Likelihood` (which remembers pairs it has scored).
        passages: the evidence each claim is checked against.
        claims: question + answer texts.

    Returns:
        Mean and minimum log-prob per answer token; NaN for a claim without answer tokens.
    """
    if isinstance(judge, Likelihood):
        return judge.matrix(passages, claims)
    parts = [split_claim(c) for c in claims]
    contexts = [LIKELIHOOD_CONTEXT.format(passage=p, question=q) for p, (q, _) in zip(passages, parts)]
    logps = judge.token_logprobs(contexts, [" " + a for _, a in parts])
    return np.array([[float(t.mean()), float(t.min())] if len(t) else [np.nan, np.nan] for t in logps]).reshape(
        len(claims), len(LIKELIHOOD_FEATURES))


class Likelihood:
    """A judge's LIKELIHOOD_FEATURES with a memory of the (passage, claim) pairs already scored.

    One judge forward pass per pair costs far more than the verifier itself; train_verifier scores its val pairs
    for the combiner, then for the calibration, then twice more for the aggregation check, and the lexical
    features do not change in between.
    """

    def __init__(self, judge: Any):
        self.judge = judge
        self.memo: dict[tuple[str, str], np.ndarray] = {}

    def token_logprobs(self, contexts: Sequence[str], continuations: Sequence[str]) -> list[np.ndarray]:
        """Pass through to the judge (so a Likelihood is accepted wherever a judge is)."""
        return self.judge.token_logprobs(contexts, continuations)

    def matrix(self, passages: Sequence[str], claims: Sequence[str]) -> np.ndarray:
        """Return the features of every pair, scoring only the pairs not seen before."""
        keys = list(zip(passages, claims))
        todo = list(dict.fromkeys(k for k in keys if k not in self.memo))
        if todo:
            x = likelihood_matrix(self.judge, [p for p, _ in todo], [c for _, c in todo])
            self.memo.update(zip(todo, x))
        return np.array([self.memo[k] for k in keys]).reshape(len(keys), len(LIKELIHOOD_FEATURES))


def feature_matrix(passages: Sequence[str], claims: Sequence[str], model_probs: np.ndarray) -> np.ndarray:
    """Return an (n, len(FEATURES)) matrix; rows whose model score is NaN get NaN."""
    x = np.full((len(claims), len(FEATURES)), np.nan)
    for i, (p, c, s) in enumerate(zip(passages, claims, model_probs)):
        if isinstance(p, str) and isinstance(c, str) and np.isfinite(s):
            x[i] = features(p, c, s)
    return x


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = 1.0, iterations: int = 50,
                 names: Sequence[str] | None = None) -> dict[str, Any]:
    """Fit an L2-regularised logistic regression by Newton's method on standardised features.

    Args:
        x: (n, k) features, finite.
        y: n labels in {0, 1}.
        l2: ridge penalty on the (standardised) weights, not on the intercept.
        iterations: Newton steps (it converges in far fewer on k ≈ 8).
        names: the feature names of x's columns (default FEATURES).

    Returns:
        {"features", "mean", "std", "weights", "bias"} — what ``Combiner`` reads.
    """
    if len(np.unique(y)) < 2:
        raise ValueError("logistic combiner: needs both labels")
    if names is not None and len(names) != x.shape[1]:
        raise ValueError(f"logistic combiner: {len(names)} names for {x.shape[1]} features")
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std < 1e-9] = 1.0
    z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-np.clip(z @ w, -30, 30)))
        grad = z.T @ (p - y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return {"features": list(names or FEATURES), "mean": mean.round(8).tolist(), "std": std.round(8).tolist(),
            "weights": w[:-1].round(8).tolist(), "bias": round(float(w[-1]), 8)}


class Combiner:
    """The fitted logistic regression over FEATURES (and LIKELIHOOD_FEATURES, when fitted with a judge)."""

    def __init__(self, spec: dict[str, Any]):
        known = (list(FEATURES), list(FEATURES + LIKELIHOOD_FEATURES))
        if list(spec.get("features", [])) not in known:
            raise ValueError(f"combiner features {spec.get('features')} differ from this version's {list(FEATURES)} "
                             f"(optionally + {list(LIKELIHOOD_FEATURES)})")
        self.spec = spec
        self.needs_judge = len(spec["features"]) > len(FEATURES)
        self.mean, self.std = np.asarray(spec["mean"]), np.asarray(spec["std"])
        self.weights, self.bias = np.asarray(spec["weights"]), float(spec["bias"])

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Return P(supported) per row; NaN rows stay NaN."""
        z = ((x - self.mean) / self.std) @ self.weights + self.bias
        return 1 / (1 + np.exp(-np.clip(z, -30, 30)))

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write COMBINER.json into a model folder."""
        path = Path(folder) / COMBINER_FILE
        path.write_text(json.dumps({**self.spec, **(extra or {})}, indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Combiner | None:
        """Return the folder's combiner, or None when it has none."""
        path = Path(folder) / COMBINER_FILE
        return cls(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


class GroundedVerifier:
    """A verifier whose score is the combiner over its model's score and grounding features.

    Keeps the wrapped verifier's interface (``name``, ``threshold``, ``score``), so gates and the
    calibration code use it unchanged. A combiner fitted with LIKELIHOOD_FEATURES needs the judge backend.
    """

    def __init__(self, base: Any, combiner: Combiner, judge: Any | None = None):
        if combiner.needs_judge and not callable(getattr(judge, "token_logprobs", None)):
            got = "none was given" if judge is None else f"{type(judge).__name__} cannot return token log-probs"
            raise ValueError(f"verifier {base.name}: its combiner reads the judge's answer likelihood "
                             f"({', '.join(LIKELIHOOD_FEATURES)}), but {got}: use a local judge model")
        if combiner.needs_judge and not isinstance(judge, Likelihood):
            judge = Likelihood(judge)
        self.base, self.combiner, self.judge = base, combiner, judge if combiner.needs_judge else None
        suffix = "+lexical+likelihood" if self.judge is not None else "+lexical"
        self.name, self.threshold = f"{base.name}{suffix}", base.threshold

    @property
    def full_max_chars(self) -> int:
        return self.base.full_max_chars

    @full_max_chars.setter
    def full_max_chars(self, value: int) -> None:
        self.base.full_max_chars = value

    def score(self, passages: Sequence[str], claims: Sequence[str]) -> np.ndarray:
        """Return the combined support probability per pair; NaN where the model could not score."""
        probs = np.asarray(self.base.score(passages, claims), dtype=float)
        x = feature_matrix(passages, claims, probs)
        if self.judge is not None:
            x = np.hstack([x, likelihood_matrix(self.judge, passages, claims)])
        return self.combiner.predict(x)
