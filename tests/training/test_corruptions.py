"""Each corruption on inline text: exact output for a fixed seed, and the cases where it cannot apply."""

from __future__ import annotations

import numpy as np
import pytest

from refinery.planted import corruptions as corr

PASSAGE = "Refunds are issued within 14 days by the Billing team. Contact Support from the Help menu."
ANSWER = "Refunds take 14 days. Ask the Billing team."


def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def test_entity_swap_replaces_a_capitalised_term_with_one_from_the_passage():
    # given an answer naming "Billing" and a passage that also names Support and Help
    c = corr.entity_swap(ANSWER, passage=PASSAGE, rng=rng())
    # then one entity is swapped for a passage entity the answer does not contain
    assert c.applied and c.kind == "entity_swap"
    assert c.text == "Refunds take 14 days. Ask the Support team."
    assert c.detail == "'Billing' -> 'Support'"


def test_entity_swap_falls_back_to_a_content_word_and_fails_without_candidates():
    c = corr.entity_swap("the printer needs fresh paper", passage="scanners require toner", rng=rng())
    assert c.applied and c.detail.startswith("word ")
    assert c.text != "the printer needs fresh paper"
    # when there is nothing to swap in, it does not apply and returns the text unchanged
    none = corr.entity_swap("ok", passage="", rng=rng())
    assert not none.applied and none.text == "ok"


def test_entities_skip_sentence_initial_words():
    assert [t for _, _, t in corr.entities("Refunds go to Billing. Ask Support.")] == ["Billing", "Support"]


def test_number_change_alters_one_number():
    c = corr.number_change("Refunds take 14 days and cost $20.", rng=rng())
    assert c.applied
    assert c.text == "Refunds take 14 days and cost $60."
    assert c.detail == "'20' -> '60'"


def test_number_change_handles_number_words_and_dates():
    assert corr.number_change("It runs on Monday.", rng=rng()).text == "It runs on Sunday."
    assert corr.number_change("Wait three hours.", rng=rng()).applied


def test_number_change_without_a_number_does_not_apply():
    c = corr.number_change("Ask the Billing team.", rng=rng())
    assert not c.applied and c.text == "Ask the Billing team." and c.kind == "number_change"


def test_negation_flip_inverts_polarity():
    assert corr.negation_flip("You cannot export to Word.", rng=rng()).text == "You can export to Word."
    assert corr.negation_flip("Yes, it runs hourly.", rng=rng()).text == "No, it runs hourly."
    assert corr.negation_flip("Sync is fast.", rng=rng()).text == "Sync is not fast."


def test_negation_flip_without_a_polarity_word_does_not_apply():
    c = corr.negation_flip("Open Settings and click Export.", rng=rng())
    assert not c.applied


def test_unsupported_claim_appends_a_corpus_sentence_not_in_the_passage():
    other = ["Export runs from the File menu. Sync runs every five minutes on the Pro plan."]
    c = corr.unsupported_claim("Refunds take 14 days", passage=PASSAGE, other_texts=other, rng=rng())
    assert c.applied
    assert c.text == "Refunds take 14 days. Sync runs every five minutes on the Pro plan."


def test_unsupported_claim_uses_a_template_without_a_corpus():
    c = corr.unsupported_claim(ANSWER, passage=PASSAGE, rng=rng())
    assert c.applied and c.text.startswith(ANSWER + " ") and c.detail.startswith("template")


def test_other_document_needs_other_answers():
    assert not corr.other_document(ANSWER, other_texts=[ANSWER], rng=rng()).applied
    c = corr.other_document(ANSWER, other_texts=["Use the File menu.", "Sync is hourly."], rng=rng())
    assert c.applied and c.text in {"Use the File menu.", "Sync is hourly."}


def test_truncation_cuts_mid_sentence_and_skips_short_text():
    c = corr.truncation("Refunds are issued within fourteen days by the billing team.", rng=rng())
    assert c.applied and c.text == "Refunds are issued within fourteen"
    assert not corr.truncation("Too short.", rng=rng()).applied


def test_refusal_always_applies():
    c = corr.refusal(ANSWER, rng=rng())
    assert c.applied and c.text in corr.REFUSALS


def test_near_duplicate_makes_small_edits():
    c = corr.near_duplicate("You can usually start the export from the File menu.", rng=rng())
    assert c.applied
    assert c.text == "You can begin the export from the File menu."
    assert not corr.near_duplicate("Click Export now.", rng=rng()).applied


def test_seed_paraphrase_rewrites_by_rule_and_reports_when_no_rule_applies():
    c = corr.seed_paraphrase("You can start the export, it is quick.", rng=rng())
    assert c.applied and c.text == "It is possible to begin the export, it is fast."
    assert not corr.seed_paraphrase("Sync runs hourly.", rng=rng()).applied


def test_style_degradations():
    assert corr.missing_direct_answer("Yes, it runs hourly on Free.", rng=rng()).text == "It runs hourly on Free."
    assert not corr.missing_direct_answer("It runs hourly.", rng=rng()).applied
    c = corr.missing_escalation("Refunds take 14 days. Contact Support if it is late.", rng=rng())
    assert c.applied and c.text == "Refunds take 14 days."
    assert not corr.missing_escalation("Refunds take 14 days.", rng=rng()).applied
    assert corr.vague_answer(ANSWER, rng=rng()).text.count("Billing") == 1
    assert corr.condescending_tone(ANSWER, rng=rng()).text != ANSWER


@pytest.mark.parametrize("kind", sorted(corr.CORRUPTIONS))
def test_every_corruption_is_deterministic_for_a_seed(kind):
    a = corr.corrupt(kind, ANSWER, passage=PASSAGE, other_texts=[PASSAGE, "Sync is hourly."], rng=rng())
    b = corr.corrupt(kind, ANSWER, passage=PASSAGE, other_texts=[PASSAGE, "Sync is hourly."], rng=rng())
    assert a == b and a.kind == kind


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown corruption"):
        corr.corrupt("typo", ANSWER, rng=rng())
