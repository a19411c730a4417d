"""Build (passage, claim, label) pairs from seed QA rows and realistic corruptions: the verifier's training data."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from refinery.core.errors import require_columns
from refinery.planted import corruptions as corr

SPLIT_COLUMNS = ("question", "answer", "evidence", "doc_id")
DOCUMENT_COLUMNS = ("doc_id", "text")
# Corruptions applied to one passage sentence for counterfactual pairs: the same edited sentence is supported
# by the edited passage and unsupported by the original, so only comparing claim and passage can tell them apart.
COUNTERFACTUAL_KINDS = ("entity_swap", "number_change", "negation_flip")

PAIRS_ARROW = pa.schema([
    pa.field("passage", pa.string(), nullable=False),
    pa.field("claim", pa.string(), nullable=False),
    pa.field("label", pa.float32(), nullable=False),  # 1 supported, 0 not
    pa.field("kind", pa.string(), nullable=False),  # clean | passage_sentence | counterfactual | <corruption>
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("detail", pa.string(), nullable=False),
])


def _corrupt_first(kinds: Sequence[str], text: str, *, passage: str, other_texts: Sequence[str],
                   rng: np.random.Generator) -> corr.Corruption | None:
    for kind in kinds:
        c = corr.corrupt(kind, text, passage=passage, other_texts=other_texts, rng=rng)
        if c.applied and c.text.strip() != text.strip() and not c.detail.startswith("word "):
            return c  # content-word swaps are skipped here: the edited passage would not read as real text
    return None


def build_pairs(rows: pa.Table, documents: pa.Table, *, seed: int, negatives_per_positive: int,
                counterfactual: bool, sentence_positives: bool = True,
                kinds: Sequence[str] = corr.FACTUAL_KINDS,
                counterfactual_kinds: Sequence[str] = COUNTERFACTUAL_KINDS, where: str = "split") -> pa.Table:
    """Build (passage, claim, label) pairs from seed QA rows.

    Per row: the clean answer (with its question) against its evidence is supported; with
    ``sentence_positives`` a sentence of the evidence is supported too; ``negatives_per_positive``
    corrupted answers (kinds taken in a seeded rotating order, skipping kinds that cannot apply) are not;
    with ``counterfactual``, one evidence sentence edited by an entity / number / negation corruption is
    supported by the edited evidence and unsupported by the original.

    Args:
        rows: split-contract rows (question, answer, evidence, doc_id are read).
        documents: documents-contract rows (doc_id, text).
        seed: seeds the corruption choices.
        negatives_per_positive: corrupted answers per row.
        counterfactual: add the counterfactual sentence pair.
        sentence_positives: add an evidence sentence as a supported claim.
        kinds: corruption kinds for the negatives.
        counterfactual_kinds: the kinds that may edit the counterfactual sentence.
        where: the input's name for error messages.

    Returns:
        A table of PAIRS_ARROW, in a deterministic order.

    Raises:
        InputError: a required column is missing.
    """
    require_columns(rows, SPLIT_COLUMNS, where)
    require_columns(documents, DOCUMENT_COLUMNS, "documents")
    from refinery.models.claims import claim_text

    rng = np.random.default_rng(seed)
    doc_text = dict(zip(documents.column("doc_id").to_pylist(), documents.column("text").to_pylist()))
    doc_ids = sorted(doc_text)
    data = rows.select(list(SPLIT_COLUMNS)).to_pylist()
    answers_by_doc: dict[str, list[str]] = defaultdict(list)
    for r in data:
        answers_by_doc[r["doc_id"]].append(r["answer"])
    out: list[dict[str, Any]] = []

    def add(passage: str, claim: str, label: float, kind: str, doc: str, detail: str = "") -> None:
        out.append({"passage": passage, "claim": claim, "label": label, "kind": kind, "doc_id": doc,
                    "detail": detail})

    for n, r in enumerate(data):
        q, a, ev, doc = r["question"], r["answer"], r["evidence"], r["doc_id"]
        others = [d for d in doc_ids if d != doc]
        picked = [others[i] for i in rng.choice(len(others), size=min(4, len(others)), replace=False)] if others else []
        context = [doc_text.get(doc, "")] + [doc_text[d] for d in picked]
        other_answers = [x for d in picked for x in answers_by_doc.get(d, [])][:20]
        if not other_answers:
            other_answers = [x for x in (data[(n + k) % len(data)]["answer"] for k in range(1, len(data)))
                             if x not in answers_by_doc[doc]][:20]
        add(ev, claim_text(q, a), 1.0, "clean", doc)
        sents = corr.sentences(ev)
        if sentence_positives and sents:
            add(ev, corr._pick(rng, sents), 1.0, "passage_sentence", doc)
        start = int(rng.integers(len(kinds)))
        rotation = [kinds[(start + i) % len(kinds)] for i in range(len(kinds))]
        made = 0
        for i in range(len(rotation)):
            if made == negatives_per_positive:
                break
            kind = rotation[i]
            texts = other_answers if kind == "other_document" else context
            c = corr.corrupt(kind, a, passage=ev, other_texts=texts, rng=rng)
            if c.applied and c.text.strip() != a.strip():
                add(ev, claim_text(q, c.text), 0.0, kind, doc, c.detail)
                made += 1
        if counterfactual and sents and counterfactual_kinds:
            s = corr._pick(rng, sents)
            m = len(counterfactual_kinds)
            order = [counterfactual_kinds[(int(rng.integers(m)) + i) % m] for i in range(m)]
            c = _corrupt_first(order, s, passage=ev, other_texts=context, rng=rng)
            if c is not None:
                add(ev.replace(s, c.text, 1), c.text, 1.0, "counterfactual", doc, c.kind)
                add(ev, c.text, 0.0, c.kind, doc, f"counterfactual: {c.detail}")
    return pa.Table.from_pylist(out, schema=PAIRS_ARROW)

