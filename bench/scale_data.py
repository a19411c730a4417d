"""Build the scale benchmark's inputs (documents, a human seed split three ways, contaminated rows, DPO pairs) and
the mock teacher's replies: deterministic by seed, sized by the number of generated rows.

Used by ``bench/bench_scale.py``; the mock server (``bench/bench_http_teacher.py``) imports :func:`mock_reply`.
Text comes from the support-style templates and vocabulary of ``bench/bench_gates.py``, so the rules gate's
English and length checks see realistic rows.
"""

from __future__ import annotations

import hashlib
import random
import re
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_gates import ANSWERS, NOUNS, REFUSALS, _fill, edit_words, make_pair  # noqa: E402

QA_PER_DOC = 10  # seed QA rows per document (each on its own evidence sentence)
SENTENCES_PER_DOC = 12
TRAIN_SHARE_OF_ROWS = 0.25  # human train rows per generated row: budget / seed rows = 4 (the widest strategy mix)
HELD_OUT_EVERY = 20  # every 20th document goes to val, the next to test (group-aware: no document in two splits)
STALE_EVERY = 50  # every 50th document is superseded by the next one (generate skips stale sources)
CATEGORIES = ("help_center", "billing", "api", "policy", "security", "mobile")
# seed intents with the demo's skew: three rare ones (recovery, assemble's top-ups and validate's floors see them)
INTENTS = (["how_to"] * 24 + ["troubleshooting"] * 16 + ["billing"] * 11 + ["feature_info"] * 14
           + ["account_access"] * 6 + ["policy"] * 7 + ["integration"] * 7 + ["data_privacy"] * 6
           + ["accessibility", "legal_request", "escalation"])
PAIR_CATEGORIES = ("factuality", "constraint_following", "tone", "vagueness", "missing_escalation", "off_topic")


def sizes(rows: int) -> dict[str, int]:
    """Seed sizes for ``rows`` generated rows: documents and human QA rows (train about rows / 4)."""
    train_docs = max(4, round(rows * TRAIN_SHARE_OF_ROWS / QA_PER_DOC))
    docs = train_docs * HELD_OUT_EVERY // (HELD_OUT_EVERY - 2) + 2
    return {"documents": docs, "qa": docs * QA_PER_DOC}


