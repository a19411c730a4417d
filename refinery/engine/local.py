"""Run gate units and block maps one after another in this process (the ``local`` engine)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from refinery.engine.base import GateJob, GateRecipe, Judged, gather, judge_unit, take, units
from refinery.gates.base import Gate


class LocalEngine:
    """Apply each gate unit by unit in this process, the reference the Ray engine must equal.

    Args:
        block_rows: the most rows per unit (None: one call per gate and group, as when no engine is given).
        quiet: no progress lines.
    """

    name = "local"

    def __init__(self, block_rows: int | None = None, *, quiet: bool = False):
        self.block_rows, self.quiet = block_rows, quiet

    def judge(self, jobs: Sequence[GateJob], gates: dict[str, Gate], recipe: GateRecipe | None = None
              ) -> list[dict[str, Judged]]:
        from refinery.core.progress import progress

        plans = [units(job.rows, self.block_rows, job.by) for job in jobs]
        total = sum(job.rows.num_rows for job in jobs)
        bar = progress(total, "gate", "row", enabled=not self.quiet and total > 0, file=sys.stderr)
        out = []
        try:
            for job, plan in zip(jobs, plans):
                parts = []
                for idx in plan:
                    parts.append((idx, judge_unit(take(job.rows, idx), job.names, gates.__getitem__, job.cascade)))
                    bar.update(len(idx))
                out.append(gather(job.rows.num_rows, parts, job.names, job.cascade))
        finally:
            bar.close()
        return out

    def map_blocks(self, fn: Any, table: pa.Table, *args: Any) -> list[Any]:
        return [fn(take(table, idx), *args) for idx in units(table, self.block_rows)]

    def close(self) -> None:
        pass

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
