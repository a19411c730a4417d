"""Build the static review page and the human-review sample export from gated, recovered and dataset rows."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from typing import Any

import pyarrow as pa

from refinery.inspect.trace import gate_verdicts

ROW_FIELDS = ("row_id", "origin", "strategy", "intent", "question", "answer", "evidence", "doc_id", "evidence_start",
              "evidence_end", "teacher", "prompt_template", "attempt", "recovery_action", "recovery_method",
              "diagnosis", "diagnosis_confidence", "gate_keep", "gate_reasons", "weight", "source", "parent_ids")
SYNTHETIC_ORIGINS = ("synthetic", "recovered")
MAX_LINEAGE = 8


@dataclass(frozen=True)
class SampleSpec:
    """Which rows go to human review (governance brief: at least 20% of rare-class synthetic rows).

    Attributes:
        seed: orders candidate rows by sha256(seed, row_id), so a sample is stable as rows are added.
        rare_max_share: an intent is rare when its share of human seed rows is below this.
        rare_share: share of each rare intent's synthetic rows sampled (rounded up).
        other_share: share of the other synthetic rows sampled (rounded up).
    """

    seed: int = 3
    rare_max_share: float = 0.05
    rare_share: float = 0.2
    other_share: float = 0.05


def _status(dataset: str) -> str:
    """Name a row's place from its file: data/04_gated/rejected.parquet -> rejected."""
    return dataset.rsplit("/", 1)[-1].removesuffix(".parquet")