def _hex(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def build_inputs(rows: int, out: Path, seed: int = 0) -> dict[str, int]:
    """Write documents, train/val/test splits, contaminated rows and DPO pairs for ``rows`` generated rows.

    Args:
        rows: generated rows the benchmark will ask for (the generate budget).
        out: folder for ``documents.parquet``, ``train/val/test.parquet``, ``contaminated.parquet``,
            ``pairs.parquet``.
        seed: the builder's RNG seed (a local ``random.Random``).

    Returns:
        Row counts per written table.
    """
    from refinery.core.text import stable_id
    from schemas import documents as documents_schema
    from schemas import preference_pairs as pairs_schema
    from schemas import split as split_schema
    from schemas import synthetic as synthetic_schema

    r = random.Random(seed)
    n_docs = sizes(rows)["documents"]
    docs: dict[str, list] = {k: [] for k in documents_schema.ARROW.names}
    qa: dict[str, list] = {k: [] for k in split_schema.ARROW.names}
    for d in range(n_docs):
        doc_id = f"kb-{d:06d}"
        sentences = [_fill(r.choice(ANSWERS), r) for _ in range(SENTENCES_PER_DOC)]
        text = " ".join(sentences)
        stale = d % STALE_EVERY == STALE_EVERY - 1 and d + 1 < n_docs
        for k, v in (("doc_id", doc_id), ("title", f"{r.choice(NOUNS).title()} and {r.choice(NOUNS)}"),
                     ("text", text), ("updated_at", f"2024-{1 + d % 12:02d}-{1 + d % 28:02d}"),
                     ("category", CATEGORIES[d % len(CATEGORIES)]),
                     ("supersedes", f"kb-{d - 1:06d}" if (d - 1) % STALE_EVERY == STALE_EVERY - 1 else None),
                     ("superseded_by", f"kb-{d + 1:06d}" if stale else None), ("stale", stale),
                     ("content_hash", _hex(text)[:16]), ("source_file", "bench"), ("source_row", d + 1),
                     ("params_hash", "bench"), ("code_version", "bench")):
            docs[k].append(v)
        split = "val" if d % HELD_OUT_EVERY == 1 else "test" if d % HELD_OUT_EVERY == 2 else "train"
        starts = [0]
        for s in sentences[:-1]:
            starts.append(starts[-1] + len(s) + 1)
        for j in sorted(r.sample(range(SENTENCES_PER_DOC), QA_PER_DOC)):
            evidence = sentences[j]
            question, _ = make_pair(r)
            answer = edit_words(evidence, 2, r)
            answer = answer if answer.endswith((".", "!", "?")) else answer + "."
            qa_id = f"qa-{len(qa['qa_id']):07d}"
            for k, v in (("row_id", stable_id("qa", qa_id)), ("origin", "human"), ("parent_ids", []),
                         ("doc_id", doc_id), ("evidence_start", starts[j]),
                         ("evidence_end", starts[j] + len(evidence)), ("strategy", None), ("teacher", None),
                         ("prompt_template", None), ("gen_params", None), ("attempt", 0), ("recovery_action", None),
                         ("params_hash", "bench"), ("code_version", "bench"), ("qa_id", qa_id),
                         ("question", question), ("answer", answer), ("intent", r.choice(INTENTS)),
                         ("evidence", evidence), ("source_file", "bench"), ("source_row", len(qa["qa_id"]) + 1),
                         ("split", split)):
                qa[k].append(v)
    documents = pa.table(docs, schema=documents_schema.ARROW)
    pq.write_table(documents, out / "documents.parquet")
    seed_rows = pa.table(qa, schema=split_schema.ARROW)
    counts = {"documents": documents.num_rows}
    for split in ("train", "val", "test"):
        part = seed_rows.filter(pa.compute.equal(seed_rows.column("split"), split))
        pq.write_table(part, out / f"{split}.parquet")
        counts[split] = part.num_rows
    train = pq.read_table(out / "train.parquet").to_pylist()
    con: dict[str, list] = {k: [] for k in synthetic_schema.ARROW.names}
    pairs: dict[str, list] = {k: [] for k in pairs_schema.ARROW.names}
    for i, row in enumerate(train):
        strategy = "contaminate_answer" if i % 5 else "contaminate_paraphrase"
        answer = edit_words(row["answer"], 3, r)
        key = _hex("con", seed, row["row_id"])
        values = {**{k: row[k] for k in ("parent_ids", "doc_id", "evidence_start", "evidence_end", "question",
                                          "intent", "evidence")},
                  "row_id": stable_id("con", key), "origin": "contaminated", "parent_ids": [row["row_id"]],
                  "strategy": strategy, "teacher": "mock@bench", "prompt_template": f"{strategy}@000000000000",
                  "gen_params": "{}", "attempt": 0, "recovery_action": None, "params_hash": "bench",
                  "code_version": "bench", "answer": answer, "raw_output": answer, "parse_error": None,
                  "error": None, "finish_reason": "stop", "prompt_tokens": 40, "completion_tokens": 20,
                  "seed": i, "sample_index": 0, "cache_key": key}
        for k in con:
            con[k].append(values[k])
        rejected = edit_words(row["answer"], 4, r)
        rejected = rejected if rejected.strip() != row["answer"].strip() else rejected + " Maybe."
        values = {"pair_id": "pref_" + _hex("pair", seed, row["row_id"])[:16], "prompt": row["question"],
                  "chosen": row["answer"], "rejected": rejected, "category": PAIR_CATEGORIES[i % len(PAIR_CATEGORIES)],
                  "corruption": "entity_swap", "detail": "bench", "parent_id": row["row_id"], "doc_id": row["doc_id"],
                  "category_source": "templated", "params_hash": "bench", "code_version": "bench"}
        for k in pairs:
            pairs[k].append(values[k])
    pq.write_table(pa.table(con, schema=synthetic_schema.ARROW), out / "contaminated.parquet")
    pq.write_table(pa.table(pairs, schema=pairs_schema.ARROW), out / "pairs.parquet")
    counts.update(contaminated=len(con["row_id"]), pairs=len(pairs["pair_id"]))
    return counts


_SHOT_ANSWER = re.compile(r"\nAnswer: ([^\n]+)\n")
_QA_ENDS = ("Question:", "New question:", "Harder question:")
_STOCK = 300  # the stock pairs the duplicate replies draw from


def mock_reply(prompt: str, seed: object) -> str:
    """Return the mock teacher's completion for a prompt, in the format its strategy parses.

    A pure function of (prompt, seed): a question and answer from the support templates with a fifth of their words
    swapped (templated text would otherwise share 8-grams with the templated seed at a rate that grows with the
    seed's size), and planted failures
    at fixed shares (by the request's hash): 3% refusals, 2% meta-talk, 2% truncated answers, 3% one of 300
    stock pairs (exact and near duplicates), 1% an e-mail address the source does not hold, 2% (question-and-answer
    prompts) no ``Answer:`` line, 2% (prompts with few-shot examples) a seed answer copied from an example.

    Args:
        prompt: the rendered prompt (its last line names the output: ``Question:``, ``Rewritten:``, ``Answer:``).
        seed: the request's sampling seed.
    """
    h = hashlib.sha256(f"{seed}|{prompt}".encode()).digest()
    r = random.Random(h)
    tail = prompt.rstrip()
    kind = "qa" if tail.endswith(_QA_ENDS) else "question" if tail.endswith("Rewritten:") else "answer"
    q, a = make_pair(r)
    u = r.random()
    if u < 0.03:
        a = r.choice(REFUSALS)
    elif u < 0.05:
        a = "Sure! Here's the answer: " + a
    elif u < 0.07:
        a = a.rstrip(".") + ", and"
    elif u < 0.10:
        q, a = make_pair(random.Random(int.from_bytes(h[:4], "big") % _STOCK))
    elif u < 0.11:
        a += " Write to jane.doe@example.org for help."
    elif u < 0.13 and kind == "qa":
        return " " + q
    elif u < 0.15:
        m = _SHOT_ANSWER.search(prompt)
        a = m.group(1) if m else a
    else:  # a row of its own: words swapped, so templated text shares few 8-grams with the templated seed
        q = edit_words(q, max(1, len(q.split()) // 5), r)
        a = edit_words(a, max(1, len(a.split()) // 4), r)
        a = a if a.endswith((".", "!", "?")) else a + "."
    if kind == "qa":
        return f" {q}\nAnswer: {a}"
    return f" {q}" if kind == "question" else f" {a}"
