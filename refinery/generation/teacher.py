"""Run teacher requests through a content-addressed, resumable cache (a continuous window or fixed batches)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from refinery.models.backends.base import Backend, GenRequest, GenResult


def cache_key(model: str, template_ref: str, request: GenRequest, sample_index: int) -> str:
    """Return the content address of one teacher call.

    The key covers the model (id + revision/hash), the template (name + content hash), the rendered
    prompt or messages, the sampling params and seed, and the sample index: if any of them changes,
    the call is made again; if none does, the cached result is reused.
    """
    payload = {"model": model, "template": template_ref, "request": request_fields(request),
               "sample_index": sample_index}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


_REQUEST_FIELDS = tuple(f.name for f in fields(GenRequest))
_RESULT_FIELDS = tuple(f.name for f in fields(GenResult))
_OPTIONAL_FIELDS = ("require_text", "require")


def request_fields(request: GenRequest) -> dict[str, Any]:
    """Return ``request.as_dict()`` (the fields a cache key covers) without its deep copy: the same JSON, ~10x faster.

    ``GenRequest`` holds only strings, numbers and tuples of them, so a shallow read of its fields serialises
    exactly as ``dataclasses.asdict`` does; like ``as_dict``, ``require_text`` and ``require`` only when set.
    """
    d = {k: getattr(request, k) for k in _REQUEST_FIELDS}
    for key in _OPTIONAL_FIELDS:
        if not d[key]:
            del d[key]
    return d


class GenerationCache:
    """A SQLite store of teacher results keyed by :func:`cache_key`, committed after every batch.

    A killed run (even ``kill -9``) loses at most the batch in flight: SQLite commits are atomic.
    Only successful results are stored, so transport failures are retried on the next run.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, result TEXT NOT NULL)")
        self._db.commit()

    def get_many(self, keys: Sequence[str]) -> dict[str, GenResult]:
        """Return the cached results among ``keys``."""
        found: dict[str, GenResult] = {}
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), 500):
            chunk = unique[i:i + 500]
            rows = self._db.execute(f"SELECT key, result FROM results WHERE key IN ({','.join('?' * len(chunk))})",
                                    chunk).fetchall()
            found.update({k: GenResult(**json.loads(v)) for k, v in rows})
        return found

    def put_many(self, items: Sequence[tuple[str, GenResult]]) -> None:
        """Store results and commit (one transaction)."""
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO results (key, result) VALUES (?, ?)",
                                 [(k, json.dumps({f: getattr(r, f) for f in _RESULT_FIELDS}, ensure_ascii=False))
                                  for k, r in items])

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    @staticmethod
    def committed(path: str | Path) -> int:
        """Count the results another process has committed so far (read-only; 0 while the store is not there yet)."""
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.05) as db:
                return db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        except sqlite3.OperationalError:
            return 0

    def close(self) -> None:
        """Close the database."""
        self._db.close()


@dataclass(frozen=True)
class Job:
    """One teacher call: the request and its cache key."""

    request: GenRequest
    key: str


@dataclass
class RunStats:
    """Counts of a run: calls made to the model, cache hits, failures, and the latency of each fresh call.

    These depend on the run (what was cached, how the server behaved), so they go to the run log and the
    console, never into a DVC-tracked table or metrics file.
    """

    calls: int = 0
    cache_hits: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    retries: dict[str, int] = field(default_factory=dict)  # e.g. {'malformed_response': 3} from the backend

    def merged(self, other: RunStats) -> RunStats:
        """Return the counts of this run and ``other`` together."""
        retries = dict(self.retries)
        for k, v in other.retries.items():
            retries[k] = retries.get(k, 0) + v
        return RunStats(self.calls + other.calls, self.cache_hits + other.cache_hits, self.errors + other.errors,
                        self.latencies + other.latencies, retries)

    def summary(self) -> dict[str, Any]:
        """Return the run's counts and latency percentiles (seconds) as plain JSON values."""
        lat = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return round(lat[min(int(q * len(lat)), len(lat) - 1)], 4) if lat else None

        return {"calls": self.calls, "cache_hits": self.cache_hits, "call_errors": self.errors,
                "retries": dict(sorted(self.retries.items())),
                "latency_s": {"mean": round(sum(lat) / len(lat), 4) if lat else None, "p50": pct(0.5),
                              "p99": pct(0.99), "max": lat[-1] if lat else None}}


def progress_bar(total: int, desc: str, quiet: bool) -> Any:
    """Return progress on stderr (rate and ETA): a bar on a terminal, a line every few seconds in a log."""
    from refinery.core.progress import progress

    return progress(total, desc, "call", enabled=not quiet, file=sys.stderr)


