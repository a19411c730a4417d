"""Turn planned teacher calls into provenance-stamped rows: shared by generate, contaminate and recover."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from refinery.generation import strategies as strat
from refinery.models.backends.base import Backend, GenResult
from refinery.generation.prompts import Template
from refinery.generation.teacher import GenerationCache, Job, RunStats, run_jobs
from refinery.core.text import stable_id
from schemas import synthetic as synthetic_schema


# Weights dtype of an in-process teacher (params generate/contaminate/recover.dtype; see teacher_backend).
TeacherDtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class Planned:
    """One planned teacher call and the provenance it will carry."""

    job: Job
    strategy: str
    parent: dict[str, Any]
    span: tuple[int, int]
    sample_index: int
    template_ref: str
    lineage: tuple[str, ...] = ()  # parent_ids before the parent's own row_id (an Evol round's seed row)


def call_seed(base: int, *parts: Any) -> int:
    """Return a per-call sampling seed derived from the stage seed and the call's identity."""
    return int(hashlib.sha256("|".join(map(str, (base, *parts))).encode()).hexdigest()[:8], 16)


def to_rows(planned: list[Planned], results: list[GenResult], documents: pa.Table, *, origin: str,
            teacher_id: str, phash: str, code_version: str, texts: dict[str, str] | None = None) -> pa.Table:
    """Turn teacher results into rows of the synthetic contract, parsed strictly, failures kept with a reason.

    ``texts`` (doc_id -> text, read from ``documents`` when None) saves reading the documents again per call.
    """
    if texts is None:
        texts = doc_texts(documents)
    cols: dict[str, list[Any]] = {name: [] for name in synthetic_schema.ARROW.names}
    gen_params: dict[tuple, str] = {}  # one JSON text per distinct sampling setting (most calls share a few)
    prefix = "syn" if origin == "synthetic" else origin[:3]
    for p, r in zip(planned, results):
        s = strat.STRATEGIES[p.strategy]
        question, answer, parse_error = (None, None, None)
        if r.ok:
            question, answer, parse_error = strat.parse_output(s, r.text)
            if parse_error is None and s.output == "answer":
                question = p.parent["question"]
            elif parse_error is None and s.output == "question":
                answer = (texts[p.parent["doc_id"]][p.span[0]:p.span[1]] if s.answer_from == "span"
                          else p.parent["answer"])
        req = p.job.request
        setting = (req.max_new_tokens, type(req.temperature), req.temperature, type(req.top_p), req.top_p, req.stop)
        gp = gen_params.get(setting)
        if gp is None:
            gp = gen_params[setting] = json.dumps({"max_new_tokens": req.max_new_tokens, "temperature": req.temperature,
                                                   "top_p": req.top_p, "stop": list(req.stop)}, sort_keys=True)
        for name, value in (
            ("row_id", stable_id(prefix, p.job.key)), ("origin", origin),
            ("parent_ids", [*p.lineage, p.parent["row_id"]]),
            ("doc_id", p.parent["doc_id"]), ("evidence_start", p.span[0]), ("evidence_end", p.span[1]),
            ("strategy", p.strategy), ("teacher", teacher_id), ("prompt_template", p.template_ref),
            ("gen_params", gp), ("attempt", 0), ("recovery_action", None), ("params_hash", phash),
            ("code_version", code_version), ("question", question), ("answer", answer),
            ("intent", p.parent["intent"]), ("evidence", texts[p.parent["doc_id"]][p.span[0]:p.span[1]]),
            ("raw_output", r.text), ("parse_error", parse_error), ("error", r.error),
            ("finish_reason", r.finish_reason), ("prompt_tokens", r.prompt_tokens),
            ("completion_tokens", r.completion_tokens), ("seed", req.seed), ("sample_index", p.sample_index),
            ("cache_key", p.job.key),
        ):
            cols[name].append(value)
    return pa.table(cols, schema=synthetic_schema.ARROW)


def doc_texts(documents: pa.Table) -> dict[str, str]:
    """Return doc_id -> text of the documents table."""
    return dict(zip(documents.column("doc_id").to_pylist(), documents.column("text").to_pylist()))


# calls per block of a streamed execute: the rows it holds at once, and one row group of the output each
STREAM_BLOCK = 8192

# the columns outcome_metrics reads: a stage that streams its rows keeps only these
OUTCOME_COLUMNS = ("strategy", "error", "parse_error", "completion_tokens")


