"""Answer teacher calls planned lazily, handing the results over in plan order as blocks of calls complete.

:func:`refinery.generation.teacher.run_jobs` answers a list of jobs and returns every result; a stage that streams
(generate) instead gives :func:`stream_jobs` an iterator of planned calls and a sink. The iterator is read a little
at a time, so only the calls pulled but not yet handed over are in memory: about a block and the requests in flight,
whatever the number of calls. Every call is answered as ``run_jobs`` answers it, so the results are the same:
through the cache, an HTTP server's continuous window (kept full while the next calls are pulled), an in-process
model's batches cut at the same edges, or a distributed engine's workers.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any, Protocol

from refinery.generation.teacher import GenerationCache, Job, RunStats, _on_engine, progress_bar
from refinery.models.backends.base import Backend, GenRequest, GenResult


class HasJob(Protocol):
    job: Job


# calls pulled at a time to top up an HTTP window (an in-process model or an engine pulls a block at a time)
STREAM_PULL = 256


class _Pending:
    """The calls pulled and not yet handed over, in plan order, with those of their results already there."""

    def __init__(self, sink: Callable[[list[Any], list[GenResult]], None], block: int):
        self.sink, self.block = sink, block
        self.items: list[Any] = []
        self.results: dict[str, GenResult] = {}
        self.uses: Counter[str] = Counter()  # pending calls per key
        self.ready = 0  # items[:ready] have their results

    def extend(self, items: list[Any], cached: dict[str, GenResult]) -> None:
        self.items += items
        self.results.update(cached)
        self.uses.update(p.job.key for p in items)

    def flush(self, final: bool = False) -> None:
        """Hand over every complete block (with ``final``, the rest too: every result must be there)."""
        n = len(self.items)
        while self.ready < n and self.items[self.ready].job.key in self.results:
            self.ready += 1
        if final and self.ready < n:
            raise RuntimeError(f"stream: {n - self.ready} calls were never answered")
        while self.ready >= self.block or (final and self.ready):
            part = self.items[:self.block]
            self.sink(part, [self.results[p.job.key] for p in part])
            for p in part:
                self.uses[p.job.key] -= 1
                if not self.uses[p.job.key]:
                    del self.uses[p.job.key]
                    self.results.pop(p.job.key, None)
            del self.items[:len(part)]
            self.ready -= len(part)


class _Feed:
    """Requests queued for an HTTP window: this thread appends, the window's event loop takes them in order.

    A window's worker takes its next request only after the caller has taken its last result, and the caller
    tops the queue up before it comes back: so a worker finds the queue empty only when the plan is exhausted (or
    the caller fell behind; the window then ends early and the caller opens a new one on what is queued).
    """

    def __init__(self) -> None:
        self._queue: deque[GenRequest] = deque()
        self._jobs: dict[int, Job] = {}  # by position in the order of put, until the result is taken
        self.put_count = 0
        self.taken = 0

    def put(self, jobs: Iterable[Job]) -> None:
        for j in jobs:
            self._jobs[self.put_count] = j
            self._queue.append(j.request)
            self.put_count += 1

    def job(self, position: int) -> Job:
        return self._jobs.pop(position)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[GenRequest]:
        return self

    def __next__(self) -> GenRequest:
        try:
            request = self._queue.popleft()
        except IndexError:
            raise StopIteration from None
        self.taken += 1
        return request


class _Run:
    """One stream_jobs run: the plan's iterator, the cache, the pending calls, the counts and the progress."""

    def __init__(self, items: Iterator[Any], cache: GenerationCache, pending: _Pending, bar: Any):
        self.items, self.cache, self.pending, self.bar = items, cache, pending, bar
        self.stats = RunStats()
        self.asked: set[str] = set()  # keys sent and not answered yet

    def pull(self, n: int) -> list[Any] | None:
        """Pull the next ``n`` calls (None when the plan is exhausted), their cached results with them."""
        chunk = list(islice(self.items, n))
        if not chunk:
            return None
        keys = [p.job.key for p in chunk]
        cached = self.cache.get_many([k for k in keys if k not in self.pending.results])
        hits = sum(k in cached for k in keys)
        self.stats.cache_hits += hits
        self.bar.update(hits)
        self.pending.extend(chunk, cached)
        return chunk

    def todo(self, chunk: list[Any]) -> list[Job]:
        """The calls of ``chunk`` to send: not answered, not asked already, each key once."""
        out = []
        for p in chunk:
            k = p.job.key
            if k not in self.pending.results and k not in self.asked:
                self.asked.add(k)
                out.append(p.job)
        return out

    def take(self, done: list[tuple[str, GenResult]]) -> None:
        """Count fresh results, commit the good ones, hand over what is complete."""
        self.stats.calls += len(done)
        self.stats.errors += sum(not r.ok for _, r in done)
        self.stats.latencies.extend(r.latency_s for _, r in done)
        self.cache.put_many([(k, r) for k, r in done if r.ok])
        self.pending.results.update(done)
        self.asked.difference_update(k for k, _ in done)
        self.bar.update(len(done))
        self.pending.flush()

    def window(self, model: Any, first: list[Any]) -> None:
        """An HTTP server: one continuous window over every call, topped up as results come.

        The queue is kept at twice the window's width, so that a slot never waits for the plan; the plan is read
        ahead of the calls handed over by at most two blocks and the queue (a run of cached calls is not queued).
        """
        feed = _Feed()
        feed.put(self.todo(first))
        size = 2 * max(int(getattr(model, "concurrency", 1) or 1), 1)
        most = 2 * self.pending.block + size
        exhausted = False

        def top_up() -> None:
            nonlocal exhausted
            self.pending.flush()
            while not exhausted and len(feed) < size and len(self.pending.items) < most:
                chunk = self.pull(STREAM_PULL)
                if chunk is None:
                    exhausted = True
                else:
                    feed.put(self.todo(chunk))

        while True:
            top_up()
            if not len(feed):
                if exhausted:
                    return
                continue  # nothing queued but the plan goes on: what was answered is handed over, then more read
            start = feed.taken
            for group in model.generate_stream(feed):
                self.take([(feed.job(start + i).key, r) for i, r in group])
                top_up()

    def batches(self, model: Backend, first: list[Any], batch_size: int) -> None:
        """An in-process model: a block at a time, cut into batches at the edges run_jobs cuts them."""
        chunk: list[Any] | None = first
        while chunk is not None:
            for start in range(0, len(chunk), batch_size):
                sent = self.todo(chunk[start:start + batch_size])
                if sent:
                    self.take(list(zip((j.key for j in sent), model.generate([j.request for j in sent]))))
            chunk = self.pull(self.pending.block)

    def engine(self, engine: Any, backend: Any, first: list[Any], batch_size: int) -> None:
        """A distributed engine: a block at a time, in the batches run_jobs sends it."""
        chunk: list[Any] | None = first
        while chunk is not None:
            jobs = [p.job for p in chunk]
            results = {k: self.pending.results[k] for k in {j.key for j in jobs} if k in self.pending.results}
            known = set(results)
            _on_engine(engine, backend, jobs, results, self.cache, self.stats, self.bar, batch_size)
            self.pending.results.update((k, r) for k, r in results.items() if k not in known)
            self.pending.flush()
            chunk = self.pull(self.pending.block)