def _clean(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


def collect_rows(tables: dict[str, pa.Table]) -> dict[str, dict]:
    """Merge every table's rows by ``row_id``: fields from the first table that has them, all places kept.

    Args:
        tables: ``{dataset name: table}``, in precedence order (a row's status is its first dataset's).

    Returns:
        ``{row_id: record}`` with ``datasets``, ``status``, the ROW_FIELDS present and ``gates``.
    """
    rows: dict[str, dict] = {}
    for name, table in tables.items():
        for r in table.to_pylist():
            rec = rows.setdefault(r["row_id"], {"datasets": [], "status": _status(name), "gates": {}, "weights": {}})
            rec["datasets"].append(name)
            for f in ROW_FIELDS:
                if rec.get(f) is None and r.get(f) is not None:
                    rec[f] = _clean(r[f])
            if not rec["gates"]:
                rec["gates"] = {g: {k: _clean(v) for k, v in d.items()} for g, d in gate_verdicts(r).items()}
            if r.get("weight") is not None:
                rec["weights"][name] = _clean(r["weight"])
    return rows


def lineage(row_id: str, graph: dict[str, dict]) -> list[dict]:
    """Return the chain of ancestors of ``row_id`` (breadth first, nearest first), from a ``row_id -> row`` map."""
    out, seen, frontier = [], {row_id}, list((graph.get(row_id) or {}).get("parent_ids") or [])
    depth = 1
    while frontier and depth <= MAX_LINEAGE:
        nxt = []
        for rid in frontier:
            if rid in seen:
                continue
            seen.add(rid)
            node = graph.get(rid)
            out.append({"row_id": rid, "depth": depth, "found": node is not None,
                        **({k: node.get(k) for k in ("origin", "strategy", "status", "question", "recovery_action",
                                                     "diagnosis")} if node else {})})
            nxt += list((node or {}).get("parent_ids") or [])
        frontier, depth = nxt, depth + 1
    return out


def _order(seed: int, row_id: str) -> str:
    return hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()


def rare_intents(seeds: pa.Table | None, rows: dict[str, dict], max_share: float) -> list[str]:
    """Intents whose share of human seed rows (or of all rows when no seed table is given) is below ``max_share``."""
    intents = seeds.column("intent").to_pylist() if seeds is not None and "intent" in seeds.column_names \
        else [r.get("intent") for r in rows.values()]
    counts = Counter(i for i in intents if i is not None)
    total = sum(counts.values())
    return sorted(i for i, n in counts.items() if total and n / total < max_share)


def review_sample(rows: dict[str, dict], rare: list[str], spec: SampleSpec) -> dict[str, Any]:
    """Pick the rows for human review: ceil(rare_share) of each rare intent's synthetic rows, ceil(other_share)
    of the others; deterministic in ``spec.seed``.

    Returns:
        ``{"row_ids": [...], "per_class": {intent: {"rows", "sampled", "share"}}}``.
    """
    groups: dict[str, list[str]] = {}
    for rid, r in rows.items():
        if r.get("origin") in SYNTHETIC_ORIGINS:
            groups.setdefault(r.get("intent") or "(none)", []).append(rid)
    picked, per_class = [], {}
    for intent, ids in sorted(groups.items()):
        share = spec.rare_share if intent in rare else spec.other_share
        k = min(len(ids), math.ceil(share * len(ids)))
        chosen = sorted(ids, key=lambda rid: _order(spec.seed, rid))[:k]
        picked += chosen
        per_class[intent] = {"rare": intent in rare, "rows": len(ids), "sampled": k,
                             "share": round(k / len(ids), 4) if ids else 0.0}
    return {"row_ids": sorted(picked, key=lambda rid: _order(spec.seed, rid)), "per_class": per_class}


def build_review(tables: dict[str, pa.Table], documents: pa.Table | None, seeds: pa.Table | None,
                 spec: SampleSpec = SampleSpec()) -> dict[str, Any]:
    """Assemble the page's data: rows with gates, lineage and evidence; documents; the review sample.

    Args:
        tables: rows to review ``{dataset name: table}`` (gated accepted/rejected, recovered, datasets ...).
        documents: the documents table (``doc_id``, ``title``, ``text``), for evidence passages.
        seeds: human seed rows (split tables), for lineage and the rare-intent shares.
        spec: how the human-review sample is drawn.

    Returns:
        ``{"rows": [...], "documents": {doc_id: {title, text}}, "gates": [...], "sample": {...}, "rare": [...]}``.
    """
    rows = collect_rows(tables)
    graph = dict(rows)
    if seeds is not None:
        for r in seeds.to_pylist():
            graph.setdefault(r["row_id"], {**{f: r.get(f) for f in ROW_FIELDS}, "status": "seed"})
    rare = rare_intents(seeds, rows, spec.rare_max_share)
    sample = review_sample(rows, rare, spec)
    in_sample = set(sample["row_ids"])
    docs_needed = {r.get("doc_id") for r in graph.values()}
    docs = {}
    if documents is not None:
        for d in documents.select([c for c in ("doc_id", "title", "text") if c in documents.column_names]).to_pylist():
            if d["doc_id"] in docs_needed:
                docs[d["doc_id"]] = {"title": d.get("title"), "text": d.get("text") or ""}
    gates: list[str] = []
    out_rows = []
    for rid, r in rows.items():
        for g in r["gates"]:
            if g not in gates:
                gates.append(g)
        span = (r.get("evidence_start"), r.get("evidence_end"))
        if span[0] is None and rid in graph:  # fall back on the nearest ancestor with a span
            for step in lineage(rid, graph):
                node = graph.get(step["row_id"]) or {}
                if node.get("evidence_start") is not None:
                    span = (node["evidence_start"], node["evidence_end"])
                    break
        out_rows.append({**{k: v for k, v in r.items() if k not in ("evidence_start", "evidence_end")},
                         "span": list(span) if span[0] is not None else None,
                         "failed_gates": [g for g, v in r["gates"].items() if v.get("keep") is False],
                         "lineage": lineage(rid, graph), "in_sample": rid in in_sample,
                         "rare": (r.get("intent") in rare)})
    return {"rows": out_rows, "documents": docs, "gates": gates, "sample": sample, "rare": rare,
            "spec": {"seed": spec.seed, "rare_max_share": spec.rare_max_share, "rare_share": spec.rare_share,
                     "other_share": spec.other_share}}


def _passage(row: dict, docs: dict[str, dict]) -> str:
    doc = docs.get(row.get("doc_id") or "")
    if doc and row.get("span"):
        return doc["text"]
    return row.get("evidence") or ""


def label_studio_tasks(data: dict) -> list[dict]:
    """The review sample as Label Studio tasks (import the JSON file; see LABEL_STUDIO_CONFIG)."""
    by_id = {r["row_id"]: r for r in data["rows"]}
    tasks = []
    for rid in data["sample"]["row_ids"]:
        r = by_id[rid]
        doc = data["documents"].get(r.get("doc_id") or "", {})
        start, end = (r["span"] or [None, None])
        evidence = doc["text"][start:end] if doc and start is not None else (r.get("evidence") or "")
        tasks.append({
            "data": {"row_id": rid, "question": r.get("question") or "", "answer": r.get("answer") or "",
                     "evidence": evidence, "passage": _passage(r, data["documents"]), "intent": r.get("intent"),
                     "strategy": r.get("strategy"), "status": r.get("status"),
                     "gate_reasons": ", ".join(r.get("gate_reasons") or [])},
            "meta": {"origin": r.get("origin"), "rare": r["rare"], "datasets": r["datasets"],
                     "gates": {g: v.get("score") for g, v in r["gates"].items()}},
            "predictions": [gate_prediction(r)],
        })
    return tasks


def gate_prediction(row: dict) -> dict:
    """The gates' verdict on a row as a Label Studio prediction of the ``verdict`` choice (pre-filled for reviewers).

    ``accept`` when every gate that ran kept the row, else ``reject``; the score is the share of gates that kept it.
    """
    verdicts = [v.get("keep") for v in row["gates"].values() if v.get("keep") is not None]
    kept = sum(bool(k) for k in verdicts)
    choice = "accept" if verdicts and kept == len(verdicts) else "reject"
    return {"model_version": "refinery-gates", "score": round(kept / len(verdicts), 4) if verdicts else None,
            "result": [{"from_name": "verdict", "to_name": "answer", "type": "choices",
                        "value": {"choices": [choice]}}]}


def argilla_records(data: dict) -> list[dict]:
    """The review sample as Argilla 2.x records (``rg.Record.from_dict`` shape; log them into a dataset created
    from :data:`ARGILLA_SETTINGS`), the gates' verdict offered as the ``verdict`` suggestion."""
    out = []
    for task in label_studio_tasks(data):
        d, pred = task["data"], task["predictions"][0]
        out.append({"id": d["row_id"],
                    "fields": {"question": d["question"], "answer": d["answer"], "evidence": d["evidence"] or "-"},
                    "metadata": {"intent": d["intent"] or "", "strategy": d["strategy"] or "",
                                 "status": d["status"] or "", "gate_reasons": d["gate_reasons"] or "none",
                                 "origin": task["meta"]["origin"] or "", "rare": str(bool(task["meta"]["rare"])).lower()},
                    "suggestions": {"verdict": {"value": pred["result"][0]["value"]["choices"][0],
                                                "score": pred["score"], "agent": pred["model_version"]}},
                    "responses": {}, "vectors": {}, "status": "pending"})
    return out


LABEL_STUDIO_CONFIG = """<View>
  <Header value="Is this synthetic QA row correct and supported by the evidence?"/>
  <Text name="question" value="$question"/>
  <Text name="answer" value="$answer"/>
  <Header value="Evidence"/>
  <Text name="evidence" value="$evidence"/>
  <Header value="Gates (their verdict is pre-filled as a prediction)"/>
  <Text name="gate_reasons" value="$gate_reasons"/>
  <Choices name="verdict" toName="answer" choice="single" showInline="true" required="true">
    <Choice value="accept"/>
    <Choice value="reject"/>
    <Choice value="fix"/>
  </Choices>
  <TextArea name="corrected_answer" toName="answer" placeholder="Corrected answer (when 'fix')"/>
</View>
"""

def _argilla_property(name: str, settings: dict, *, required: bool | None = None, kind: str | None = None) -> dict:
    out = {"name": name, "title": name, "description": None, "settings": settings}
    if required is not None:
        out["required"] = required
    if kind is not None:
        out["type"] = kind
    return out


# Argilla 2.x serialised dataset settings (what ``rg.Settings.to_json`` writes and ``rg.Settings.from_json`` reads)
ARGILLA_SETTINGS = {
    "guidelines": "Is this synthetic QA row correct and supported by the evidence? accept, reject, or fix it (then "
                  "write the corrected answer). The gates' verdict is offered as a suggestion.",
    "fields": [_argilla_property(n, {"type": "text", "use_markdown": False}, required=n != "evidence", kind="text")
               for n in ("question", "answer", "evidence")],
    "questions": [
        _argilla_property("verdict", {"type": "label_selection", "visible_options": 3,
                                      "options": [{"text": v, "value": v} for v in ("accept", "reject", "fix")]},
                          required=True, kind="label_selection"),
        _argilla_property("corrected_answer", {"type": "text", "use_markdown": False}, required=False, kind="text"),
    ],
    "vectors": [],
    "metadata": [{**_argilla_property(n, {"type": "terms", "values": None, "visible_for_annotators": True}),
                  "visible_for_annotators": True}
                 for n in ("intent", "strategy", "status", "gate_reasons", "origin", "rare")],
    "allow_extra_metadata": False,
    "distribution": {"strategy": "overlap", "min_submitted": 1},
    "mapping": None,
}


def render_html(data: dict, title: str = "refinery review") -> str:
    """Return the single self-contained page: the template with the data embedded as JSON (no network)."""
    template = resources.files("refinery.inspect").joinpath("templates/review.html").read_text(encoding="utf-8")
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)
    blob = blob.replace("</", "<\\/").replace("<!--", "<\\!--")
    return template.replace("__TITLE__", title).replace("__REVIEW_DATA__", blob)
