"""Recover rejected rows: diagnose each failure, regenerate it with a targeted action, re-gate; naive baseline."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import click
import numpy as np
import pyarrow as pa
from pydantic import Field

from refinery.recovery import loop as rec
from refinery.core.errors import RefineryError
from refinery.generation.calls import Planned, TeacherDtype
from refinery.core.params import StageParams
from refinery.generation.prompts import Template
from schemas import recovered as recovered_schema
from schemas.recovered import MODES


class Margins(StageParams):
    """How close to its bound a failing score must be for ``threshold_marginal`` (absolute; perplexity relative)."""

    faithfulness: float = Field(ge=0)
    reward: float = Field(ge=0)
    overlap_embedding: float = Field(ge=0)
    overlap_ngram: float = Field(ge=0)
    dedup: float = Field(ge=0)
    perplexity: float = Field(ge=0)


class RecoverParams(StageParams):
    """Knobs of the recover stage."""

    seed: int
    budget: int = Field(ge=0)  # global teacher calls per method on rejected generated rows
    injected_budget: int = Field(ge=0)  # global teacher calls per method on rejected planted rows
    max_attempts: int = Field(ge=1)  # calls (actions) per row
    naive_baseline: bool  # also run plain resampling at equal budget (off for production runs)
    min_confidence: float = Field(ge=0, le=1)  # rows diagnosed with less are not attempted
    order: Literal["round_robin", "by_mode"]  # how rows queue for the budget (both methods use the same queue)
    margins: Margins
    temperatures: dict[str, float]  # per adaptive action
    chains: dict[str, list[str]] = Field(default_factory=dict)  # per failure mode: actions in order (replaces built-in)
    top_p: float = Field(gt=0, le=1)
    max_new_tokens: dict[str, int]  # per output kind: answer, qa
    naive_temperature: float = Field(ge=0)  # resampling temperature of rows that record none (planted rows)
    naive_max_new_tokens: dict[str, int]  # per token-budget kind (answer, question, qa) when a row records none
    naive_shots: int = Field(ge=0)  # few-shot examples in resampled prompts (generate.shots)
    batch_size: int = Field(gt=0)
    threads: int = Field(gt=0)
    dtype: TeacherDtype = "auto"  # weights of an in-process teacher


@dataclass
class Recovery:
    """What the core returns: outputs by name and the metrics."""

    recovered: pa.Table
    baseline: pa.Table
    unrecoverable: pa.Table
    diagnosed: pa.Table
    injected: pa.Table
    attempts: pa.Table
    metrics: dict[str, Any]


def check_params(p: RecoverParams) -> None:
    """Fail with one line on an action without a temperature, a chain naming an unknown mode or action, or an
    output kind without a token budget."""
    missing = [a for a in rec.ACTIONS if a not in p.temperatures and a not in rec.OWN_TEMPERATURE]
    if missing:
        raise RefineryError(f"recover.temperatures: no temperature for action {missing[0]}")
    for mode, chain in p.chains.items():
        if mode not in rec.CHAINS:
            raise RefineryError(f"recover.chains.{mode}: not a recoverable failure mode "
                                f"(one of {', '.join(sorted(rec.CHAINS))})")
        bad = [a for a in chain if a not in rec.ACTIONS and a != "rewrite_weakest"]
        if not chain or bad:
            raise RefineryError(f"recover.chains.{mode}: " + (f"unknown action {bad[0]}" if bad else "empty chain")
                                + f" (actions: {', '.join(sorted([*rec.ACTIONS, 'rewrite_weakest']))})")
    for kind in ("answer", "qa"):
        if kind not in p.max_new_tokens:
            raise RefineryError(f"recover.max_new_tokens: no budget for output kind {kind}")


def _settings(p: RecoverParams) -> rec.CallSettings:
    return rec.CallSettings(seed=p.seed, temperatures=dict(p.temperatures), top_p=p.top_p,
                            max_new_tokens=dict(p.max_new_tokens), naive_temperature=p.naive_temperature,
                            naive_max_new_tokens=dict(p.naive_max_new_tokens), naive_shots=p.naive_shots)


def _shots(row: dict[str, Any], train_rows: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    from refinery.generation.calls import call_seed

    others = [r for r in train_rows if r["doc_id"] != row["doc_id"]]
    if not n or not others:
        return []
    rng = np.random.default_rng(call_seed(seed, row["row_id"], "shots"))
    return [others[i] for i in rng.choice(len(others), size=min(n, len(others)), replace=False)]


def run_both(rows: list[dict[str, Any]], *, budget: int, params: RecoverParams, bounds: rec.Bounds,
             docs: dict[str, dict[str, Any]], train_rows: list[dict[str, Any]], templates: dict[str, Template],
             teacher_id: str, execute: Callable[[list[Planned], list[str]], pa.Table], regate: rec.Regate,
             pool: pa.Table, injected: bool, trail: dict[str, list[pa.Table]] | None = None
             ) -> tuple[list[rec.RowState], list[rec.RowState], pa.Table | None, pa.Table | None]:
    """Diagnose rows, then run the adaptive method and (when on) the naive baseline on the same rows and budget.

    With ``trail`` (method -> list), every gated candidate of each method is appended to its list.

    Returns:
        Adaptive and naive states (in ``rows`` order) and each method's recovered rows (or None).
    """
    cs = _settings(params)
    diags = [rec.diagnose(r, bounds, docs, params.min_confidence) for r in rows]
    order = rec.priority(diags, interleave=params.order == "round_robin").tolist()
    ordered = [rows[i] for i in order]
    by_id = {r["row_id"]: r for r in train_rows}

    def evidence(row: dict[str, Any]) -> str:
        return docs[row["doc_id"]]["text"][row["evidence_start"]:row["evidence_end"]]

    def neighbours(row: dict[str, Any]) -> list[dict[str, str]]:
        seen = [by_id[p] for p in row.get("parent_ids") or [] if p in by_id]
        out = [{"question": r["question"], "answer": r["answer"]} for r in seen]
        if row.get("question") and row.get("answer"):
            out.append({"question": row["question"], "answer": row["answer"]})
        return out

    def original(row: dict[str, Any], attempt: int, temperature: float | None, tag: str) -> Planned:
        seed_row = by_id.get((row.get("parent_ids") or [None])[0])
        return rec.plan_naive(row, seed_row, attempt, evidence(row),
                              _shots(row, train_rows, params.naive_shots, params.seed), templates, cs, teacher_id,
                              temperature=temperature, tag=tag)

    def plan_adaptive(row: dict[str, Any], s: rec.RowState, attempt: int) -> tuple[str, Planned]:
        action = s.next or rec.next_action(s.diagnosis, s.actions, chains=params.chains)
        if action in rec.OWN_TEMPERATURE:  # the row's own prompt and temperature: the naive call, same seed
            return action, original(row, attempt, None, "resample")
        if rec.ACTIONS[action][0] is None:  # the row's own prompt at a lower temperature
            return action, original(row, attempt, cs.temperatures[action], action)
        if not (row.get("question") or "").strip():  # a malformed row may still hold a usable question
            question = rec.salvage_question(row, by_id.get((row.get("parent_ids") or [None])[0]))
            row = {**row, "question": question} if question else row
        return rec.plan_adaptive(row, action, attempt, evidence(row), neighbours(row), templates, cs, teacher_id)

    def plan_naive(row: dict[str, Any], s: rec.RowState, attempt: int) -> tuple[str, Planned]:
        return "resample", original(row, attempt, None, "resample")

    check = (lambda row, cand: rec.injected_error_present(row, cand["question"], cand["answer"])) if injected \
        else None
    group = (lambda row: row["injection_kind"]) if injected else None

    def redo(cand: dict[str, Any]) -> rec.Diagnosis:
        return rec.diagnose(cand, bounds, docs, 0.0)

    adaptive = [rec.RowState(diags[i]) for i in order]
    got_a = rec.run_method(ordered, adaptive, plan_adaptive, execute, regate, pool, budget=budget,
                           max_attempts=params.max_attempts, rediagnose=redo, check_error=check, group_of=group,
                           trail=None if trail is None else trail.setdefault("adaptive", []), chains=params.chains)
    naive = [rec.RowState(diags[i]) for i in order]
    got_n = None
    if params.naive_baseline:
        got_n = rec.run_method(ordered, naive, plan_naive, execute, regate, pool, budget=budget,
                               max_attempts=params.max_attempts, rediagnose=None, check_error=check, group_of=group,
                               trail=None if trail is None else trail.setdefault("naive", []))
    else:
        for s in naive:
            s.outcome = "off"
    back = np.argsort(order, kind="stable")
    return [adaptive[i] for i in back], [naive[i] for i in back], got_a, got_n


def _recovered_rows(got: pa.Table | None, states: list[rec.RowState], rows: list[dict[str, Any]],
                    method: str) -> pa.Table:
    if got is None or got.num_rows == 0:
        return recovered_schema.RECOVERED_ARROW.empty_table()
    by_parent = {r["row_id"]: s for r, s in zip(rows, states)}
    parents = [p[0] for p in got.column("parent_ids").to_pylist()]
    st = [by_parent[p] for p in parents]
    extra = {"diagnosis": pa.array([s.diagnosis.mode for s in st], pa.string()),
             "diagnosis_confidence": pa.array([s.diagnosis.confidence for s in st], pa.float64()),
             "recovery_method": pa.array([method] * len(st), pa.string()),
             "recovery_calls": pa.array([s.calls for s in st], pa.int32()),
             "recovery_tokens": pa.array([s.tokens for s in st], pa.int64())}
    for k, v in extra.items():
        got = got.append_column(k, v)
    return got.select(recovered_schema.RECOVERED_ARROW.names).cast(recovered_schema.RECOVERED_ARROW)


def _diagnosed(table: pa.Table, a: list[rec.RowState], n: list[rec.RowState], schema: pa.Schema) -> pa.Table:
    cols = {
        "diagnosis": [s.diagnosis.mode for s in a], "diagnosis_confidence": [s.diagnosis.confidence for s in a],
        "diagnosis_detail": [s.diagnosis.detail for s in a], "recoverable": [s.diagnosis.recoverable for s in a],
        "outcome": [s.outcome for s in a],
        "recovered_row_id": [s.recovered["row_id"] if s.recovered else None for s in a],
        "actions": [list(s.actions) for s in a], "attempts": [s.attempts for s in a], "calls": [s.calls for s in a],
        "tokens": [s.tokens for s in a], "naive_outcome": [s.outcome for s in n],
        "naive_recovered_row_id": [s.recovered["row_id"] if s.recovered else None for s in n],
        "naive_attempts": [s.attempts for s in n], "naive_calls": [s.calls for s in n],
        "naive_tokens": [s.tokens for s in n], "failure_reasons": [list(s.last_reasons) for s in a],
        "error_survives": [s.error_survives for s in a], "naive_error_survives": [s.error_survives for s in n],
    }
    for name in schema.names:
        if name not in table.column_names:
            table = table.append_column(schema.field(name), pa.array(cols[name], schema.field(name).type))
    return table.select(schema.names).cast(schema)


def _attempts(trails: dict[str, dict[str, list[pa.Table]]], diagnoses: dict[str, str]) -> pa.Table:
    """Stack every gated recovery candidate with its method, row set and the parent's diagnosis."""
    schema = recovered_schema.ATTEMPT_ARROW
    parts = []
    for rowset, by_method in trails.items():
        for method, tables in by_method.items():
            for t in tables:
                parents = [p[0] for p in t.column("parent_ids").to_pylist()]
                extra = {"recovery_method": [method] * t.num_rows, "row_set": [rowset] * t.num_rows,
                         "diagnosis": [diagnoses[p] for p in parents]}
                for k, v in extra.items():
                    t = t.append_column(k, pa.array(v, pa.string()))
                parts.append(t.select(schema.names).cast(schema))
    return pa.concat_tables(parts) if parts else schema.empty_table()


