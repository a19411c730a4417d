"""PII gate: personal data in an answer that its source document does not hold; exact codes, quoted data kept."""

from __future__ import annotations

import pyarrow as pa
import pytest

from refinery.gates.base import GateContext
from refinery.gates.pii import PiiGate, PiiParams, luhn_ok
from refinery.recovery.diagnose import diagnose

DOCS = pa.table({"doc_id": ["d1", "d2"], "text": [
    "Billing questions go to Billing@Example.com. Phone support: +1 (800) 555-0199, weekdays 9-17.",
    "Exports larger than 2 GB are split into parts. Write to privacy@example.com to delete your data."]})


def judge(answers, docs=None, **settings):
    gate = PiiGate(DOCS, **settings)
    rows = pa.table({"answer": answers, "doc_id": docs or ["d1"] * len(answers)})
    return gate.apply(rows)


@pytest.mark.parametrize("answer, reason", [
    ("Email jane.doe@gmail.com and they will reset it.", "pii_email"),
    ("Call them on +44 20 7946 0958 to cancel.", "pii_phone"),
    ("Call (555) 123-4567 for a refund.", "pii_phone"),
    ("Ring 555-123-4567 for a refund.", "pii_phone"),
    ("Pay with card 4111 1111 1111 1111 and it renews.", "pii_card"),
    ("Pay with card 4111-1111-1111-1111.", "pii_card"),
    ("Use 5500005555555559 at checkout.", "pii_card"),
])
def test_personal_data_the_document_does_not_hold_is_rejected_with_its_code(answer, reason):
    v = judge([answer])
    assert (v.keep, v.reason) == ([False], [reason])
    assert v.score == [1.0]


def test_a_support_number_and_address_quoted_from_the_document_are_kept():
    # the same number in another format, and the address in another case, are still the document's own
    v = judge(["Call +1 800 555 0199 on weekdays.", "Call 800-555-0199.", "Write to billing@example.com."])
    assert v.keep == [True, True, True] and v.reason == [None, None, None] and v.score == [0.0, 0.0, 0.0]


def test_data_quoted_from_another_document_is_not_the_rows_own():
    # privacy@example.com is in d2, not in d1 (the row's source): an answer about d1 must not carry it
    v = judge(["Write to privacy@example.com.", "Write to privacy@example.com."], docs=["d1", "d2"])
    assert v.reason == ["pii_email", None]


@pytest.mark.parametrize("answer", [
    "Refunds take 14 days.", "It was updated on 2024-06-01.", "Published 14.10.2024 in the notes.",
    "The Pro plan costs $1,299.99 a year.", "Version 10.15.7 fixed it.", "Sync runs every 5 minutes.",
    "Use the code 1234 5678 9012 3456 from the voucher.",  # 16 digits failing the Luhn check: not a card
    "Call 555-1234.",  # two groups only: not recognised as a phone number (a documented limit)
])
def test_numbers_that_are_not_personal_data_are_kept(answer):
    assert judge([answer]).keep == [True]


def test_the_first_code_in_priority_order_names_the_row_and_the_score_counts_every_item():
    v = judge(["Mail a.b@mail.org or call 555-123-4567, card 4111 1111 1111 1111."])
    assert v.reason == ["pii_email"] and v.score == [3.0]


def test_a_card_number_is_not_also_counted_as_a_phone_number():
    v = judge(["Card 4111 1111 1111 1111."], phone=True, card=False)
    assert v.keep == [True]  # the card check is off, and its digits are no phone number


def test_each_kind_can_be_switched_off():
    answers = ["Email x.y@mail.org.", "Call 555-123-4567.", "Card 4111 1111 1111 1111."]
    assert judge(answers, email=False).reason == [None, "pii_phone", "pii_card"]
    assert judge(answers, phone=False, card=False).reason == ["pii_email", None, None]


def test_a_row_whose_document_is_missing_has_no_source_to_quote_from():
    v = judge(["Call +1 800 555 0199.", None], docs=["gone", "gone"])
    assert v.reason == ["pii_phone", None] and v.score == [1.0, 0.0]


def test_luhn_check():
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112") and not luhn_ok("79927398710")


def test_built_from_its_params_section_and_counted():
    params = PiiParams(email=True, phone=False, card=True, min_phone_digits=7)
    bounds = PiiGate.calibrate(params, GateContext(train=None, documents=DOCS))
    assert bounds == {"email": True, "phone": False, "card": True, "min_phone_digits": 7}
    gate = PiiGate.build(bounds, GateContext(train=None, documents=DOCS))
    gate.apply(pa.table({"answer": ["Call 555-123-4567.", "Email x.y@mail.org."], "doc_id": ["d1", "d1"]}))
    assert gate.stats.as_dict() == {"judged": 2, "kept": 1, "failed_batches": 0, "reasons": {"pii_email": 1}}


def test_empty_input_gives_empty_verdicts():
    assert judge([]).keep == []


def test_the_registry_declares_the_codes_the_gate_gives_and_recovery_regrounds_such_a_row():
    from refinery.gates import pii
    from refinery.gates.registry import BY_NAME
    from refinery.recovery.actions import next_action
    from tests.test_recover import BOUNDS, TEXT, one

    assert tuple(BY_NAME["pii"].reasons) == pii.REASONS
    # a row whose answer invents a phone number is ungrounded: answered again from its evidence alone
    d = diagnose(one({"pii": (1.0, "pii_phone")}), BOUNDS, {"d1": {"text": TEXT, "stale": False}}, 0.5)
    assert (d.mode, d.detail, d.recoverable) == ("ungrounded", "pii_phone", True)
    assert next_action(d, []) == "strict_grounding"
