"""Describe generation strategies (generation, filtering, experiment briefs); parse teacher output by field markers."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from refinery.core.text import normalize_line


@dataclass(frozen=True)
class Strategy:
    """How one strategy asks the teacher and reads its answer.

    output: what the completion holds: 'answer', 'question', or 'qa' (a question, then a line
    starting with ``Answer:``). passage: 'evidence' (the parent's evidence span), 'window' (another
    window of sentences from the parent's document), 'span' (one sentence of the parent's document that
    states a fact, chosen as the answer) or 'around' (the parent's evidence with the sentence before and
    after). token_budget: the max_new_tokens key used. answer_from: where a 'question' strategy's answer
    comes from: 'parent' (the parent row's answer) or 'span' (the passage span itself, verbatim: the answer
    is in the source text by construction, and the rules gate checks it stays so). require: a field marker the
    completion must reach (``GenRequest.require``): a 'qa' completion must reach its ``Answer:`` line, since a
    small teacher often ends its turn, or starts another example, right after the question.
    """

    name: str
    output: str
    passage: str
    token_budget: str
    stop: tuple[str, ...]
    answer_from: str = "parent"
    require: str = ""


QA_STOP = ("\n\n", "\nPassage:", "\nQuestion:", "###")  # stops of a question-and-answer call
# a question-and-answer call must reach its answer line: a small teacher often ends its turn, or starts
# another example, right after the question (parse_missing_answer)
QA_REQUIRE = "Answer:"
_LINE_STOP = ("\n\n", "\nQuestion:", "\nAnswer:", "\nRewritten:")
STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("answer_augmentation", "answer", "evidence", "answer", ("\n",)),
    Strategy("question_rephrasing", "question", "evidence", "question", ("\n",)),
    Strategy("new_question", "qa", "window", "qa", QA_STOP, require=QA_REQUIRE),
    Strategy("evol_depth", "qa", "evidence", "qa", QA_STOP, require=QA_REQUIRE),
    Strategy("evol_breadth", "qa", "evidence", "qa", QA_STOP, require=QA_REQUIRE),
    # Evol-Instruct's third direction: the same facts, cleaner phrasing, no AI-isms
    Strategy("evol_denoise", "qa", "evidence", "qa", QA_STOP, require=QA_REQUIRE),
    # verifiable from gold context: the answer is a sentence of the document; the teacher writes its question
    Strategy("answer_first", "question", "span", "question", ("\n",), answer_from="span"),
    # targeted rare-class expansion (generate.rare_expansion): a new row of a rare intent, from the passage around
    # the evidence of a seed row of that intent, with an intent-aware prompt
    Strategy("rare_intent", "qa", "around", "qa", QA_STOP, require=QA_REQUIRE),
    # constitutional critique -> revise (refinery/generation/critique.py): a draft answer to the seed question (this
    # strategy's template), a critique naming the rule it breaks, a revision (prompts/revise.txt) that follows it
    Strategy("critique_revise", "answer", "evidence", "answer", ("\n",)),
    # zero-shot prompts: small teachers often open with a newline, so stop only at a blank line or a new field
    Strategy("contaminate_answer", "answer", "evidence", "answer", _LINE_STOP),
    Strategy("contaminate_paraphrase", "answer", "evidence", "answer", _LINE_STOP),
)}
GENERATION_STRATEGIES = ("answer_augmentation", "question_rephrasing", "new_question", "answer_first", "evol_depth",
                         "evol_breadth", "evol_denoise", "critique_revise", "rare_intent")
MIX_STRATEGIES = GENERATION_STRATEGIES[:-1]  # what generate.budget buys; rare_intent has its own calls
EVOL_STRATEGIES = ("evol_depth", "evol_breadth", "evol_denoise")  # rewrite a row; generate.evol_rounds repeats them

# Budget-aware mix (generation brief, docs/sources.md): with few calls per seed row, spend them on new answers and
# paraphrases of existing questions (cheap, close to the seed); with many, on new questions and Evol-Instruct rewrites
# (more coverage). Rows: (largest budget/seed ratio the row applies to, mix).
# A critique_revise share counts chains: each costs up to three teacher calls (draft, critique, revision).
# Answer-first rows (an answer taken verbatim from a document sentence no seed row uses as evidence) join as soon as
# there are calls beyond one per seed row: they reach passages the seed does not, with answers checkable by containment.
MIX_BY_RATIO: tuple[tuple[float, dict[str, float]], ...] = (
    (1.0, {"answer_augmentation": 0.6, "question_rephrasing": 0.3, "new_question": 0.1}),
    (3.0, {"answer_augmentation": 0.25, "question_rephrasing": 0.2, "new_question": 0.2, "answer_first": 0.1,
           "evol_depth": 0.1, "evol_breadth": 0.05, "evol_denoise": 0.05, "critique_revise": 0.05}),
    (math.inf, {"answer_augmentation": 0.05, "question_rephrasing": 0.1, "new_question": 0.35, "answer_first": 0.15,
                "evol_depth": 0.15, "evol_breadth": 0.1, "evol_denoise": 0.05, "critique_revise": 0.05}),
)


def choose_mix(budget: int, seed_rows: int) -> tuple[float, dict[str, float]]:
    """Return the budget/seed ratio and the strategy mix it calls for."""
    ratio = budget / max(seed_rows, 1)
    for bound, mix in MIX_BY_RATIO:
        if ratio <= bound:
            return ratio, dict(mix)
    raise AssertionError("unreachable: the last bound is infinite")


def allocate(budget: int, mix: dict[str, float]) -> dict[str, int]:
    """Split ``budget`` calls over strategies by ``mix`` (largest remainder; ties by name): counts sum to budget."""
    total = sum(mix.values())
    exact = {k: budget * v / total for k, v in mix.items()}
    counts = {k: math.floor(v) for k, v in exact.items()}
    left = budget - sum(counts.values())
    for k in sorted(exact, key=lambda k: (-(exact[k] - counts[k]), k))[:left]:
        counts[k] += 1
    return counts


_ANSWER_MARK = re.compile(r"(?:^|\n)[ \t]*answer[ \t]*:", re.IGNORECASE)
_LEADING_MARK = re.compile(r"^\s*(?:answer|rewritten|question|harder question|new question|clean question)\s*:\s*",
                           re.IGNORECASE)
_ANY_MARK = re.compile(r"\b(?:passage|question|answer|rewritten)\s*:", re.IGNORECASE)


def parse_output(strategy: Strategy, text: str) -> tuple[str | None, str | None, str | None]:
    """Read the fields a strategy expects from a completion, or say why not.

    Only field markers split text: a completion without the ``Answer:`` line that a 'qa' strategy needs
    is a ``parse_missing_answer`` error, never a guess (a peer tool split on any letter 'a').

    Returns:
        (question, answer, parse_error): the fields the strategy produces (others None), or a reason code.
    """
    if strategy.output == "qa":
        m = _ANSWER_MARK.search(text)
        if m is None:
            return None, None, "parse_missing_answer"
        question_part, answer_part = text[:m.start()].strip(), text[m.end():].strip()
        if "\n" in question_part:
            return None, None, "parse_multiline_question"
        question, answer = normalize_line(question_part), normalize_line(answer_part.split("\n\n")[0])
        if not question:
            return None, None, "parse_empty_question"
        if not answer:
            return None, None, "parse_empty_answer"
        if _ANY_MARK.search(answer):
            return None, None, "parse_extra_fields"
        return question, answer, None
    first_line = next((line for line in text.split("\n") if line.strip()), "")  # the field is one line
    value = normalize_line(_LEADING_MARK.sub("", first_line.strip(), count=1))
    if not value:
        return None, None, "parse_empty_" + strategy.output
    if _ANY_MARK.search(value):
        return None, None, "parse_extra_fields"
    return (value, None, None) if strategy.output == "question" else (None, value, None)
