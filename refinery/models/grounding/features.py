"""Extract grounding features of (passage, claim) pairs: lexical cues, the judge's answer likelihood, embedding cosines.

A small cross-encoder trained on a few hundred seed pairs misses edits a reader spots at once: a number the
passage never states, a name from nowhere, a "not" the passage lacks, a claim whose word pairs the passage
never uses. Those cues are cheap to compute and complementary to the model, so the embedded verifier is
the model's logit and these features combined (``refinery.models.grounding.learners`` fits the combination,
``refinery.models.grounding.scorer`` applies it).

With a judge language model (the pipeline's perplexity judge), two more features read how likely the judge
finds each answer token given the exact evidence passage and the question: the mean and the minimum token
log-probability. A swapped-in word or an answer written for another passage holds tokens the passage makes
improbable, which word overlap cannot see (conditional likelihood as a faithfulness score: Yuan et al. 2021,
BARTScore).

Three more judge features are per answer word: the least likely word that the passage also holds (a word lifted
from the passage into the wrong place is improbable even with the passage in view), the least likely word it
does not, and the least likely negation word. Optionally, sentence-embedding cosines of the answer with its
passage and its question see an answer written for another document.

Sources: lexical-overlap baselines for factual consistency (Kryscinski et al. 2020, FactCC; Laban et al.
2022, SummaC report n-gram overlap as a strong baseline); number / entity hallucination checks
(Nan et al. 2021, entity-level factual consistency).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from refinery.models.claims import split_claim
from refinery.planted.corruptions import STOPWORDS, entities

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

    The claim is the question then the answer (``refinery.models.claims.claim_text``); the answer-level features
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