def action_metrics(attempts: pa.Table, method: str) -> dict[str, Any]:
    """Per action of one method on the rejected generated rows: calls, candidates recovered, top rejection reasons."""
    out: dict[str, Any] = {}
    for r in attempts.to_pylist():
        if r["recovery_method"] != method or r["row_set"] != "generated":
            continue
        a = out.setdefault(r["recovery_action"], {"calls": 0, "recovered": 0, "reasons": Counter()})
        a["calls"] += 1
        a["recovered"] += bool(r["counted"])
        a["reasons"].update(r["gate_reasons"] or [])
    return {k: {"calls": v["calls"], "recovered": v["recovered"], "success": round(v["recovered"] / v["calls"], 4),
                "top_reasons": dict(v["reasons"].most_common(3))} for k, v in sorted(out.items())}


def method_metrics(states: list[rec.RowState], *, accepted: int, generated: int) -> dict[str, Any]:
    """Count, per failure mode and overall: rows, recoverable, attempted, recovered, rates, calls and tokens."""
    def block(sub: list[rec.RowState]) -> dict[str, Any]:
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


def injection_metrics(rows: list[dict[str, Any]], states: list[rec.RowState], planted: list[dict[str, Any]]) -> dict:
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


def recover(rejected: pa.Table, accepted: pa.Table, planted: pa.Table, train: pa.Table, documents: pa.Table, *,
            params: RecoverParams, bounds: rec.Bounds, templates: dict[str, Template], teacher_id: str,
            execute: Callable[[list[Planned], list[str]], pa.Table], regate: rec.Regate) -> Recovery:
    """Diagnose every rejected row and recover what the budget allows, adaptively and naively.

    Args:
        rejected: rejected generated rows (gated contract).
        accepted: accepted generated rows (a recovered row must not duplicate them).
        planted: gated planted rows (gated injected contract); the rejected ones are recovered for measurement.
        train: human train rows (parents, few-shot examples; the dedup seed lives in the gates).
        documents: documents (text, stale).
        params: recover params.
        bounds: thresholds in force and margins.
        templates: recovery and strategy templates by name.
        teacher_id: model id + revision.
        execute: planned calls + actions -> stamped candidate rows (synthetic contract, origin=recovered).
        regate: candidates, pool -> candidates with every gate's columns.

    Returns:
        Recovered (adaptive) and baseline (naive) rows, unrecoverable and diagnosed rows, diagnosed planted
        rows, and metrics.
    """
    check_params(params)
    docs = {d["doc_id"]: d for d in documents.to_pylist()}
    train_rows = train.to_pylist()
    rows = rejected.to_pylist()
    pool = rec.pool_of(accepted)
    common = dict(params=params, bounds=bounds, docs=docs, train_rows=train_rows, templates=templates,
                  teacher_id=teacher_id, execute=execute, regate=regate)
    trails: dict[str, dict[str, list[pa.Table]]] = {"generated": {}, "planted": {}}
    a, n, got_a, got_n = run_both(rows, budget=params.budget, pool=pool, injected=False,
                                  trail=trails["generated"], **common)
    planted_rows = planted.to_pylist()
    p_rows = [r for r in planted_rows if not r["gate_keep"]]
    p_idx = [i for i, r in enumerate(planted_rows) if not r["gate_keep"]]
    pa_, pn, _, _ = run_both(p_rows, budget=params.injected_budget, pool=pool, injected=True,
                             trail=trails["planted"], **common)
    diagnoses = {r["row_id"]: s.diagnosis.mode for r, s in zip(rows, a)}
    diagnoses.update({r["row_id"]: s.diagnosis.mode for r, s in zip(p_rows, pa_)})
    attempts = _attempts(trails, diagnoses)
    recovered = _recovered_rows(got_a, a, rows, "adaptive")
    baseline = _recovered_rows(got_n, n, rows, "naive")
    diag_schema = recovered_schema.DIAGNOSED_ARROW
    diagnosed = _diagnosed(rejected, a, n, diag_schema)
    unrecoverable = diagnosed.filter(pa.array([s.outcome != "recovered" for s in a], pa.bool_()))
    injected = _diagnosed(planted.take(pa.array(p_idx, pa.int64())), pa_, pn,
                          recovered_schema.DIAGNOSED_INJECTED_ARROW)
    generated = rejected.num_rows + accepted.num_rows
    adaptive_m = method_metrics(a, accepted=accepted.num_rows, generated=generated)
    adaptive_m["per_action"] = action_metrics(attempts, "adaptive")
    naive_m = method_metrics(n, accepted=accepted.num_rows, generated=generated) if params.naive_baseline else None
    if naive_m is not None:
        naive_m["per_action"] = action_metrics(attempts, "naive")
    ra, rn = adaptive_m["overall"]["recovered"], (naive_m or {}).get("overall", {}).get("recovered")
    metrics = {
        "rejected": rejected.num_rows, "accepted": accepted.num_rows, "budget": params.budget,
        "max_attempts": params.max_attempts, "naive_baseline": params.naive_baseline,
        "diagnosis": {m: sum(s.diagnosis.mode == m for s in a) for m in MODES if any(s.diagnosis.mode == m for s in a)},
        "recoverable": sum(s.diagnosis.recoverable for s in a),
        "adaptive": adaptive_m, "naive": naive_m,
        "adaptive_over_naive_recovered": round(ra / rn, 3) if rn else None,
        "injected": {"rejected_planted_rows": len(p_rows), "budget": params.injected_budget,
                     "adaptive": injection_metrics(p_rows, pa_, planted_rows),
                     "naive": injection_metrics(p_rows, pn, planted_rows) if params.naive_baseline else None},
    }
    if params.budget == 0:
        metrics["note"] = "budget is 0: nothing attempted"
    return Recovery(recovered, baseline, unrecoverable, diagnosed, injected, attempts, metrics)


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


