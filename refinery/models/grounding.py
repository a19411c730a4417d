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

Three more judge features are per answer word: the least likely word that the passage also holds (a word lifted
from the passage into the wrong place is improbable even with the passage in view), the least likely word it
does not, and the least likely negation word. Optionally, sentence-embedding cosines of the answer with its passage and its question see an answer
written for another document, and one regression per corruption kind, the score being their minimum, keeps each
kind's cue at full weight where one linear score must trade them against each other.

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

from refinery.planted.corruptions import STOPWORDS, entities

COMBINER_FILE = "COMBINER.json"
FEATURES = ("model_logit", "novel_number", "novel_entity_share", "novel_word_share", "bigram_support",
            "claim_negation", "passage_negation", "negation_not_in_passage",
            # the answer alone (the claim after its question), so a grounded question does not dilute it
            "answer_novel_word_share", "max_sentence_novel_word_share", "answer_bigram_support",
            "min_sentence_bigram_support", "answer_sentences_gt1", "answer_words_in_question")

LIKELIHOOD_FEATURES = ("answer_logprob_mean", "answer_logprob_min",
                       # per answer content word (log-prob summed over its tokens): the least likely word the
                       # answer shares with the passage, and the least likely word it does not
                       "copied_word_logprob_min", "new_word_logprob_min",
                       # and the least likely negation word ("not", "never", "n't"): a flipped claim's inserted
                       # "not" is one the passage makes improbable
                       "negation_word_logprob_min",
                       # the counterfactual: how much likelier the answer becomes with its negations removed
                       # (summed log-prob, 0 for an answer without one); a faithful "did not" loses, a flipped one
                       # gains
                       "negation_removal_gain")
# the word features need the judge's token offsets; the others need only its token log-probs
OFFSET_FEATURES = ("copied_word_logprob_min", "new_word_logprob_min", "negation_word_logprob_min")
_TOKEN_ONLY = 2
_WORD_COLUMNS = slice(_TOKEN_ONLY, _TOKEN_ONLY + len(OFFSET_FEATURES))
_GAIN = LIKELIHOOD_FEATURES.index("negation_removal_gain")
EMBEDDING_FEATURES = ("answer_passage_cosine", "answer_question_cosine")
EXTRA_FEATURES = LIKELIHOOD_FEATURES + EMBEDDING_FEATURES
LIKELIHOOD_CONTEXT = "Passage: {passage}\nQuestion: {question}\nAnswer:"

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_NEGATION = re.compile(r"\b(?:not|no|never|none|nobody|nothing|neither|nor|cannot|without|no longer)\b|n't\b",
                       re.IGNORECASE)
# (pattern, replacement): each removes one negation; "can't" and "won't" keep their modal
_DENEGATE = [(re.compile(p, re.IGNORECASE), r) for p, r in (
    (r"\b(c)an(?:'t|not)\b", r"\1an"), (r"\b(w)on't\b", r"\1ill"), (r"\s*n't\b", ""), (r"\s+(?:not|never)\b", ""))]


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

    The claim is the question then the answer (``refinery.models.verifier.claim_text``); the answer-level features
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


def denegate(answer: str) -> str:
    """Return ``answer`` with its negations removed ("did not go" -> "did go", "can't" -> "can", "never" -> "")."""
    for pattern, repl in _DENEGATE:
        answer = pattern.sub(repl, answer)
    return answer


