"""Normalise text and derive stable content-based ids."""

from __future__ import annotations

import hashlib
import re
import unicodedata

_SPACES = re.compile(r"[^\S\n]+")  # whitespace except newline
_MANY_NEWLINES = re.compile(r"\n{3,}")
_ALL_WS = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)


def normalize_passage(text: str) -> str:
    """Return NFC text with single spaces, Unix newlines and at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()


def normalize_line(text: str) -> str:
    """Return NFC text with every whitespace run collapsed to one space (questions, answers, titles)."""
    return _ALL_WS.sub(" ", unicodedata.normalize("NFC", text)).strip()


def match_key(text: str) -> str:
    """Return a comparison key: case-folded, punctuation removed, whitespace collapsed.

    Two texts with the same key count as the same for leakage and exact-duplicate checks.
    """
    return _ALL_WS.sub(" ", _PUNCT.sub(" ", unicodedata.normalize("NFKC", text).casefold())).strip()


def content_words(text: str | None) -> set[str]:
    """Return the match-key words of ``text`` longer than three characters (a cheap lexical-support cue)."""
    return {w for w in match_key(text or "").split() if len(w) > 3}


def sha256_hex(*parts: str) -> str:
    """Hash parts joined by a unit separator, so ('ab', 'c') and ('a', 'bc') differ."""
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def stable_id(prefix: str, *parts: str, length: int = 16) -> str:
    """Return ``<prefix>_<hex>``: a content-derived id that is the same on every machine and run."""
    return f"{prefix}_{sha256_hex(*parts)[:length]}"


def find_span(haystack: str, needle: str) -> tuple[int, int] | None:
    """Find ``needle`` in ``haystack`` where any whitespace run matches any whitespace run.

    Returns:
        (start, end) character offsets of the first occurrence in ``haystack``, or None when absent.
    """
    spans = find_spans(haystack, needle, limit=1)
    return spans[0] if spans else None


def find_spans(haystack: str, needle: str, limit: int | None = None) -> list[tuple[int, int]]:
    """Return every non-overlapping occurrence of ``needle`` in ``haystack`` (whitespace runs match any run)."""
    words = needle.split()
    if not words:
        return []
    pattern = re.compile(r"\s+".join(re.escape(w) for w in words))
    spans = []
    for m in pattern.finditer(haystack):
        spans.append((m.start(), m.end()))
        if limit is not None and len(spans) >= limit:
            break
    return spans


_SENTENCE_BREAK = re.compile(r"(?<=[.!?])[\"')\]]*[ \t]+(?=[\"'(\[]?[A-Z0-9])|\n+")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Return (start, end) offsets of the sentences of ``text``.

    A sentence ends at . ! or ? followed by a space and a capital letter or digit, or at a newline,
    so '$9.50' and 'help@x.example' do not split.
    """
    spans, start = [], 0
    for m in list(_SENTENCE_BREAK.finditer(text)) + [None]:
        end = m.start() if m else len(text)
        if m is not None and not text[m.start()].isspace():
            end = m.start() + len(m.group(0).rstrip())  # keep closing quotes with their sentence
        s, e = start, end
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if e > s:
            spans.append((s, e))
        if m is not None:
            start = m.end()
    return spans
