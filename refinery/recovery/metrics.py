"""Count what recovery did: per failure mode and method, per action, and on planted errors; the report's table."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa

from refinery.recovery.loop import RowState
from schemas.recovered import MODES


def action_metrics(attempts: pa.Table, method: str) -> dict[str, Any]:
    """Per action of one method on the rejected generated rows: calls, candidates recovered, top rejection reasons."""
    out: dict[str, Any] = {}
    for r in attempts.select(["recovery_method", "row_set", "recovery_action", "counted", "gate_reasons"]).to_pylist():
        if r["recovery_method"] != method or r["row_set"] != "generated":
            continue
        a = out.setdefault(r["recovery_action"], {"calls": 0, "recovered": 0, "reasons": Counter()})
        a["calls"] += 1
        a["recovered"] += bool(r["counted"])
        a["reasons"].update(r["gate_reasons"] or [])
    return {k: {"calls": v["calls"], "recovered": v["recovered"], "success": round(v["recovered"] / v["calls"], 4),
                "top_reasons": dict(v["reasons"].most_common(3))} for k, v in sorted(out.items())}


def method_metrics(states: list[RowState], *, accepted: int, generated: int) -> dict[str, Any]:
    """Count, per failure mode and overall: rows, recoverable, attempted, recovered, rates, calls and tokens."""
    def block(sub: list[RowState]) -> dict[str, Any]:
        attempted = [s for s in sub if s.attempts > 0]
        got = sum(s.outcome == "recovered" for s in sub)
        calls, tokens = sum(s.calls for s in sub), sum(s.tokens for s in sub)
        recoverable = sum(s.diagnosis.recoverable for s in sub)
        return {"rows": len(sub), "recoverable": recoverable, "attempted": len(attempted), "recovered": got,
                "laundered": sum(s.outcome == "laundered" for s in sub),
                "budget_exhausted": sum(s.outcome == "budget_exhausted" for s in sub),
                "recovery_rate": round(got / len(attempted), 4) if attempted else None,
                "recovery_rate_of_recoverable": round(got / recoverable, 4) if recoverable else None,
                "calls": calls, "tokens": tokens,
                "calls_per_recovered": round(calls / got, 3) if got else None,
                "tokens_per_recovered": round(tokens / got, 1) if got else None}

    overall = block(states)
    overall["yield_before"] = round(accepted / generated, 4) if generated else None
    overall["yield_after"] = round((accepted + overall["recovered"]) / (generated + overall["calls"]), 4) \
        if generated + overall["calls"] else None
    overall["accepted_after"] = accepted + overall["recovered"]
    per_mode = {m: block([s for s in states if s.diagnosis.mode == m]) for m in MODES
                if any(s.diagnosis.mode == m for s in states)}
    return {"overall": overall, "per_mode": per_mode}


def injection_metrics(rows: list[dict[str, Any]], states: list[RowState], planted: list[dict[str, Any]]) -> dict:
    """Recall on planted errors before and after recovery, where after = what the gates alone let through.

    A planted row the gates rejected and recovery then rescued with a candidate that still holds the error
    (``laundered``, measured with the injection's ground truth after the gates decided) is an error that got
    through: it no longer counts as caught.
    """
    n = sum(r["injection_kind"] != "clean" for r in planted)
    caught = sum(r["injection_kind"] != "clean" and not r["gate_keep"] for r in planted)
    errs = [(r, s) for r, s in zip(rows, states) if r["injection_kind"] != "clean"]
    surviving = sum(s.outcome == "laundered" for _, s in errs)
    fixed = sum(s.outcome == "recovered" for _, s in errs)
    return {"planted_errors": n, "rejected_by_gates": caught, "attempted": sum(s.attempts > 0 for _, s in errs),
            "recovered_error_removed": fixed, "errors_surviving_into_recovered": surviving,
            "recall_before": round(caught / n, 4) if n else None,
            "recall_after": round((caught - surviving) / n, 4) if n else None,
            "clean_rows_recovered": sum(s.outcome == "recovered" for r, s in zip(rows, states)
                                        if r["injection_kind"] == "clean")}


def report_table(metrics: dict[str, Any]) -> str:
    """Return the adaptive-vs-naive table (Markdown) for the report: per failure mode and overall."""
    lines = ["| mode | method | rows | attempted | recovered | recovery rate | calls / recovered | "
             "tokens / recovered |", "|---|---|---:|---:|---:|---:|---:|---:|"]

    def fmt(v: Any) -> str:
        return "–" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    for method in ("adaptive", "naive"):
        m = metrics.get(method)
        if not m:
            continue
        for mode, b in list(m["per_mode"].items()) + [("overall", m["overall"])]:
            lines.append(f"| {mode} | {method} | {b['rows']} | {b['attempted']} | {b['recovered']} | "
                         f"{fmt(b['recovery_rate'])} | {fmt(b['calls_per_recovered'])} | "
                         f"{fmt(b['tokens_per_recovered'])} |")
    lines += ["", "| method | action | calls | recovered | success | most frequent rejection reasons |",
              "|---|---|---:|---:|---:|---|"]
    for method in ("adaptive", "naive"):
        for action, b in ((metrics.get(method) or {}).get("per_action") or {}).items():
            reasons = ", ".join(f"{k} {v}" for k, v in b["top_reasons"].items()) or "–"
            lines.append(f"| {method} | {action} | {b['calls']} | {b['recovered']} | {fmt(b['success'])} | {reasons} |")
    o = metrics["adaptive"]["overall"]
    lines.append("")
    lines.append(f"Yield (accepted / generated): {fmt(o['yield_before'])} before, {fmt(o['yield_after'])} after "
                 f"adaptive recovery (extra calls counted as generated).")
    for method in ("adaptive", "naive"):
        inj = (metrics.get("injected") or {}).get(method)
        if inj and inj["planted_errors"]:
            lines.append(f"\nPlanted errors, {method}: recall {fmt(inj['recall_before'])} before recovery, "
                         f"{fmt(inj['recall_after'])} after (the gates alone decided; "
                         f"{inj['errors_surviving_into_recovered']} of {inj['rejected_by_gates']} caught errors came "
                         f"back through a recovered candidate that still held them).")
    return "\n".join(lines) + "\n"
