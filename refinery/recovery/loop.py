"""Run a recovery method over rejected rows: rounds of planned calls within budgets, every candidate re-gated.

A candidate is recovered when it passes every gate (plus dedup against accepted and already recovered rows);
on failure the adaptive method diagnoses the candidate again to choose the next action. The rows queue for the
budget in one priority order that both methods share.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from refinery.generation.calls import Planned
from refinery.recovery.actions import next_action
from refinery.recovery.diagnose import Diagnosis


@dataclass
class RowState:
    """What one method did with one rejected row."""

    diagnosis: Diagnosis
    outcome: str = "not_attempted"
    actions: list[str] = field(default_factory=list)
    attempts: int = 0
    calls: int = 0
    tokens: int = 0
    recovered: dict[str, Any] | None = None
    last_reasons: list[str] = field(default_factory=list)
    error_survives: bool | None = None  # planted rows: the candidate the gates recovered still holds the error
    next: str | None = None
    next_mode: str | None = None  # the failure mode whose chain chose ``next`` (the failed candidate's)
    cap: int = 0  # calls this row may use (0: not admitted yet)


Execute = Callable[[list[Planned], list[str]], pa.Table]  # planned calls, actions -> stamped candidate rows
Regate = Callable[[pa.Table, pa.Table], pa.Table]  # candidates, pool -> candidates with every gate's columns
PlanFn = Callable[[dict[str, Any], RowState, int], tuple[str, Planned]]


def run_method(rows: list[dict[str, Any]], states: list[RowState], plan: PlanFn, execute: Execute, regate: Regate,
               pool: pa.Table, *, budget: int, max_attempts: int, rediagnose: Callable[[dict], Diagnosis] | None,
               check_error: Callable[[dict, dict], bool] | None,
               group_of: Callable[[dict], str] | None = None,
               trail: list[pa.Table] | None = None,
               chains: Mapping[str, Sequence[str]] | None = None) -> pa.Table | None:
    """Attempt recoverable rows in rounds (one call per row per round) within per-row and global budgets.

    Rows are admitted in priority order while their whole per-row budget (``max_attempts`` calls) still fits
    in the global one; a recovered row gives back what it did not use, so later rounds admit further rows.

    A candidate is recovered when it passes every gate: the gates alone decide, as they would in a real run.
    On planted rows ``check_error`` then measures whether the recovered candidate still holds the planted
    error (outcome ``laundered``): ground truth measures what the gates let through, and never refuses a
    candidate. A failed candidate is diagnosed again (``rediagnose``, adaptive) to choose the next action.

    Args:
        rows: the rejected rows, in priority order.
        states: one state per row (diagnosis set; updated in place).
        plan: (row, state, attempt) -> (action, planned call).
        execute: runs planned calls (through the cache) and returns candidate rows.
        regate: gates candidates against the pool of accepted and recovered rows.
        pool: question/answer rows a candidate must not duplicate (accepted rows).
        budget: global teacher calls for this method.
        max_attempts: calls per row.
        rediagnose: diagnoses a failed candidate (None: keep the row's diagnosis, as the naive method does).
        check_error: (rejected row, candidate) -> the planted error is still there (planted rows only; a
            measurement of the recovered candidate, not a filter).
        group_of: when set, candidates are gated one group at a time (planted rows: one injection kind at a
            time, so twins planted from the same source are never deduplicated against each other).
        trail: when given, every gated candidate (recovered or not) is appended to it, one table per round,
            with a ``counted`` column (True where it passed every gate and so recovered its row).
        chains: per-mode action chains replacing the built-in ones (``next_action``).

    Returns:
        The recovered rows (gated contract columns), in the order they were recovered.
    """
    used = reserved = 0  # calls made; calls still reserved by admitted rows that are not finished
    for s in states:
        if s.diagnosis.recoverable:
            s.outcome = "budget_exhausted"
    recovered: list[pa.Table] = []
    pool = pool_of(pool)  # grows by each round's recovered rows, in the order they were recovered
    while True:
        todo, planned = [], []
        for i, (row, s) in enumerate(zip(rows, states)):
            if not s.diagnosis.recoverable or s.recovered is not None or (s.cap and s.attempts >= s.cap):
                continue
            if s.cap == 0:  # admit a new row only if its whole per-row budget still fits in the global one
                s.cap = min(max_attempts, budget - used - reserved)
                if s.cap <= 0:
                    s.cap = 0
                    continue
                reserved += s.cap
            action, p = plan(row, s, s.attempts + 1)
            todo.append(i), planned.append(p)
            s.actions.append(action)
            used += 1
            reserved -= 1
        if not planned:
            break
        cands = execute(planned, [states[i].actions[-1] for i in todo])
        gated = _regate_groups(cands, pool, regate, [group_of(rows[i]) for i in todo] if group_of else None)
        counted, got = [], []
        whole = rediagnose is not None or check_error is not None  # else the bookkeeping's columns suffice
        for k, (i, cand) in enumerate(zip(todo, _candidates(gated, full=whole))):
            s = states[i]
            s.attempts += 1
            s.calls += 1
            s.tokens += int(cand["prompt_tokens"]) + int(cand["completion_tokens"])
            s.outcome = "failed"
            s.last_reasons = list(cand["gate_reasons"])
            counted.append(bool(cand["gate_keep"]))
            if cand["gate_keep"]:  # the gates alone decide, as in a real run
                s.outcome, s.recovered = "recovered", cand
                if check_error is not None:  # planted rows: measure (never filter) whether the error got through
                    s.error_survives = bool(check_error(rows[i], cand))
                    if s.error_survives:
                        s.outcome = "laundered"
                got.append(k)
                reserved -= s.cap - s.attempts  # release what this row no longer needs
                continue
            if rediagnose is not None:
                again = rediagnose(cand)
                s.next, s.next_mode = next_action(again, s.actions, s.diagnosis, chains), again.mode
        if trail is not None:
            trail.append(gated.append_column("counted", pa.array(counted, pa.bool_())))
        if got:
            kept = gated.take(pa.array(got, pa.int64()))
            recovered.append(kept)
            pool = pool_of(pool, kept)
    return pa.concat_tables(recovered).combine_chunks() if recovered else None


_STEP_COLUMNS = ("row_id", "prompt_tokens", "completion_tokens", "gate_keep", "gate_reasons")


def _candidates(gated: pa.Table, *, full: bool) -> list[dict[str, Any]]:
    """Gated candidates as dicts: every column when a candidate is diagnosed again or checked for its planted
    error, else only the columns a round's bookkeeping reads (``_STEP_COLUMNS``)."""
    return gated.to_pylist() if full else gated.select(list(_STEP_COLUMNS)).to_pylist()


def _regate_groups(cands: pa.Table, pool: pa.Table, regate: Regate, groups: list[str] | None) -> pa.Table:
    if groups is None:
        return regate(cands, pool)
    parts, order = [], []
    for g in sorted(set(groups)):
        idx = [i for i, x in enumerate(groups) if x == g]
        parts.append(regate(cands.take(pa.array(idx, pa.int64())), pool))
        order += idx
    out = pa.concat_tables(parts)
    return out.take(pa.array(np.argsort(order, kind="stable"), pa.int64()))


def stamp(cands: pa.Table, planned: list[Planned], parents: dict[str, dict[str, Any]], actions: list[str],
          phash: str, code_version: str) -> pa.Table:
    """Give candidate rows their recovery provenance: original strategy, attempt, action, this stage's hashes."""
    strategies = [parents[p.parent["row_id"]].get("strategy") for p in planned]
    cols = {"strategy": pa.array(strategies, pa.string()),
            "attempt": pa.array([p.sample_index for p in planned], pa.int32()),
            "recovery_action": pa.array(actions, pa.string()),
            "params_hash": pa.array([phash] * len(planned), pa.string()),
            "code_version": pa.array([code_version] * len(planned), pa.string())}
    for name, arr in cols.items():
        cands = cands.set_column(cands.schema.get_field_index(name), cands.schema.field(name), arr)
    return cands


MODE_RANK = ("threshold_marginal", "truncated", "malformed", "refusal", "low_quality", "ungrounded",
             "question_defect", "duplicate", "too_close_to_seed")


def priority(diags: list[Diagnosis], *, interleave: bool = True) -> np.ndarray:
    """Order rows for the budget (both methods take rows from this one queue, so they see the same rows).

    Within a mode, rows go by confidence (stable). ``interleave`` (round robin) takes one row of each mode in
    ``MODE_RANK`` order, then the second of each, and so on, so a small budget reaches every failure mode and
    the per-mode table measures each; otherwise every row of a mode goes before the next mode's.
    """
    rank = {m: i for i, m in enumerate(MODE_RANK)}
    keys = [(rank.get(d.mode, len(rank)), -d.confidence) for d in diags]
    by_mode = sorted(range(len(diags)), key=lambda i: keys[i])
    # rows that are never attempted (unrecoverable, or below min_confidence) go last, so they take no turn
    later = [i for i in by_mode if not diags[i].recoverable]
    by_mode = [i for i in by_mode if diags[i].recoverable]
    if not interleave:
        return np.array(by_mode + later, dtype=np.int64)
    seen: dict[int, int] = {}
    turn = []
    for i in by_mode:  # the k-th row of its mode goes in round k
        m = keys[i][0]
        turn.append((seen.get(m, 0), m, i))
        seen[m] = seen.get(m, 0) + 1
    return np.array([i for _, _, i in sorted(turn)] + later, dtype=np.int64)


def pool_of(*tables: pa.Table) -> pa.Table:
    """Stack the row_id/question/answer columns of tables (rows a recovered candidate must not duplicate)."""
    parts = [t.select(["row_id", "question", "answer"]).cast(pa.schema([("row_id", pa.string()),
                                                                         ("question", pa.string()),
                                                                         ("answer", pa.string())]))
             for t in tables if t is not None]
    out = pa.concat_tables(parts) if parts else pa.table({"row_id": pa.array([], pa.string()),
                                                           "question": pa.array([], pa.string()),
                                                           "answer": pa.array([], pa.string())})
    return out.filter(pc.is_valid(out.column("answer")))
