"""Read seed data in its source format (refinery, QA table, CosmosQA, SQuAD, HF datasets) into raw records."""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refinery.core.errors import InputError
from refinery.core.io import TABLE_SUFFIXES, Records, check_input, read_json, read_records
from refinery.core.text import find_spans, stable_id

FORMATS = ("refinery", "qa_table", "cosmosqa", "squad", "hf")


@dataclass(frozen=True)
class RawDoc:
    """One source document as read, before normalisation."""

    doc_id: str
    text: str
    file: str
    row: int
    title: str | None = None
    updated_at: str | None = None
    category: str | None = None
    supersedes: str | None = None
    columns: tuple[tuple[str, str], ...] = ()  # (field, the source's column for it) where they differ

    def column(self, name: str) -> str:
        """Return the source's name for field ``name`` (errors name what the user's file calls it)."""
        return dict(self.columns).get(name, name)


@dataclass(frozen=True)
class RawQA:
    """One human QA pair as read; ``evidence`` None means the whole document is the evidence."""

    qa_id: str
    doc_id: str
    question: str
    answer: str
    file: str
    row: int
    intent: str | None = None
    evidence: str | None = None
    evidence_occurrence: int | None = None  # which occurrence of the evidence in the document (SQuAD offsets)
    columns: tuple[tuple[str, str], ...] = ()  # (field, the source's column for it) where they differ

    def column(self, name: str) -> str:
        """Return the source's name for field ``name`` (errors name what the user's file calls it)."""
        return dict(self.columns).get(name, name)


@dataclass(frozen=True)
class RawExcluded:
    """A source row left out on purpose, with a stable reason code."""

    file: str
    row: int
    reason: str
    detail: str
    qa_id: str | None = None
    doc_id: str | None = None
    question: str | None = None
    answer: str | None = None


