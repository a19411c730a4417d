"""Rules gate: one test per reason code on inline text, real-looking rows kept, vectorised helpers exact."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from refinery.core.textkernels import match_keys, word_counts, word_tokens
from refinery.gates.rules import REASONS, RulesGate
from refinery.core.text import match_key
from tests.gates.conftest import ROOT, rows

GOOD_Q = "How quickly does a file I save on my desktop show up on my laptop?"
GOOD_A = "Normally within a few seconds, provided both machines are connected to the internet."


def judge(pairs, **columns):
    return RulesGate().apply(rows(pairs, **columns))


def reason_of(question, answer, **columns):
    return judge([(question, answer)], **{k: [v] for k, v in columns.items()}).reason[0]


def test_a_well_formed_row_is_kept_with_score_zero():
    v = judge([(GOOD_Q, GOOD_A)])
    assert v.keep == [True] and v.score == [0.0] and v.reason == [None]


def test_transport_error():
    assert reason_of(None, None, error="transport_timeout", finish_reason="error") == "rules_transport_error"


def test_parse_error():
    assert reason_of(None, None, parse_error="parse_no_json") == "rules_parse_error"


@pytest.mark.parametrize("question, answer", [("", GOOD_A), (GOOD_Q, "   "), (None, GOOD_A)])
def test_empty(question, answer):
    assert reason_of(question, answer) == "rules_empty"


def test_truncated_by_finish_reason():
    assert reason_of(GOOD_Q, GOOD_A, finish_reason="length") == "rules_truncated"


@pytest.mark.parametrize("answer", [
    "Open Admin console > Members and choose Invite (you need the Owner role",  # unclosed bracket
    'The error reads "cannot sync this file name and then the app stops.',  # odd double quotes
    "Open Settings, then choose Sync and",  # dangling joining word
    "Open Settings and look under Sync,",  # dangling comma
    "Refunds are issued within 14 days. To start one, open Billing and pick the",  # inner sentence end
])
def test_truncated_endings(answer):
    assert reason_of(GOOD_Q, answer) == "rules_truncated"


def test_long_answer_without_terminal_punctuation_is_truncated():
    answer = " ".join(["sync runs on every device you have linked to the workspace"] * 5)  # 55 words
    assert reason_of(GOOD_Q, answer) == "rules_truncated"


@pytest.mark.parametrize("answer", [
    "Every 5 minutes on the Pro plan",  # short, single sentence, no period: fine
    "1) Open Settings 2) Choose Export 3) Pick PDF.",  # lone closing brackets in a numbered list
    'The message says "file too large". Split it first.',
    "An ambulance would likely come to the scene to help the injured old man lying on the sidewalk",  # CosmosQA
])
def test_legitimate_endings_are_not_truncated(answer):
    assert reason_of("What should I do when the desktop app shows an error about this?", answer) is None


@pytest.mark.parametrize("question, answer", [
    (GOOD_Q, "I'm sorry, but I can't help with that request about your laptop."),
    (GOOD_Q, "I cannot assist with this question because it asks about private data."),
    ("I'm sorry, but as an AI I am unable to write a question about this passage.", GOOD_A),
    (GOOD_Q, "The passage does not mention how quickly files show up on a laptop."),
])
def test_refusal(question, answer):
    assert reason_of(question, answer) == "rules_refusal"


@pytest.mark.parametrize("question, answer", [
    ("Can I get a refund for the rest of the month after cancelling?",
     "Sorry, partial months aren't refunded. You keep the paid features until the billing month ends."),
    ("where is the admin console? I can't find it anywhere",
     "Click your avatar at the top right of the web app and select Admin console from the menu."),
])
def test_support_answers_that_say_sorry_or_cant_are_not_refusals(question, answer):
    assert reason_of(question, answer) is None


@pytest.mark.parametrize("question, answer", [
    (GOOD_Q, "As an AI language model, I think it normally takes a few seconds to show up."),
    ("Sure! Here's a question about syncing: how fast do files show up?", GOOD_A),
    ("According to the passage, how quickly does a saved file show up on a laptop?", GOOD_A),
    (GOOD_Q, "Normally within a few seconds.\nNote: this depends on your connection speed and load."),
    (GOOD_Q, "Answer: normally within a few seconds, provided both machines are online."),
    ("Here is a question about the sync feature for new laptop users?", GOOD_A),
])
def test_meta_talk(question, answer):
    assert reason_of(question, answer) == "rules_meta_talk"


@pytest.mark.parametrize("question", [
    "How do I change the font size in the text editor on my laptop?",
    "Can I share the document with a guest who has no account yet?",
])
def test_user_questions_about_text_or_documents_are_not_meta_talk(question):
    assert reason_of(question, GOOD_A) is None


def test_too_short():
    assert reason_of("Sync speed?", "Seconds.") == "rules_too_short"


def test_too_long():
    answer = "Normally within a few seconds. " * 45  # 225 words
    assert reason_of(GOOD_Q, answer) == "rules_too_long"


def test_answer_bounds_apply_on_their_own():
    gate = RulesGate(min_answer_words=3, max_answer_words=10)
    v = gate.apply(rows([("How quickly does a file I save on my desktop show up on my laptop today?", "Seconds."),
                         (GOOD_Q, GOOD_A)]))
    assert v.reason == ["rules_too_short", "rules_too_long"]


@pytest.mark.parametrize("question, answer", [
    ("¿Cómo puedo exportar mis notas a PDF desde la aplicación?",
     "Abre el menú Archivo y elige Exportar, después selecciona PDF en la lista de formatos."),
    ("Как экспортировать заметки в PDF?", "Откройте меню Файл и выберите Экспорт, затем формат PDF."),
])
def test_language(question, answer):
    assert reason_of(question, answer) == "rules_language"


def test_answer_repeats_question():
    q = "Can I change where the Brindlepost folder lives after installing the app?"
    assert reason_of(q, "Can I change where the Brindlepost folder lives after installing the app?") \
        == "rules_answer_repeats_question"
    assert reason_of(q, "Change where the Brindlepost folder lives after installing the app.") \
        == "rules_answer_repeats_question"


SPAN = "Exports larger than 2 GB are delivered in several parts by e-mail."


def test_answer_first_row_whose_answer_left_its_source_span_is_rejected():
    q = "What happens when my data export is bigger than two gigabytes?"
    # the answer taken verbatim from its passage passes; a rewrite of it (a recovery action, a reviewer's fix) fails
    assert reason_of(q, SPAN, strategy="answer_first", evidence=SPAN) is None
    assert reason_of(q, "Large exports over 2 GB arrive in several parts by e-mail.", strategy="answer_first",
                     evidence=SPAN) == "rules_answer_not_in_source"
    assert reason_of(q, SPAN, strategy="answer_first", evidence=None) == "rules_answer_not_in_source"


def test_containment_applies_only_to_answer_first_rows():
    q = "What happens when my data export is bigger than two gigabytes?"
    assert reason_of(q, "Large exports over 2 GB arrive in several parts by e-mail.", strategy="new_question",
                     evidence=SPAN) is None


def test_a_yes_answer_that_reuses_question_words_is_kept():
    q = "Can I export notes as PDF from the desktop app on Windows?"
    assert reason_of(q, "Yes, you can export notes as PDF from the File menu on Windows.") is None


def test_reason_follows_priority_and_score_counts_every_failed_rule():
    # given a row that is truncated (finish_reason), a refusal, and too short
    v = judge([("Sync?", "I'm sorry, but I can't help with that.")], finish_reason=["length"])
    assert v.reason == ["rules_truncated"]
    assert v.score == [3.0]


def test_every_reason_code_is_prefixed_and_snake_case():
    assert all(r.startswith("rules_") and r == r.lower() and " " not in r for r in REASONS)


def test_empty_input_gives_empty_verdicts():
    v = RulesGate().apply(rows([]))
    assert (v.keep, v.score, v.reason) == ([], [], [])


def test_the_human_seed_passes():
    import json

    seed = [json.loads(line) for line in (ROOT / "data" / "00_seed" / "qa.jsonl").read_text().splitlines() if line]
    v = RulesGate().apply(rows([(r["question"], r["answer"]) for r in seed]))
    rejected = [(r["question"], reason) for r, reason in zip(seed, v.reason) if reason]
    assert rejected == []


def test_invalid_thresholds_are_refused():
    with pytest.raises(ValueError):
        RulesGate(min_qa_words=50, max_qa_words=10)
    with pytest.raises(ValueError):
        RulesGate(min_stopword_share=1.5)


# --- vectorised helpers ------------------------------------------------------------------------------------------

ALPHABET = [chr(i) for i in range(128)] + ["é", "ß", "Ä", "ﬁ", "\u00a0", "—", "’", "日本", "\u2028", "\U0001F600"]


def random_texts(n: int, seed: int) -> list[str | None]:
    r = random.Random(seed)
    texts = ["".join(r.choice(ALPHABET) for _ in range(r.randint(0, 40))) for _ in range(n)]
    return texts + ["", " ", "  a  b  ", "x", None, "Hello, World!!  ", "\x1c\x1dword\x1f"]


def test_match_keys_equals_match_key_on_every_string():
    texts = random_texts(3000, 0)
    assert match_keys(texts).to_pylist() == [match_key(t or "") for t in texts]


def test_match_keys_reads_sliced_and_chunked_arrays():
    texts = random_texts(200, 1)
    chunked = pa.chunked_array([pa.array(texts[:50]), pa.array(texts[50:])])
    assert match_keys(chunked).to_pylist() == [match_key(t or "") for t in texts]
    assert match_keys(pa.array(texts).slice(7, 30)).to_pylist() == [match_key(t or "") for t in texts[7:37]]


def test_word_counts_equal_str_split():
    texts = random_texts(3000, 2)
    assert word_counts(texts).tolist() == [len((t or "").split()) for t in texts]


def test_word_tokens_give_one_hash_per_word_and_equal_words_equal_hashes():
    keys = match_keys(["the cat saw the dog", "", "dog"])
    tokens = word_tokens(keys)
    assert tokens.counts.tolist() == [5, 0, 1]
    h = tokens.hashes
    assert h[0] == h[3] and h[4] == h[5] and len(set(h[:3].tolist())) == 3
