"""Recover rejected rows: diagnose, run the adaptive method and the naive baseline at equal budget, re-gate.

:func:`recover` is the recover stage's core with its wiring (teacher calls through the cache, re-gating with
the gates built from ``data/04_gated/thresholds.json``); :func:`recover_rows` is the same over any ``execute``
and ``regate``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from refinery.core.errors import RefineryError
from refinery.core.params import StageParams
from refinery.gates.base import Gate
from refinery.gates.dedup import DedupGate, PooledDedup
from refinery.gates.registry import SPECS
from refinery.generation import calls as generation
from refinery.generation.calls import Planned, TeacherDtype, call_seed
from refinery.generation.few_shot import ShotPool, sample_shots
from refinery.generation.prompts import Template
from refinery.planted.truth import injected_error_present
from refinery.generation.critique import Constitution
from refinery.recovery.actions import (ACTIONS, CHAINS, OWN_TEMPERATURE, REVISE_RULES, CallSettings, next_action,
                                       plan_adaptive, plan_naive)
from refinery.recovery.diagnose import Bounds, Diagnosis, diagnose, salvage_question
from refinery.recovery.loop import Regate, RowState, pool_of, priority, run_method, stamp
from refinery.recovery.metrics import action_metrics, injection_metrics, method_metrics
from schemas import recovered as recovered_schema
from schemas.recovered import MODES
from schemas.thresholds import Thresholds, review_copy


class RecoverParams(StageParams):
    """Knobs of the recover stage."""

    seed: int
    budget: int = Field(ge=0)  # global teacher calls per method on rejected generated rows
    injected_budget: int = Field(ge=0)  # global teacher calls per method on rejected planted rows
    max_attempts: int = Field(ge=1)  # calls (actions) per row
    naive_baseline: bool  # also run plain resampling at equal budget (off for production runs)
    min_confidence: float = Field(ge=0, le=1)  # rows diagnosed with less are not attempted
    order: Literal["round_robin", "by_mode"]  # how rows queue for the budget (both methods use the same queue)
    margins: dict[str, float]  # per gate with a margin in the registry: how close to its bound is threshold_marginal
    temperatures: dict[str, float]  # per adaptive action
    chains: dict[str, list[str]] = Field(default_factory=dict)  # per failure mode: actions in order (replaces built-in)
    # per failure mode: the constitution rule its rows break (revise_by_rule states it); replaces the built-in map
    revise_rules: dict[str, int] = Field(default_factory=dict)
    top_p: float = Field(gt=0, le=1)
    max_new_tokens: dict[str, int]  # per output kind: answer, qa
    naive_temperature: float = Field(ge=0)  # resampling temperature of rows that record none (planted rows)
    naive_max_new_tokens: dict[str, int]  # per token-budget kind (answer, question, qa) when a row records none
    naive_shots: int = Field(ge=0)  # few-shot examples in resampled prompts (generate.shots)
    batch_size: int = Field(gt=0)
    threads: int = Field(gt=0)
    dtype: TeacherDtype = "auto"  # weights of an in-process teacher

    @model_validator(mode="after")
    def _check_margins(self) -> RecoverParams:
        wanted = [s.name for s in SPECS if s.margins]
        unknown = sorted(set(self.margins) - set(wanted))
        if unknown:
            raise ValueError(f"margins.{unknown[0]}: not a gate with a margin (gates with one: {', '.join(wanted)})")
        missing = [g for g in wanted if g not in self.margins]
        if missing:
            raise ValueError(f"margins.{missing[0]}: missing (gates with a margin: {', '.join(wanted)})")
        negative = [g for g, m in self.margins.items() if m < 0]
        if negative:
            raise ValueError(f"margins.{negative[0]}: must be >= 0")
        return self


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
    teacher: dict[str, Any] = field(default_factory=dict)  # teacher calls, cache hits, failures, seconds (not written)

    def write(self, out_dir: str | Path, metrics_file: str | Path, table_file: str | Path) -> None:
        """Write every output, checked against its contract, all or nothing (:func:`refinery.core.io.atomic_outputs`).

        Args:
            out_dir: the folder of the six Parquet outputs.
            metrics_file: the metrics JSON.
            table_file: the metrics as a Markdown table.
        """
        from refinery.core.io import atomic_outputs
        from refinery.recovery.metrics import report_table

        out, rs = Path(out_dir), recovered_schema
        tables = (("recovered", self.recovered, rs.CONTRACT, "recovered rows", rs.RECOVERED_ARROW),
                  ("baseline", self.baseline, rs.CONTRACT, "baseline rows", rs.RECOVERED_ARROW),
                  ("unrecoverable", self.unrecoverable, rs.DIAGNOSED_CONTRACT, "unrecoverable rows",
                   rs.DIAGNOSED_ARROW),
                  ("diagnosed", self.diagnosed, rs.DIAGNOSED_CONTRACT, "diagnosed rows", rs.DIAGNOSED_ARROW),
                  ("injected", self.injected, rs.DIAGNOSED_INJECTED_CONTRACT, "planted rows",
                   rs.DIAGNOSED_INJECTED_ARROW),
                  ("attempts", self.attempts, rs.ATTEMPT_CONTRACT, "recovery attempts", rs.ATTEMPT_ARROW))
        with atomic_outputs() as outputs:
            for name, table, contract, what, arrow in tables:
                outputs.parquet(contract.validate(table, what), out / f"{name}.parquet", arrow)
            outputs.json(self.metrics, metrics_file)
            outputs.text(report_table(self.metrics), table_file)


def check_params(p: RecoverParams) -> None:
    """Fail with one line on an action without a temperature, a chain naming an unknown mode or action, or an
    output kind without a token budget."""
    missing = [a for a in ACTIONS if a not in p.temperatures and a not in OWN_TEMPERATURE]
    if missing:
        raise RefineryError(f"recover.temperatures: no temperature for action {missing[0]}")
    for mode, chain in p.chains.items():
        if mode not in CHAINS:
            raise RefineryError(f"recover.chains.{mode}: not a recoverable failure mode "
                                f"(one of {', '.join(sorted(CHAINS))})")
        bad = [a for a in chain if a not in ACTIONS and a != "rewrite_weakest"]
        if not chain or bad:
            raise RefineryError(f"recover.chains.{mode}: " + (f"unknown action {bad[0]}" if bad else "empty chain")
                                + f" (actions: {', '.join(sorted([*ACTIONS, 'rewrite_weakest']))})")
    for mode, number in p.revise_rules.items():
        if mode not in CHAINS:
            raise RefineryError(f"recover.revise_rules.{mode}: not a recoverable failure mode "
                                f"(one of {', '.join(sorted(CHAINS))})")
        if number < 1:
            raise RefineryError(f"recover.revise_rules.{mode}: rule numbers start at 1")
    rules = revise_rules(p)
    for mode, chain in p.chains.items():
        if "revise_by_rule" in chain and mode not in rules:
            raise RefineryError(f"recover.chains.{mode}: revise_by_rule needs the rule this mode breaks "
                                f"(recover.revise_rules.{mode})")
    for kind in ("answer", "qa"):
        if kind not in p.max_new_tokens:
            raise RefineryError(f"recover.max_new_tokens: no budget for output kind {kind}")


def revise_rules(p: RecoverParams) -> dict[str, int]:
    """Failure mode -> the constitution rule its rows break: the built-in map with recover.revise_rules over it."""
    return {**REVISE_RULES, **p.revise_rules}


def check_constitution(p: RecoverParams, constitution: Constitution) -> None:
    """Fail with one line when a failure mode names a rule the constitution does not have."""
    for mode, number in sorted(revise_rules(p).items()):
        if number > len(constitution.rules):
            raise RefineryError(f"recover.revise_rules.{mode}: rule {number}, but the constitution "
                                f"({constitution.ref}) has {len(constitution.rules)} rules")


def _settings(p: RecoverParams) -> CallSettings:
    return CallSettings(seed=p.seed, temperatures=dict(p.temperatures), top_p=p.top_p,
                        max_new_tokens=dict(p.max_new_tokens), naive_temperature=p.naive_temperature,
                        naive_max_new_tokens=dict(p.naive_max_new_tokens), naive_shots=p.naive_shots)


def run_both(rows: list[dict[str, Any]], *, budget: int, params: RecoverParams, bounds: Bounds,
             docs: dict[str, dict[str, Any]], train_rows: list[dict[str, Any]], templates: dict[str, Template],
             teacher_id: str, execute: Callable[[list[Planned], list[str]], pa.Table], regate: Regate,
             pool: pa.Table, injected: bool, trail: dict[str, list[pa.Table]] | None = None,
             constitution: Constitution | None = None
             ) -> tuple[list[RowState], list[RowState], pa.Table | None, pa.Table | None]:
    """Diagnose rows, then run the adaptive method and (when on) the naive baseline on the same rows and budget.

    With ``trail`` (method -> list), every gated candidate of each method is appended to its list. The
    ``constitution`` states the rule a ``revise_by_rule`` call asks the teacher to follow.

    Returns:
        Adaptive and naive states (in ``rows`` order) and each method's recovered rows (or None).
    """
    cs = _settings(params)
    rules = revise_rules(params)
    diags = [diagnose(r, bounds, docs, params.min_confidence) for r in rows]
    order = priority(diags, interleave=params.order == "round_robin").tolist()
    ordered = [rows[i] for i in order]
    by_id = {r["row_id"]: r for r in train_rows}
    shot_pool = ShotPool(train_rows)

    def evidence(row: dict[str, Any]) -> str:
        return docs[row["doc_id"]]["text"][row["evidence_start"]:row["evidence_end"]]

    def neighbours(row: dict[str, Any]) -> list[dict[str, str]]:
        seen = [by_id[p] for p in row.get("parent_ids") or [] if p in by_id]
        out = [{"question": r["question"], "answer": r["answer"]} for r in seen]
        if row.get("question") and row.get("answer"):
            out.append({"question": row["question"], "answer": row["answer"]})
        return out

    def shots(row: dict[str, Any]) -> list[dict[str, Any]]:  # the row's own draw: seeded by its id
        if not params.naive_shots:
            return []
        rng = np.random.default_rng(call_seed(params.seed, row["row_id"], "shots"))
        return sample_shots(shot_pool, row["doc_id"], params.naive_shots, rng)

    def original(row: dict[str, Any], attempt: int, temperature: float | None, tag: str) -> Planned:
        seed_row = by_id.get((row.get("parent_ids") or [None])[0])
        return plan_naive(row, seed_row, attempt, evidence(row), shots(row), templates, cs, teacher_id,
                          temperature=temperature, tag=tag)

    def plan_targeted(row: dict[str, Any], s: RowState, attempt: int) -> tuple[str, Planned]:
        action = s.next or next_action(s.diagnosis, s.actions, chains=params.chains)
        if action in OWN_TEMPERATURE:  # the row's own prompt and temperature: the naive call, same seed
            return action, original(row, attempt, None, "resample")
        if ACTIONS[action][0] is None:  # the row's own prompt at a lower temperature
            return action, original(row, attempt, cs.temperatures[action], action)
        if not (row.get("question") or "").strip():  # a malformed row may still hold a usable question
            question = salvage_question(row, by_id.get((row.get("parent_ids") or [None])[0]))
            row = {**row, "question": question} if question else row
        rule = ""
        if action == "revise_by_rule":  # the rule of the mode whose chain chose it: the gates' critique
            if constitution is None:
                raise RefineryError("recover: revise_by_rule needs the constitution (prompts/constitution.txt)")
            rule = constitution.rule(rules[(s.next_mode if s.next else None) or s.diagnosis.mode])
        return plan_adaptive(row, action, attempt, evidence(row), neighbours(row), templates, cs, teacher_id, rule)

    def plan_resample(row: dict[str, Any], s: RowState, attempt: int) -> tuple[str, Planned]:
        return "resample", original(row, attempt, None, "resample")

    check = (lambda row, cand: injected_error_present(row, cand["question"], cand["answer"])) if injected \
        else None
    group = (lambda row: row["injection_kind"]) if injected else None

    def redo(cand: dict[str, Any]) -> Diagnosis:
        return diagnose(cand, bounds, docs, 0.0)

    adaptive = [RowState(diags[i]) for i in order]
    got_a = run_method(ordered, adaptive, plan_targeted, execute, regate, pool, budget=budget,
                       max_attempts=params.max_attempts, rediagnose=redo, check_error=check, group_of=group,
                       trail=None if trail is None else trail.setdefault("adaptive", []), chains=params.chains)
    naive = [RowState(diags[i]) for i in order]
    got_n = None
    if params.naive_baseline:
        got_n = run_method(ordered, naive, plan_resample, execute, regate, pool, budget=budget,
                           max_attempts=params.max_attempts, rediagnose=None, check_error=check, group_of=group,
                           trail=None if trail is None else trail.setdefault("naive", []))
    else:
        for s in naive:
            s.outcome = "off"
    back = np.argsort(order, kind="stable")
    return [adaptive[i] for i in back], [naive[i] for i in back], got_a, got_n


def _recovered_rows(got: pa.Table | None, states: list[RowState], rows: list[dict[str, Any]],
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


def _diagnosed(table: pa.Table, a: list[RowState], n: list[RowState], schema: pa.Schema) -> pa.Table:
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


def recover_rows(rejected: pa.Table, accepted: pa.Table, planted: pa.Table, train: pa.Table, documents: pa.Table,
                 *, params: RecoverParams, bounds: Bounds, templates: dict[str, Template], teacher_id: str,
                 execute: Callable[[list[Planned], list[str]], pa.Table], regate: Regate,
                 constitution: Constitution | None = None) -> Recovery:
    """Diagnose every rejected row and recover what the budget allows, adaptively and naively.

    Args:
        rejected: rejected generated rows (gated contract).
        accepted: accepted generated rows (a recovered row must not duplicate them).
        planted: gated planted rows (gated injected contract); the rejected ones are recovered for measurement.
        train: human train rows (parents, few-shot examples; the dedup seed lives in the gates).
        documents: documents (text, stale).
        params: recover params.
        bounds: the bounds the gates judged with, and the margins.
        templates: recovery and strategy templates by name.
        teacher_id: model id + revision.
        execute: planned calls + actions -> stamped candidate rows (synthetic contract, origin=recovered).
        regate: candidates, pool -> candidates with every gate's columns.
        constitution: the rules ``revise_by_rule`` asks the teacher to follow (prompts/constitution.txt).

    Returns:
        Recovered (adaptive) and baseline (naive) rows, unrecoverable and diagnosed rows, diagnosed planted
        rows, and metrics.
    """
    check_params(params)
    if constitution is not None:
        check_constitution(params, constitution)
    docs = {d["doc_id"]: d for d in documents.to_pylist()}
    train_rows = train.to_pylist()
    rows = rejected.to_pylist()
    pool = pool_of(accepted)
    common = dict(params=params, bounds=bounds, docs=docs, train_rows=train_rows, templates=templates,
                  teacher_id=teacher_id, execute=execute, regate=regate, constitution=constitution)
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


class TeacherCalls:
    """Run planned recovery calls through the teacher cache and stamp the candidates (``execute`` of run_method).

    Args:
        backend: the teacher, or a function that builds it (called once, on the first call not in the cache).
        cache_file: the teacher result cache.
        documents: documents (the candidates' evidence).
        parents: row_id -> the rejected row (generated or planted), or the part of it candidates carry (its strategy).
        batch_size: requests per teacher batch.
        teacher_id: model id + revision (in every cache key).
        phash: recover params hash stamped on candidates.
        code_version: stamped on candidates.
        quiet: no progress bar.

    Attributes:
        stats: model calls, cache hits, failed calls (retried on a rerun) and teacher seconds so far.
    """

    def __init__(self, backend: Any, cache_file: str | Path, documents: pa.Table,
                 parents: Mapping[str, dict[str, Any]], *, batch_size: int, teacher_id: str, phash: str,
                 code_version: str, quiet: bool = True):
        self._backend, self._built = backend, None
        self.cache_file, self.documents, self.parents = cache_file, documents, parents
        self.batch_size, self.teacher_id, self.phash, self.code_version, self.quiet = (
            batch_size, teacher_id, phash, code_version, quiet)
        self.stats: dict[str, Any] = {"calls": 0, "cache_hits": 0, "errors": 0, "seconds": 0.0}

    def teacher(self) -> Any:
        """Return the teacher, building it on first use and once only (execute runs once per round)."""
        if hasattr(self._backend, "generate") or not callable(self._backend):
            return self._backend
        if self._built is None:
            self._built = self._backend()
        return self._built

    def __call__(self, planned: list[Planned], actions: list[str]) -> pa.Table:
        table, st, secs = generation.execute(planned, self.teacher, self.cache_file, self.documents,
                                             batch_size=self.batch_size, origin="recovered",
                                             teacher_id=self.teacher_id, phash=self.phash,
                                             code_version=self.code_version, desc="recover", quiet=self.quiet)
        self.stats["calls"] += st.calls
        self.stats["cache_hits"] += st.cache_hits
        self.stats["errors"] += st.errors  # transport failures: not cached, so a rerun retries them
        self.stats["seconds"] += secs
        return stamp(table, planned, self.parents, actions, self.phash, self.code_version)


class Regater:
    """Re-gate recovery candidates with every gate, the dedup gate pooled with the accepted and recovered rows.

    Args:
        gates: the gates by name, built from thresholds.json (``refinery.gates.run.build_gates``).
        dedup: the dedup gate's bounds (thresholds.json ``dedup``): the pool is deduplicated with the same.
        cache_dir: the signature cache.
        mode: ``full`` or ``cascade`` (``gate.mode``), as the gate stage ran.
    """

    def __init__(self, gates: Mapping[str, Gate], dedup: Mapping[str, Any], cache_dir: Path | None, mode: str):
        self.gates, self.dedup, self.cache_dir, self.mode = dict(gates), dict(dedup), cache_dir, mode
        self._pools: list[tuple[pa.Table, DedupGate]] = []  # the first pool's gate and the last one's

    def _pool_gate(self, pool: pa.Table) -> DedupGate | None:
        """The dedup gate seeded by ``pool``: a pool that extends one seen before extends that one's gate.

        Each round's pool is the accepted rows plus the rows recovered so far (``run_method``), so rebuilding the
        pool's keys and signatures every round would cost each round the whole pool; extending costs the new rows.
        """
        if pool.num_rows == 0:
            return None
        for seen, gate in reversed(self._pools):
            k = seen.num_rows
            if k <= pool.num_rows and pool.slice(0, k).equals(seen):
                if k < pool.num_rows:
                    gate = gate.extended(pool.slice(k))
                    self._pools = self._pools[:1] + [(pool, gate)]
                return gate
        base = getattr(self.gates["dedup"], "store", None)  # the candidates are signed once for both gates
        same = base is not None and (base.num_perm, base.shingle) == (self.dedup["num_perm"], self.dedup["shingle"])
        gate = DedupGate(pool, max_jaccard=self.dedup["max_jaccard"], num_perm=self.dedup["num_perm"],
                         shingle=self.dedup["shingle"], cache_dir=self.cache_dir, store=base if same else None)
        self._pools = self._pools[:1] + [(pool, gate)]
        return gate

    def __call__(self, cands: pa.Table, pool: pa.Table) -> pa.Table:
        from refinery.gates.run import run_gates

        pooled = PooledDedup(self.gates["dedup"], self._pool_gate(pool))
        return run_gates(cands, {**self.gates, "dedup": pooled}, self.mode)


def recover(rejected: pa.Table, accepted: pa.Table, planted: pa.Table, train: pa.Table, documents: pa.Table, *,
            params: RecoverParams, thresholds: Thresholds, gates: Mapping[str, Gate], gate_mode: str,
            templates: dict[str, Template], teacher_id: str, backend: Any, cache_file: str | Path,
            gate_cache: Path | None, phash: str, code_version: str, quiet: bool = True,
            constitution: Constitution | None = None) -> Recovery:
    """Recover rejected rows with the stage's wiring: teacher calls through the cache, re-gating with ``gates``.

    Args:
        rejected, accepted, planted, train, documents: as :func:`recover_rows`.
        params: recover params.
        thresholds: every gate's bounds as the gate stage resolved them (validated thresholds.json): diagnosis
            measures margins from them, and the pooled dedup gate uses the dedup bounds.
        gates: the gates built from ``thresholds`` (may be empty when nothing can be attempted).
        gate_mode: ``gate.mode`` (full or cascade).
        templates: recovery and strategy templates by name.
        teacher_id: model id + revision.
        backend: the teacher, or a function that builds it (only when some call is not cached).
        cache_file: the teacher result cache.
        gate_cache: the gates' signature and embedding cache.
        phash: recover params hash stamped on candidates.
        code_version: stamped on candidates.
        quiet: no progress bar.
        constitution: as :func:`recover_rows`.

    Returns:
        The recovery; its metrics hold a review copy of the thresholds, ``teacher`` the call counts.
    """
    # what candidates take from their rejected row (stamp: the original strategy), not a copy of every row
    parents = {rid: {"strategy": strategy} for t in (rejected, planted)
               for rid, strategy in zip(t.column("row_id").to_pylist(), t.column("strategy").to_pylist())}
    execute = TeacherCalls(backend, cache_file, documents, parents, batch_size=params.batch_size,
                           teacher_id=teacher_id, phash=phash, code_version=code_version, quiet=quiet)
    regate = Regater(gates, thresholds["dedup"], gate_cache, gate_mode)
    result = recover_rows(rejected, accepted, planted, train, documents, params=params,
                          bounds=Bounds.from_thresholds(thresholds, params.margins), templates=templates,
                          teacher_id=teacher_id, execute=execute, regate=regate, constitution=constitution)
    result.metrics["thresholds"] = review_copy(thresholds)
    if constitution is not None:  # the critique each failure mode stands for in revise_by_rule calls
        result.metrics["revise_rules"] = {"constitution": constitution.ref, "rules": {
            mode: constitution.rule(n) for mode, n in sorted(revise_rules(params).items())}}
    result.teacher = dict(execute.stats)
    return result
