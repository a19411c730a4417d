"""Read human review decisions back: a Label Studio JSON export or Argilla records, one verdict per row.

The review stage exports a sample of synthetic rows (``label_studio_tasks.json``, ``argilla_records.jsonl``) with a
``verdict`` question (accept | reject | fix) and a ``corrected_answer``. What reviewers decided comes back here as
:class:`Decision` rows that assemble applies: a rejected row leaves every arm, a fixed row is replaced by its
corrected answer once every gate has judged it again.

Accepted shapes (detected per file):
- Label Studio's JSON export: a list of tasks ``{"data": {"row_id": ...}, "annotations": [{"result": [...]}]}``;
  the newest annotation that was not cancelled counts.
- Argilla 2.x records, as ``dataset.records.to_list(flatten=True)`` or ``to_json`` writes them (JSON list or
  JSON lines): ``{"id": row_id, "verdict.responses": [...], "corrected_answer.responses": [...]}``, or the nested
  ``{"id": ..., "responses": {"verdict": [{"value": ...}], ...}}``; the last submitted response counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refinery.core.errors import InputError

VERDICTS = ("accept", "reject", "fix")


@dataclass(frozen=True)
class Decision:
    """One reviewer decision on one row.

    Attributes:
        row_id: the reviewed row.
        verdict: accept | reject | fix.
        corrected_answer: the reviewer's answer (``fix`` only).
        where: file and record number, for messages and the decisions table.
    """

    row_id: str
    verdict: str
    corrected_answer: str | None
    where: str


def _records(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
        out = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(str(path), f"not JSON nor JSON lines ({e.msg})", row=i + 1) from None
        return out
    if isinstance(data, dict):
        data = data.get("records", data.get("tasks", [data]))
    if not isinstance(data, list):
        raise InputError(str(path), "expected a list of Label Studio tasks or Argilla records")
    return data


def _label_studio(task: dict, where: str) -> tuple[str | None, str | None] | None:
    """(verdict, corrected answer) of the newest annotation that was not cancelled; None when none."""
    annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not annotations:
        return None
    newest = max(enumerate(annotations), key=lambda ia: (str(ia[1].get("updated_at") or ""), ia[0]))[1]
    verdict = corrected = None
    for item in newest.get("result") or []:
        value = item.get("value") or {}
        if item.get("from_name") == "verdict":
            choices = value.get("choices") or []
            verdict = choices[0] if choices else None
        elif item.get("from_name") == "corrected_answer":
            texts = value.get("text") or []
            corrected = "\n".join(str(t) for t in texts) if texts else None
    return verdict, corrected


def _argilla_value(record: dict, name: str) -> Any:
    flat = record.get(f"{name}.responses")
    if flat is not None:
        values = [v.get("value") if isinstance(v, dict) else v for v in flat]
    else:
        nested = (record.get("responses") or {}).get(name) or []
        values = [v.get("value") for v in nested if isinstance(v, dict) and v.get("status", "submitted") == "submitted"]
    values = [v for v in values if v not in (None, "")]
    return values[-1] if values else None


def read_decisions(path: str | Path) -> list[Decision]:
    """Read review decisions from a Label Studio export or Argilla records (see the module docstring).

    Records with no decision yet are skipped. When a row is decided more than once, the last record counts.

    Raises:
        InputError: naming the file, the record and the field: an unknown verdict, a ``fix`` without an answer, a
            record without a row id.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "file not found (the review decisions file; an empty list '[]' means none)")
    out: dict[str, Decision] = {}
    for i, rec in enumerate(_records(path)):
        where = f"{path}, record {i + 1}"
        if not isinstance(rec, dict):
            raise InputError(str(path), "a record is not a JSON object", row=i + 1)
        if "annotations" in rec or "data" in rec:
            row_id = (rec.get("data") or {}).get("row_id")
            found = _label_studio(rec, where)
            if found is None:
                continue
            verdict, corrected = found
            field = "annotations.result.verdict"
        else:
            row_id = rec.get("id") or (rec.get("fields") or {}).get("row_id") or rec.get("row_id")
            verdict, corrected = _argilla_value(rec, "verdict"), _argilla_value(rec, "corrected_answer")
            if verdict is None:
                continue
            field = "verdict"
        if not row_id:
            raise InputError(str(path), "a decided record names no row (data.row_id / id)", row=i + 1,
                             field="row_id")
        if verdict not in VERDICTS:
            raise InputError(str(path), f"verdict {verdict!r} is not one of {', '.join(VERDICTS)}", row=i + 1,
                             field=field)
        corrected = corrected.strip() if isinstance(corrected, str) else None
        if verdict == "fix" and not corrected:
            raise InputError(str(path), "verdict 'fix' without a corrected answer", row=i + 1,
                             field="corrected_answer")
        out[str(row_id)] = Decision(str(row_id), verdict, corrected if verdict == "fix" else None, where)
    return list(out.values())
