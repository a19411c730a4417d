#!/usr/bin/env python3
"""Validate the refinery demo seed corpus (data/00_seed) and print its counts.

Stdlib only. Usage:

    python3 data/00_seed/check_seed.py [SEED_DIR]

Checks documents.jsonl and qa.jsonl against the rules in README.md and exits
with status 1 if any rule is violated (every violation is listed on stderr).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from collections import Counter
from pathlib import Path

DOC_KEYS = {"doc_id", "title", "text", "updated_at", "category", "supersedes"}
QA_KEYS = {"qa_id", "doc_id", "question", "answer", "intent", "evidence"}

CATEGORIES = ("help_center", "policy", "release_notes", "troubleshooting", "billing", "api")
COMMON_INTENTS = ("how_to", "troubleshooting", "billing", "account_access", "feature_info",
                  "policy", "integration", "data_privacy")
RARE_INTENTS = ("accessibility", "legal_request", "escalation")
INTENTS = COMMON_INTENTS + RARE_INTENTS

DOC_ID_RE = re.compile(r"^kb-\d{3}$")
QA_ID_RE = re.compile(r"^qa-\d{4}$")
DATE_MIN, DATE_MAX = dt.date(2023, 1, 1), dt.date(2026, 12, 31)

# word-count bounds (whitespace-separated tokens), inclusive
DOC_WORDS = (90, 260)
QUESTION_WORDS = (5, 40)
ANSWER_WORDS = (6, 60)
EVIDENCE_WORDS = (8, 60)

QA_PER_DOC = (2, 6)          # every document
QA_PER_STALE_DOC = (2, 3)    # documents that a newer document supersedes
EXPECTED_STALE = 4
RARE_MAX_SHARE = 0.05        # each rare intent must be < 5% of QA rows
RARE_ROWS = (5, 9)           # and have between 5 and 9 rows
NGRAM = 8                    # answer/evidence overlap run length
MAX_OVERLAP_SHARE = 0.15     # at most 15% of answers may share an 8-word run
MIN_NON_ASCII_DOCS = 3


def words(s: str) -> int:
    return len(s.split())


def tokens(s: str) -> list[str]:
    return re.findall(r"\w+", s.lower())


def shares_run(a: str, b: str, n: int = NGRAM) -> bool:
    ta, tb = tokens(a), tokens(b)
    grams = {tuple(tb[i:i + n]) for i in range(len(tb) - n + 1)}
    return any(tuple(ta[i:i + n]) in grams for i in range(len(ta) - n + 1))


def load_jsonl(path: Path, errors: list[str]) -> list[dict]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        errors.append(f"{path.name}: not valid UTF-8 ({e})")
        return []
    if text.startswith("\ufeff"):
        errors.append(f"{path.name}: has a byte-order mark")
    if not text.endswith("\n"):
        errors.append(f"{path.name}: missing final newline")
    if "\r" in text:
        errors.append(f"{path.name}: contains CR characters (expected LF line endings)")
    rows = []
    for n, line in enumerate(text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"), 1):
        if not line.strip():
            errors.append(f"{path.name}:{n}: blank line")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"{path.name}:{n}: invalid JSON ({e})")
            continue
        if not isinstance(obj, dict):
            errors.append(f"{path.name}:{n}: not a JSON object")
            continue
        if re.search(r"(?<!\\)\\u[0-9a-fA-F]{4}", line):
            errors.append(f"{path.name}:{n}: \\u escape found; write with ensure_ascii=False")
        rows.append(obj)
    return rows


def check_bounds(errors, where, field, value, bounds):
    n = words(value)
    if not bounds[0] <= n <= bounds[1]:
        errors.append(f"{where}: {field} has {n} words, expected {bounds[0]}-{bounds[1]}")


def main(argv: list[str]) -> int:
    seed = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent
    errors: list[str] = []
    docs = load_jsonl(seed / "documents.jsonl", errors)
    qas = load_jsonl(seed / "qa.jsonl", errors)

    # ---------------- documents ----------------
    by_id: dict[str, dict] = {}
    dates: dict[str, dt.date] = {}
    for i, d in enumerate(docs, 1):
        where = f"documents.jsonl row {i} ({d.get('doc_id')})"
        if set(d) != DOC_KEYS:
            errors.append(f"{where}: keys {sorted(d)} != {sorted(DOC_KEYS)}")
            continue
        did = d["doc_id"]
        if not isinstance(did, str) or not DOC_ID_RE.match(did):
            errors.append(f"{where}: bad doc_id {did!r}")
        if did in by_id:
            errors.append(f"{where}: duplicate doc_id {did}")
        by_id[did] = d
        for k in ("title", "text"):
            if not isinstance(d[k], str) or not d[k].strip() or d[k] != d[k].strip():
                errors.append(f"{where}: {k} must be a non-empty trimmed string")
        if isinstance(d["text"], str):
            check_bounds(errors, where, "text", d["text"], DOC_WORDS)
            if "  " in d["text"] or "\n" in d["text"]:
                errors.append(f"{where}: text has double spaces or newlines")
        if d["category"] not in CATEGORIES:
            errors.append(f"{where}: unknown category {d['category']!r}")
        try:
            date = dt.date.fromisoformat(d["updated_at"])
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", d["updated_at"]):
                raise ValueError
            if not DATE_MIN <= date <= DATE_MAX:
                errors.append(f"{where}: updated_at {date} outside {DATE_MIN}..{DATE_MAX}")
            dates[did] = date
        except (TypeError, ValueError):
            errors.append(f"{where}: updated_at {d['updated_at']!r} is not YYYY-MM-DD")
        if d["supersedes"] is not None and not isinstance(d["supersedes"], str):
            errors.append(f"{where}: supersedes must be null or a doc_id string")

    stale: dict[str, str] = {}  # old doc_id -> newer doc_id
    for did, d in by_id.items():
        old = d.get("supersedes")
        if old is None:
            continue
        if old not in by_id:
            errors.append(f"{did}: supersedes unknown doc {old}")
            continue
        if old == did:
            errors.append(f"{did}: supersedes itself")
        if old in stale:
            errors.append(f"{did}: {old} is already superseded by {stale[old]}")
        if did in dates and old in dates and not dates[old] < dates[did]:
            errors.append(f"{did} ({dates[did]}) supersedes {old} ({dates[old]}) which is not older")
        if by_id[old].get("supersedes") is not None:
            errors.append(f"{did}: superseded doc {old} itself supersedes something (chains not allowed)")
        if by_id[old].get("category") != d.get("category"):
            errors.append(f"{did}: category differs from superseded doc {old}")
        stale[old] = did
    if len(stale) != EXPECTED_STALE:
        errors.append(f"expected {EXPECTED_STALE} superseded (stale) documents, found {len(stale)}")

    non_ascii_docs = [did for did, d in by_id.items()
                      if any(ord(c) > 127 for c in d.get("title", "") + d.get("text", ""))]
    if len(non_ascii_docs) < MIN_NON_ASCII_DOCS:
        errors.append(f"only {len(non_ascii_docs)} documents contain non-ASCII text, need >= {MIN_NON_ASCII_DOCS}")

    # ---------------- QA pairs ----------------
    qa_ids: set[str] = set()
    seen_q: dict[str, str] = {}
    per_doc: Counter = Counter()
    intents: Counter = Counter()
    overlapping: list[str] = []
    for i, q in enumerate(qas, 1):
        where = f"qa.jsonl row {i} ({q.get('qa_id')})"
        if set(q) != QA_KEYS:
            errors.append(f"{where}: keys {sorted(q)} != {sorted(QA_KEYS)}")
            continue
        if not all(isinstance(q[k], str) and q[k].strip() and q[k] == q[k].strip() for k in QA_KEYS):
            errors.append(f"{where}: every field must be a non-empty trimmed string")
            continue
        if not QA_ID_RE.match(q["qa_id"]):
            errors.append(f"{where}: bad qa_id")
        if q["qa_id"] in qa_ids:
            errors.append(f"{where}: duplicate qa_id")
        qa_ids.add(q["qa_id"])
        doc = by_id.get(q["doc_id"])
        if doc is None:
            errors.append(f"{where}: doc_id {q['doc_id']} not in documents.jsonl")
        elif q["evidence"] not in doc["text"]:
            errors.append(f"{where}: evidence is not a verbatim substring of {q['doc_id']} text")
        per_doc[q["doc_id"]] += 1
        if q["intent"] not in INTENTS:
            errors.append(f"{where}: unknown intent {q['intent']!r}")
        intents[q["intent"]] += 1
        check_bounds(errors, where, "question", q["question"], QUESTION_WORDS)
        check_bounds(errors, where, "answer", q["answer"], ANSWER_WORDS)
        check_bounds(errors, where, "evidence", q["evidence"], EVIDENCE_WORDS)
        norm_q = " ".join(tokens(q["question"]))
        if norm_q in seen_q:
            errors.append(f"{where}: question duplicates {seen_q[norm_q]}")
        seen_q[norm_q] = q["qa_id"]
        if " ".join(tokens(q["answer"])) == " ".join(tokens(q["evidence"])):
            errors.append(f"{where}: answer is a verbatim copy of the evidence")
        if shares_run(q["answer"], q["evidence"]):
            overlapping.append(q["qa_id"])

    for did in by_id:
        lo, hi = QA_PER_STALE_DOC if did in stale else QA_PER_DOC
        if not lo <= per_doc[did] <= hi:
            kind = "stale doc" if did in stale else "doc"
            errors.append(f"{kind} {did} has {per_doc[did]} QA pairs, expected {lo}-{hi}")

    total = len(qas)
    for r in RARE_INTENTS:
        share = intents[r] / total if total else 0
        if not share < RARE_MAX_SHARE or not RARE_ROWS[0] <= intents[r] <= RARE_ROWS[1]:
            errors.append(f"rare intent {r}: {intents[r]} rows ({share:.1%}), expected "
                          f"{RARE_ROWS[0]}-{RARE_ROWS[1]} rows and < {RARE_MAX_SHARE:.0%}")
    for c in COMMON_INTENTS:
        if intents[c] == 0:
            errors.append(f"common intent {c} has no rows")
    overlap_share = len(overlapping) / total if total else 0
    if overlap_share > MAX_OVERLAP_SHARE:
        errors.append(f"{overlap_share:.1%} of answers share an {NGRAM}-word run with their evidence "
                      f"(max {MAX_OVERLAP_SHARE:.0%})")

    # ---------------- report ----------------
    cats = Counter(d.get("category") for d in docs)
    print(f"documents.jsonl: {len(docs)} documents")
    for c in CATEGORIES:
        print(f"  category {c:<16} {cats[c]:>4}")
    print(f"  stale (superseded) documents: {len(stale)}")
    for old, new in sorted(stale.items()):
        print(f"    {old} ({by_id[old]['updated_at']}) -> superseded by {new} ({by_id[new]['updated_at']})"
              f"  [{by_id[new]['title']}]")
    print(f"  documents with non-ASCII characters: {len(non_ascii_docs)} ({', '.join(sorted(non_ascii_docs))})")
    print(f"qa.jsonl: {total} QA pairs over {len(per_doc)} documents "
          f"(min {min(per_doc.values(), default=0)}, max {max(per_doc.values(), default=0)} per document)")
    for name in INTENTS:
        tag = " (rare)" if name in RARE_INTENTS else ""
        share = intents[name] / total if total else 0
        print(f"  intent {name:<16} {intents[name]:>4}  {share:6.1%}{tag}")
    print(f"  QA pairs on stale documents: {sum(per_doc[d] for d in stale)}")
    print(f"  answers sharing an {NGRAM}-word run with their evidence: "
          f"{len(overlapping)}/{total} = {overlap_share:.1%}"
          + (f" ({', '.join(overlapping)})" if overlapping else ""))

    if errors:
        print(f"\nFAILED: {len(errors)} problem(s)", file=sys.stderr)
        for e in errors:
            print(f"  - {e}", file=sys.stderr)
        return 1
    print("\nOK: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
