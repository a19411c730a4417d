"""Diff every dataset of a DVC project row by row between two revisions, and report it for review."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from refinery.core import dag
from refinery.core.errors import RefineryError
from refinery.inspect.artifacts import Snapshot, columns, default_base, repo_root

SAMPLE_COLUMNS = ("origin", "strategy", "intent", "question", "answer", "gate_reasons", "diagnosis", "weight")
REASON_LIST_COLUMNS = ("gate_reasons",)  # list columns counted value by value
REASON_VALUE_COLUMNS = ("diagnosis",)  # scalar columns counted value by value
MAX_METRICS_SHOWN = 20  # metric rows shown unfolded in Markdown


@dataclass(frozen=True)
class DiffOptions:
    """What to compare and how much to show.

    Attributes:
        key: the row identity column the two versions are joined on.
        sample: rows shown per kind (added, removed, changed) and dataset.
        ignore_columns: columns left out of the comparison (e.g. wall-clock ``latency_s``).
        under: only artifacts below this folder are compared.
        audit: the validate stage's audit, read at both revisions for threshold status: a folder of one JSON per
            dataset (<audit>/<arm>.json) or one JSON file. None: the validate stage's ``--audit`` in the project's
            dvc.yaml (no threshold status where it declares none).
        threads: DuckDB threads (None: DuckDB's default, all cores).
    """

    key: str = "row_id"
    sample: int = 3
    ignore_columns: tuple[str, ...] = ()
    under: str = "data/"
    audit: str | None = None
    threads: int | None = None


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(value: Any) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _connect(threads: int | None):
    import duckdb

    con = duckdb.connect()
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    con.execute("SET preserve_insertion_order = false")
    return con


def _types(con, view: str) -> dict[str, str]:
    return {r[0]: r[1] for r in con.execute(f"SELECT column_name, column_type FROM (DESCRIBE {view})").fetchall()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _reason_counts(con, view: str, cols: dict[str, str]) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for col in REASON_LIST_COLUMNS:
        if col in cols:
            for value, n in con.execute(f"SELECT r, count(*) FROM (SELECT unnest({_q(col)}) AS r FROM {view}) "
                                        f"WHERE r IS NOT NULL GROUP BY r").fetchall():
                counts[(col, value)] = n
    for col in REASON_VALUE_COLUMNS:
        if col in cols:
            for value, n in con.execute(f"SELECT CAST({_q(col)} AS VARCHAR), count(*) FROM {view} "
                                        f"WHERE {_q(col)} IS NOT NULL GROUP BY 1").fetchall():
                counts[(col, value)] = n
    return counts


def _sample_rows(con, view: str, cols: dict[str, str], key: str, keys_sql: str, n: int) -> list[dict]:
    shown = [key] + [c for c in SAMPLE_COLUMNS if c in cols]
    sql = (f"SELECT {', '.join(_q(c) for c in shown)} FROM {view} WHERE {_q(key)} IN ({keys_sql}) "
           f"ORDER BY {_q(key)} LIMIT {int(n)}")
    return [dict(zip(shown, map(_jsonable, r))) for r in con.execute(sql).fetchall()]


def diff_table(con, a: Path | None, b: Path | None, name: str, opts: DiffOptions, moves: bool = True) -> dict:
    """Compare one dataset's two versions by ``opts.key``.

    Args:
        con: a DuckDB connection (scratch tables are created in it).
        a: the Parquet file before (None: the dataset did not exist).
        b: the Parquet file after (None: the dataset was removed).
        name: the dataset's path in the project, used in the report.
        opts: what to compare and how much to show.
        moves: record added/removed keys in the ``moves`` table (for rows moving between datasets).

    Returns:
        Counts (rows, added, removed, changed, unchanged), changed columns with row counts, changes by
        origin and strategy, reason counts before/after, and sample rows.
    """
    key = opts.key
    con.execute("CREATE OR REPLACE TEMP VIEW va AS SELECT * FROM "
                + (f"read_parquet({_lit(a)})" if a else "(SELECT NULL::VARCHAR AS " + _q(key) + " WHERE false)"))
    con.execute("CREATE OR REPLACE TEMP VIEW vb AS SELECT * FROM "
                + (f"read_parquet({_lit(b)})" if b else "(SELECT NULL::VARCHAR AS " + _q(key) + " WHERE false)"))
    ta, tb = _types(con, "va"), _types(con, "vb")
    common = [c for c in ta if c in tb and c != key and c not in opts.ignore_columns]
    same_type = {c: ta[c] == tb[c] for c in common}

    def value(side: str, c: str) -> str:
        return f"{side}.{_q(c)}" if same_type[c] else f"CAST({side}.{_q(c)} AS VARCHAR)"

    def hashed(view: str, types: dict[str, str]) -> str:
        exprs = [value("t", c) for c in common] or ["0"]
        group = [f"CAST(t.{_q(c)} AS VARCHAR)" if c in types else "NULL::VARCHAR" for c in ("origin", "strategy")]
        return (f"SELECT CAST(t.{_q(key)} AS VARCHAR) AS k, hash({', '.join(exprs)}) AS h, {group[0]} AS origin, "
                f"{group[1]} AS strategy FROM {view} AS t")

    con.execute(f"CREATE OR REPLACE TEMP TABLE ha AS {hashed('va', ta)}")
    con.execute(f"CREATE OR REPLACE TEMP TABLE hb AS {hashed('vb', tb)}")
    con.execute("""CREATE OR REPLACE TEMP TABLE st AS
        SELECT coalesce(hb.k, ha.k) AS k,
               CASE WHEN ha.k IS NULL THEN 'added' WHEN hb.k IS NULL THEN 'removed'
                    WHEN ha.h <> hb.h THEN 'changed' ELSE 'unchanged' END AS status,
               coalesce(hb.origin, ha.origin) AS origin, coalesce(hb.strategy, ha.strategy) AS strategy
        FROM ha FULL OUTER JOIN hb ON ha.k = hb.k""")
    rows_a, dup_a = con.execute("SELECT count(*), count(*) - count(DISTINCT k) FROM ha").fetchone()
    rows_b, dup_b = con.execute("SELECT count(*), count(*) - count(DISTINCT k) FROM hb").fetchone()
    counts = dict(con.execute("SELECT status, count(*) FROM st GROUP BY status").fetchall())
    out: dict[str, Any] = {
        "dataset": name,
        "status": "added" if a is None else "removed" if b is None else
        ("changed" if any(counts.get(s) for s in ("added", "removed", "changed")) or set(ta) != set(tb)
         else "unchanged"),
        "rows_a": rows_a, "rows_b": rows_b,
        **{s: counts.get(s, 0) for s in ("added", "removed", "changed", "unchanged")},
        "duplicate_keys_a": dup_a, "duplicate_keys_b": dup_b,
        "columns_added": [c for c in tb if c not in ta] if a else [],
        "columns_removed": [c for c in ta if c not in tb] if b else [],
        "columns_retyped": {c: [ta[c], tb[c]] for c in common if not same_type[c]},
        "ignored_columns": [c for c in opts.ignore_columns if c in ta or c in tb],
    }
    out["by_origin_strategy"] = [
        {"origin": o, "strategy": s, "added": ad, "removed": rm, "changed": ch}
        for o, s, ad, rm, ch in con.execute("""
            SELECT origin, strategy, count(*) FILTER (status = 'added'), count(*) FILTER (status = 'removed'),
                   count(*) FILTER (status = 'changed')
            FROM st WHERE status <> 'unchanged' GROUP BY ALL ORDER BY 1 NULLS FIRST, 2 NULLS FIRST""").fetchall()]

    # which columns changed, on the changed rows only (a second pass limited to them)
    changed_columns: dict[str, int] = {}
    samples: dict[str, list] = {"added": [], "removed": [], "changed": []}
    if out["changed"]:
        # materialise the changed rows of each side first, so no join ever builds on a whole dataset
        con.execute("CREATE OR REPLACE TEMP TABLE chk AS SELECT k FROM st WHERE status = 'changed'")
        for side, view in (("ca", "va"), ("cb", "vb")):
            con.execute(f"CREATE OR REPLACE TEMP TABLE {side} AS SELECT * FROM {view} "
                        f"WHERE CAST({_q(key)} AS VARCHAR) IN (SELECT k FROM chk)")
        join = (f"FROM chk JOIN ca AS a ON CAST(a.{_q(key)} AS VARCHAR) = chk.k "
                f"JOIN cb AS b ON CAST(b.{_q(key)} AS VARCHAR) = chk.k")
        flags = [f"sum(CAST({value('a', c)} IS DISTINCT FROM {value('b', c)} AS INTEGER))" for c in common]
        totals = con.execute(f"SELECT {', '.join(flags)} {join}").fetchone()
        changed_columns = {c: int(n) for c, n in zip(common, totals) if n}
        shown = [c for c in common if c in changed_columns]
        cols = ", ".join(f"{value('a', c)}, {value('b', c)}, ({value('a', c)} IS DISTINCT FROM {value('b', c)})"
                         for c in shown)
        context = "b.question" if "question" in tb else "NULL"
        for r in con.execute(f"SELECT chk.k, {context}, {cols} {join} ORDER BY chk.k LIMIT {int(opts.sample)}"
                             ).fetchall():
            changes = {c: [_jsonable(r[2 + 3 * i]), _jsonable(r[3 + 3 * i])]
                       for i, c in enumerate(shown) if r[4 + 3 * i]}
            samples["changed"].append({key: r[0], "question": r[1], "changes": changes})
    out["changed_columns"] = changed_columns
    if out["added"]:
        samples["added"] = _sample_rows(con, "vb", tb, key, "SELECT k FROM st WHERE status = 'added'", opts.sample)
    if out["removed"]:
        samples["removed"] = _sample_rows(con, "va", ta, key, "SELECT k FROM st WHERE status = 'removed'",
                                          opts.sample)
    out["samples"] = samples

    before, after = _reason_counts(con, "va", ta), _reason_counts(con, "vb", tb)
    out["reasons"] = [{"column": col, "reason": reason, "a": before.get((col, reason), 0),
                       "b": after.get((col, reason), 0),
                       "delta": after.get((col, reason), 0) - before.get((col, reason), 0)}
                      for col, reason in sorted(set(before) | set(after))]
    if moves:
        con.execute(f"INSERT INTO moves SELECT {_lit(name)}, k, status FROM st WHERE status IN ('added', 'removed')")
    return out


def _moved(con, files_b: dict[str, Path]) -> list[dict]:
    """Rows removed from one dataset and added to another (e.g. accepted -> rejected), with their reasons."""
    pairs = con.execute("""SELECT r.ds, a.ds, count(*) FROM moves r JOIN moves a
                           ON r.k = a.k AND r.status = 'removed' AND a.status = 'added' AND r.ds <> a.ds
                           GROUP BY ALL ORDER BY 3 DESC, 1, 2""").fetchall()
    out = []
    for src, dst, n in pairs:
        reasons: dict[str, int] = {}
        path = files_b.get(dst)
        if path is not None and "gate_reasons" in columns(path):
            reasons = dict(con.execute(f"""
                SELECT reason, count(*) FROM (SELECT unnest(gate_reasons) AS reason FROM read_parquet({_lit(path)}) AS t
                WHERE CAST(t.row_id AS VARCHAR) IN (SELECT mr.k FROM moves mr JOIN moves ma ON mr.k = ma.k
                      AND mr.status = 'removed' AND ma.status = 'added' AND mr.ds = ? AND ma.ds = ?))
                GROUP BY reason ORDER BY 2 DESC, 1""", [src, dst]).fetchall())
        out.append({"from": src, "to": dst, "rows": n, "reasons": reasons})
    return out


def audit_status(audit: Any) -> dict[str, dict]:
    """Return ``{dataset: {decision, failed_checks}}`` from a validate audit (any of its shapes)."""
    if not isinstance(audit, dict):
        return {}
    found: dict[str, dict] = {}
    items: Any = audit.get("datasets", audit)
    if isinstance(items, list):
        items = {str(d.get("name") or d.get("dataset") or i): d for i, d in enumerate(items) if isinstance(d, dict)}
    for name, entry in (items or {}).items():
        if isinstance(entry, dict) and "decision" in entry:
            found[str(name)] = {"decision": entry.get("decision"),
                                "failed_checks": list(entry.get("failed_checks") or [])}
    if "decision" in audit and "overall" not in found:
        found["overall"] = {"decision": audit.get("decision"), "failed_checks": list(audit.get("failed_checks") or [])}
    return found


def read_audit(snap: Snapshot, path: str) -> dict | None:
    """The audit at a revision: one JSON file, or a folder of per-dataset audit files merged (None: neither)."""
    if path.endswith(".json"):
        return snap.read_json(path)
    files = [f for f in snap.list_files(path) if f.endswith(".json")]
    if not files:
        return None
    records: list = []
    for f in files:
        doc = snap.read_json(f) or {}
        records += [r for r in doc.get("datasets") or [] if isinstance(r, dict)]
    return {"datasets": records}


def audit_path(root: str | Path) -> tuple[str | None, str]:
    """Return the validate stage's ``--audit`` in ``root``'s dvc.yaml, or None and why there is none."""
    try:
        return dag.option("validate", "--audit", root, needed_for="--audit"), ""
    except RefineryError as e:
        return None, str(e)


def _thresholds(snap_a: Snapshot, snap_b: Snapshot, path: str | None, why: str = "") -> dict:
    if path is None:
        return {"available": False, "reason": why, "datasets": []}
    before, after = read_audit(snap_a, path), read_audit(snap_b, path)
    if before is None and after is None:
        return {"available": False, "reason": f"{path} not found at either revision", "datasets": []}
    sa, sb = audit_status(before), audit_status(after)
    rows = []
    for name in sorted(set(sa) | set(sb)):
        a, b = sa.get(name, {}), sb.get(name, {})
        rows.append({"dataset": name, "before": a.get("decision"), "after": b.get("decision"),
                     "failed_before": a.get("failed_checks", []), "failed_after": b.get("failed_checks", []),
                     "newly_failed": [c for c in b.get("failed_checks", []) if c not in a.get("failed_checks", [])],
                     "fixed": [c for c in a.get("failed_checks", []) if c not in b.get("failed_checks", [])]})
    return {"available": True, "a_present": before is not None, "b_present": after is not None, "datasets": rows}


FAILING = {"fail", "failed", "reject", "rejected", "block", "blocked", "error", False}


def threshold_violations(report: dict) -> list[str]:
    """Return the datasets whose threshold decision after the change is a failure."""
    out = []
    for row in report.get("thresholds", {}).get("datasets", []):
        decision = row.get("after")
        if (isinstance(decision, str) and decision.lower() in FAILING) or decision is False or row["failed_after"]:
            out.append(row["dataset"])
    return out


def _dvc_diffs(root: Path, rev_a: str, rev_b: str | None) -> tuple[list, list, list[str]]:
    """Metrics and params that differ, from DVC's own ``metrics diff`` / ``params diff``."""
    errors: list[str] = []
    metrics: list[dict] = []
    params: list[dict] = []
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            m = repo.metrics.diff(a_rev=rev_a, b_rev=rev_b or "workspace") or {}
            p = repo.params.diff(a_rev=rev_a, b_rev=rev_b or "workspace") or {}
    except Exception as e:  # noqa: BLE001 - reported in the output, never swallowed silently
        return [], [], [f"dvc metrics/params diff failed: {type(e).__name__}: {e}"]
    for path, entries in sorted((m.get("diff") or {}).items()):
        for metric, d in sorted(entries.items()):
            metrics.append({"path": path, "metric": metric, "old": _jsonable(d.get("old")),
                            "new": _jsonable(d.get("new")), "diff": _jsonable(d.get("diff"))})
    for path, entries in sorted((p.get("diff") or {}).items()):
        for param, d in sorted(entries.items()):
            params.append({"path": path, "param": param, "old": _jsonable(d.get("old")),
                           "new": _jsonable(d.get("new"))})
    for kind, res in (("metrics", m), ("params", p)):
        for where, err in (res.get("errors") or {}).items():
            errors.append(f"{kind} {where}: {err}")
    return metrics, params, errors


def diff_revisions(root: str | Path, rev_a: str | None, rev_b: str | None, opts: DiffOptions = DiffOptions(),
                   dvc_diffs: bool = True) -> dict:
    """Diff every row-keyed Parquet artifact of the project between two revisions.

    Args:
        root: the project's git root.
        rev_a: the "before" revision (None: the merge-base of HEAD with the base branch).
        rev_b: the "after" revision (None: the workspace: files on disk, and the outputs its dvc.lock records
            but that are not on disk, read by that hash from the DVC cache or remote).
        opts: comparison options.
        dvc_diffs: also report ``dvc metrics diff`` and ``dvc params diff``.

    Returns:
        The report: revisions, per-dataset diffs, rows moved between datasets, threshold status before and
        after, metric and param changes.
    """
    root = Path(root)
    rev_a = rev_a or default_base(root)
    snap_a, snap_b = Snapshot(root, rev_a), Snapshot(root, rev_b)
    audit, why = (opts.audit, "") if opts.audit else audit_path(root)
    try:
        files_a, files_b = snap_a.parquet_outs(opts.under), snap_b.parquet_outs(opts.under)
        keyed_a = {n: p for n, p in files_a.items() if opts.key in columns(p)}
        keyed_b = {n: p for n, p in files_b.items() if opts.key in columns(p)}
        con = _connect(opts.threads)
        con.execute("CREATE TEMP TABLE moves (ds VARCHAR, k VARCHAR, status VARCHAR)")
        datasets = [diff_table(con, keyed_a.get(n), keyed_b.get(n), n, opts)
                    for n in sorted(set(keyed_a) | set(keyed_b))]
        report = {
            "rev_a": {"rev": rev_a, "commit": snap_a.commit}, "rev_b": {"rev": rev_b or "workspace",
                                                                        "commit": snap_b.commit},
            "key": opts.key,
            "datasets": datasets,
            "moved": _moved(con, keyed_b),
            "thresholds": _thresholds(snap_a, snap_b, audit, why),
        }
        if dvc_diffs:
            report["metrics"], report["params"], report["errors"] = _dvc_diffs(root, rev_a, rev_b)
        else:
            report["metrics"], report["params"], report["errors"] = [], [], []
        report["violations"] = threshold_violations(report)
        if rev_b is None:  # outputs dvc.lock records that were not on disk, read by hash (never taken as deleted)
            report["rev_b"]["not_in_workspace"] = list(snap_b.not_in_workspace)
        return report
    finally:
        snap_a.close()
        snap_b.close()


# ---- rendering -----------------------------------------------------------------------------------

def _cell(value: Any, width: int = 80, markdown: bool = True) -> str:
    if value is None:
        text = "∅"
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (list, dict)):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = str(value)
    text = " ".join(text.split())
    if len(text) > width:
        text = text[: width - 1] + "…"
    return text.replace("|", "\\|") if markdown else text


