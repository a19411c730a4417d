"""Cut gate work into units (the rows that share one model call) and name the engine interface both engines keep.

A *unit* is what makes the two engines agree to the last bit: a model's score for a row depends on the other rows
in its call (length-sorted, padded batches), so both engines call every gate once per unit, on the same rows in
the same order, and nothing else. Units are consecutive runs of at most ``block_rows`` rows, within each value of
a grouping column where there is one (planted rows are judged one injection kind at a time). In a cascade job a
unit's gates run in order, each on the unit's rows that every earlier gate kept (:func:`judge_unit`), so one pass
of the engine (one pool of workers, models loaded once per worker) runs a whole run of cascade gates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from refinery.gates.base import Gate, Verdicts


@dataclass(frozen=True)
class GateJob:
    """Gates to apply, each to every row of a table, unit by unit.

    Attributes:
        rows: the rows to judge.
        names: the gates to apply (each judges rows independently: no gate that compares rows with each other).
        by: a column whose values split the rows into separate calls (``injection_kind``), or None.
        cascade: apply the names in order, each only to the rows of its unit that every earlier name kept.
    """

    rows: pa.Table
    names: tuple[str, ...]
    by: str | None = None
    cascade: bool = False


# One gate's verdicts on the rows of a job it judged: their positions in the job's rows (ascending) and verdicts.
Judged = tuple[np.ndarray, Verdicts]


class GateRecipe(Protocol):
    """How to build the gates in another process (:class:`refinery.gates.run.GateRecipe`); picklable."""

    def build(self, names: Sequence[str]) -> dict[str, Gate]:
        """Build the named gates (loading the models they need)."""
        ...

    def needs_model(self, names: Sequence[str]) -> bool:
        """Whether any named gate scores rows with a model."""
        ...


class Engine(Protocol):
    """Runs row-parallel work: gate verdicts per unit, and generic per-block maps (the validate stage's checks)."""

    name: str
    block_rows: int | None

    def judge(self, jobs: Sequence[GateJob], gates: dict[str, Gate], recipe: GateRecipe | None = None
              ) -> list[dict[str, Judged]]:
        """Return, per job, every named gate's verdicts on the rows it judged (every row, outside a cascade)."""
        ...

    def map_blocks(self, fn: Any, table: pa.Table, *args: Any) -> list[Any]:
        """Return ``[fn(block, *args) for block in blocks of the table]``, in block order."""
        ...

    def close(self) -> None:
        """Release what the engine started (a local Ray cluster)."""
        ...


def units(rows: pa.Table, block_rows: int | None, by: str | None = None) -> list[np.ndarray]:
    """Cut rows into units: within each value of ``by`` (first-seen order), consecutive runs of ``block_rows``.

    Args:
        rows: the rows.
        block_rows: the most rows per unit (None: one unit per group).
        by: grouping column, or None for one group.

    Returns:
        The row indices of each unit (int64, ascending), in unit order; no unit is empty.
    """
    n = rows.num_rows
    if by is None:
        groups = [np.arange(n, dtype=np.int64)] if n else []
    else:
        labels = np.asarray(rows.column(by).to_pylist(), dtype=object)
        groups = [np.flatnonzero(labels == v).astype(np.int64) for v in dict.fromkeys(labels.tolist())]
    out = []
    for g in groups:
        step = block_rows or max(len(g), 1)
        out.extend(g[lo:lo + step] for lo in range(0, len(g), step))
    return out


def take(rows: pa.Table, idx: np.ndarray) -> pa.Table:
    """Return the rows at ``idx`` (the table itself when idx is every row in order)."""
    if len(idx) == rows.num_rows and (len(idx) == 0 or (idx[0] == 0 and idx[-1] == len(idx) - 1)):
        return rows
    return rows.take(pa.array(idx, pa.int64()))


def scatter(n: int, parts: Sequence[tuple[np.ndarray, Verdicts]]) -> Verdicts:
    """Put each unit's verdicts back at its rows' positions.

    Raises:
        ValueError: the units do not cover each of the n rows exactly once, or a unit's verdict count is wrong.
    """
    keep: list[Any] = [None] * n
    score: list[float | None] = [None] * n
    reason: list[str | None] = [None] * n
    seen = np.zeros(n, bool)
    for idx, v in parts:
        if len(v.keep) != len(idx):
            raise ValueError(f"a unit of {len(idx)} rows came back with {len(v.keep)} verdicts")
        if seen[idx].any():
            raise ValueError("a row was judged in two units")
        seen[idx] = True
        for j, i in enumerate(idx.tolist()):
            keep[i], score[i], reason[i] = v.keep[j], v.score[j], v.reason[j]
    if not seen.all():
        raise ValueError(f"{int((~seen).sum())} rows were judged in no unit")
    return Verdicts(keep, score, reason)


def judge_unit(rows: pa.Table, names: Sequence[str], gate_of: Any, cascade: bool) -> pa.Table:
    """Apply gates to one unit's rows; return their verdict columns, null where a gate did not judge a row.

    Args:
        rows: the unit's rows.
        names: the gates, in order.
        gate_of: name -> the built gate.
        cascade: each gate judges only the rows every earlier gate kept (otherwise every gate every row).
    """
    n = rows.num_rows
    standing = np.arange(n, dtype=np.int64)
    cols: dict[str, pa.Array] = {}
    for name in names:
        v = gate_of(name).apply(take(rows, standing)) if len(standing) else Verdicts([], [], [])
        keep: list[bool | None] = [None] * n
        score: list[float | None] = [None] * n
        reason: list[str | None] = [None] * n
        for j, i in enumerate(standing.tolist()):
            keep[i], score[i], reason[i] = v.keep[j], v.score[j], v.reason[j]
        cols.update({f"{name}_keep": pa.array(keep, pa.bool_()), f"{name}_score": pa.array(score, pa.float64()),
                     f"{name}_reason": pa.array(reason, pa.string())})
        if cascade:
            standing = standing[np.asarray(v.keep, bool)] if len(standing) else standing
    return pa.table(cols)


def gather(n: int, parts: Sequence[tuple[np.ndarray, pa.Table]], names: Sequence[str], cascade: bool
           ) -> dict[str, Judged]:
    """Put each unit's verdict columns (:func:`judge_unit`) back at the job's row positions, gate by gate.

    Args:
        n: the job's row count.
        parts: per unit, its rows' positions in the job and its verdict columns.
        names: the job's gates.
        cascade: the job is a cascade (a gate judged only some rows); otherwise every row must be judged once.

    Raises:
        ValueError: outside a cascade, the units do not cover each of the n rows exactly once.
    """
    out: dict[str, Judged] = {}
    for name in names:
        pieces = []
        for idx, table in parts:
            mine = np.asarray([k is not None for k in table.column(f"{name}_keep").to_pylist()], bool)
            pieces.append((idx[mine], verdicts_of(table.filter(pa.array(mine, pa.bool_())), name)))
        if not cascade:
            out[name] = (np.arange(n, dtype=np.int64), scatter(n, pieces))
            continue
        idx = np.concatenate([i for i, _ in pieces]) if pieces else np.zeros(0, np.int64)
        keep = [k for _, v in pieces for k in v.keep]
        score = [x for _, v in pieces for x in v.score]
        reason = [r for _, v in pieces for r in v.reason]
        o = np.argsort(idx, kind="stable").tolist()
        out[name] = (idx[o].astype(np.int64), Verdicts([keep[i] for i in o], [score[i] for i in o],
                                                       [reason[i] for i in o]))
    return out


def verdicts_of(table: pa.Table, name: str) -> Verdicts:
    """Read a gate's verdicts back from its ``<name>_keep/_score/_reason`` columns (:meth:`Verdicts.to_columns`)."""
    return Verdicts(table.column(f"{name}_keep").to_pylist(), table.column(f"{name}_score").to_pylist(),
                    table.column(f"{name}_reason").to_pylist())


def engine_of(params_file: Any) -> Engine:
    """Return the engine a params file's ``engine`` section names; without one, the local engine with one unit
    per gate call (exactly how the stages ran before engines existed).

    Raises:
        ParamsError: the section is there but invalid (one line naming the key).
    """
    from refinery.core.params import load_yaml, parse_section
    from refinery.engine.params import EngineParams

    data = load_yaml(params_file)
    if "engine" not in data:
        from refinery.engine.local import LocalEngine

        return LocalEngine(None)
    return make_engine(parse_section(data["engine"], EngineParams, where=f"{params_file}: engine"))


def make_engine(params: Any) -> Engine:
    """Return the engine the ``engine`` params name (:class:`refinery.engine.params.EngineParams`)."""
    if params.kind == "ray":
        from refinery.engine.raydata import RayEngine

        return RayEngine(params)
    from refinery.engine.local import LocalEngine

    return LocalEngine(params.block_rows)