def _word_logprobs(continuation: str, logps: np.ndarray, offsets: Sequence[tuple[int, int]],
                   passage_words: set[str]) -> list[float]:
    """Return the word features (OFFSET_FEATURES) of one scored continuation.

    A word's log-prob is the sum over the tokens that overlap it. Copied and new words are content words (no
    stopwords, more than two letters); negation words are those of the negation cue. 0.0 where there is no
    such word. ``offsets`` are the scored tokens' character spans in ``continuation``.
    """
    copied, new, negations = [], [], []
    spans = list(offsets)[len(offsets) - len(logps):]  # the backend scores the last tokens of a long continuation
    for m in _WORD.finditer(continuation.lower()):
        word = m.group(0)
        negation, content = bool(_NEGATION.fullmatch(word) or word.endswith("n't")), bool(_content([word]))
        if not (negation or content):
            continue
        lp = [float(v) for (start, end), v in zip(spans, logps) if start < m.end() and end > m.start()]
        if not lp:
            continue
        if negation:
            negations.append(sum(lp))
        if content:
            (copied if word in passage_words else new).append(sum(lp))
    return [min(copied, default=0.0), min(new, default=0.0), min(negations, default=0.0)]


def likelihood_matrix(judge: Any, passages: Sequence[str], claims: Sequence[str]) -> np.ndarray:
    """Return an (n, len(LIKELIHOOD_FEATURES)) matrix: the judge's answer log-probs given passage + question.

    An answer word that the passage holds but puts in the wrong place (a swapped name, a word lifted from
    another sentence) is one the judge finds improbable even with the passage in view, where a faithful
    answer's copied words are the likeliest it has; so the least likely copied word is a feature of its own.

    Args:
        judge: a backend with ``token_logprobs(contexts, continuations)`` (the local transformers backend), or a
            :class:`Likelihood` (which remembers pairs it has scored). The word features also need
            ``token_offsets(continuations)``; without it they are NaN.
        passages: the evidence each claim is checked against.
        claims: question + answer texts.

    Returns:
        Per pair: mean and minimum log-prob per answer token, the word features, and the negation-removal gain
        (the answer with its negations removed, ``denegate``, scored in a second pass); NaN for a claim without
        answer tokens.
    """
    if isinstance(judge, Likelihood):
        return judge.matrix(passages, claims)
    parts = [split_claim(c) for c in claims]
    contexts = [LIKELIHOOD_CONTEXT.format(passage=p, question=q) for p, (q, _) in zip(passages, parts)]
    continuations = [" " + a for _, a in parts]
    logps = judge.token_logprobs(contexts, continuations)
    offsets = judge.token_offsets(continuations) if callable(getattr(judge, "token_offsets", None)) else None
    x = np.full((len(claims), len(LIKELIHOOD_FEATURES)), np.nan)
    for i, t in enumerate(logps):
        if not len(t):
            continue
        x[i, :_TOKEN_ONLY] = [float(t.mean()), float(t.min())]
        x[i, _GAIN] = 0.0
        if offsets is not None:
            words = set(_WORD.findall(passages[i].lower()))
            x[i, _WORD_COLUMNS] = _word_logprobs(continuations[i], t, offsets[i], words)
    # one more judge pass, over the answers that hold a negation only
    flipped = {i: " " + denegate(a) for i, (_, a) in enumerate(parts) if len(logps[i]) and denegate(a) != a}
    if flipped:
        gained = judge.token_logprobs([contexts[i] for i in flipped], list(flipped.values()))
        for i, t in zip(flipped, gained):
            x[i, _GAIN] = float(t.sum() - logps[i].sum())
    return x


class Likelihood:
    """A judge's LIKELIHOOD_FEATURES with a memory of the (passage, claim) pairs already scored.

    One judge forward pass per pair costs far more than the verifier itself; train_verifier scores its val pairs
    for the combiner, then for the calibration, then twice more for the aggregation check, and the lexical
    features do not change in between.
    """

    def __init__(self, judge: Any):
        self.judge = judge
        self.memo: dict[tuple[str, str], np.ndarray] = {}
        if callable(getattr(judge, "token_offsets", None)):
            self.token_offsets = judge.token_offsets

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


