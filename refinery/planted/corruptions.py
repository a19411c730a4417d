"""Corrupt answers realistically and deterministically, recording what was changed (ground truth for gates)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# Kinds that make an answer unfaithful to its evidence; the faithfulness gate must catch these.
FACTUAL_KINDS = ("entity_swap", "number_change", "negation_flip", "unsupported_claim", "other_document")
# Kinds that degrade an answer without (necessarily) contradicting the evidence.
FORM_KINDS = ("truncation", "refusal", "near_duplicate", "seed_paraphrase")
# Kinds that make an answer worse to read or act on (reward-model preference pairs).
STYLE_KINDS = ("condescending_tone", "vague_answer", "missing_direct_answer", "missing_escalation")
# Families of factual kinds, for leave-families-out measurement: the learned gates (verifier, reward head) are
# trained without the families named in params (inject.unseen_families), and the planted errors of those
# families then measure whether a gate learned faithfulness or only the corruption generator.
FAMILIES: dict[str, tuple[str, ...]] = {
    "substitution": ("entity_swap", "number_change"),  # one span of the answer replaced by another
    "polarity": ("negation_flip",),  # the answer says the opposite
    "addition": ("unsupported_claim",),  # a claim the passage does not make is added
    "misattribution": ("other_document",),  # an answer written for another passage
}


def unseen_kinds(families: object, where: str) -> tuple[str, ...]:
    """Return the kinds of ``inject.unseen_families`` as read from ``where`` (a params file), failing in one line."""
    from refinery.core.errors import ParamsError

    if not isinstance(families, list) or not all(isinstance(f, str) for f in families):
        raise ParamsError(f"{where}: inject.unseen_families: expected a list of family names")
    try:
        return kinds_of(families)
    except ValueError as e:
        raise ParamsError(f"{where}: inject.unseen_families: {e}") from None


def kinds_of(families: Sequence[str]) -> tuple[str, ...]:
    """Return the corruption kinds of the named families (in FACTUAL_KINDS order); unknown names fail."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown corruption family {unknown[0]!r} (known: {', '.join(FAMILIES)})")
    named = {k for f in families for k in FAMILIES[f]}
    return tuple(k for k in FACTUAL_KINDS if k in named)


@dataclass(frozen=True)
class Corruption:
    """The result of one corruption attempt.

    Attributes:
        text: the corrupted text (the input unchanged when ``applied`` is False).
        applied: False when the corruption cannot apply (no number to change, no other document...).
        kind: the corruption's name, e.g. ``number_change``.
        detail: what changed, e.g. ``'14' -> '21'``; why not, when not applied.
    """

    text: str
    applied: bool
    kind: str
    detail: str


CorruptionFn = Callable[..., Corruption]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
STOPWORDS = frozenset("""
a an the and or but if then else of to in on at by for with from into onto over under about as is are was were be
been being am do does did done have has had having can could will would shall should may might must not no nor so
than too very just also only any all each every some such this that these those it its it's they them their there
here he him his she her hers we us our you your yours i me my mine who whom whose which what when where why how
up down out off again further once more most other same own both few many much yes one
""".split())
# Capitalised words that are not entities even in mid-sentence.
_NOT_ENTITIES = frozenset({"I", "I'm", "I've", "I'd", "I'll", "OK", "Yes", "No"})
_ENTITY = re.compile(r"\b[A-Z][\w&'-]*(?:\s+(?:of\s+|&\s+)?[A-Z][\w&'-]*)*")