@click.command("recover")
@click.option("--params", "params_file", default="params.yaml", show_default=True)
@click.option("--rejected", "rejected_file", default="data/04_gated/rejected.parquet", show_default=True)
@click.option("--accepted", "accepted_file", default="data/04_gated/accepted.parquet", show_default=True)
@click.option("--injected", "injected_file", default="data/04_gated/injected.parquet", show_default=True)
@click.option("--train", "train_file", default="data/02_split/train.parquet", show_default=True)
@click.option("--val", "val_file", default="data/02_split/val.parquet", show_default=True)
@click.option("--documents", "documents_file", default="data/01_seed/documents.parquet", show_default=True)
@click.option("--models", "models_dir", default="models/base", show_default=True)
@click.option("--verifier", "verifier_dir", default="models/verifier", show_default=True)
@click.option("--reward", "reward_dir", default="models/reward", show_default=True)
@click.option("--prompts", "prompts_dir", default="prompts", show_default=True)
@click.option("--cache", "cache_file", default=".refinery/cache/teacher.sqlite", show_default=True)
@click.option("--gate-cache", "gate_cache", default=".refinery/cache/gate", show_default=True)
@click.option("--gate-metrics", "gate_metrics", default="metrics/gate.json", show_default=True,
              help="The gate stage's metrics: its resolved thresholds must equal the ones recomputed here.")