def outcome_metrics(table: pa.Table) -> dict[str, Any]:
    """Count rows, failed teacher calls and unparseable outputs, overall and per strategy.

    One vocabulary for every teacher stage: ``call_errors`` are calls that returned no text (transport,
    HTTP status, malformed reply after its retries; ``call_errors_by_reason`` names them), ``parse_errors``
    are replies that did not parse (``dropped_<reason>``); ``failure_share`` = both over ``rows``. Call
    counts, cache hits, retries and latencies go to the run log, not here: metrics must not depend on
    what was cached or how the server behaved.
    """
    import pyarrow.compute as pc

    # counted column by column, with no Python object per row
    strategy, error, parse_error = (table.column(c) for c in ("strategy", "error", "parse_error"))
    call_failed = pc.is_valid(error)
    parse_failed = pc.and_(pc.invert(call_failed), pc.is_valid(parse_error))

    def counts(where: pa.ChunkedArray | None) -> dict[str, Any]:
        n = table.num_rows if where is None else int(pc.sum(where).as_py() or 0)
        call = int(pc.sum(call_failed if where is None else pc.and_(where, call_failed)).as_py() or 0)
        parse = int(pc.sum(parse_failed if where is None else pc.and_(where, parse_failed)).as_py() or 0)
        return {"rows": n, "parsed": n - call - parse, "call_errors": call, "parse_errors": parse,
                "failure_share": round((call + parse) / max(n, 1), 4)}

    per = {name: counts(pc.equal(strategy, name)) for name in sorted(pc.unique(strategy).to_pylist())}
    errors = pc.drop_null(error).to_pylist()
    dropped = pc.drop_null(parse_error).to_pylist()
    return {
        **counts(None),
        "call_errors_by_reason": dict(sorted(Counter(e.split(":", 1)[0] for e in errors if e).items())),
        **{f"dropped_{k}": v for k, v in sorted(Counter(d for d in dropped if d).items())},
        "per_strategy": per, "completion_tokens": int(pc.sum(table.column("completion_tokens")).as_py() or 0),
    }


def write_run_log(path: Path, record: dict[str, Any]) -> None:
    """Write a run's wall-clock figures (latencies, retries, seconds) beside the teacher cache.

    They differ from run to run and machine to machine, so they never enter a DVC-tracked output: the
    same inputs must give byte-identical tables everywhere.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_templates(folder: Path, names: list[str]) -> dict[str, Template]:
    """Load ``<folder>/<name>.txt`` for each strategy name."""
    from refinery.generation.prompts import load_template

    return {n: load_template(folder / f"{n}.txt") for n in names}


def teacher_backend(base: str, batch_size: int, threads: int,
                    dtype: str = "float32") -> tuple[str, Callable[[], Backend]]:
    """Return the teacher's provenance id and a function that builds its backend (lazily, once).

    ``dtype`` ('auto' | 'float32' | 'bfloat16' | 'float16') applies to in-process models only. Outputs depend
    on it, so any dtype but float32 is part of the id (``<id>+bfloat16``): the id is in every cache key and in
    the rows' provenance.
    """
    from refinery.models.backends.factory import make_backend
    from refinery.models.backends.local import resolve_dtype
    from refinery.models.resolve import backend_spec, load_target

    load = load_target(base, "teacher")
    spec = backend_spec(load, batch_size=batch_size, threads=threads)
    teacher_id = load["id"]
    if spec["kind"] == "local":
        spec["dtype"] = resolve_dtype(dtype)
        if spec["dtype"] != "float32":
            teacher_id = f"{teacher_id}+{spec['dtype']}"
    # Built only when some call is not cached; an unreachable server then fails with one line naming its URL.
    return teacher_id, lambda: make_backend(spec)


def execute(planned: Iterable[Planned], backend: Callable[[], Backend], cache_file: str | Path, documents: pa.Table,
            *, batch_size: int, origin: str, teacher_id: str, phash: str, code_version: str, desc: str,
            quiet: bool, engine: Any = None, write: Callable[[pa.Table], None] | None = None,
            total: int | None = None) -> tuple[pa.Table | None, RunStats, float]:
    """Run planned calls through the cache and turn the results into contract-checked rows.

    With ``write``, the rows stream: ``planned`` may be an iterator, read as the calls are made
    (:func:`refinery.generation.stream.stream_jobs`), and each block of calls (:data:`STREAM_BLOCK`), in plan order,
    becomes rows handed to ``write`` as soon as its results are there; no result or row is kept beyond its block.
    Each block is checked against the contract on its own: row_id uniqueness across blocks is the caller's to check.

    Args:
        total: the number of calls, for the progress bar, when ``planned`` is an iterator.

    Returns:
        The rows (synthetic contract; None with ``write``), the run's counts, and the seconds spent on teacher
        calls (with ``write``, on planning the calls and turning results into rows as well).
    """
    import time

    texts = doc_texts(documents)
    kw = {"origin": origin, "teacher_id": teacher_id, "phash": phash, "code_version": code_version, "texts": texts}
    written = 0

    def sink(calls: list[Planned], results: list[GenResult]) -> None:
        nonlocal written
        rows = to_rows(calls, results, documents, **kw)
        write(synthetic_schema.CONTRACT.validate(rows, f"{origin} rows {written + 1}-{written + len(calls)}"))
        written += len(calls)

    cache = GenerationCache(cache_file)
    t0 = time.perf_counter()
    try:
        if write is not None:
            from refinery.generation.stream import stream_jobs

            stats = stream_jobs(planned, backend, cache, sink=sink, batch_size=batch_size, block=STREAM_BLOCK,
                                total=total, desc=desc, quiet=quiet, engine=engine)
        else:
            planned = list(planned)
            results, stats = run_jobs([p.job for p in planned], backend, cache, batch_size=batch_size, desc=desc,
                                      quiet=quiet, engine=engine)
    finally:
        cache.close()
    seconds = time.perf_counter() - t0
    write_run_log(Path(cache_file).parent / "runs" / f"{desc}.json", {"stage": desc, "teacher": teacher_id,
                                                                      "seconds": round(seconds, 2), **stats.summary()})
    if write is not None:
        return None, stats, seconds
    table = to_rows(planned, results, documents, **kw)
    return synthetic_schema.CONTRACT.validate(table, f"{origin} rows"), stats, seconds