def embedding_matrix(embedder: Any, passages: Sequence[str], claims: Sequence[str]) -> np.ndarray:
    """Return an (n, 2) matrix of EMBEDDING_FEATURES: cosine of the answer with its passage and with its question.

    An answer written for another document shares neither topic nor vocabulary with this passage, even when it
    is a fluent, plausible sentence; sentence embeddings see the topic where word overlap sees nothing.

    Args:
        embedder: an object with ``embed(texts)`` returning L2-normalised vectors (``refinery.models.embed.Embedder``).
        passages: the evidence passages.
        claims: question + answer texts.

    Returns:
        float64 matrix; a claim without a question gets cosine 0 with its (empty) question.
    """
    parts = [split_claim(c) for c in claims]
    answers = embedder.embed([a for _, a in parts])
    evidence = embedder.embed(list(passages))
    questions = embedder.embed([q or "" for q, _ in parts])
    x = np.stack([(answers * evidence).sum(axis=1), (answers * questions).sum(axis=1)], axis=1).astype(float)
    x[[not q for q, _ in parts], 1] = 0.0
    return x


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
    """The fitted logistic regression over FEATURES, plus any of EXTRA_FEATURES it was fitted with.

    A spec may instead hold ``boosted``: gradient-boosted trees over the same features (``fit_combiner_spec``
    with ``boosted``), exported as plain node arrays so no pickled model is ever loaded.

    A spec may also hold ``per_kind``: one regression per corruption kind, each fitted on clean answers against
    that kind's negatives alone and ranked against the clean answers (``fit_combiner_spec``). The score is then
    the minimum over the overall regression and the per-kind ones, so a row is as supported as its most damning
    detector says. One linear score has to trade a swapped word's cue against an answer-from-another-document's
    cue; the minimum keeps each cue at full strength.
    """

    def __init__(self, spec: dict[str, Any]):
        names = list(spec.get("features", []))
        self.trees = _Trees(spec["boosted"], len(names)) if "boosted" in spec else None
        extra = names[len(FEATURES):]
        if names[:len(FEATURES)] != list(FEATURES) or len(set(extra)) != len(extra) or \
                not set(extra) <= set(EXTRA_FEATURES):
            raise ValueError(f"combiner features {spec.get('features')} differ from this version's {list(FEATURES)} "
                             f"(optionally + some of {list(EXTRA_FEATURES)})")
        self.spec = spec
        self.likelihood_columns = [LIKELIHOOD_FEATURES.index(n) for n in extra if n in LIKELIHOOD_FEATURES]
        self.embedding_columns = [EMBEDDING_FEATURES.index(n) for n in extra if n in EMBEDDING_FEATURES]
        if [n for n in extra if n in LIKELIHOOD_FEATURES] + [n for n in extra if n in EMBEDDING_FEATURES] != extra:
            raise ValueError(f"combiner features {extra}: likelihood features must come before embedding features")
        self.needs_judge = bool(self.likelihood_columns)
        self.needs_offsets = any(n in OFFSET_FEATURES for n in extra)
        self.needs_embedder = bool(self.embedding_columns)
        self.models = [] if self.trees is not None else \
            [spec] + [spec["per_kind"][k] for k in sorted(spec.get("per_kind") or {})]
        for m in self.models:
            if not len(m["mean"]) == len(m["std"]) == len(m["weights"]) == len(names):
                raise ValueError(f"combiner: {len(names)} features but a regression of {len(m['weights'])} weights")

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Return the support score per row; NaN rows stay NaN.

        One regression, or boosted trees: P(supported). Per kind: the minimum over the regressions of the share of
        clean answers each one scores the row above (``fit_combiner_spec``).
        """
        if self.trees is not None:
            p = 1 / (1 + np.exp(-np.clip(self.trees.raw(x), -30, 30)))
            return np.where(np.isnan(x).any(axis=1), np.nan, p)
        out = None
        for m in self.models:
            z = _logit(m, x)
            if "clean_logits" in m:
                p = _clean_rank(z, np.asarray(m["clean_logits"], dtype=float))
            else:
                p = 1 / (1 + np.exp(-np.clip(z, -30, 30)))
            out = p if out is None else np.minimum(out, p)
        return out

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


def _logit(m: dict[str, Any], x: np.ndarray) -> np.ndarray:
    return ((x - np.asarray(m["mean"])) / np.asarray(m["std"])) @ np.asarray(m["weights"]) + float(m["bias"])


def _clean_rank(z: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Return the share of clean answers (sorted logits ``ref``) below each logit, strictly increasing in z.

    Between clean logits it interpolates; beyond them it decays exponentially into the outer half-step
    (0 < p < 0.5/n below the lowest, 1 - 0.5/n < p < 1 above the highest), so rows below every clean answer keep
    their order instead of tying at 0, and a threshold can still be set at any false-rejection rate.
    """
    n = len(ref)
    if n == 0:
        return 1 / (1 + np.exp(-np.clip(z, -30, 30)))
    mid = np.interp(z, ref, (np.arange(n) + 0.5) / n)
    low = 0.5 / n * np.exp(np.clip(z - ref[0], -700, 0))
    high = 1 - 0.5 / n * np.exp(np.clip(ref[-1] - z, -700, 0))
    return np.where(np.isnan(z), np.nan, np.where(z < ref[0], low, np.where(z > ref[-1], high, mid)))