@dataclass
class SeedSource:
    """Everything an adapter read: documents, QA pairs and rows it excluded with a reason."""

    documents: list[RawDoc] = field(default_factory=list)
    qa: list[RawQA] = field(default_factory=list)
    excluded: list[RawExcluded] = field(default_factory=list)
    path: str = ""  # the input as the user named it (file, folder or hf:<id>)
    ignored_columns: dict[str, list[str]] = field(default_factory=dict)  # file -> columns left unread


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def require_columns(recs: Records, required: Sequence[str]) -> None:
    """Fail naming the first required column the file lacks (with a did-you-mean hint)."""
    for name in required:
        if name not in recs.columns:
            close = difflib.get_close_matches(name, recs.columns, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (found: {', '.join(recs.columns) or 'none'})"
            raise InputError(recs.path, f"required column is missing{hint}", field=name)


def check_columns(recs: Records, known: Sequence[str], policy: str, src: SeedSource) -> None:
    """Fail on columns the format does not read (a misspelt ``supercedes`` would silently lose data).

    Args:
        known: every column the format reads.
        policy: 'error' (fail listing them, with a did-you-mean hint) or 'ignore' (count them in
            ``src.ignored_columns``; ingest's metrics report them).
    """
    unknown = [c for c in recs.columns if c not in known]
    if not unknown:
        return
    if policy == "ignore":
        src.ignored_columns[recs.path] = unknown
        return
    hints = []
    for c in unknown:
        close = difflib.get_close_matches(c, known, n=1)
        hints.append(f"'{c}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    raise InputError(recs.path, f"unknown column(s) {', '.join(hints)}; this format reads {', '.join(known)} "
                                f"(set ingest.unknown_columns: ignore to read the file without them)",
                     field=unknown[0])


def value(recs: Records, i: int, name: str, *, required: bool = True, kind: str = "text") -> str | None:
    """Return row ``i``'s field ``name`` as text; a missing required value fails naming row and field.

    Args:
        kind: 'text' (a string: a number where a question belongs is an error, not turned into "42"),
            'id' (a string or a whole number, e.g. ``"doc_id": 7``) or 'number' (a string or any number).
    """
    raw = recs.rows[i].get(name)
    if _is_missing(raw):
        if required:
            raise InputError(recs.path, "missing value (null/NaN)", row=recs.row_number(i), field=name)
        return None
    allowed = {"text": (str,), "id": (str, int), "number": (str, int, float)}[kind]
    if isinstance(raw, bool) or not isinstance(raw, allowed):
        expected = {"text": "text (a JSON string)", "id": "an id (a string or a whole number)",
                    "number": "a number or text"}[kind]
        raise InputError(recs.path, f"expected {expected}, got {type(raw).__name__} {raw!r:.40}",
                         row=recs.row_number(i), field=name)
    text = str(raw)
    if required and not text.strip():
        raise InputError(recs.path, "empty or whitespace-only", row=recs.row_number(i), field=name)
    return text if text.strip() else None


def _table_in(folder: Path, stem: str) -> Path:
    found = sorted(p for p in folder.iterdir() if p.stem == stem and (p.is_file() or p.is_symlink()))
    if not found:
        raise InputError(str(folder / stem), f"no {stem}.{{csv,jsonl,parquet}} in the seed folder")
    if len(found) > 1:
        raise InputError(str(folder), f"several '{stem}' tables ({', '.join(p.name for p in found)}): keep one")
    if found[0].suffix.lower() not in TABLE_SUFFIXES:
        raise InputError(str(found[0]), f"unknown file format '{found[0].suffix}' (expected one of: "
                                        f"{', '.join(sorted(TABLE_SUFFIXES))})")
    return found[0]


DOC_COLUMNS = ("doc_id", "title", "text", "updated_at", "category", "supersedes")
QA_COLUMNS = ("qa_id", "doc_id", "question", "answer", "intent", "evidence")
QA_TABLE_COLUMNS = ("question", "answer", "context", "qa_id", "id", "title", "intent", "evidence")
COSMOSQA_COLUMNS = ("id", "context", "question", "answer0", "answer1", "answer2", "answer3", "label")


def read_refinery(path: Path, unknown_columns: str = "error") -> SeedSource:
    """Read the native format: a folder with ``documents.*`` and ``qa.*`` (CSV, JSONL or Parquet).

    documents: ``doc_id, title, text, updated_at, category`` (+ optional ``supersedes``);
    qa: ``qa_id, doc_id, question, answer, intent, evidence``.
    """
    if path.is_file():
        raise InputError(str(path), "format 'refinery' expects a folder with documents.* and qa.*")
    check_input(path, "folder", missing="seed folder not found")
    src = SeedSource(path=str(path))
    docs = read_records(_table_in(path, "documents"))
    require_columns(docs, ["doc_id", "title", "text", "updated_at", "category"])
    check_columns(docs, DOC_COLUMNS, unknown_columns, src)
    qa = read_records(_table_in(path, "qa"))
    require_columns(qa, ["qa_id", "doc_id", "question", "answer", "intent", "evidence"])
    check_columns(qa, QA_COLUMNS, unknown_columns, src)
    for i in range(len(docs.rows)):
        src.documents.append(RawDoc(
            doc_id=value(docs, i, "doc_id", kind="id"), text=value(docs, i, "text"), file=docs.path,
            row=docs.row_number(i), title=value(docs, i, "title", required=False),
            updated_at=value(docs, i, "updated_at", required=False),
            category=value(docs, i, "category", required=False),
            supersedes=value(docs, i, "supersedes", required=False, kind="id") if "supersedes" in docs.columns
            else None))
    for i in range(len(qa.rows)):
        src.qa.append(RawQA(
            qa_id=value(qa, i, "qa_id", kind="id"), doc_id=value(qa, i, "doc_id", kind="id"),
            question=value(qa, i, "question"), answer=value(qa, i, "answer"), file=qa.path, row=qa.row_number(i),
            intent=value(qa, i, "intent", required=False), evidence=value(qa, i, "evidence")))
    return src


def _docs_from_contexts(recs: Records, context_col: str, title_col: str | None, src: SeedSource) -> list[str]:
    """Add one document per distinct context; return each row's doc_id."""
    ids, seen = [], set()
    columns = (("text", context_col),) + ((("title", title_col),) if title_col else ())
    for i in range(len(recs.rows)):
        context = value(recs, i, context_col)
        doc_id = stable_id("doc", " ".join(context.split()), length=12)
        ids.append(doc_id)
        if doc_id not in seen:
            seen.add(doc_id)
            title = value(recs, i, title_col, required=False) if title_col else None
            src.documents.append(RawDoc(doc_id=doc_id, text=context, file=recs.path, row=recs.row_number(i),
                                        title=title, columns=columns))
    return ids


def read_qa_table(path: Path, unknown_columns: str = "error") -> SeedSource:
    """Read one table with ``question, answer, context`` (+ optional ``qa_id/id, title, intent, evidence``).

    Each distinct context becomes a document; without ``qa_id`` or ``id``, QA ids are content-derived.
    """
    return qa_table_source(read_records(path), unknown_columns)


def qa_table_source(recs: Records, unknown_columns: str = "error") -> SeedSource:
    """Build a seed source from QA-table records (see :func:`read_qa_table`)."""
    require_columns(recs, ["question", "answer", "context"])
    src = SeedSource(path=recs.path)
    check_columns(recs, QA_TABLE_COLUMNS, unknown_columns, src)
    id_col = "qa_id" if "qa_id" in recs.columns else "id" if "id" in recs.columns else None
    doc_ids = _docs_from_contexts(recs, "context", "title" if "title" in recs.columns else None, src)
    columns = (("qa_id", id_col or "(content-derived id)"), ("doc_id", "context"))
    for i in range(len(recs.rows)):
        q, a = value(recs, i, "question"), value(recs, i, "answer")
        src.qa.append(RawQA(
            qa_id=value(recs, i, id_col, kind="id") if id_col else stable_id("qa", doc_ids[i], q, a, length=12),
            doc_id=doc_ids[i], question=q, answer=a, file=recs.path, row=recs.row_number(i),
            intent=value(recs, i, "intent", required=False) if "intent" in recs.columns else None,
            evidence=value(recs, i, "evidence", required=False) if "evidence" in recs.columns else None,
            columns=columns))
    return src


# Coarse CosmosQA question types (Huang et al. 2019 list causes, effects, facts, counterfactuals, ...),
# used as the intent so splits and rare-class checks have something to stratify on.
_COSMOS_INTENTS = [
    ("counterfactual", re.compile(r"\b(if|would .* have|had .* not|without)\b", re.I)),
    ("cause", re.compile(r"^(why|what (may|might|could|is|was) (be )?(the )?(a )?(possible )?reason|"
                         r"what (may|might|could) have caused|what caused)", re.I)),
    ("effect", re.compile(r"(happen|will .* do|would .* do|after|next|result|consequence)", re.I)),
    ("fact", re.compile(r"^(who|what|which|where|when|how)\b", re.I)),
]
NONE_OF_THE_ABOVE = re.compile(r"^\s*none of the above choices?\s*\.?\s*$", re.I)


def cosmosqa_intent(question: str) -> str:
    """Return a coarse question type for a CosmosQA question (a heuristic on its wording)."""
    for name, pattern in _COSMOS_INTENTS:
        if pattern.search(question):
            return name
    return "other"


def read_cosmosqa(path: Path, *, drop_none_of_the_above: bool = True, unknown_columns: str = "error") -> SeedSource:
    """Read CosmosQA CSV/JSONL: ``id, context, question, answer0..answer3, label``.

    The reference answer is the text of ``answer{label}``; the context is the document and the whole
    context is the evidence. Rows whose correct option is "None of the above choices." carry no usable
    short answer: with ``drop_none_of_the_above`` they are excluded with reason ``ingest_no_reference_answer``.
    """
    recs = read_records(path)
    require_columns(recs, COSMOSQA_COLUMNS)
    src = SeedSource(path=str(path))
    check_columns(recs, COSMOSQA_COLUMNS, unknown_columns, src)
    doc_ids = _docs_from_contexts(recs, "context", None, src)
    for i in range(len(recs.rows)):
        label_text = value(recs, i, "label", kind="number")
        try:
            label = int(float(label_text))
            if label != float(label_text):
                raise ValueError
        except ValueError:
            raise InputError(recs.path, f"'{label_text}' is not an integer option number 0..3",
                             row=recs.row_number(i), field="label") from None
        if not 0 <= label <= 3:
            raise InputError(recs.path, f"{label} is out of range 0..3", row=recs.row_number(i), field="label")
        answer = value(recs, i, f"answer{label}")
        qa_id, question = value(recs, i, "id", kind="id"), value(recs, i, "question")
        if drop_none_of_the_above and NONE_OF_THE_ABOVE.match(answer):
            src.excluded.append(RawExcluded(recs.path, recs.row_number(i), "ingest_no_reference_answer",
                                            f"correct option answer{label} is 'None of the above'", qa_id,
                                            doc_ids[i], question, answer))
            continue
        src.qa.append(RawQA(qa_id=qa_id, doc_id=doc_ids[i], question=question, answer=answer, file=recs.path,
                            row=recs.row_number(i), intent=cosmosqa_intent(question), evidence=None,
                            columns=(("qa_id", "id"), ("answer", f"answer{label}"), ("doc_id", "context"))))
    return src


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentence_around(text: str, start: int, end: int) -> str:
    """Return the sentence(s) of ``text`` that contain the character span [start, end)."""
    bounds = [0] + [m.end() for m in _SENTENCE_END.finditer(text)] + [len(text)]
    s = max(b for b in bounds if b <= start)
    e = min(b for b in bounds if b >= end)
    return text[s:e].strip()


def read_squad(path: Path) -> SeedSource:
    """Read SQuAD-style JSON (``data[].paragraphs[].{context, qas[]}``; v1 and v2).

    The evidence is the sentence around the first answer's ``answer_start``; unanswerable questions
    (v2 ``is_impossible`` or no answers) are excluded with reason ``ingest_unanswerable``.
    Rows are numbered by question in file order; fields are named by their JSON path.
    """
    return squad_source(read_json(path), str(path))


def squad_source(doc: Any, path: str) -> SeedSource:
    """Build a seed source from a parsed SQuAD-style object (see :func:`read_squad`)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise InputError(str(path), "not SQuAD JSON: expected a top-level object with a 'data' list", field="data")
    src, row = SeedSource(path=str(path)), 0
    for a, article in enumerate(doc["data"]):
        title = article.get("title") if isinstance(article, dict) else None
        for p, para in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            where = f"data[{a}].paragraphs[{p}]"
            context = para.get("context") if isinstance(para, dict) else None
            if not isinstance(context, str) or not context.strip():
                raise InputError(str(path), "empty or missing context", row=row + 1, field=f"{where}.context")
            doc_id = stable_id("doc", " ".join(context.split()), length=12)
            src.documents.append(RawDoc(doc_id=doc_id, text=context, file=str(path), row=row + 1, title=title,
                                        columns=(("text", f"{where}.context"), ("title", f"data[{a}].title"))))
            for q, qa in enumerate(para.get("qas", [])):
                row += 1
                qwhere = f"{where}.qas[{q}]"
                question = qa.get("question") if isinstance(qa, dict) else None
                if not isinstance(question, str) or not question.strip():
                    raise InputError(str(path), "empty or missing question", row=row, field=f"{qwhere}.question")
                qa_id = str(qa.get("id") or stable_id("qa", doc_id, question, length=12))
                answers = qa.get("answers") or []
                if qa.get("is_impossible") or not answers:
                    src.excluded.append(RawExcluded(str(path), row, "ingest_unanswerable", "no answer given",
                                                    qa_id, doc_id, question, None))
                    continue
                first = answers[0]
                text, start = first.get("text"), first.get("answer_start")
                if not isinstance(text, str) or not text.strip():
                    raise InputError(str(path), "empty or missing answer text", row=row,
                                     field=f"{qwhere}.answers[0].text")
                evidence, occurrence = None, None
                if isinstance(start, int) and 0 <= start and context[start:start + len(text)] == text:
                    evidence = sentence_around(context, start, start + len(text))
                    # the sentence may stand twice in the paragraph: answer_start says which one is meant
                    spans = find_spans(context, evidence)
                    occurrence = next((k for k, (s0, s1) in enumerate(spans) if s0 <= start < s1), None)
                src.qa.append(RawQA(qa_id=qa_id, doc_id=doc_id, question=question, answer=text, file=str(path),
                                    row=row, evidence=evidence, evidence_occurrence=occurrence,
                                    columns=(("qa_id", f"{qwhere}.id"), ("question", f"{qwhere}.question"),
                                             ("answer", f"{qwhere}.answers[0].text"),
                                             ("evidence", f"{qwhere}.answers[0].answer_start"))))
    if not src.qa and not src.excluded:
        raise InputError(str(path), "empty file (no questions)")
    return src


def read_hf(dataset_id: str, split: str, unknown_columns: str = "error", revision: str | None = None) -> SeedSource:
    """Read a Hugging Face ``datasets`` id, or a local dataset folder (needs the ``datasets`` package).

    An id not in the local cache needs network access to the hub: offline (``HF_HUB_OFFLINE=1``, or no route)
    that is said in one line. SQuAD-like columns (``context, question, answers``) or QA-table columns
    (``context, question, answer``).
    """
    where = f"hf:{dataset_id}" + (f"@{revision}" if revision else "")
    try:
        import datasets  # noqa: F401  (optional dependency)
    except ImportError:
        raise InputError(where, "format 'hf' needs the `datasets` package (pip install datasets) "
                                "and network access to the Hugging Face hub") from None
    try:
        ds = datasets.load_dataset(dataset_id, split=split, revision=revision)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; report in one line, never swallow
        text = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False") \
            or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0", "false", "False")
        if offline or any(w in text for w in ("Connection", "offline", "Couldn't reach", "resolve", "Network")):
            raise InputError(where, "format 'hf' needs network access to the Hugging Face hub for a dataset "
                                    "that is not in the local cache" + (" (HF_HUB_OFFLINE is set)" if offline else "")
                                    + f": {text}") from None
        raise InputError(where, f"cannot load split '{split}' ({text})") from None
    rows = ds.to_list()
    if rows and "answers" in rows[0]:
        squad = {"data": [{"title": r.get("title"), "paragraphs": [{"context": r["context"], "qas": [
            {"id": r.get("id"), "question": r["question"],
             "answers": [{"text": t, "answer_start": s} for t, s in
                         zip(r["answers"].get("text", []), r["answers"].get("answer_start", []))]}]}]}
            for r in rows]}
        return squad_source(squad, where)
    return qa_table_source(Records(where, tuple(rows[0]) if rows else (), rows), unknown_columns)


def read_source(fmt: str, path: str, *, hf_split: str = "train", drop_none_of_the_above: bool = True,
                unknown_columns: str = "error", hf_revision: str | None = None) -> SeedSource:
    """Dispatch to the adapter for ``fmt``.

    Args:
        unknown_columns: 'error' (a column the format does not read stops ingest, listing it) or 'ignore'.

    Raises:
        InputError: unknown format, or any problem the adapter finds, naming file, row and field.
    """
    if fmt == "hf":
        return read_hf(path.removeprefix("hf:"), hf_split, unknown_columns, hf_revision)
    p = Path(path)
    if fmt == "refinery":
        return read_refinery(p, unknown_columns)
    if fmt == "qa_table":
        return read_qa_table(p, unknown_columns)
    if fmt == "cosmosqa":
        return read_cosmosqa(p, drop_none_of_the_above=drop_none_of_the_above, unknown_columns=unknown_columns)
    if fmt == "squad":
        return read_squad(check_input(p))
    raise InputError(str(p), f"unknown format '{fmt}' (expected one of: {', '.join(FORMATS)})")
