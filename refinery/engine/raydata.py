"""Run gate units, teacher batches and block maps on a Ray cluster (the ``ray`` engine).

Gate units and block maps run on Ray Data: every piece of work is one Ray Data row holding one unit (its rows as
Arrow IPC bytes, so a worker sees exactly the driver's schema and values) in a block of its own; ``map_batches``
runs it in an actor pool where a model is needed (each actor builds its gates and loads their models once, on its
first unit) and in tasks otherwise. Results stream back to the driver, which puts each unit's verdicts at its
rows' positions. Teacher batches run on Ray actors that live as long as the engine (a stage that calls its
teacher in several passes, such as generate's rounds and critique chains, builds its teacher once per worker);
the driver commits each batch to the SQLite cache as it arrives.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from refinery.core.errors import RefineryError
from refinery.engine.base import GateJob, GateRecipe, Judged, gather, judge_unit, take, units
from refinery.gates.base import Gate

# what workers must see as the driver does (offline model loading, tokenizer threads, the shared datasets)
_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "HF_HOME", "REFINERY_SHARED",
        "OMP_WAIT_POLICY")
_INSTALL = "pip install -c constraints.txt 'ray[data]==2.60.0' (make install does)"


_DIGEST: dict[str, str] = {}


def code_digest() -> str:
    """Return a hash of the ``refinery`` and ``schemas`` sources this process imports (once per process)."""
    if "code" not in _DIGEST:
        import hashlib

        import refinery
        import schemas

        h = hashlib.sha256()
        for pkg in (refinery, schemas):
            root = Path(pkg.__file__).parent
            for f in sorted(root.rglob("*.py")):
                h.update(str(f.relative_to(root.parent)).encode() + b"\0" + f.read_bytes())
        _DIGEST["code"] = h.hexdigest()[:16]
    return _DIGEST["code"]


def check_code(driver: str) -> None:
    """Refuse to work with other code than the driver's (a stale copy first on a worker's path).

    Raises:
        RefineryError: one line naming the worker's copy.
    """
    if code_digest() != driver:
        import refinery

        raise RefineryError(f"a Ray worker imports refinery from {Path(refinery.__file__).parent}, which differs "
                            f"from the driver's code: run dvc repro from the project root, with the same commit "
                            f"on every node (docs/ray.md)")


def to_ipc(table: pa.Table) -> bytes:
    """Serialise a table as Arrow IPC stream bytes (schema and values exact)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    """Read a table written by :func:`to_ipc`."""
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def _judge_units(batch: pa.Table, jobs: Sequence[tuple[tuple[str, ...], bool]], gate_of: Callable[[str], Gate]
                 ) -> pa.Table:
    """Judge each unit of the batch with its job's gates (names, cascade); return (unit, verdicts as IPC) per unit."""
    out = []
    for data, job in zip(batch.column("rows").to_pylist(), batch.column("job").to_pylist()):
        names, cascade = jobs[job]
        out.append(to_ipc(judge_unit(from_ipc(data), names, gate_of, cascade)))
    return pa.table({"unit": batch.column("unit"), "result": pa.array(out, pa.large_binary())})


class _GateWorker:
    """A Ray Data actor: builds the gates (and loads their models) once, then judges every unit it is given."""

    def __init__(self, recipe: GateRecipe, jobs: Sequence[tuple[tuple[str, ...], bool]], code: str):
        check_code(code)
        self.recipe, self.jobs = recipe, jobs
        self.models: Any = None
        self.gates: dict[str, Gate] = {}

    def _gate(self, name: str) -> Gate:
        if name not in self.gates:
            if self.models is None and self.recipe.needs_model([name]):
                self.models = self.recipe.models()
            self.gates.update(self.recipe.build([name], models=self.models))
        return self.gates[name]

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _judge_units(batch, self.jobs, self._gate)


def _judge_task(batch: pa.Table, recipe: GateRecipe, jobs: Sequence[tuple[tuple[str, ...], bool]], code: str
                ) -> pa.Table:
    """A Ray Data task for gates without a model (cheap to build per block)."""
    check_code(code)
    built: dict[str, Gate] = {}

    def gate_of(name: str) -> Gate:
        if name not in built:
            built.update(recipe.build([name]))
        return built[name]

    return _judge_units(batch, jobs, gate_of)


def _map_task(batch: pa.Table, fn: Callable[..., pa.Table], args: tuple, code: str) -> pa.Table:
    """A Ray Data task applying ``fn`` to each block (a table) it is given."""
    check_code(code)
    out = [to_ipc(fn(from_ipc(data), *args)) for data in batch.column("rows").to_pylist()]
    return pa.table({"unit": batch.column("unit"), "result": pa.array(out, pa.large_binary())})


def request_of(d: dict[str, Any]) -> Any:
    """Rebuild a GenRequest from ``GenRequest.as_dict()`` (JSON lists back to tuples)."""
    from refinery.models.backends.base import GenRequest

    d = dict(d)
    if d.get("messages") is not None:
        d["messages"] = tuple(tuple(m) for m in d["messages"])
    d["stop"] = tuple(d.get("stop") or ())
    return GenRequest(**d)