def fit_combiner_spec(x: np.ndarray, y: np.ndarray, names: Sequence[str], kinds: Sequence[str] | None = None,
                      *, l2: float = 1.0, min_rows: int = 5, boosted: bool = False, seed: int = 0) -> dict[str, Any]:
    """Fit the combiner: one regression, with ``kinds`` one overall and one per corruption kind, or boosted trees.

    Per kind, the regressions are fitted on clean answers (pairs of kind ``clean``) against that kind's negatives
    (or against all negatives, for the overall one): passage sentences and counterfactual sentences are positives
    of another shape than the answers a gate scores. Each regression's score is then its logit's rank among the
    clean answers' logits (the share of clean answers it scores above), so every detector rejects the same share
    of clean answers at a given threshold and the minimum over them favours none.

    Args:
        x: (n, len(names)) finite features.
        y: labels in {0, 1}.
        names: the feature names.
        kinds: per row, its pair kind (``clean``, ``passage_sentence``, ``counterfactual`` or a corruption kind);
            None: a single regression over all rows.
        l2: ridge penalty.
        min_rows: fewer clean answers than this: all positives stand in for them; fewer negatives of a kind:
            that kind gets no regression of its own.
        boosted: instead of regressions, fit gradient-boosted trees (depth 2, 300 rounds, learning rate 0.05;
            ``fit_boosted``) on the clean answers (by ``kinds``) against every negative. Trees can read a cue
            one way beside one value of another feature and another way beside another, and cut a feature at
            a threshold, which a weighted sum cannot.
        seed: the trees' random state.

    Returns:
        A Combiner spec; with kinds, ``per_kind`` maps each kind to its regression, and every regression holds
        ``clean_logits``, the sorted logits of the clean answers it is ranked against; boosted: ``boosted``.
    """
    neg = y < 0.5
    answers = ~neg
    if kinds is not None:
        kinds = np.asarray(kinds, dtype=object)
        if (~neg & (kinds == "clean")).sum() >= min_rows:
            answers = ~neg & (kinds == "clean")
    if boosted:
        return fit_boosted(x[answers | neg], y[answers | neg], names, seed=seed)
    spec = fit_logistic(x, y, l2=l2, names=names)
    if kinds is None:
        return spec

    def fit(sel: np.ndarray) -> dict[str, Any]:
        m = {k: v for k, v in fit_logistic(x[sel], y[sel], l2=l2, names=names).items() if k != "features"}
        m["clean_logits"] = np.sort(_logit(m, x[answers])).round(6).tolist()
        return m

    spec = {"features": list(names), **fit(answers | neg)}
    spec["per_kind"] = {k: fit(answers | (neg & (kinds == k))) for k in sorted({str(v) for v in kinds[neg]})
                        if (neg & (kinds == k)).sum() >= min_rows}
    return spec


