"""Say whether a text still holds the error planted in a row: the injection's ground truth, for measurement only.

Recovery uses it after the gates decided, to count planted errors that a recovered candidate let through; it never
decides what is recovered (a real run has no such truth).
"""

from __future__ import annotations

import re
from typing import Any

from refinery.core.text import content_words, match_key

_SWAP = re.compile(r"^(?:word )?'(?P<old>.*)' -> '(?P<new>.*)'$")
_CLAIM = re.compile(r"^corpus sentence: '(?P<s>.*)'$", re.S)


def _has_word(text: str, word: str, case: bool) -> bool:
    flags = 0 if case else re.IGNORECASE
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text, flags) is not None


def _word_share(part: str, whole: str) -> float:
    a, b = content_words(part), content_words(whole)
    return len(a & b) / len(a) if a else 0.0


def injected_error_present(row: dict[str, Any], question: str | None, answer: str | None) -> bool:
    """Say whether a candidate still holds the error planted in ``row`` (checked against the injection's truth).

    Swaps (entity, number, negation; detail ``'old' -> 'new'``): the new value is in the candidate's answer
    (negations case-insensitively) and not in the evidence, unless it was. An unsupported claim: most of the
    planted sentence's content words are in the answer. Other kinds (other document, truncation, refusal,
    copies): the candidate's answer is the planted answer, or holds most of its content words while the
    evidence does not. Clean rows hold no error.
    """
    kind, detail = row.get("injection_kind"), row.get("injection_detail") or ""
    if kind in (None, "clean"):
        return False
    cand = f"{question or ''} {answer or ''}" if row.get("injection_field") != "answer" else (answer or "")
    planted = f"{row.get('question') or ''} {row.get('answer') or ''}" if row.get("injection_field") != "answer" \
        else (row.get("answer") or "")
    evidence = row.get("evidence") or ""
    if match_key(cand) == match_key(planted):
        return True
    m = _SWAP.match(detail)
    if kind in ("entity_swap", "number_change", "negation_flip") and m:
        new, case = m.group("new"), kind != "negation_flip"
        return _has_word(cand, new, case) and not (case and _has_word(evidence, new, case))
    m = _CLAIM.match(detail)
    if kind == "unsupported_claim" and m:
        return _word_share(m.group("s"), cand) >= 0.6
    if kind == "truncation":
        return match_key(cand).startswith(match_key(planted)) or match_key(planted).startswith(match_key(cand))
    if kind == "other_document":
        return _word_share(planted, cand) >= 0.6 and _word_share(planted, evidence) < 0.6
    return _word_share(planted, cand) >= 0.8