class _TeacherWorker:
    """A Ray actor: builds the teacher backend once (on its first batch), then answers each batch it is given."""

    def __init__(self, backend: Any, code: str):
        check_code(code)
        self.backend = backend
        self.model: Any = None

    def answer(self, requests: list[str]) -> list[str]:
        """Answer one batch: ``GenRequest.as_dict()`` JSON in, ``GenResult`` JSON out, in order."""
        if self.model is None:
            b = self.backend
            self.model = b() if callable(b) and not hasattr(b, "generate") else b
        results = self.model.generate([request_of(json.loads(r)) for r in requests])
        return [json.dumps(asdict(r), ensure_ascii=False) for r in results]


def _probe(address: str, timeout_s: float = 10.0) -> None:
    """Fail in seconds, with one line, when nothing listens at a cluster address (Ray itself retries for minutes).

    Raises:
        RefineryError: naming ``engine.address``.
    """
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RefineryError(f"engine.address {address!r}: nothing answers at {host}:{port} ({e.strerror or e}); "
                            f"start the cluster (ray start --head) or fix the address") from None


class RayEngine:
    """Run row-parallel work on Ray Data, unit by unit, with the local engine's units (so its outputs).

    Args:
        params: the ``engine`` params (:class:`refinery.engine.params.EngineParams`): address, workers,
            cpus_per_worker, block_rows.
        quiet: no progress lines.
    """

    name = "ray"

    def __init__(self, params: Any, *, quiet: bool = False):
        self.params, self.quiet = params, quiet
        self.block_rows = params.block_rows
        self._ray: Any = None
        self._started = False
        self._teachers: tuple[Any, list[Any]] | None = None  # (the backend they were built from, their actors)

    # ---- cluster ----

    def connect(self) -> Any:
        """Start a local cluster or join the one ``engine.address`` names (once); return the ``ray`` module."""
        if self._ray is not None:
            return self._ray
        try:
            import ray
            import ray.data
        except ImportError:
            raise RefineryError(f"engine.kind is ray but Ray is not installed: {_INSTALL}") from None
        p = self.params
        if not ray.is_initialized():
            import refinery
            import schemas

            # the driver's own code travels to the workers (a copy already on a worker's path comes first there,
            # so each worker checks it runs the driver's code: check_code)
            # workers share their node's cores with each other (and, on a local cluster, with this process):
            # idle OpenMP threads sleep instead of spinning (scores do not depend on it; the thread count does)
            env = {"py_modules": [str(Path(refinery.__file__).parent), str(Path(schemas.__file__).parent)],
                   "env_vars": {"OMP_WAIT_POLICY": "PASSIVE", **{k: os.environ[k] for k in _ENV if k in os.environ}}}
            if p.address not in (None, "local", "auto"):
                _probe(p.address)
            try:
                if p.address in (None, "local"):
                    ray.init(num_cpus=max(1, round(p.workers * p.cpus_per_worker)), include_dashboard=False,
                             runtime_env=env, logging_level=logging.WARNING, log_to_driver=True)
                else:
                    ray.init(address=p.address, runtime_env=env, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise RefineryError(f"engine.address {p.address!r}: cannot start or join the Ray cluster: "
                                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            self._started = True
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        self._ray = ray
        return ray

    def close(self) -> None:
        """Leave the cluster (a local one started here stops)."""
        if self._ray is not None and self._teachers is not None:
            for actor in self._teachers[1]:
                self._ray.kill(actor)
        if self._ray is not None and self._started:
            self._ray.shutdown()
        self._ray, self._started, self._teachers = None, False, None

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- running units ----

    def _run(self, tables: list[pa.Table], desc: str, sizes: Sequence[int], **map_args: Any) -> Iterator[tuple[int, bytes]]:
        """Run one unit per block through ``map_batches``; yield (unit, result bytes) as units finish."""
        from refinery.core.progress import progress

        ray = self.connect()
        ds = ray.data.from_arrow(tables)
        ds = ds.map_batches(batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
                            udf_modifying_row_count=False, **map_args)
        bar = progress(int(sum(sizes)), desc, "row", enabled=not self.quiet and len(tables) > 0, file=sys.stderr)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                for unit, data in zip(batch.column("unit").to_pylist(), batch.column("result").to_pylist()):
                    bar.update(sizes[unit])
                    yield unit, data
        finally:
            bar.close()

    @staticmethod
    def _unit_table(unit: int, job: int, rows: pa.Table) -> pa.Table:
        return pa.table({"unit": pa.array([unit], pa.int64()), "job": pa.array([job], pa.int64()),
                         "rows": pa.array([to_ipc(rows)], pa.large_binary())})

    def _compute(self, stateful: bool, n_units: int) -> dict[str, Any]:
        ray = self.connect()
        size = max(1, min(self.params.workers, n_units))
        strategy = ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1) if stateful else \
            ray.data.TaskPoolStrategy(size=size)
        return {"compute": strategy, "num_cpus": self.params.cpus_per_worker}

    def judge(self, jobs: Sequence[GateJob], gates: dict[str, Gate], recipe: GateRecipe | None = None
              ) -> list[dict[str, Judged]]:
        """Judge every job's rows unit by unit on the cluster (see :class:`refinery.engine.base.Engine`): one
        Ray Data pass for all jobs, so one pool of workers that load their models once."""
        if recipe is None:
            raise RefineryError("the ray engine needs a gate recipe to build the gates on its workers")
        plan: list[tuple[int, np.ndarray]] = []
        tables = []
        for j, job in enumerate(jobs):
            for idx in units(job.rows, self.block_rows, job.by):
                tables.append(self._unit_table(len(plan), j, take(job.rows, idx)))
                plan.append((j, idx))
        specs = [(tuple(job.names), job.cascade) for job in jobs]
        results: dict[int, pa.Table] = {}
        if plan:
            stateful = recipe.needs_model([n for names, _ in specs for n in names])
            args = dict(fn_constructor_args=(recipe, specs, code_digest())) if stateful else \
                dict(fn_args=(recipe, specs, code_digest()))
            udf = _GateWorker if stateful else _judge_task
            for unit, data in self._run(tables, "gate (ray)", [len(i) for _, i in plan], fn=udf, **args,
                                        **self._compute(stateful, len(plan))):
                results[unit] = from_ipc(data)
        if len(results) != len(plan):
            raise RefineryError(f"ray engine: {len(plan) - len(results)} of {len(plan)} gate units never came back")
        return [gather(job.rows.num_rows, [(idx, results[u]) for u, (jj, idx) in enumerate(plan) if jj == j],
                       job.names, job.cascade) for j, job in enumerate(jobs)]

    def map_blocks(self, fn: Callable[..., pa.Table], table: pa.Table, *args: Any) -> list[pa.Table]:
        """Return ``[fn(block, *args) for block in blocks]`` computed in Ray tasks, in block order."""
        plan = units(table, self.block_rows)
        if not plan:
            return []
        tables = [self._unit_table(u, 0, take(table, idx)) for u, idx in enumerate(plan)]
        results = dict(self._run(tables, "checks (ray)", [len(i) for i in plan], fn=_map_task, fn_args=(fn, args, code_digest()),
                                 **self._compute(False, len(plan))))
        return [from_ipc(results[u]) for u in range(len(plan))]

    def _teacher_pool(self, backend: Any) -> list[Any]:
        """Return the teacher actors for ``backend``, started on first use and kept until :meth:`close`."""
        if self._teachers is None or self._teachers[0] is not backend:
            ray = self.connect()
            if self._teachers is not None:
                for actor in self._teachers[1]:
                    ray.kill(actor)
            cls = ray.remote(num_cpus=self.params.cpus_per_worker)(_TeacherWorker)
            self._teachers = (backend, [cls.remote(backend, code_digest()) for _ in range(self.params.workers)])
        return self._teachers[1]

    def generate_batches(self, backend: Any, batches: Sequence[Sequence[Any]]) -> Iterator[tuple[int, list[Any]]]:
        """Answer batches of teacher requests on the cluster; yield (batch index, results) as each batch finishes.

        Each batch is one call of the backend's ``generate`` in an actor that built the backend once, so a batch
        is answered exactly as the local engine answers it. The actors outlive the call: every pass of a stage
        (generate's rounds, its critique chains) reuses them. Each actor holds at most two batches (one running,
        one queued behind it); the caller commits results as they come, so a kill loses at most the batches in
        flight (two per worker).

        Args:
            backend: the backend, or a picklable function that builds it (the same object on every call of a
                stage: another one starts new actors).
            batches: GenRequests per batch.
        """
        from collections import deque

        from refinery.core.progress import progress
        from refinery.models.backends.base import GenResult

        if not batches:
            return
        ray = self.connect()
        actors = self._teacher_pool(backend)
        slots = deque(a for _ in range(2) for a in actors)
        todo = deque(enumerate(batches))
        pending: dict[Any, tuple[int, Any]] = {}
        bar = progress(sum(len(b) for b in batches), "teacher (ray)", "row", enabled=not self.quiet, file=sys.stderr)
        try:
            while todo or pending:
                while todo and slots:
                    i, batch = todo.popleft()
                    actor = slots.popleft()
                    payload = [json.dumps(r.as_dict(), sort_keys=True, ensure_ascii=False) for r in batch]
                    pending[actor.answer.remote(payload)] = (i, actor)
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                i, actor = pending.pop(ref)
                slots.append(actor)
                try:
                    answered = ray.get(ref)
                except ray.exceptions.RayError as e:  # the worker's own error (a RayTaskError's cause), one line
                    cause = getattr(e, "cause", None) or e
                    raise RefineryError(f"ray engine: a teacher worker failed: "
                                        f"{(str(cause).splitlines() or [type(cause).__name__])[0]}") from None
                out = [GenResult(**json.loads(r)) for r in answered]
                bar.update(len(out))
                yield i, out
        finally:
            bar.close()
            for ref in pending:  # a kill or an error: drop the batches still queued
                with contextlib.suppress(Exception):
                    ray.cancel(ref)