def fit_boosted(x: np.ndarray, y: np.ndarray, names: Sequence[str], *, max_depth: int = 2, rounds: int = 300,
                learning_rate: float = 0.05, l2: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """Fit gradient-boosted trees (scikit-learn's histogram booster) and export them as node arrays.

    The defaults were chosen by 5-fold cross-validation on the CosmosQA combiner holdout (factual recall at a
    false-rejection rate of 0.10, out of fold: 0.842 at depth 2; depths 2-4, 150-300 rounds, rates 0.05-0.1 and
    balanced class weights all read 0.82-0.84).

    Args:
        x: (n, len(names)) finite features.
        y: labels in {0, 1}, both present.
        names: the feature names.
        max_depth, rounds, learning_rate, l2: the booster's knobs.
        seed: its random state (no early stopping, so the fit is deterministic).

    Returns:
        {"features", "boosted": {"baseline", "trees", "settings", "importance"}}: ``baseline`` is the raw log-odds
        before the first tree; each tree holds per node its feature, threshold (left when x <= threshold), side for
        a missing value, children, leaf flag and value (the learning rate already applied).
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    if len(np.unique(y)) < 2:
        raise ValueError("boosted combiner: needs both labels")
    if len(names) != x.shape[1]:
        raise ValueError(f"boosted combiner: {len(names)} names for {x.shape[1]} features")
    model = HistGradientBoostingClassifier(max_depth=max_depth, max_iter=rounds, learning_rate=learning_rate,
                                           l2_regularization=l2, early_stopping=False, random_state=seed).fit(x, y)
    trees, gain = [], np.zeros(x.shape[1])
    # scikit-learn keeps the fitted trees in private attributes; tests check the export against its predictions
    for (predictor,) in model._predictors:
        nodes = predictor.nodes
        trees.append({"feature": nodes["feature_idx"].tolist(), "threshold": nodes["num_threshold"].tolist(),
                      "missing_left": nodes["missing_go_to_left"].astype(bool).tolist(),
                      "left": nodes["left"].tolist(), "right": nodes["right"].tolist(),
                      "leaf": nodes["is_leaf"].astype(bool).tolist(), "value": nodes["value"].tolist()})
        inner = ~nodes["is_leaf"].astype(bool)
        np.add.at(gain, nodes["feature_idx"][inner], nodes["gain"][inner])
    importance = gain / gain.sum() if gain.sum() > 0 else gain
    return {"features": list(names), "boosted": {
        "baseline": float(np.ravel(model._baseline_prediction)[0]), "trees": trees,
        "settings": {"max_depth": max_depth, "rounds": rounds, "learning_rate": learning_rate, "l2": l2,
                     "seed": seed},
        "importance": dict(zip(names, np.round(importance, 4).tolist()))}}


class _Trees:
    """Boosted trees from a spec's ``boosted`` entry, evaluated with numpy."""

    def __init__(self, boosted: dict[str, Any], n_features: int):
        self.baseline = float(boosted["baseline"])
        self.trees = []
        for t in boosted["trees"]:
            arrays = tuple(np.asarray(t[k]) for k in ("feature", "threshold", "missing_left", "left", "right",
                                                       "leaf", "value"))
            feature, _, _, left, right, leaf, _ = arrays
            inner = ~leaf.astype(bool)
            if len({len(a) for a in arrays}) != 1 or (feature[inner] >= n_features).any() or \
                    (left[inner] >= len(leaf)).any() or (right[inner] >= len(leaf)).any():
                raise ValueError(f"combiner: a boosted tree does not fit its {n_features} features")
            self.trees.append(arrays[:5] + (leaf.astype(bool), arrays[6].astype(float)))

    def raw(self, x: np.ndarray) -> np.ndarray:
        """Return the raw log-odds per row."""
        out = np.full(len(x), self.baseline)
        rows = np.arange(len(x))
        for feature, threshold, missing_left, left, right, leaf, value in self.trees:
            node = np.zeros(len(x), dtype=int)
            for _ in range(len(leaf)):  # a path is at most as long as the tree has nodes
                if leaf[node].all():
                    break
                v = x[rows, feature[node]]
                go_left = np.where(np.isnan(v), missing_left[node].astype(bool), v <= threshold[node])
                node = np.where(leaf[node], node, np.where(go_left, left[node], right[node]))
            else:
                if not leaf[node].all():
                    raise ValueError("combiner: a boosted tree has a cycle (no leaf is reached)")
            out += value[node]
        return out


class GroundedVerifier:
    """A verifier whose score is the combiner over its model's score and grounding features.

    Keeps the wrapped verifier's interface (``name``, ``threshold``, ``score``), so gates and the
    calibration code use it unchanged. A combiner fitted with LIKELIHOOD_FEATURES needs the judge backend (with
    ``token_offsets`` for the word features); one fitted with EMBEDDING_FEATURES needs the embedder.
    """

    def __init__(self, base: Any, combiner: Combiner, judge: Any | None = None, embedder: Any | None = None):
        if combiner.needs_judge and not callable(getattr(judge, "token_logprobs", None)):
            got = "none was given" if judge is None else f"{type(judge).__name__} cannot return token log-probs"
            raise ValueError(f"verifier {base.name}: its combiner reads the judge's answer likelihood "
                             f"({', '.join(LIKELIHOOD_FEATURES)}), but {got}: use a local judge model")
        if combiner.needs_offsets and not callable(getattr(judge, "token_offsets", None)):
            raise ValueError(f"verifier {base.name}: its combiner reads the judge's word log-probs, but "
                             f"{type(judge).__name__} cannot return token offsets: use a local judge model")
        if combiner.needs_embedder and not callable(getattr(embedder, "embed", None)):
            raise ValueError(f"verifier {base.name}: its combiner reads sentence-embedding cosines "
                             f"({', '.join(EMBEDDING_FEATURES)}), but no embedder was given")
        if combiner.needs_judge and not isinstance(judge, Likelihood):
            judge = Likelihood(judge)
        self.base, self.combiner = base, combiner
        self.judge = judge if combiner.needs_judge else None
        self.embedder = embedder if combiner.needs_embedder else None
        suffix = "+lexical" + ("+likelihood" if self.judge is not None else "") + \
            ("+embedding" if self.embedder is not None else "")
        self.name, self.threshold = f"{base.name}{suffix}", base.threshold

    @property
    def full_max_chars(self) -> int:
        return self.base.full_max_chars

    @full_max_chars.setter
    def full_max_chars(self, value: int) -> None:
        self.base.full_max_chars = value

    def score(self, passages: Sequence[str], claims: Sequence[str]) -> np.ndarray:
        """Return the combined support score per pair (see ``Combiner.predict``); NaN where a feature is NaN."""
        probs = np.asarray(self.base.score(passages, claims), dtype=float)
        return self.combiner.predict(combiner_matrix(self.combiner, passages, claims, probs, judge=self.judge,
                                                     embedder=self.embedder))


def combiner_matrix(combiner: Combiner, passages: Sequence[str], claims: Sequence[str], model_probs: np.ndarray,
                    *, judge: Any | None = None, embedder: Any | None = None) -> np.ndarray:
    """Return the feature matrix in ``combiner``'s column order (FEATURES, then its extra features)."""
    x = [feature_matrix(passages, claims, model_probs)]
    if combiner.likelihood_columns:
        x.append(likelihood_matrix(judge, passages, claims)[:, combiner.likelihood_columns])
    if combiner.embedding_columns:
        x.append(embedding_matrix(embedder, passages, claims)[:, combiner.embedding_columns])
    return np.hstack(x)
