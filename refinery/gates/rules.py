"""Reject generated rows by fast text rules: errors, emptiness, truncation, refusals, meta-talk, length, language.

The rules run over whole Arrow columns with the kernels of :mod:`refinery.core.textkernels`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from refinery.core.params import StageParams
from refinery.core.textkernels import (ROWS_PER_PASS, SmallHashSet, Tokens, as_strings, hash_words, in_sorted,
                                       match_keys, per_row_sum, word_counts, word_tokens)
from refinery.gates.base import BaseGate, GateContext, Verdicts

_U64 = np.uint64


# Teacher refusals: first-person inability to help. Written so that support answers that say "sorry" or
# "can't" about the product ("Sorry, partial months aren't refunded", "share links can't be given an expiry
# date") and users who say "I can't find it" do not match.
_APOS = "['\u2019]"
REFUSAL = (
    r"(?i)(?:"
    rf"\b(?:i{_APOS}m|i am) (?:so |very |really )?(?:sorry|afraid),? but (?:i|as an ai)\b"
    rf"|\bi apologi[sz]e,? but (?:i|as an ai)\b"
    rf"|\b(?:i|as an ai,? i) (?:can{_APOS}?t|cannot|can not|won{_APOS}t|will not|am unable to|{_APOS}m unable to|"
    rf"am not able to|{_APOS}m not able to|must decline to|won{_APOS}t be able to) "
    r"(?:help|assist|comply|fulfil|fulfill|answer (?:that|this|your)|provide (?:that|this|an answer|a response|"
    r"the requested|information (?:on|about) (?:that|this))|generate (?:that|this|a question|an answer)|"
    r"create (?:that|this|a question|an answer))\b"
    r"|\bi must (?:respectfully )?decline\b"
    r"|\b(?:against|violates?) my (?:guidelines|programming|policies|policy|principles)\b"
    rf"|\bthe (?:passage|text|context|excerpt|document|article) (?:does not|doesn{_APOS}t|did not) "
    r"(?:provide|contain|mention|specify|say|state|include|give)\b"
    r")"
)
# Meta-talk: the teacher speaking about the task instead of being the QA pair. A question must stand alone
# (users of the fine-tuned model never see the source passage), so pointers to "the passage/the text" are
# rejected only in forms that cannot be a user's own words ("according to the text", "the passage says");
# "the text editor" or "share the document" stay legitimate.
_SOURCE = r"(?:passage|text|context|excerpt|paragraph|article|given (?:text|passage|context|information)|" \
          r"provided (?:text|passage|context|information|document))"
META_TALK = (
    r"(?i)(?:"
    r"\bas an ai(?: language model| assistant| model)?\b"
    r"|\bi{_APOS}?m (?:just )?an ai\b"
    r"|^\W*(?:sure|certainly|of course|absolutely|okay|ok|great)\W{0,3}\s*(?:here|i{_APOS}?d be happy|"
    r"i would be happy|i can help|below is|below are)\b"
    r"|\bhere(?:{_APOS}s| is| are)\s+(?:a |an |the |one |some |your |my )?(?:\w+ ){0,2}"
    r"(?:question|answer|qa pair|q&a pair|rewrite|paraphrase|rephrasing)s?\b"
    r"|(?m:^\W*(?:note|disclaimer)\W*:)"
    r"|^\W*(?:question|answer|q|a)\s*:"
    rf"|\baccording to the (?:{_SOURCE}|document)\b"
    rf"|\b(?:based on|from|in) the (?:given|provided|above|following) (?:{_SOURCE}|document|information)\b"
    rf"|\bbased on the {_SOURCE}\b"
    rf"|\bas (?:stated|mentioned|described|noted|explained|shown|given) in the (?:{_SOURCE}|document)\b"
    rf"|\bthe (?:{_SOURCE}|document) (?:says|states|mentions|describes|explains|notes|suggests|indicates|"
    r"implies)\b"
    r")"
).replace("{_APOS}", _APOS)
# Ends that cannot finish an answer: a dangling joining word or joining punctuation.
DANGLING_END = ("(?i)(?:[,;:(\\[{\\-\u2013\u2014&]|\\b(?:and|or|but|nor|the|a|an|of|because|than|whose|"
                "such as|including|e\\.g|i\\.e))\\s*$")
INNER_SENTENCE_END = r"[.!?]\s+\S"  # a sentence ended inside the answer, so its last one should end too
TERMINAL_END = "[.!?\u2026)\\]}\"'\u201d\u2019*`]\\s*$"
# English function words (NLTK's English list, trimmed of contractions), used for the language check.
ENGLISH_STOPWORDS = (
    "i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers "
    "herself it its itself they them their theirs themselves what which who whom this that these those am is are "
    "was were be been being have has had having do does did doing a an the and but if or because as until while "
    "of at by for with about against between into through during before after above below to from up down in "
    "out on off over under again further then once here there when where why how all any both each few more most "
    "other some such no nor not only own same so than too very s t can will just don should now d ll m o re ve y "
    "ain aren couldn didn doesn hadn hasn haven isn ma mightn mustn needn shan shouldn wasn weren won wouldn"
).split()

REASONS = ("rules_transport_error", "rules_parse_error", "rules_empty", "rules_truncated", "rules_refusal",
           "rules_meta_talk", "rules_too_short", "rules_too_long", "rules_language",
           "rules_answer_repeats_question", "rules_answer_not_in_source")
# Strategies whose answer must be a verbatim part of the row's source passage (gold-context answers).
VERBATIM_STRATEGIES = ("answer_first",)


def _count(arr: pa.StringArray, pattern: str) -> np.ndarray:
    return pc.count_substring(arr, pattern).to_numpy(zero_copy_only=False).astype(np.int64)


def _matches(arr: pa.StringArray, regex: str) -> np.ndarray:
    return pc.match_substring_regex(arr, regex).to_numpy(zero_copy_only=False)


def _unbalanced(arr: pa.StringArray) -> np.ndarray:
    """True where a bracket or double quote is opened and never closed (a cut-off generation).

    Only unclosed openers count: a lone ')' is common in numbered lists ("1) Open Settings").
    """
    bad = np.zeros(len(arr), bool)
    candidates = np.flatnonzero(_matches(arr, '[(\\[{"\u201c`]'))  # most rows hold none of these
    if len(candidates) == 0:
        return bad
    sub = arr.take(pa.array(candidates))
    sub_bad = np.zeros(len(sub), bool)
    for opener, closer in (("(", ")"), ("[", "]"), ("{", "}"), ("\u201c", "\u201d")):
        sub_bad |= _count(sub, opener) > _count(sub, closer)
    sub_bad |= _count(sub, '"') % 2 == 1
    sub_bad |= _count(sub, "```") % 2 == 1
    bad[candidates] = sub_bad
    return bad


def _not_verbatim(rows: pa.Table, answers: pa.StringArray) -> np.ndarray:
    """True where a row of a :data:`VERBATIM_STRATEGIES` strategy has an answer its evidence does not hold exactly."""
    bad = np.zeros(rows.num_rows, bool)
    if "strategy" not in rows.column_names or "evidence" not in rows.column_names:
        return bad
    which = pc.is_in(rows.column("strategy"), value_set=pa.array(VERBATIM_STRATEGIES, pa.string()))
    for i in np.flatnonzero(pc.fill_null(which, False).to_numpy(zero_copy_only=False)):
        answer, evidence = answers[i].as_py(), rows.column("evidence")[i].as_py()
        bad[i] = bool(answer) and (not evidence or answer.strip() not in evidence)
    return bad


class RulesParams(StageParams):
    """Bounds of the rules gate: ``gate.rules`` (experiment brief: 10-200 words of question + answer)."""

    min_qa_words: int = Field(ge=0)
    max_qa_words: int = Field(gt=0)
    min_answer_words: int = Field(ge=0)
    max_answer_words: int = Field(gt=0)


class RulesGate(BaseGate):
    """Reject rows that fail cheap text rules; reason = the first failing rule in priority order.

    Codes, in priority order: ``rules_transport_error`` (the teacher call failed), ``rules_parse_error``
    (the output did not parse), ``rules_empty``, ``rules_truncated``, ``rules_refusal``, ``rules_meta_talk``,
    ``rules_too_short`` / ``rules_too_long`` (words of question + answer, and of the answer alone),
    ``rules_language``, ``rules_answer_repeats_question``, ``rules_answer_not_in_source`` (a row of an
    answer-first strategy whose answer is not an exact substring of its evidence passage, the span of the source
    document it was taken from: a later rewrite, a recovery action or a reviewer's fix changed it). Score: the
    number of rules the row fails (0 when kept).

    Sources: word-count bounds and the English stop-word test follow the Gopher quality filters (Rae et al.
    2021, "Scaling Language Models", appendix A.1.1; datatrove ``GopherQualityFilter``: ``gopher_short_doc``,
    ``gopher_enough_stop_words``); truncation and terminal punctuation follow C4's "lines that end in
    terminal punctuation" rule (Raffel et al. 2020, section 2.2; datatrove ``C4QualityFilter``); refusal and
    "As an AI language model" filters follow the cleaning of distilled instruction data (Alpaca-cleaned,
    WizardLM/Vicuna "unfiltered" ShareGPT cleaning lists); the experiment brief (docs/sources.md) sets 10-200 QA words.

    Truncation (``rules_truncated``): ``finish_reason == 'length'``; an unclosed bracket, double quote,
    curly quote or code fence in the question or answer; an answer that ends with a joining word or
    punctuation (", and", "the", ":"); or an answer that does not end with terminal punctuation although
    an earlier sentence in it did ("... 14 days. To start one, open"), or that is longer than
    ``max_unterminated_answer_words`` words. Single-sentence answers may omit the final period, as many of Cosmos
    QA's human answers do; the default bound of 40 words keeps every one of them (docs/measurements.md).

    Language (``rules_language``): not English when fewer than ``min_ascii_letter_share`` of the letters
    are ASCII, or, for texts of at least ``language_min_words`` words, when fewer than
    ``min_stopword_share`` of the words are English function words. Limits: it cannot tell English from
    other Latin-script languages on texts shorter than ``language_min_words`` words, it passes mixed-language
    text whose English part carries enough function words, and it rejects English written without function
    words (keyword lists, code).

    Args:
        min_qa_words, max_qa_words: bounds on the words of question + answer (``rules_too_short``/``_long``).
        min_answer_words, max_answer_words: bounds on the answer's words.
        max_unterminated_answer_words: longest answer (words) allowed without terminal punctuation.
        min_ascii_letter_share: least share of letters that are ASCII (0-1).
        min_stopword_share: least share of words that are English function words (0-1).
        language_min_words: fewest words for the function-word test to apply.
        max_answer_question_overlap: most share of the answer's words that may come from the question (0-1)
            before ``rules_answer_repeats_question``; an answer equal to the question always fails.
    """

    name = "rules"

    def __init__(self, min_qa_words: int = 10, max_qa_words: int = 200, min_answer_words: int = 2,
                 max_answer_words: int = 150, max_unterminated_answer_words: int = 40,
                 min_ascii_letter_share: float = 0.9, min_stopword_share: float = 0.1,
                 language_min_words: int = 8, max_answer_question_overlap: float = 0.9):
        super().__init__()
        if min_qa_words > max_qa_words or min_answer_words > max_answer_words:
            raise ValueError("rules: a min_* word bound is above its max_* bound")
        for share in (min_ascii_letter_share, min_stopword_share, max_answer_question_overlap):
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"rules: share thresholds must lie in [0, 1], got {share}")
        self.min_qa_words, self.max_qa_words = min_qa_words, max_qa_words
        self.min_answer_words, self.max_answer_words = min_answer_words, max_answer_words
        self.max_unterminated_answer_words = max_unterminated_answer_words
        self.min_ascii_letter_share = min_ascii_letter_share
        self.min_stopword_share = min_stopword_share
        self.language_min_words = language_min_words
        self.max_answer_question_overlap = max_answer_question_overlap
        self._stopwords = SmallHashSet(hash_words(ENGLISH_STOPWORDS))

    @classmethod
    def calibrate(cls, params: RulesParams, ctx: GateContext) -> dict[str, Any]:
        return params.model_dump()

    @classmethod
    def build(cls, bounds: dict[str, Any], ctx: GateContext) -> RulesGate:
        return cls(min_qa_words=bounds["min_qa_words"], max_qa_words=bounds["max_qa_words"],
                   min_answer_words=bounds["min_answer_words"], max_answer_words=bounds["max_answer_words"])

    def failures(self, rows: pa.Table) -> dict[str, np.ndarray]:
        """Evaluate every rule on every row.

        Args:
            rows: a table with the synthetic contract's question, answer, parse_error, error and
                finish_reason columns.

        Returns:
            ``{reason code: bool array}`` in priority order (True = the row fails that rule).
        """
        parts = [self._failures(rows.slice(lo, ROWS_PER_PASS)) for lo in range(0, rows.num_rows, ROWS_PER_PASS)]
        if not parts:
            return {r: np.zeros(0, bool) for r in REASONS}
        return {r: np.concatenate([p[r] for p in parts]) for r in REASONS}

    def _failures(self, rows: pa.Table) -> dict[str, np.ndarray]:
        n = rows.num_rows
        q = as_strings(rows.column("question"))
        a = as_strings(rows.column("answer"))
        fr = rows.column("finish_reason").to_numpy(zero_copy_only=False)
        fails: dict[str, np.ndarray] = {}
        fails["rules_transport_error"] = rows.column("error").is_valid().to_numpy(zero_copy_only=False)
        fails["rules_parse_error"] = rows.column("parse_error").is_valid().to_numpy(zero_copy_only=False)
        q_words, a_words = word_counts(q), word_counts(a)
        fails["rules_empty"] = (q_words == 0) | (a_words == 0)
        a_trim = pc.utf8_trim_whitespace(a)
        unterminated = ~_matches(a_trim, TERMINAL_END) & ((a_words > self.max_unterminated_answer_words)
                                                          | _matches(a_trim, INNER_SENTENCE_END))
        fails["rules_truncated"] = ((fr == "length") | _unbalanced(q) | _unbalanced(a) | unterminated
                                    | (_matches(a_trim, DANGLING_END) & (a_words > 0)))
        fails["rules_refusal"] = _matches(q, REFUSAL) | _matches(a, REFUSAL)
        fails["rules_meta_talk"] = _matches(q, META_TALK) | _matches(a, META_TALK)
        qa_words = q_words + a_words
        fails["rules_too_short"] = (qa_words < self.min_qa_words) | (a_words < self.min_answer_words)
        fails["rules_too_long"] = (qa_words > self.max_qa_words) | (a_words > self.max_answer_words)
        q_keys, a_keys = match_keys(q), match_keys(a)
        q_tok, a_tok = word_tokens(q_keys), word_tokens(a_keys)
        fails["rules_language"] = self._not_english(q, a, q_tok, a_tok, n)
        fails["rules_answer_repeats_question"] = self._repeats(q_keys, a_keys, q_tok, a_tok, n)
        fails["rules_answer_not_in_source"] = _not_verbatim(rows, a)
        return fails

    def _not_english(self, q: pa.StringArray, a: pa.StringArray, q_tok: Tokens, a_tok: Tokens,
                     n: int) -> np.ndarray:
        stop = (per_row_sum(q_tok.rows, self._stopwords.contains(q_tok.hashes), n)
                + per_row_sum(a_tok.rows, self._stopwords.contains(a_tok.hashes), n))
        n_tok = q_tok.counts + a_tok.counts
        few_stopwords = (n_tok >= self.language_min_words) & (stop / np.maximum(n_tok, 1) < self.min_stopword_share)
        ascii_share = np.ones(n)
        not_ascii = ~(pc.string_is_ascii(q).to_numpy(zero_copy_only=False)
                      & pc.string_is_ascii(a).to_numpy(zero_copy_only=False))
        for i in np.flatnonzero(not_ascii):
            s = f"{q[i].as_py()} {a[i].as_py()}"
            letters = sum(ch.isalpha() for ch in s)
            ascii_share[i] = sum(ch.isascii() and ch.isalpha() for ch in s) / letters if letters else 1.0
        return few_stopwords | (ascii_share < self.min_ascii_letter_share)

    def _repeats(self, q_keys: pa.StringArray, a_keys: pa.StringArray, q_tok: Tokens, a_tok: Tokens,
                 n: int) -> np.ndarray:
        same = pc.equal(q_keys, a_keys).to_numpy(zero_copy_only=False) & (a_tok.counts > 0)
        # (row, token) keys, the row in the high bits (n <= ROWS_PER_PASS < 2**24)
        low = _U64((1 << 40) - 1)
        q_keyed = np.sort((q_tok.rows.astype(_U64) << _U64(40)) | (q_tok.hashes & low))
        a_keyed = (a_tok.rows.astype(_U64) << _U64(40)) | (a_tok.hashes & low)
        inside = in_sorted(a_keyed, q_keyed)
        share = per_row_sum(a_tok.rows, inside, n) / np.maximum(a_tok.counts, 1)
        return same | ((a_tok.counts > 0) & (share > self.max_answer_question_overlap))

    def judge(self, rows: pa.Table) -> Verdicts:
        """Judge every row.

        Args:
            rows: rows of the synthetic contract (question, answer, parse_error, error, finish_reason).

        Returns:
            One verdict per row: score = rules failed, reason = the first failed rule in priority order.
        """
        fails = self.failures(rows)
        stacked = np.stack([fails[r] for r in REASONS])
        score = stacked.sum(axis=0)
        first = np.argmax(stacked, axis=0)
        keep = score == 0
        reason = [None if k else REASONS[f] for k, f in zip(keep.tolist(), first.tolist())]
        return Verdicts(keep.tolist(), score.astype(float).tolist(), reason)
