"""Write the claim a verifier checks (question, then answer) and split it back: one format for training and gating."""

from __future__ import annotations


def claim_text(question: str | None, answer: str | None) -> str:
    """Return the claim checked against the passage: the question (when given), one space, then the answer.

    Both parts are stripped. A missing or blank answer makes no claim and gives "" (a verifier scores an empty
    claim NaN, so a row is never judged on its question alone); a missing or blank question gives the answer
    alone.

    Args:
        question: the row's question, or None.
        answer: the row's answer, or None.

    Returns:
        The claim text, "" when there is no answer.
    """
    answer = (answer or "").strip()
    if not answer:
        return ""
    question = (question or "").strip()
    return f"{question} {answer}" if question else answer


def split_claim(claim: str) -> tuple[str, str]:
    """Split a claim (``claim_text``: question, then answer) into (question, answer) at its last "?"."""
    question, mark, answer = claim.rpartition("?")
    if mark and answer.strip():
        return (question + mark).strip(), answer.strip()
    return "", claim.strip()