def _stream(model: Any, todo: list[Job], jobs: Sequence[Job], results: dict[str, GenResult],
            cache: GenerationCache, stats: RunStats, bar: Any) -> None:
    """Answer ``todo`` through a backend's continuous window, committing each group of results as it arrives."""
    per_key = Counter(j.key for j in jobs)
    for group in model.generate_stream([j.request for j in todo]):
        done = [(todo[i].key, r) for i, r in group]
        stats.calls += len(done)
        stats.errors += sum(not r.ok for _, r in done)
        stats.latencies.extend(r.latency_s for _, r in done)
        results.update(done)
        cache.put_many([(k, r) for k, r in done if r.ok])
        bar.update(sum(per_key[k] for k, _ in done))


def _on_engine(engine: Any, backend: Any, jobs: Sequence[Job], results: dict[str, GenResult],
               cache: GenerationCache, stats: RunStats, bar: Any, batch_size: int) -> None:
    """Answer the missing jobs on a distributed engine, in the batches the in-process path would send.

    The batches are cut from the full job list, each key sent once (in the first batch holding it), as the
    in-process path cuts them; the workers return results and this process commits each batch as it arrives,
    so a kill loses at most the batches in flight (one per worker).
    """
    batches: list[list[Job]] = []
    seen = set(results)
    for start in range(0, len(jobs), batch_size):
        sent = []
        for j in jobs[start:start + batch_size]:
            if j.key not in seen:
                seen.add(j.key)
                sent.append(j)
        if sent:
            batches.append(sent)
    per_key = Counter(j.key for j in jobs)
    for i, out in engine.generate_batches(backend, [[j.request for j in b] for b in batches]):
        done = [(j.key, r) for j, r in zip(batches[i], out)]
        stats.calls += len(done)
        stats.errors += sum(not r.ok for _, r in done)
        stats.latencies.extend(r.latency_s for _, r in done)
        results.update(done)
        cache.put_many([(k, r) for k, r in done if r.ok])
        bar.update(sum(per_key[k] for k, _ in done))


def run_jobs(jobs: Sequence[Job], backend: Backend | Callable[[], Backend], cache: GenerationCache, *,
             batch_size: int, desc: str = "teacher", quiet: bool = False,
             engine: Any = None) -> tuple[list[GenResult], RunStats]:
    """Answer every job from the cache or the backend.

    A backend with ``generate_stream`` (HTTP servers) gets every missing job in job order through its
    continuous window of ``concurrency`` requests in flight; each group of results is committed to the
    cache as it arrives, so a kill loses at most the requests in flight. Other backends (in-process
    models) get batches cut from the full job list (not from what is missing), so a resumed run sends
    the same batches as an uninterrupted one; each finished batch is committed before the next starts.
    Either way a result depends only on its job (request, seed), never on completion order.

    Args:
        jobs: the calls, in a deterministic order.
        backend: the model, or a function that builds it (called only if some job is not cached).
        cache: the result store.
        batch_size: jobs per backend call.
        desc: progress-bar label.
        quiet: no progress bar.
        engine: a distributed engine (``refinery.engine.raydata.RayEngine``) that answers the missing jobs on its
            workers, batch by batch as above (the backend, or the function that builds it, travels to them);
            None: this process.

    Returns:
        One result per job, in order, and the run's counts.
    """
    cached = cache.get_many([j.key for j in jobs])
    stats = RunStats(cache_hits=sum(j.key in cached for j in jobs))
    results: dict[str, GenResult] = dict(cached)
    model: Backend | None = None if callable(backend) and not hasattr(backend, "generate") else backend
    bar = progress_bar(len(jobs), desc, quiet)
    bar.update(stats.cache_hits)
    todo = list({j.key: j for j in jobs if j.key not in results}.values())  # job order, each key once
    if todo and engine is not None:
        try:
            _on_engine(engine, backend, jobs, results, cache, stats, bar, batch_size)
        finally:
            bar.close()
        return [results[j.key] for j in jobs], stats
    if todo and model is None:
        model = backend()
    try:
        if todo and callable(getattr(model, "generate_stream", None)):
            _stream(model, todo, jobs, results, cache, stats, bar)
            todo = []
        for start in range(0, len(jobs) if todo else 0, batch_size):
            batch = [j for j in jobs[start:start + batch_size] if j.key not in results]
            sent = list({j.key: j for j in batch}.values())
            if not sent:
                continue
            out = model.generate([j.request for j in sent])
            stats.calls += len(sent)
            stats.errors += sum(not r.ok for r in out)
            stats.latencies.extend(r.latency_s for r in out)
            results.update({j.key: r for j, r in zip(sent, out)})
            cache.put_many([(j.key, r) for j, r in zip(sent, out) if r.ok])
            bar.update(len(batch))
    finally:
        bar.close()
    if model is not None and isinstance(getattr(model, "retries", None), dict):
        stats.retries = dict(model.retries)
    return [results[j.key] for j in jobs], stats