def stream_jobs(items: Iterable[HasJob], backend: Backend | Callable[[], Backend], cache: GenerationCache, *,
                sink: Callable[[list[Any], list[GenResult]], None], batch_size: int, block: int = 8192,
                total: int | None = None, desc: str = "teacher", quiet: bool = False,
                engine: Any = None) -> RunStats:
    """Answer every planned call of ``items`` (objects with a ``job``), handing the results to ``sink`` in order.

    ``sink(calls, results)`` gets each ``block`` of calls in plan order (the last one shorter) with their results,
    as soon as the block's results are all there; nothing is kept beyond it. The calls are answered as
    :func:`refinery.generation.teacher.run_jobs` answers a list of them, with the same results: from the cache,
    else through an HTTP server's continuous window (the plan is pulled as the window needs more: it never waits
    for a block), an in-process model's batches (cut at the same edges: ``block`` is rounded to a multiple of
    ``batch_size``) or a distributed engine (a block at a time). Each result is committed to the cache as it comes,
    so a kill loses at most the requests in flight. The backend is built only if some call is not cached.

    Args:
        items: the planned calls, in a deterministic order; read lazily.
        backend: the model, or a function that builds it.
        cache: the result store.
        sink: takes each block of calls and their results.
        batch_size: jobs per in-process backend call.
        block: calls per hand-over.
        total: the number of calls, for the progress bar (None: unknown).
        desc: progress-bar label.
        quiet: no progress bar.
        engine: a distributed engine (as for ``run_jobs``); None: this process.

    Returns:
        The run's counts.
    """
    block = max(block // batch_size, 1) * batch_size
    run = _Run(iter(items), cache, _Pending(sink, block), progress_bar(total, desc, quiet))
    model: Backend | None = None
    try:
        first = run.pull(block)
        while first is not None and all(p.job.key in run.pending.results for p in first):  # cached blocks
            run.pending.flush()
            first = run.pull(block)
        if first is not None and engine is not None:
            run.engine(engine, backend, first, batch_size)
        elif first is not None:
            model = backend() if callable(backend) and not hasattr(backend, "generate") else backend
            if callable(getattr(model, "generate_stream", None)):
                run.window(model, first)
            else:
                run.batches(model, first, batch_size)
        run.pending.flush(final=True)
    finally:
        run.bar.close()
    if model is not None and isinstance(getattr(model, "retries", None), dict):
        run.stats.retries = dict(model.retries)
    return run.stats
