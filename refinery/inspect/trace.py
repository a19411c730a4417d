"""Trace a row's lineage back to its human seed rows and source document span, and forward to where it ended."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from refinery.inspect.artifacts import Snapshot, columns, repo_root
from refinery.core.errors import RefineryError

STEP_FIELDS = ("origin", "strategy", "teacher", "prompt_template", "gen_params", "attempt", "recovery_action",
               "recovery_method", "diagnosis", "diagnosis_confidence", "outcome", "recovered_row_id", "doc_id",
               "evidence_start", "evidence_end", "intent", "question", "answer", "gate_keep", "gate_reasons",
               "weight", "source", "split", "injection_kind", "parent_ids")
MAX_DEPTH = 32


@dataclass(frozen=True)
class Sources:
    """Where rows and documents are read from.

    Attributes:
        rows: ``{dataset name: Parquet file}`` of tables with a ``row_id`` column.
        documents: ``{name: Parquet file}`` of tables with ``doc_id`` and ``text`` columns.
    """

    rows: dict[str, Path]
    documents: dict[str, Path]

    @classmethod
    def from_files(cls, files: dict[str, Path]) -> Sources:
        """Sort artifact files into row tables and document tables by their columns."""
        rows, docs = {}, {}
        for name, path in files.items():
            cols = columns(path)
            if "row_id" in cols:
                rows[name] = path
            elif "doc_id" in cols and "text" in cols:
                docs[name] = path
        return cls(rows, docs)


def _lit(value: Any) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    return value


class Lineage:
    """Row lookups by id, parent and child over every row table, with one DuckDB connection."""

    def __init__(self, sources: Sources):
        import duckdb

        self.sources = sources
        self.con = duckdb.connect()
        self.cols = {name: columns(p) for name, p in sources.rows.items()}

    def rows(self, ids: list[str]) -> dict[str, list[tuple[str, dict]]]:
        """Return ``{row_id: [(dataset, row), ...]}`` for every table holding one of ``ids``."""
        found: dict[str, list[tuple[str, dict]]] = {}
        if not ids:
            return found
        for name, path in self.sources.rows.items():
            res = self.con.execute(f"SELECT * FROM read_parquet({_lit(path)}) WHERE row_id IN (SELECT unnest(?))",
                                   [ids])
            names = [d[0] for d in res.description]
            for r in res.fetchall():
                row = dict(zip(names, map(_clean, r)))
                found.setdefault(row["row_id"], []).append((name, row))
        return found

    def children(self, ids: list[str]) -> dict[str, list[str]]:
        """Return ``{parent row_id: [child row_id, ...]}`` from every table's ``parent_ids``."""
        out: dict[str, set[str]] = {}
        for name, path in self.sources.rows.items():
            if "parent_ids" not in self.cols[name] or not ids:
                continue
            for child, parents in self.con.execute(
                    f"SELECT row_id, parent_ids FROM read_parquet({_lit(path)}) "
                    f"WHERE list_has_any(parent_ids, CAST(? AS VARCHAR[]))", [ids]).fetchall():
                for p in parents or []:
                    if p in ids:
                        out.setdefault(p, set()).add(child)
        return {k: sorted(v) for k, v in out.items()}

    def document(self, doc_id: str) -> dict | None:
        """Return a source document's row, or None."""
        for path in self.sources.documents.values():
            res = self.con.execute(f"SELECT * FROM read_parquet({_lit(path)}) WHERE doc_id = ? LIMIT 1", [doc_id])
            names = [d[0] for d in res.description]
            r = res.fetchone()
            if r:
                return dict(zip(names, r))
        return None


def gate_verdicts(row: dict) -> dict[str, dict]:
    """Return ``{gate: {keep, score, reason}}`` from a gated row's ``<gate>_keep/_score/_reason`` columns."""
    gates = {}
    for col in row:
        if col.endswith("_keep") and col != "gate_keep":
            g = col[: -len("_keep")]
            gates[g] = {"keep": row[col], "score": row.get(f"{g}_score"), "reason": row.get(f"{g}_reason")}
    return gates


def _step(row_id: str, appearances: list[tuple[str, dict]], depth: int) -> dict:
    merged: dict[str, Any] = {}
    gates: dict[str, dict] = {}
    for _, row in appearances:
        for f in STEP_FIELDS:
            if merged.get(f) is None and row.get(f) is not None:
                merged[f] = row[f]
        gates = gates or gate_verdicts(row)
    return {"row_id": row_id, "depth": depth, "datasets": [n for n, _ in appearances], **merged, "gates": gates,
            "weights": {n: r["weight"] for n, r in appearances if r.get("weight") is not None}}


def _span(doc: dict, start: int | None, end: int | None, context: int = 160) -> dict:
    text = doc.get("text") or ""
    out = {"doc_id": doc["doc_id"], "title": doc.get("title"), "start": start, "end": end}
    if start is not None and end is not None and 0 <= start <= end <= len(text):
        out.update(span=text[start:end], before=text[max(0, start - context):start], after=text[end:end + context])
    return out