def _table(headers: list[str], rows: list[list], markdown: bool, width: int = 80) -> str:
    cells = [[_cell(v, width, markdown) for v in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join(lines)
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _signed(n: int | float | None) -> str:
    if n is None:
        return ""
    return f"+{n}" if n > 0 else str(n)


def render(report: dict, markdown: bool = True) -> str:
    """Render a diff report as Markdown (a PR comment / job summary) or as terminal tables."""
    h = (lambda level, t: f"{'#' * level} {t}") if markdown else (lambda level, t: f"{t}\n{'=' * len(t)}")
    code = (lambda t: f"`{t}`") if markdown else (lambda t: t)
    a, b = report["rev_a"], report["rev_b"]
    label = lambda r: (r["commit"] or r["rev"])[:10] if r["commit"] else r["rev"]  # noqa: E731
    parts = [h(2, f"refinery diff {code(label(a))} → {code(label(b))}")]
    changed = [d for d in report["datasets"] if d["status"] != "unchanged"]
    parts.append(f"{len(changed)} of {len(report['datasets'])} datasets changed (rows joined on "
                 f"{code(report['key'])}).")
    if b.get("not_in_workspace"):
        parts.append("Not in the workspace, so read by their dvc.lock hash from the DVC cache or remote: "
                     + ", ".join(code(p) for p in b["not_in_workspace"]) + ".")
    parts.append(_table(["dataset", "rows before", "rows after", "added", "removed", "changed", "changed columns"],
                        [[code(d["dataset"]), d["rows_a"], d["rows_b"], _signed(d["added"]), _signed(-d["removed"]),
                          d["changed"], ", ".join(f"{c} ({n})" for c, n in sorted(d["changed_columns"].items(),
                                                                                key=lambda x: -x[1])[:6])]
                         for d in report["datasets"]], markdown, width=120))

    if report["moved"]:
        parts.append(h(3, "Rows that moved between datasets"))
        parts.append(_table(["from", "to", "rows", "reasons (at destination)"],
                            [[code(m["from"]), code(m["to"]), m["rows"],
                              ", ".join(f"{r} {n}" for r, n in m["reasons"].items())] for m in report["moved"]],
                            markdown, width=160))

    reason_rows = [[code(d["dataset"]), r["reason"], r["a"], r["b"], _signed(r["delta"])]
                   for d in report["datasets"] for r in d["reasons"] if r["delta"]]
    if reason_rows:
        parts.append(h(3, "Rejections by reason"))
        parts.append(_table(["dataset", "reason", "before", "after", "Δ"], reason_rows, markdown))

    th = report["thresholds"]
    parts.append(h(3, "Thresholds"))
    if not th["available"]:
        parts.append(f"Not available: {th['reason']}.")
    else:
        parts.append(_table(["dataset", "before", "after", "newly failed checks", "fixed checks"],
                            [[r["dataset"], r["before"] if th["a_present"] else "n/a", r["after"]
                              if th["b_present"] else "n/a", ", ".join(r["newly_failed"]), ", ".join(r["fixed"])]
                             for r in th["datasets"]], markdown))
    if report["violations"]:
        parts.append(("**" if markdown else "") + "Threshold violations after the change: "
                     + ", ".join(report["violations"]) + ("**" if markdown else ""))

    parts.append(h(3, "Params that changed"))
    parts.append(_table(["file", "param", "before", "after"],
                        [[r["path"], code(r["param"]), r["old"], r["new"]] for r in report["params"]], markdown)
                 if report["params"] else "None.")
    parts.append(h(3, "Metrics that changed"))
    metric_rows = [[r["path"], r["metric"], r["old"], r["new"], r["diff"]] for r in report["metrics"]]
    headers = ["file", "metric", "before", "after", "Δ"]
    if not metric_rows:
        parts.append("None.")
    elif markdown and len(metric_rows) > MAX_METRICS_SHOWN:
        # a PR comment shows the top-level metrics; nested ones (per-gate matrices ...) fold away
        top = [r for r in metric_rows if r[1].count(".") <= 1][:MAX_METRICS_SHOWN]
        parts.append(_table(headers, top, markdown) if top else "")
        parts.append(f"<details><summary>all {len(metric_rows)} changed metrics</summary>\n\n"
                     + _table(headers, metric_rows, markdown) + "\n\n</details>")
    else:
        parts.append(_table(headers, metric_rows, markdown))

    for d in changed:
        body = [_detail(d, markdown)]
        if markdown:
            parts.append(f"<details><summary><b>{d['dataset']}</b>: +{d['added']} −{d['removed']} "
                         f"~{d['changed']}</summary>\n\n" + "\n\n".join(body) + "\n\n</details>")
        else:
            parts.append(h(3, d["dataset"]) + "\n" + "\n\n".join(body))
    for err in report.get("errors", []):
        parts.append(f"> note: {err}" if markdown else f"note: {err}")
    return "\n\n".join(parts) + "\n"


def _detail(d: dict, markdown: bool) -> str:
    out = []
    if d["columns_added"] or d["columns_removed"] or d["columns_retyped"]:
        out.append(f"Schema: added {d['columns_added'] or '[]'}, removed {d['columns_removed'] or '[]'}, "
                   f"retyped {d['columns_retyped'] or '{}'}.")
    if d["duplicate_keys_a"] or d["duplicate_keys_b"]:
        out.append(f"Warning: duplicate keys before {d['duplicate_keys_a']}, after {d['duplicate_keys_b']}.")
    if d["by_origin_strategy"]:
        out.append(_table(["origin", "strategy", "added", "removed", "changed"],
                          [[r["origin"], r["strategy"], r["added"], r["removed"], r["changed"]]
                           for r in d["by_origin_strategy"]], markdown))
    for kind in ("added", "removed"):
        rows = d["samples"][kind]
        if rows:
            cols = list(rows[0])
            out.append(f"Sample of {kind} rows:\n\n" + _table(cols, [[r.get(c) for c in cols] for r in rows],
                                                              markdown, width=60))
    if d["samples"]["changed"]:
        rows = [[next(iter(r.values())), c, old, new]
                for r in d["samples"]["changed"] for c, (old, new) in r["changes"].items()]
        out.append("Sample of changed rows, side by side:\n\n"
                   + _table(["row", "column", "before", "after"], rows, markdown, width=60))
    return "\n\n".join(out)


@click.command("diff")
@click.argument("rev_a", required=False)
@click.argument("rev_b", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--markdown", "--md", "as_md", is_flag=True, help="Print Markdown (a PR comment / job summary).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), help="Also write the output to this file.")
@click.option("--key", default="row_id", show_default=True, help="Column that identifies a row.")
@click.option("--sample", default=3, show_default=True, help="Sample rows shown per kind and dataset.")
@click.option("--ignore-column", "ignore", multiple=True, help="Leave a column out of the comparison (repeatable).")
@click.option("--under", default="data/", show_default=True, help="Compare artifacts below this folder.")
@click.option("--audit", default=None,
              help="Validate audit (thresholds): a folder of <dataset>.json, or one JSON file (default: the validate "
                   "stage's --audit in dvc.yaml).")
@click.option("--no-dvc-diffs", is_flag=True, help="Skip `dvc metrics diff` / `dvc params diff`.")
@click.option("--fail-on-threshold", is_flag=True, help="Exit 1 when a dataset threshold fails after the change.")
@click.option("--threads", type=int, default=None, help="DuckDB threads (default: all cores).")
@click.option("--repo", default=".", show_default=True, type=click.Path(file_okay=False, exists=True))
def cli(rev_a, rev_b, as_json, as_md, out_file, key, sample, ignore, under, audit, no_dvc_diffs, fail_on_threshold,
        threads, repo) -> None:
    """Row-level diff of every dataset between REV_A (default: merge-base with the base branch) and REV_B
    (default: the workspace), read from the DVC cache without checking anything out."""
    opts = DiffOptions(key=key, sample=sample, ignore_columns=tuple(ignore), under=under, audit=audit,
                       threads=threads)
    report = diff_revisions(repo_root(repo), rev_a, rev_b, opts, dvc_diffs=not no_dvc_diffs)
    text = (json.dumps(report, indent=2, ensure_ascii=False) + "\n" if as_json
            else render(report, markdown=as_md))
    if out_file:
        Path(out_file).parent.mkdir(parents=True, exist_ok=True)
        Path(out_file).write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    if fail_on_threshold and report["violations"]:
        raise click.exceptions.Exit(1)
