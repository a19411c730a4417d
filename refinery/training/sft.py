"""Format QA rows as chat messages: one prompt shape shared by assembly exports, LoRA training and evaluation."""

from __future__ import annotations

SYSTEM = "Answer the question using only the passage. Reply with the answer alone, in one or two sentences."


def user_prompt(passage: str, question: str, max_passage_chars: int = 2000) -> str:
    """Return the user turn: the (possibly shortened) passage, then the question."""
    passage = passage.strip()
    if len(passage) > max_passage_chars:
        passage = passage[:max_passage_chars].rsplit(" ", 1)[0] + " …"
    return f"Passage:\n{passage}\n\nQuestion: {question.strip()}"


def messages(passage: str, question: str, answer: str | None = None, max_passage_chars: int = 2000) -> list[dict]:
    """Return chat messages (system, user[, assistant]) in the OpenAI / Hugging Face chat-template shape.

    Args:
        passage: the source document text the question is about.
        question: the question.
        answer: the reference answer; None for a prompt to complete at evaluation time.
        max_passage_chars: passages longer than this are cut at a word boundary.
    """
    out = [{"role": "system", "content": SYSTEM},
           {"role": "user", "content": user_prompt(passage, question, max_passage_chars)}]
    if answer is not None:
        out.append({"role": "assistant", "content": answer.strip()})
    return out