def trace(row_id: str, sources: Sources, lineage: Lineage | None = None) -> dict:
    """Walk a row's ``parent_ids`` back to human seed rows and their document spans, and its children forward.

    Args:
        row_id: the row to trace.
        sources: the row tables and document tables to search.
        lineage: a reusable lookup over ``sources`` (made when None).

    Returns:
        ``steps`` (the row, then its ancestors breadth first, each with the datasets it is in, how it was made,
        its gate verdicts, diagnosis and recovery action), ``seeds`` (human row ids reached), ``documents``
        (the source spans), ``descendants`` and ``ended`` (every dataset the row or a descendant is in, with
        its weight).

    Raises:
        RefineryError: the row is in none of the tables.
    """
    lineage = lineage or Lineage(sources)
    first = lineage.rows([row_id])
    if row_id not in first:
        raise RefineryError(f"row {row_id} not found in any of {len(sources.rows)} row tables "
                            f"({', '.join(sorted(sources.rows)) or 'none'})")
    steps, seen, frontier, found, depth = [], {row_id}, [row_id], first, 0
    missing: list[str] = []
    while frontier and depth <= MAX_DEPTH:
        nxt = []
        for rid in frontier:
            if rid not in found:
                missing.append(rid)
                continue
            step = _step(rid, found[rid], depth)
            steps.append(step)
            for p in step.get("parent_ids") or []:
                if p not in seen:
                    seen.add(p)
                    nxt.append(p)
        frontier, depth = nxt, depth + 1
        found = lineage.rows(frontier)
    seeds = [s["row_id"] for s in steps if s.get("origin") == "human"]
    documents, doc_cache = [], {}
    spans = {(s["doc_id"], s.get("evidence_start"), s.get("evidence_end")) for s in steps
             if s.get("doc_id") and (s.get("origin") == "human" or not seeds)}
    for doc_id, start, end in sorted(spans, key=lambda x: (x[0], x[1] or -1, x[2] or -1)):
        doc = doc_cache.setdefault(doc_id, lineage.document(doc_id))
        documents.append(_span(doc, start, end) if doc else {"doc_id": doc_id, "start": start, "end": end,
                                                               "missing": True})
    # forward: children, grandchildren, ... and where they ended
    descendants, frontier, depth = [], [row_id], 0
    seen_fwd = {row_id}
    while frontier and depth < MAX_DEPTH:
        kids = lineage.children(frontier)
        frontier = [c for cs in kids.values() for c in cs if c not in seen_fwd]
        seen_fwd.update(frontier)
        descendants += frontier
        depth += 1
    ended = []
    for rid, apps in sorted(lineage.rows([row_id] + descendants).items()):
        for name, row in apps:
            ended.append({"row_id": rid, "dataset": name, "origin": row.get("origin"), "weight": row.get("weight"),
                          "gate_keep": row.get("gate_keep")})
    return {"row_id": row_id, "steps": steps, "seeds": seeds, "documents": documents, "descendants": descendants,
            "ended": ended, "missing_parents": missing}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def render(result: dict) -> str:
    """Render a trace as an indented text tree."""
    lines = []
    for s in result["steps"]:
        pad = "  " * s["depth"]
        arrow = "" if s["depth"] == 0 else "← "
        lines.append(f"{pad}{arrow}{s['row_id']} ({s.get('origin')}) in {', '.join(s['datasets'])}")
        made = [f"{k}={_fmt(s[k])}" for k in ("strategy", "teacher", "prompt_template", "attempt", "recovery_action",
                                              "recovery_method", "diagnosis", "split", "intent")
                if s.get(k) is not None]
        if made:
            lines.append(f"{pad}    " + "  ".join(made))
        if s.get("question"):
            lines.append(f"{pad}    Q: {s['question']}")
            lines.append(f"{pad}    A: {s.get('answer')}")
        if s["gates"]:
            lines.append(f"{pad}    gates: " + "  ".join(
                f"{g} {'✓' if v['keep'] else '✗'} {_fmt(v['score']) if v['score'] is not None else ''}"
                f"{' ' + v['reason'] if v['reason'] else ''}".rstrip() for g, v in s["gates"].items()))
        if s["weights"]:
            lines.append(f"{pad}    weight: " + ", ".join(f"{n}={_fmt(w)}" for n, w in s["weights"].items()))
    for d in result["documents"]:
        if d.get("missing"):
            lines.append(f"document {d['doc_id']}: not found in any documents table")
        else:
            lines.append(f"document {d['doc_id']} \"{d.get('title')}\" [{d['start']}:{d['end']}]: "
                         f"…{d.get('before', '')[-60:]}«{d.get('span', '')}»{d.get('after', '')[:60]}…")
    lines.append("seed rows: " + (", ".join(result["seeds"]) or "none reached"))
    if result["missing_parents"]:
        lines.append("parents not found: " + ", ".join(result["missing_parents"]))
    if result["descendants"]:
        lines.append("descendants: " + ", ".join(result["descendants"]))
    lines.append("ended in:")
    for e in result["ended"]:
        w = f" weight {_fmt(e['weight'])}" if e["weight"] is not None else ""
        lines.append(f"  {e['dataset']} ({e['row_id']}{w})")
    return "\n".join(lines) + "\n"


@click.command("trace")
@click.argument("row_id")
@click.option("--json", "as_json", is_flag=True, help="Print the lineage as JSON.")
@click.option("--rev", default=None, help="Trace at a git revision (default: the workspace).")
@click.option("--under", default="data/", show_default=True, help="Search artifacts below this folder.")
@click.option("--repo", default=".", show_default=True, type=click.Path(file_okay=False, exists=True))
def cli(row_id, as_json, rev, under, repo) -> None:
    """Show ROW_ID's lineage: each step back to the human seed rows and document span, and where it ended."""
    snap = Snapshot(repo_root(repo), rev)
    try:
        result = trace(row_id, Sources.from_files(snap.parquet_outs(under)))
    finally:
        snap.close()
    sys.stdout.write(json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n" if as_json
                     else render(result))