def sentences(text: str) -> list[str]:
    """Split text into sentences on end punctuation followed by a capital, digit or quote."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def _not_applied(kind: str, text: str, why: str) -> Corruption:
    return Corruption(text, False, kind, why)


def _sentence_starts(text: str) -> set[int]:
    starts = {0}
    for m in re.finditer(r"[.!?:;]\s+|\n+|[\"(]\s*", text):
        starts.add(m.end())
    return starts


def entities(text: str) -> list[tuple[int, int, str]]:
    """Return capitalised terms ``(start, end, term)`` that are not just a sentence's first word.

    A run of capitalised words ("Admin console" counts from its capital, "Windows 11" its word) is one
    term; a single capitalised word that opens a sentence is skipped unless it recurs mid-sentence elsewhere.
    """
    starts = _sentence_starts(text)
    found: list[tuple[int, int, str]] = []
    mid = {m.group(0) for m in _ENTITY.finditer(text) if m.start() not in starts}
    for m in _ENTITY.finditer(text):
        term = m.group(0)
        if term in _NOT_ENTITIES:
            continue
        if m.start() in starts:
            if " " in term:  # drop the sentence-initial word, keep the rest of the run
                head, rest = term.split(None, 1)
                if head.lower() in STOPWORDS or head not in mid:
                    off = m.start() + len(term) - len(rest)
                    if rest not in _NOT_ENTITIES:
                        found.append((off, m.end(), rest))
                    continue
            elif term not in mid:
                continue
        found.append((m.start(), m.end(), term))
    return found


def _content_words(text: str) -> list[tuple[int, int, str]]:
    return [(m.start(), m.end(), m.group(0)) for m in _WORD.finditer(text)
            if len(m.group(0)) >= 4 and m.group(0).lower() not in STOPWORDS and m.group(0).islower()]


def _shape(word: str) -> str:
    """A crude part-of-speech proxy: the inflectional ending of a word."""
    for suffix in ("ly", "ing", "ed", "s"):
        if word.lower().endswith(suffix):
            return suffix
    return ""


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def entity_swap(text: str, *, passage: str | None = None, other_texts: Sequence[str] | None = None,
                rng: np.random.Generator) -> Corruption:
    """Swap a named entity / capitalised term for another one from the passage or corpus.

    When the text has no capitalised term (common in narrative answers), a content word is swapped for
    another content word of the passage instead (detail says ``word``).

    Args:
        text: the answer to corrupt.
        passage: its evidence passage (first source of replacement terms).
        other_texts: other texts of the same corpus (second source).
        rng: the caller's seeded generator.

    Returns:
        The corrupted text, or ``applied=False`` when there is nothing to swap or nothing to swap in.
    """
    kind = "entity_swap"
    own = entities(text)
    pool_texts = [passage or ""] + list(other_texts or [])
    own_terms = {t.lower() for _, _, t in own}
    if own:
        candidates = sorted({t for src in pool_texts for _, _, t in entities(src) if t.lower() not in own_terms
                             and t.lower() not in text.lower()})
        if candidates:
            start, end, term = _pick(rng, own)
            new = _pick(rng, candidates)
            return Corruption(text[:start] + new + text[end:], True, kind, f"{term!r} -> {new!r}")
    words = _content_words(text)
    lowered = {w.lower() for _, _, w in words}
    candidates = sorted({w for src in pool_texts[:1] or [""] for _, _, w in _content_words(src)
                         if w.lower() not in lowered and w.lower() not in text.lower()})
    if not candidates and other_texts:
        candidates = sorted({w for src in other_texts for _, _, w in _content_words(src)
                             if w.lower() not in lowered})
    if not words or not candidates:
        return _not_applied(kind, text, "no entity or content word to swap" if not words else "nothing to swap in")
    start, end, word = _pick(rng, words)
    same_shape = [c for c in candidates if _shape(c) == _shape(word)]
    new = _pick(rng, same_shape or candidates)
    return Corruption(text[:start] + new + text[end:], True, kind, f"word {word!r} -> {new!r}")


_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?![\w])")
_NUMBER_WORD = re.compile(r"\b(" + "|".join(_NUMBER_WORDS[2:]) + r")\b", re.IGNORECASE)
_CALENDAR = re.compile(r"\b(" + "|".join(_MONTHS + _WEEKDAYS) + r")\b")


def _new_number(value: float, decimals: int, rng: np.random.Generator) -> float:
    if value == 0:
        return float(rng.integers(1, 10))
    if 1900 <= value <= 2100 and decimals == 0:  # a year
        return value + _pick(rng, [-2, -1, 1, 2])
    factor = _pick(rng, [0.5, 2.0, 1.5, 3.0, 0.25, 10.0]) if value >= 4 else None
    if factor is None:
        return value + _pick(rng, [1, 2, 3])
    new = value * factor
    return round(new, decimals) if decimals else float(max(1, round(new)))


def number_change(text: str, *, passage: str | None = None, other_texts: Sequence[str] | None = None,
                  rng: np.random.Generator) -> Corruption:
    """Change one number, price, percentage, date, weekday or duration to a plausible wrong value.

    Args:
        text: the answer to corrupt.
        passage: unused (kept for the common signature).
        other_texts: unused.
        rng: the caller's seeded generator.

    Returns:
        The corrupted text, or ``applied=False`` when the text holds no number, number word or date name.
    """
    kind = "number_change"
    spots: list[tuple[int, int, str, str]] = []
    for m in _NUMBER.finditer(text):
        raw, dec = m.group(1), m.group(2) or ""
        value = float(raw.replace(",", "") + dec)
        decimals = len(dec) - 1 if dec else 0
        for _ in range(4):
            new_value = _new_number(value, decimals, rng)
            if new_value != value:
                break
        new = f"{new_value:,.{decimals}f}" if "," in raw else f"{new_value:.{decimals}f}"
        spots.append((m.start(), m.end(), m.group(0), new))
    for m in _NUMBER_WORD.finditer(text):
        word = m.group(0)
        i = _NUMBER_WORDS.index(word.lower())
        j = i + _pick(rng, [-1, 1, 2]) if i > 2 else i + _pick(rng, [1, 2])
        new = _NUMBER_WORDS[min(j, len(_NUMBER_WORDS) - 1)]
        spots.append((m.start(), m.end(), word, new.capitalize() if word[0].isupper() else new))
    for m in _CALENDAR.finditer(text):
        names = _MONTHS if m.group(0) in _MONTHS else _WEEKDAYS
        i = names.index(m.group(0))
        spots.append((m.start(), m.end(), m.group(0), names[(i + _pick(rng, [1, 2, -1])) % len(names)]))
    spots = [s for s in spots if s[2] != s[3]]
    if not spots:
        return _not_applied(kind, text, "no number, number word or date to change")
    start, end, old, new = _pick(rng, sorted(spots))
    return Corruption(text[:start] + new + text[end:], True, kind, f"{old!r} -> {new!r}")


# (pattern, replacement) pairs; each flips the polarity of a clause. Order matters only for overlaps.
_NEGATIONS: list[tuple[re.Pattern, str]] = [(re.compile(p, re.IGNORECASE), r) for p, r in [
    (r"\bcannot\b", "can"), (r"\bcan't\b", "can"), (r"\bcan not\b", "can"),
    (r"\b(do|does|did|is|are|was|were|will|would|should|could|has|have|had|must) not\b", r"\1"),
    (r"\b(do|does|did|is|are|was|were|would|should|could|has|have|had)n't\b", r"\1"),
    (r"\bwon't\b", "will"), (r"\bnever\b", "always"), (r"\balways\b", "never"),
    (r"\bcan\b", "cannot"), (r"\b(is|are|was|were|will|should|would|could|must|has|have|had)\b(?! not)", r"\1 not"),
    (r"\bno longer\b", "still"), (r"\bstill\b", "no longer"),
]]
_YES_NO = re.compile(r"^(Yes|No)\b")


def _match_case(old: str, new: str) -> str:
    return new[:1].upper() + new[1:] if old[:1].isupper() else new


def negation_flip(text: str, *, passage: str | None = None, other_texts: Sequence[str] | None = None,
                  rng: np.random.Generator) -> Corruption:
    """Flip the polarity of one clause (``can`` <-> ``cannot``, ``is`` -> ``is not``, ``Yes`` <-> ``No``...).

    Args:
        text: the answer to corrupt.
        passage: unused.
        other_texts: unused.
        rng: the caller's seeded generator.

    Returns:
        The corrupted text, or ``applied=False`` when no auxiliary, modal or yes/no can be flipped.
    """
    kind = "negation_flip"
    spots: list[tuple[int, int, str, str]] = []
    taken: set[int] = set()
    for pattern, repl in _NEGATIONS:
        for m in pattern.finditer(text):
            if any(i in taken for i in range(m.start(), m.end())):
                continue
            taken.update(range(m.start(), m.end()))
            spots.append((m.start(), m.end(), m.group(0), _match_case(m.group(0), m.expand(repl))))
    yes_no = _YES_NO.match(text)
    if yes_no:  # an answer that opens with Yes/No: flip that, the clearest polarity of the answer
        new = "No" if yes_no.group(1) == "Yes" else "Yes"
        return Corruption(new + text[yes_no.end():], True, kind, f"{yes_no.group(1)!r} -> {new!r}")
    if not spots:
        return _not_applied(kind, text, "no auxiliary, modal or polarity word to flip")
    start, end, old, new = _pick(rng, sorted(spots))
    return Corruption(text[:start] + new + text[end:], True, kind, f"{old!r} -> {new!r}")


_CLAIM_TEMPLATES = (
    "This usually takes about {n} minutes.",
    "You will also get a confirmation email within {n} hours.",
    "This only applies to accounts created after {year}.",
    "It costs an extra ${n} per month.",
    "The same applies to {term} as well.",
    "This was changed in {year} after complaints from {term}.",
    "Afterwards, {term} will be notified automatically.",
)


def unsupported_claim(text: str, *, passage: str | None = None, other_texts: Sequence[str] | None = None,
                      rng: np.random.Generator) -> Corruption:
    """Append a plausible claim the passage does not support.

    The claim is a sentence of another text of the corpus when one is given (true-sounding, off-evidence),
    otherwise a template filled with a term of the passage and a number.

    Args:
        text: the answer to corrupt.
        passage: its evidence passage; claims found in it are never used.
        other_texts: other texts of the corpus to draw a sentence from.
        rng: the caller's seeded generator.

    Returns:
        The text with one added sentence (always applies).
    """
    kind = "unsupported_claim"
    passage_key = (passage or "").lower()
    pool = sorted({s for t in other_texts or [] for s in sentences(t)
                   if 25 <= len(s) <= 200 and s[-1] == "." and not _YES_NO.match(s)
                   and s.lower() not in passage_key and s.lower() not in text.lower()})
    if pool:
        claim = _pick(rng, pool)
        if claim[-1] not in ".!?":
            claim += "."
        source = "corpus sentence"
    else:
        terms = sorted({t for _, _, t in entities(passage or text)}) or ["your team"]
        claim = _pick(rng, _CLAIM_TEMPLATES).format(n=int(rng.integers(2, 60)), year=int(rng.integers(2015, 2024)),
                                                    term=_pick(rng, terms))
        source = "template"
    joined = text.rstrip()
    if joined and joined[-1] not in ".!?":
        joined += "."
    return Corruption(f"{joined} {claim}", True, kind, f"{source}: {claim!r}")


def other_document(text: str, *, passage: str | None = None, other_texts: Sequence[str] | None = None,
                   rng: np.random.Generator) -> Corruption:
    """Replace the answer with an answer written for another document.

    Args:
        text: the answer to replace.
        passage: unused.
        other_texts: answers of other documents (the caller excludes this document's).
        rng: the caller's seeded generator.

    Returns:
        Another answer, or ``applied=False`` when ``other_texts`` holds none that differs.
    """
    kind = "other_document"
    pool = sorted({t for t in other_texts or [] if t.strip() and t.strip() != text.strip()})
    if not pool:
        return _not_applied(kind, text, "no answer of another document given")
    new = _pick(rng, pool)
    return Corruption(new, True, kind, f"answer of another document ({len(new)} chars)")


def truncation(text: str, *, passage: str | None = None, other_texts: Sequence[str] | None = None,
               rng: np.random.Generator) -> Corruption:
    """Cut the answer off mid-sentence at 30-60% of its words, as a generation hitting its token limit does.

    Args:
        text: the answer to cut.
        passage: unused.
        other_texts: unused.
        rng: the caller's seeded generator.

    Returns:
        The cut text, or ``applied=False`` when it has fewer than 6 words.
    """
    kind = "truncation"
    words = text.split()
    if len(words) < 6:
        return _not_applied(kind, text, f"only {len(words)} words")
    keep = int(round(len(words) * float(rng.uniform(0.3, 0.6))))
    keep = min(max(keep, 2), len(words) - 2)
    cut = " ".join(words[:keep]).rstrip(".,;:!?")
    return Corruption(cut, True, kind, f"kept {keep} of {len(words)} words")


REFUSALS = (
    "I'm sorry, but I can't help with that request.",
    "I don't have enough information to answer that question.",
    "As an AI language model, I cannot provide that information.",
    "I'm not able to answer this. Please contact support for help.",
    "Unfortunately, I cannot assist with this question.",
)


def refusal(text: str, *, passage: str | None = None, other_texts: Sequence[str] | None = None,
            rng: np.random.Generator) -> Corruption:
    """Replace the answer with a refusal or non-answer.

    Args:
        text: the answer to replace.
        passage: unused.
        other_texts: unused.
        rng: the caller's seeded generator.

    Returns:
        A refusal (always applies).
    """
    new = _pick(rng, REFUSALS)
    return Corruption(new, True, "refusal", f"refusal {REFUSALS.index(new)}")


_SYNONYMS = {
    "use": "utilize", "start": "begin", "get": "obtain", "help": "assist", "show": "display", "need": "require",
    "buy": "purchase", "change": "modify", "fix": "repair", "find": "locate", "make": "create", "pick": "choose",
    "choose": "select", "quick": "fast", "big": "large", "small": "little", "about": "roughly", "also": "as well",
    "usually": "typically", "often": "frequently", "maybe": "perhaps", "because": "since", "but": "however",
    "go": "head", "see": "view", "tell": "inform", "ask": "request", "end": "finish", "keep": "retain",
    "happy": "glad", "sad": "unhappy", "angry": "upset", "friend": "pal", "house": "home", "car": "vehicle",
    "think": "believe", "want": "wish", "try": "attempt", "give": "provide", "look": "check",
}
_CONTRACTIONS = {
    "do not": "don't", "does not": "doesn't", "did not": "didn't", "is not": "isn't", "are not": "aren't",
    "cannot": "can't", "will not": "won't", "it is": "it's", "you are": "you're", "they are": "they're",
    "that is": "that's", "there is": "there's", "I am": "I'm", "you will": "you'll", "we will": "we'll",
}
_EXPANSIONS = {v: k for k, v in _CONTRACTIONS.items()}


def _replace_word(words: list[str], i: int, new: str) -> None:
    core = re.match(r"^(\W*)(.*?)(\W*)$", words[i])
    words[i] = core.group(1) + _match_case(core.group(2), new) + core.group(3)


_FILLERS = frozenset({"just", "also", "really", "simply", "then", "usually", "please", "actually", "already"})


def near_duplicate(text: str, *, passage: str | None = None, other_texts: Sequence[str] | None = None,
                   rng: np.random.Generator) -> Corruption:
    """Make 1-5 small word edits (synonym, contraction, dropped filler word) that keep text and meaning close.

    Args:
        text: the text to copy with edits.
        passage: unused.
        other_texts: unused.
        rng: the caller's seeded generator.

    Returns:
        The edited copy, or ``applied=False`` when no edit applies (too short, no synonym, filler or contraction).
    """
    kind = "near_duplicate"
    words = text.split()
    if len(words) < 4:
        return _not_applied(kind, text, f"only {len(words)} words")
    edits: list[tuple[int, str, str]] = []  # (word index, op, new word or '')
    for i, w in enumerate(words):
        bare = re.sub(r"\W", "", w).lower()
        if bare in _SYNONYMS:
            edits.append((i, "synonym", bare))
        if bare in _FILLERS and w.isalpha():
            edits.append((i, "drop", bare))
        if w.lower().strip(".,;:!?") in _EXPANSIONS:
            edits.append((i, "expand", w.lower().strip(".,;:!?")))
    if not edits:
        return _not_applied(kind, text, "no synonym, filler word or contraction to edit")
    n_edits = int(rng.integers(1, min(5, len(edits)) + 1))
    chosen = sorted(rng.choice(len(edits), size=n_edits, replace=False).tolist())
    done, dropped = [], set()
    for k in chosen:
        i, op, bare = edits[k]
        if i in dropped:
            continue
        if op == "synonym":
            _replace_word(words, i, _SYNONYMS[bare])
        elif op == "drop":
            dropped.add(i)
        else:
            _replace_word(words, i, _EXPANSIONS[bare])
        done.append(f"{op} {bare}")
    new = " ".join(w for i, w in enumerate(words) if i not in dropped)
    if new == text:
        return _not_applied(kind, text, "no edit applied")
    return Corruption(new, True, kind, "; ".join(done))


def seed_paraphrase(text: str, *, passage: str | None = None, other_texts: Sequence[str] | None = None,
                    rng: np.random.Generator) -> Corruption:
    """Paraphrase lightly by rule: contractions, synonyms and a reworded opening; meaning is unchanged.

    Args:
        text: the seed answer (or question) to paraphrase.
        passage: unused.
        other_texts: unused.
        rng: the caller's seeded generator.

    Returns:
        The paraphrase, or ``applied=False`` when no rule applies.
    """
    kind = "seed_paraphrase"
    new, done = text, []
    table = _CONTRACTIONS if rng.random() < 0.5 else _EXPANSIONS
    for old, rep in sorted(table.items()):
        pattern = re.compile(r"\b" + re.escape(old) + r"\b", re.IGNORECASE)
        if pattern.search(new):
            new = pattern.sub(lambda m, r=rep: _match_case(m.group(0), r), new)
            done.append(f"{old}->{rep}")
    words = new.split()
    idx = [i for i, w in enumerate(words) if re.sub(r"\W", "", w).lower() in _SYNONYMS]
    for i in sorted(rng.permutation(idx)[:2].tolist()) if idx else []:
        bare = re.sub(r"\W", "", words[i]).lower()
        _replace_word(words, i, _SYNONYMS[bare])
        done.append(f"{bare}->{_SYNONYMS[bare]}")
    new = " ".join(words)
    for old, rep in (("You can ", "It is possible to "), ("You need to ", "You have to "),
                     ("Go to ", "Open "), ("Yes, ", "Yes. "), ("No, ", "No. ")):
        if new.startswith(old):
            new = rep + new[len(old):]
            done.append(f"opening {old.strip()!r}")
            break
    if new == text:
        return _not_applied(kind, text, "no paraphrase rule applies")
    return Corruption(new, True, kind, "; ".join(done))


_CONDESCENDING_OPENINGS = (
    "As the help center already explains, ", "Obviously, ", "Like it says in the docs, ", "To be clear, ",
)
_CONDESCENDING_CLOSINGS = (
    "This is covered in the documentation.", "Please read the instructions more carefully next time.",
    "It's really not that complicated.", "Hopefully that's clear now.",
)


def condescending_tone(text: str, *, passage: str | None = None, other_texts: Sequence[str] | None = None,
                       rng: np.random.Generator) -> Corruption:
    """Keep the content but make the tone curt and condescending (opening jab and/or closing remark).

    Args:
        text: the answer to rewrite.
        passage: unused.
        other_texts: unused.
        rng: the caller's seeded generator.

    Returns:
        The rewritten answer (always applies).
    """
    opening = _pick(rng, _CONDESCENDING_OPENINGS)
    closing = _pick(rng, _CONDESCENDING_CLOSINGS)
    body = text.strip()
    body = body[:1].lower() + body[1:] if body[:2] != body[:2].upper() else body
    mode = int(rng.integers(3))  # 0 opening, 1 closing, 2 both
    new = (opening + body if mode != 1 else text.strip())
    if mode != 0:
        new = new.rstrip() + ("" if new.rstrip()[-1:] in ".!?" else ".") + " " + closing
    return Corruption(new, True, "condescending_tone", ["opening", "closing", "opening+closing"][mode])


_VAGUE = (
    "It depends on your setup. You can usually find this under {term}; check the relevant settings there.",
    "This can vary. Have a look at {term} and adjust things as needed.",
    "There are a few ways to handle this, and {term} is usually involved. It should work after that.",
    "Generally this is handled through {term}, but the details depend on your situation.",
)


def vague_answer(text: str, *, passage: str | None = None, other_texts: Sequence[str] | None = None,
                 rng: np.random.Generator) -> Corruption:
    """Replace the answer with an on-topic but vague one that names a term of the answer and commits to nothing.

    Args:
        text: the answer to replace.
        passage: its evidence, a second source of a term to name.
        other_texts: unused.
        rng: the caller's seeded generator.

    Returns:
        The vague answer (always applies; names "the settings" when no term is found).
    """
    terms = sorted({t for _, _, t in entities(text)}) or sorted({t for _, _, t in entities(passage or "")})
    term = _pick(rng, terms) if terms else "the settings"
    template = _pick(rng, _VAGUE)
    return Corruption(template.format(term=term), True, "vague_answer", f"template {_VAGUE.index(template)}: {term}")


_YES_NO_LEAD = re.compile(r"^(Yes|No|Yep|Nope)\b[,.;:!]?\s*(?:(?:it|you|they|that|there)\s+\w+(?:n't)?\.\s*)?",
                          re.IGNORECASE)


def missing_direct_answer(text: str, *, passage: str | None = None, other_texts: Sequence[str] | None = None,
                          rng: np.random.Generator) -> Corruption:
    """Drop the direct answer the question asked for: the leading yes/no, else the first sentence.

    Args:
        text: the answer to cut.
        passage: unused.
        other_texts: unused.
        rng: unused (deterministic).

    Returns:
        The answer without its direct part, or ``applied=False`` when only one sentence would remain empty.
    """
    kind = "missing_direct_answer"
    m = _YES_NO_LEAD.match(text)
    if m and text[m.end():].strip():
        rest = text[m.end():].strip()
        return Corruption(rest[:1].upper() + rest[1:], True, kind, f"dropped {m.group(0).strip()!r}")
    sents = sentences(text)
    if len(sents) < 2:
        return _not_applied(kind, text, "no yes/no lead and a single sentence")
    return Corruption(" ".join(sents[1:]), True, kind, "dropped the first sentence")


ESCALATION = re.compile(  # a sentence that hands the user off (support, legal, an admin)
    r"\b(contact|reach out|escalat\w*|lawyer|counsel|open a (?:ticket|case)|account manager|"
    r"support (?:team|agent|ticket)|(?:ask|tell|email) (?:your|the) (?:admin|owner|it team)|"
    r"\w+@\w[\w.-]*)", re.IGNORECASE)


def missing_escalation(text: str, *, passage: str | None = None, other_texts: Sequence[str] | None = None,
                       rng: np.random.Generator) -> Corruption:
    """Drop the sentence(s) that send the user to support, legal or an admin (the escalation step).

    Args:
        text: the answer to cut.
        passage: unused.
        other_texts: unused.
        rng: unused (deterministic).

    Returns:
        The answer without its escalation sentences, or ``applied=False`` when it has none or nothing else.
    """
    kind = "missing_escalation"
    sents = sentences(text)
    keep = [s for s in sents if not ESCALATION.search(s)]
    if len(keep) == len(sents) or not keep:
        return _not_applied(kind, text, "no escalation sentence" if len(keep) == len(sents) else "only escalation")
    return Corruption(" ".join(keep), True, kind, f"dropped {len(sents) - len(keep)} escalation sentence(s)")


CORRUPTIONS: dict[str, CorruptionFn] = {
    "entity_swap": entity_swap,
    "number_change": number_change,
    "negation_flip": negation_flip,
    "unsupported_claim": unsupported_claim,
    "other_document": other_document,
    "truncation": truncation,
    "refusal": refusal,
    "near_duplicate": near_duplicate,
    "seed_paraphrase": seed_paraphrase,
    "condescending_tone": condescending_tone,
    "vague_answer": vague_answer,
    "missing_direct_answer": missing_direct_answer,
    "missing_escalation": missing_escalation,
}


def corrupt(kind: str, text: str, *, passage: str | None = None, other_texts: Sequence[str] | None = None,
            rng: np.random.Generator) -> Corruption:
    """Apply the corruption named ``kind`` (a key of :data:`CORRUPTIONS`).

    Raises:
        KeyError: an unknown kind.
    """
    if kind not in CORRUPTIONS:
        raise KeyError(f"unknown corruption '{kind}' (known: {', '.join(CORRUPTIONS)})")
    return CORRUPTIONS[kind](text, passage=passage, other_texts=other_texts, rng=rng)