@click.option("--out", "out_dir", default="data/05_recovered", show_default=True)
@click.option("--metrics", "metrics_file", default="metrics/recover.json", show_default=True)
@click.option("--table", "table_file", default="reports/recover.md", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def cli(params_file, rejected_file, accepted_file, injected_file, train_file, val_file, documents_file, models_dir,
        verifier_dir, reward_dir, prompts_dir, cache_file, gate_cache, gate_metrics, out_dir, metrics_file,
        table_file, quiet) -> None:
    """Diagnose rejected rows, recover them with targeted actions and a naive baseline, re-gate every candidate."""
    import time

    from refinery.generation import calls as generation
    from refinery.gates.dedup import DedupGate
    from refinery.gates.run import GateParams, build_gates, load_models, run_gates
    from refinery.core.io import atomic_outputs, read_json, read_parquet
    from refinery.core.params import load_section, params_hash
    from refinery.generation.prompts import load_template
    from refinery.core.provenance import code_version
    from refinery.generation.strategies import GENERATION_STRATEGIES
    from schemas import documents as documents_schema
    from schemas import gated as gated_schema
    from schemas import split as split_schema

    t0 = time.perf_counter()
    params = load_section(params_file, "recover", RecoverParams)
    gate_params = load_section(params_file, "gate", GateParams)
    check_params(params)
    rejected = gated_schema.CONTRACT.validate(read_parquet(rejected_file), rejected_file)
    accepted = gated_schema.CONTRACT.validate(read_parquet(accepted_file), accepted_file)
    planted = gated_schema.INJECTED_CONTRACT.validate(read_parquet(injected_file), injected_file)
    train = split_schema.CONTRACT.validate(read_parquet(train_file), train_file)
    val = split_schema.CONTRACT.validate(read_parquet(val_file), val_file)
    documents = documents_schema.CONTRACT.validate(read_parquet(documents_file), documents_file)
    templates = {n: load_template(Path(prompts_dir) / f"{n}.txt") for n in rec.TEMPLATES + GENERATION_STRATEGIES}
    teacher_id, backend = generation.teacher_backend(models_dir, params.batch_size, params.threads, params.dtype)
    phash = params_hash(params)
    version = code_version(sys.modules[__name__])
    nothing = (rejected.num_rows == 0 or params.budget == 0) and \
        (params.injected_budget == 0 or all(planted.column("gate_keep").to_pylist()))
    cache = Path(gate_cache)
    recorded = read_json(gate_metrics).get("thresholds", {})
    gates, thresholds = {}, dict(recorded)  # with nothing to attempt, diagnose by the gate stage's recorded bounds
    if not nothing:  # models are loaded only when some row may be attempted
        models = load_models(gate_params, models_dir, verifier_dir, reward_dir, cache)
        gates, thresholds = build_gates(gate_params, train, val, documents, models, cache)
        _same_thresholds(thresholds, recorded, gate_metrics)
    gp = gate_params
    bounds = rec.Bounds(min_support=thresholds.get("faithfulness_min_support", gp.faithfulness.min_support or 0.5),
                        min_reward=thresholds.get("reward_min", gp.reward.min_reward or 0.0),
                        max_perplexity=thresholds.get("perplexity_max", gp.perplexity.max_perplexity or 1e9),
                        min_perplexity=gp.perplexity.min_perplexity, max_cosine=gp.overlap.max_cosine,
                        max_ngram_overlap=gp.overlap.max_ngram_overlap, max_jaccard=gp.dedup.max_jaccard,
                        margins=params.margins.model_dump())
    stats = {"calls": 0, "cache_hits": 0, "errors": 0, "seconds": 0.0}
    parents = {r["row_id"]: r for r in rejected.to_pylist() + planted.to_pylist()}

    built: dict[str, Any] = {}

    def teacher() -> Any:  # built once, on the first call that is not cached (execute runs once per round)
        if "backend" not in built:
            built["backend"] = backend()
        return built["backend"]

    def execute(planned: list[Planned], actions: list[str]) -> pa.Table:
        table, st, secs = generation.execute(planned, teacher, cache_file, documents, batch_size=params.batch_size,
                                             origin="recovered", teacher_id=teacher_id, phash=phash,
                                             code_version=version, desc="recover", quiet=quiet)
        stats["calls"] += st.calls
        stats["cache_hits"] += st.cache_hits
        stats["errors"] += st.errors  # transport failures: not cached, so a rerun retries them
        stats["seconds"] += secs
        return rec.stamp(table, planned, parents, actions, phash, version)

    def regate(cands: pa.Table, pool: pa.Table) -> pa.Table:
        pool_gate = DedupGate(pool, max_jaccard=gp.dedup.max_jaccard, num_perm=gp.dedup.num_perm,
                              shingle=gp.dedup.shingle, cache_dir=cache) if pool.num_rows else None
        return run_gates(cands, {**gates, "dedup": rec.PooledDedup(gates["dedup"], pool_gate)}, gate_params.mode)

    result = recover(rejected, accepted, planted, train, documents, params=params, bounds=bounds,
                     templates=templates, teacher_id=teacher_id, execute=execute, regate=regate)
    metrics = {**result.metrics, "thresholds": thresholds}
    out = Path(out_dir)
    with atomic_outputs() as outputs:
        outputs.parquet(recovered_schema.CONTRACT.validate(result.recovered, "recovered rows"),
                        out / "recovered.parquet", recovered_schema.RECOVERED_ARROW)
        outputs.parquet(recovered_schema.CONTRACT.validate(result.baseline, "baseline rows"),
                        out / "baseline.parquet", recovered_schema.RECOVERED_ARROW)
        outputs.parquet(recovered_schema.DIAGNOSED_CONTRACT.validate(result.unrecoverable, "unrecoverable rows"),
                        out / "unrecoverable.parquet", recovered_schema.DIAGNOSED_ARROW)
        outputs.parquet(recovered_schema.DIAGNOSED_CONTRACT.validate(result.diagnosed, "diagnosed rows"),
                        out / "diagnosed.parquet", recovered_schema.DIAGNOSED_ARROW)
        outputs.parquet(recovered_schema.DIAGNOSED_INJECTED_CONTRACT.validate(result.injected, "planted rows"),
                        out / "injected.parquet", recovered_schema.DIAGNOSED_INJECTED_ARROW)
        outputs.parquet(recovered_schema.ATTEMPT_CONTRACT.validate(result.attempts, "recovery attempts"),
                        out / "attempts.parquet", recovered_schema.ATTEMPT_ARROW)
        outputs.json(metrics, metrics_file)
        outputs.text(report_table(metrics), table_file)
    a, n = metrics["adaptive"]["overall"], (metrics["naive"] or {}).get("overall")
    click.echo(f"recover: {metrics['rejected']} rejected, {metrics['recoverable']} diagnosed recoverable; adaptive "
               f"recovered {a['recovered']}/{a['attempted']} attempted with {a['calls']} calls"
               + (f", naive {n['recovered']}/{n['attempted']} with {n['calls']} calls" if n else ", naive off")
               + (" (budget 0: nothing attempted)" if params.budget == 0 else "")
               + f"; {stats['calls']} model calls ({stats['errors']} failed, retried on rerun), {stats['cache_hits']} "
               f"cached, teacher {stats['seconds']:.0f} s, "
               f"total {time.perf_counter() - t0:.0f} s -> {out}", err=True)


def _same_thresholds(mine: dict[str, Any], theirs: dict[str, Any], where: str) -> None:
    """Fail when a threshold recomputed here differs from the gate stage's (beyond its 4-decimal rounding)."""
    for k, v in mine.items():
        if k in theirs and (v != theirs[k] if isinstance(v, str) else abs(float(v) - float(theirs[k])) > 1e-3):
            raise RefineryError(f"recover: gate threshold {k} is {v} here but {theirs[k]} in {where}: rerun the gate "
                                f"stage (models or calibration rows changed)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
