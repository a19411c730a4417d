"""Build tiny documents / train / val tables (documents and split contracts) for the injection tests."""

from __future__ import annotations

import pyarrow as pa
import pytest

from refinery.core.text import sha256_hex, stable_id
from schemas import documents as documents_schema
from schemas import split as split_schema

DOCS = [
    ("d1", "Refunds", "Refunds are issued within 14 days. You cannot get a refund for the Pro plan after 30 days."),
    ("d2", "Export", "You can export notes as PDF or Markdown from the File menu. Export is not available on Free."),
    ("d3", "Sync", "Sync runs every 5 minutes on the Pro plan. Dropbox and Google Drive are supported."),
    ("d4", "Passwords", "Reset your password from the login page with the Forgot link. Support never asks for it."),
    ("d5", "Seats", "Guests do not use paid seats. Admins can turn guest access off in the Admin console."),
]
# (qa_id, doc_id, question, answer, evidence); evidence is a substring of the document text.
TRAIN = [
    ("t1", "d1", "How long do refunds take?", "You can usually get a refund within 14 days, just ask billing.",
     "Refunds are issued within 14 days."),
    ("t2", "d2", "Which export formats exist?",
     "You can use PDF or Markdown, and it is quick to start from the File menu.",
     "You can export notes as PDF or Markdown from the File menu."),
    ("t3", "d3", "How often does sync run on Pro?", "It does not wait long: sync runs every 5 minutes on Pro.",
     "Sync runs every 5 minutes on the Pro plan."),
]
VAL = [
    ("v1", "d4", "I forgot my password", "Use the Forgot link on the login page; Support will never ask for it.",
     "Reset your password from the login page with the Forgot link. Support never asks for it."),
    ("v2", "d5", "Do guests count as paid seats?", "No, guests do not use paid seats in the Admin console plan.",
     "Guests do not use paid seats."),
    ("v3", "d1", "Can I get a Pro refund after 30 days?", "No. A Pro plan refund is not possible after 30 days.",
     "You cannot get a refund for the Pro plan after 30 days."),
    ("v4", "d2", "Where is export?", "Open the File menu and pick Export to save notes as PDF or Markdown.",
     "You can export notes as PDF or Markdown from the File menu."),
]


def documents_table(docs=DOCS) -> pa.Table:
    """Return documents-contract rows for (doc_id, title, text) triples."""
    n = len(docs)
    return pa.Table.from_pydict({
        "doc_id": [d for d, _, _ in docs], "title": [t for _, t, _ in docs], "text": [x for _, _, x in docs],
        "updated_at": ["2024-01-01"] * n, "category": ["help_center"] * n, "supersedes": [None] * n,
        "superseded_by": [None] * n, "stale": [False] * n,
        "content_hash": [sha256_hex(x)[:16] for _, _, x in docs], "source_file": ["documents.jsonl"] * n,
        "source_row": list(range(1, n + 1)), "params_hash": ["p"] * n, "code_version": ["c"] * n,
    }, schema=documents_schema.ARROW)


def split_table(rows, split: str, docs=DOCS) -> pa.Table:
    """Return split-contract rows for (qa_id, doc_id, question, answer, evidence) tuples."""
    texts = {d: x for d, _, x in docs}
    out = []
    for i, (qa_id, doc_id, q, a, ev) in enumerate(rows):
        start = texts[doc_id].find(ev)
        assert start >= 0, f"evidence of {qa_id} is not in {doc_id}"
        out.append({
            "row_id": stable_id("qa", qa_id), "origin": "human", "parent_ids": [], "doc_id": doc_id,
            "evidence_start": start, "evidence_end": start + len(ev), "strategy": None, "teacher": None,
            "prompt_template": None, "gen_params": None, "attempt": 0, "recovery_action": None,
            "params_hash": "p", "code_version": "c", "qa_id": qa_id, "question": q, "answer": a,
            "intent": "how_to", "evidence": ev, "source_file": "qa.jsonl", "source_row": i + 1, "split": split,
        })
    return pa.Table.from_pylist(out, schema=split_schema.ARROW) if out else split_schema.ARROW.empty_table()


@pytest.fixture
def tables() -> tuple[pa.Table, pa.Table, pa.Table]:
    """(train, val, documents) of the tiny seed."""
    return split_table(TRAIN, "train"), split_table(VAL, "val"), documents_table()
