"""generate streams: the plan read as calls are made, results handed over in plan order block by block, the
output written as they come."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from refinery.core.errors import RefineryError
from refinery.models.backends.base import GenRequest, GenResult
from refinery.models.backends.fake import FakeBackend
from refinery.generation.stream import stream_jobs
from refinery.generation.teacher import GenerationCache, Job, cache_key, run_jobs
from tests.conftest import ROOT, params_for
from tests.test_split import seed_tables


def _calls(n: int, repeat_every: int = 0) -> list[SimpleNamespace]:
    """n planned calls (objects with a job); every ``repeat_every``-th repeats the one before it (same key)."""
    calls = []
    for i in range(n):
        k = i - 1 if repeat_every and i % repeat_every == 0 and i else i
        request = GenRequest(prompt=f"prompt {k}", max_new_tokens=4, seed=k)
        calls.append(SimpleNamespace(job=Job(request, cache_key("fake@1", "t@1", request, 0)), n=i))
    return calls


class OutOfOrder:
    """An HTTP-like backend: takes ``width`` requests at a time from what it is given and answers them last-first."""

    def __init__(self, width: int, fail: frozenset[int] = frozenset()):
        self.concurrency, self.fail, self.fake = width, fail, FakeBackend()

    def generate(self, requests):
        return self.fake.generate(requests)

    def generate_stream(self, requests):
        it, base = iter(requests), 0
        while window := list(itertools.islice(it, self.concurrency)):
            out = self.fake.generate(window)
            for k in reversed(range(len(window))):
                failed = GenResult("", "error", 0, 0, 0.0, error="transport_fake: planted")
                yield [(base + k, failed if window[k].seed in self.fail else out[k])]
            base += len(window)


class Recording(FakeBackend):
    """An in-process backend that records its batches."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def generate(self, requests):
        self.batches.append([r.seed for r in requests])
        return super().generate(requests)


@pytest.mark.parametrize("backend_kind", ["window", "batches"])
def test_stream_jobs_hands_over_every_result_in_plan_order_and_pulls_the_plan_as_it_goes(tmp_path, monkeypatch,
                                                                                          backend_kind):
    import refinery.generation.stream as stream

    monkeypatch.setattr(stream, "STREAM_PULL", 4)
    calls = _calls(50, repeat_every=7)
    # given a third of the calls already cached, a failing call, and a window answering out of order
    GenerationCache(tmp_path / "c.sqlite").put_many([(c.job.key, r) for c, r in zip(calls[10:27], FakeBackend(
        ).generate([c.job.request for c in calls[10:27]]))])
    backend = OutOfOrder(width=6, fail=frozenset({33})) if backend_kind == "window" else FakeBackend()
    reference, _ = run_jobs([c.job for c in calls], FakeBackend(), GenerationCache(tmp_path / "ref.sqlite"),
                            batch_size=4, quiet=True)
    pulled, got, ahead = [], [], []

    def plan():  # a lazy plan that says how far it has been read
        for c in calls:
            pulled.append(c.n)
            yield c

    def sink(block, results):
        got.append((block, results))
        ahead.append(len(pulled) - sum(len(b) for b, _ in got))  # calls read from the plan, not yet handed over

    # when the calls stream to the sink in blocks of 8
    stats = stream_jobs(plan(), backend, GenerationCache(tmp_path / "c.sqlite"), sink=sink, batch_size=4, block=8,
                        quiet=True)
    # then the blocks are the calls in plan order, 8 at a time (the last one shorter)
    assert [[c.n for c in b] for b, _ in got] == [list(range(i, min(i + 8, 50))) for i in range(0, 50, 8)]
    # and each result is the one run_jobs gives for the same call, failures included
    flat = [r for _, results in got for r in results]
    if backend_kind == "window":
        assert flat[33].error == "transport_fake: planted"
        flat[33] = reference[33]
    assert [(r.text, r.finish_reason) for r in flat] == [(r.text, r.finish_reason) for r in reference]
    assert stats.cache_hits == 17
    # and the plan is read ahead of what was handed over by two blocks, the window's queue and a pull at most (a
    # block and the one being pulled without a window): never whole
    limit = 2 * 8 + 2 * 6 + 4 if backend_kind == "window" else 8 + 8
    assert max(ahead) <= limit < 50


def test_stream_jobs_sends_an_in_process_model_the_batches_run_jobs_sends(tmp_path):
    calls = _calls(40)
    for cache in ("a.sqlite", "b.sqlite"):  # the same calls cached in both, so some batches are short
        GenerationCache(tmp_path / cache).put_many([(c.job.key, r) for c, r in zip(
            calls[5:13], FakeBackend().generate([c.job.request for c in calls[5:13]]))])
    listed, streamed = Recording(), Recording()
    run_jobs([c.job for c in calls], listed, GenerationCache(tmp_path / "a.sqlite"), batch_size=4, quiet=True)
    stream_jobs(iter(calls), streamed, GenerationCache(tmp_path / "b.sqlite"), sink=lambda b, r: None, batch_size=4,
                block=10, quiet=True)  # a block of 10 is rounded to 12: three batches
    assert streamed.batches == listed.batches and [len(b) for b in listed.batches] == [4, 1, 3] + [4] * 6


