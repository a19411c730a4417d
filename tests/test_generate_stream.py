"""generate streams its rows: results handed over in job order block by block, the output written as they come."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from refinery.core.errors import RefineryError
from refinery.models.backends.base import GenRequest, GenResult
from refinery.models.backends.fake import FakeBackend
from refinery.generation.teacher import GenerationCache, Job, cache_key, run_jobs
from tests.conftest import ROOT, params_for
from tests.test_split import seed_tables


def _jobs(n: int, repeat_every: int = 0) -> list[Job]:
    jobs = []
    for i in range(n):
        k = i - 1 if repeat_every and i % repeat_every == 0 and i else i  # every n-th job repeats the one before
        request = GenRequest(prompt=f"prompt {k}", max_new_tokens=4, seed=k)
        jobs.append(Job(request, cache_key("fake@1", "t@1", request, 0)))
    return jobs


class OutOfOrder:
    """A streaming backend that answers each window of ``width`` requests last-first, and counts what it yields."""

    def __init__(self, width: int, fail: set[int] = frozenset()):
        self.width, self.fail, self.fake, self.yielded = width, fail, FakeBackend(), 0

    def generate(self, requests):
        return self.fake.generate(requests)

    def generate_stream(self, requests):
        for start in range(0, len(requests), self.width):
            window = list(range(start, min(start + self.width, len(requests))))
            out = self.fake.generate([requests[i] for i in window])
            for i, r in reversed(list(zip(window, out))):
                if requests[i].seed in self.fail:
                    r = GenResult("", "error", 0, 0, 0.0, error="transport_fake: planted")
                self.yielded += 1
                yield [(i, r)]


@pytest.mark.parametrize("backend_kind", ["stream", "batches"])
def test_a_sink_gets_every_result_in_job_order_block_by_block_and_holds_no_more_than_a_block(tmp_path, backend_kind):
    jobs = _jobs(50, repeat_every=7)
    # given a third of the jobs already cached, a failing call, and a backend answering out of order
    GenerationCache(tmp_path / "c.sqlite").put_many([(j.key, r) for j, r in zip(jobs[10:27], FakeBackend().generate(
        [j.request for j in jobs[10:27]]))])
    backend = OutOfOrder(width=6, fail={33}) if backend_kind == "stream" else FakeBackend()
    reference, _ = run_jobs(jobs, FakeBackend(), GenerationCache(tmp_path / "ref.sqlite"), batch_size=4, quiet=True)
    got: list[tuple[int, list[GenResult]]] = []
    held = []

    def sink(start, results):
        got.append((start, results))
        if backend_kind == "stream":  # results the backend gave that no block has taken yet
            held.append(backend.yielded - (start + len(results)))

    # when the run streams its results to the sink in blocks of 8
    out, stats = run_jobs(jobs, backend, GenerationCache(tmp_path / "c.sqlite"), batch_size=4, quiet=True, sink=sink,
                          block=8)
    # then the blocks are consecutive, of 8 jobs (the last one shorter), and nothing is returned
    assert out == [] and [s for s, _ in got] == list(range(0, 50, 8))
    assert [len(r) for _, r in got] == [8] * 6 + [2]
    # and each result is the one the unstreamed run gives, failures included
    flat = [r for _, block in got for r in block]
    if backend_kind == "stream":
        failed = next(i for i, j in enumerate(jobs) if j.request.seed == 33)
        assert flat[failed].error == "transport_fake: planted"
        flat[failed] = reference[failed]
    assert [(r.text, r.finish_reason) for r in flat] == [(r.text, r.finish_reason) for r in reference]
    assert stats.cache_hits == 17
    # and a block is handed over as soon as it is complete: never more than a window answered ahead of it
    assert max(held, default=0) <= 6


def test_a_sink_run_answered_wholly_from_the_cache_still_hands_over_every_block(tmp_path):
    jobs = _jobs(20)
    cache = GenerationCache(tmp_path / "c.sqlite")
    run_jobs(jobs, FakeBackend(), cache, batch_size=4, quiet=True)
    got = []
    _, stats = run_jobs(jobs, lambda: pytest.fail("no backend is built when everything is cached"), cache,
                        batch_size=4, quiet=True, sink=lambda s, r: got.append((s, len(r))), block=6)
    assert got == [(0, 6), (6, 6), (12, 6), (18, 2)] and stats.calls == 0 and stats.cache_hits == 20


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
