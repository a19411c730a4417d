"""Reject answers holding personal data (e-mail, phone, payment card) that their source document does not hold."""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa
from pydantic import Field

from refinery.core.params import StageParams
from refinery.gates.base import BaseGate, GateContext, Verdicts

REASONS = ("pii_email", "pii_phone", "pii_card")

EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
# 13-19 digits, single spaces or hyphens allowed between them (4-4-4-4, 4-6-5 groupings)
CARD = re.compile(r"(?<![\d+])\d(?:[ -]?\d){12,18}(?!\d)")
# an optional +country code, an optional (area code), then 2-5 groups of 2-4 digits joined by a space, dot or hyphen
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w])")
# day-month-year and year-month-day dates: three groups, one of four digits at an end, the others of one or two
DATE = re.compile(r"^(?:\d{4}[./-]\d{1,2}[./-]\d{1,2}|\d{1,2}[./-]\d{1,2}[./-]\d{4})$")
NUMBER_RUN = re.compile(r"\+?\d[\d ().-]*\d")  # any run of digits and phone punctuation in a document


class PiiParams(StageParams):
    """PII gate: which kinds of personal data to look for (``gate.pii``)."""

    email: bool  # reject e-mail addresses the source document does not hold
    phone: bool  # reject phone numbers the source document does not hold
    card: bool  # reject payment card numbers (13-19 digits passing the Luhn check)
    min_phone_digits: int = Field(ge=5, le=15)  # fewest digits of a phone number (shorter runs are prices, counts)


def luhn_ok(digits: str) -> bool:
    """Return True when ``digits`` passes the Luhn checksum (ISO/IEC 7812-1), as payment card numbers do."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def cards(text: str) -> list[tuple[int, int, str]]:
    """Return (start, end, digits) of every payment card number in ``text`` (13-19 digits, Luhn-valid)."""
    out = []
    for m in CARD.finditer(text):
        d = _digits(m.group())
        if 13 <= len(d) <= 19 and luhn_ok(d):
            out.append((m.start(), m.end(), d))
    return out


def phones(text: str, min_digits: int) -> list[str]:
    """Return the digits of every phone number in ``text``.

    A phone number starts with ``+`` or holds an ``(area code)``, or has at least three digit groups whose last
    has at least four digits (``555-123-4567``, ``020 7946 0958``); it has ``min_digits``-15 digits (E.164) and is
    not shaped like a date. Limits: a number written as one run of digits, or in two groups (``555-1234``), is
    not recognised.
    """
    out = []
    for m in PHONE.finditer(text):
        s = m.group()
        d = _digits(s)
        groups = re.split(r"[ .()-]+", s.strip("+ ()"))
        shaped = s.startswith("+") or "(" in s or (len(groups) >= 3 and len(groups[-1]) >= 4)
        if shaped and min_digits <= len(d) <= 15 and not DATE.match(s):
            out.append(d)
    return out


class PiiGate(BaseGate):
    """Reject an answer that holds an e-mail address, a phone number or a payment card number absent from its source.

    Personal data in a generated answer is either invented by the teacher or leaked from elsewhere; a fine-tuned
    model would learn to produce it. Data quoted from the row's own source document (a support address or number
    the document gives) is kept: an address counts as found when the document holds it (case-insensitive), a
    number when its digits occur in a run of digits of the document. Codes, in priority order: ``pii_email``,
    ``pii_phone``, ``pii_card``. Score: the number of such items in the answer (0 when kept). Only the answer is
    checked.

    Sources: PII filtering of training text (datatrove's ``PIIFormatter``, which masks e-mail and IP addresses in
    FineWeb); card numbers validated with the Luhn checksum, phone numbers by their grouping, as Microsoft Presidio's
    ``CreditCardRecognizer`` and ``PhoneRecognizer`` do.

    Args:
        documents: documents table (doc_id, text): the source each row's ``doc_id`` names.
        email, phone, card: which kinds to look for.
        min_phone_digits: fewest digits of a phone number.
    """

    name = "pii"

    def __init__(self, documents: pa.Table, *, email: bool = True, phone: bool = True, card: bool = True,
                 min_phone_digits: int = 7):
        super().__init__()
        self.email, self.phone, self.card, self.min_phone_digits = email, phone, card, min_phone_digits
        self.texts = dict(zip(documents.column("doc_id").to_pylist(), documents.column("text").to_pylist()))
        self._known: dict[str, tuple[set[str], list[str]]] = {}

    @classmethod
    def calibrate(cls, params: PiiParams, ctx: GateContext) -> dict[str, Any]:
        return params.model_dump()

    @classmethod
    def build(cls, bounds: dict[str, Any], ctx: GateContext) -> PiiGate:
        return cls(ctx.documents, email=bounds["email"], phone=bounds["phone"], card=bounds["card"],
                   min_phone_digits=bounds["min_phone_digits"])

    def _source(self, doc_id: str | None) -> tuple[set[str], list[str]]:
        """The document's e-mail addresses (lower case) and digit runs, computed once per document."""
        if doc_id not in self._known:
            text = self.texts.get(doc_id) or ""
            self._known[doc_id] = ({m.group().lower() for m in EMAIL.finditer(text)},
                                   [_digits(m.group()) for m in NUMBER_RUN.finditer(text)])
        return self._known[doc_id]

    def found(self, answer: str, doc_id: str | None) -> dict[str, int]:
        """Return, per reason code, how many items of that kind ``answer`` holds that its document does not."""
        emails, runs = self._source(doc_id)
        out = dict.fromkeys(REASONS, 0)
        if self.email:
            out["pii_email"] = sum(m.group().lower() not in emails for m in EMAIL.finditer(answer))
        found_cards = cards(answer)
        if self.card:
            out["pii_card"] = sum(not any(d in r for r in runs) for _, _, d in found_cards)
        if self.phone:
            rest = answer  # a card number is not also a phone number
            for s, e, _ in found_cards:
                rest = rest[:s] + " " * (e - s) + rest[e:]
            out["pii_phone"] = sum(not any(d in r for r in runs) for d in phones(rest, self.min_phone_digits))
        return out

    def judge(self, rows: pa.Table) -> Verdicts:
        """Judge every row's answer against its source document."""
        keep, score, reason = [], [], []
        for answer, doc_id in zip(rows.column("answer").to_pylist(), rows.column("doc_id").to_pylist()):
            counts = self.found(answer or "", doc_id)
            first = next((r for r in REASONS if counts[r]), None)
            keep.append(first is None), score.append(float(sum(counts.values()))), reason.append(first)
        return Verdicts(keep, score, reason)