def test_stream_jobs_answered_wholly_from_the_cache_builds_no_backend(tmp_path):
    calls = _calls(20)
    cache = GenerationCache(tmp_path / "c.sqlite")
    run_jobs([c.job for c in calls], FakeBackend(), cache, batch_size=2, quiet=True)
    got = []
    stats = stream_jobs(iter(calls), lambda: pytest.fail("no backend is built when everything is cached"), cache,
                        sink=lambda b, r: got.append(len(b)), batch_size=2, block=6, quiet=True)
    assert got == [6, 6, 6, 2] and stats.calls == 0 and stats.cache_hits == 20


# ---- the stage: the same rows, metrics and chains whatever the block size ----

def _project(tmp: Path) -> Path:
    from stages.split import SplitParams, split

    documents, qa = seed_tables(tmp)
    result = split(documents, qa, SplitParams(seed=1, fractions={"train": 1.0, "val": 0.0, "test": 0.0}))
    pq.write_table(result.tables["train"], tmp / "train.parquet")
    pq.write_table(documents, tmp / "documents.parquet")
    mix = {"answer_augmentation": 0.2, "new_question": 0.2, "evol_depth": 0.3, "critique_revise": 0.3}
    return params_for(tmp, generate={"budget": 40, "batch_size": 4, "strategy_mix": mix, "evol_rounds": 2,
                                     "allocation": "plain", "rare_expansion": None, "max_failure_share": 1.0})


def _teacher(monkeypatch, fail_after: int | None = None) -> None:
    """The teacher: the scale benchmark's mock replies (each strategy's format), in-process; optionally a run that
    breaks down after ``fail_after`` calls."""
    import stages.generate as generate
    from bench.scale_data import mock_reply

    calls = []

    def reply(request: GenRequest) -> str:
        calls.append(1)
        if fail_after is not None and len(calls) > fail_after:
            raise RefineryError("teacher: the server went away")
        return mock_reply(request.prompt, request.seed)

    monkeypatch.setattr(generate, "teacher_backend",
                        lambda *a, **k: ("fake@1", lambda: FakeBackend(responder=reply)))


def _run(tmp: Path, params: Path, out: str) -> int:
    from refinery.cli import main

    return main(["generate", "--params", str(params), "--train", "train.parquet", "--documents", "documents.parquet",
                 "--models", "base", "--prompts", str(ROOT / "prompts"), "--cache", f"{out}.sqlite",
                 "--out", f"{out}.parquet", "--metrics", f"{out}.json", "--critiques", f"{out}.chains.parquet",
                 "--quiet"])


def test_the_streamed_stage_writes_the_rows_metrics_and_chains_of_one_block(in_tmp, monkeypatch):
    import refinery.generation.calls as calls

    params = _project(in_tmp)
    _teacher(monkeypatch)
    # given the stage run with every round in one block, and again in blocks of 3 calls
    assert _run(in_tmp, params, "whole") == 0
    monkeypatch.setattr(calls, "STREAM_BLOCK", 3)
    assert _run(in_tmp, params, "blocks") == 0
    # then the two outputs hold the same rows in the same order, and the same metrics and critique chains
    whole, blocks = pq.read_table("whole.parquet"), pq.read_table("blocks.parquet")
    assert blocks.num_rows == whole.num_rows == 40 and blocks.equals(whole)  # the budget, over both rounds
    assert pq.read_metadata("blocks.parquet").num_row_groups > pq.read_metadata("whole.parquet").num_row_groups
    assert pq.read_table("blocks.chains.parquet").equals(pq.read_table("whole.chains.parquet"))
    metrics = json.loads(Path("blocks.json").read_text())
    assert metrics == json.loads(Path("whole.json").read_text())
    # and the run covered the rounds and the chains: round 2 rewrote round 1's rows, the drafts came last
    assert len(metrics["per_round"]) == 2 and metrics["per_round"][1]["rows"] > 0
    rows = blocks.to_pylist()
    drafts = [i for i, r in enumerate(rows) if r["strategy"] == "critique_revise"]
    assert drafts and drafts == list(range(len(rows) - len(drafts), len(rows)))
    assert metrics["critique_revise"]["chains"] == len(drafts)


def test_a_streamed_stage_that_fails_midway_leaves_no_output(in_tmp, monkeypatch):
    import refinery.generation.calls as calls

    params = _project(in_tmp)
    # given a teacher that breaks down after 10 calls, while blocks of 3 calls are being written
    _teacher(monkeypatch, fail_after=10)
    monkeypatch.setattr(calls, "STREAM_BLOCK", 3)
    # then the stage fails, and neither its output nor a scratch file of it is left
    assert _run(in_tmp, params, "out") == 2
    assert not Path("out.parquet").exists() and not Path("out.json").exists()
    assert [p.name for p in in_tmp.iterdir() if "out" in p.name and p.suffix == ".parquet"] == []
