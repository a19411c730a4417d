"""The engine: units, the local engine, the frozen embedding cache, and the Ray engine equal to the local one.

The Ray tests start their own cluster on 127.0.0.1 (``ray start --head``) and join it by address, as a user joins a
real cluster. The fixture comparison runs the gate stage's core on rows built from tests/data/tiny_seed with model
doubles whose scores depend on the other rows of their call, as a padded batch's do, so any difference in how rows
are cut into calls would show; the slow ci-profile test runs the gate stage's own command both ways.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from refinery.core.errors import ParamsError
from refinery.core.params import parse_section
from refinery.engine.base import scatter, units
from refinery.engine.local import LocalEngine
from refinery.engine.params import EngineParams
from refinery.gates.base import GateContext, Verdicts
from tests.conftest import ROOT

SEED = ROOT / "tests" / "data" / "tiny_seed"


# ---- units and scatter ----

def test_units_cut_each_group_into_runs_of_block_rows_in_first_seen_order():
    # given six rows of two kinds, interleaved
    rows = pa.table({"k": ["a", "b", "a", "a", "b", "a"]})
    # when cut into units of at most two rows, by kind
    got = [u.tolist() for u in units(rows, 2, "k")]
    # then each kind's rows are cut in order, kinds in first-seen order, and no unit mixes kinds
    assert got == [[0, 2], [3, 5], [1, 4]]
    assert [u.tolist() for u in units(rows, None)] == [[0, 1, 2, 3, 4, 5]]
    assert [u.tolist() for u in units(rows, 4)] == [[0, 1, 2, 3], [4, 5]]
    assert units(pa.table({"k": pa.array([], pa.string())}), 2, "k") == []


def test_scatter_puts_verdicts_back_and_refuses_a_row_judged_twice_or_never():
    v = scatter(3, [(np.array([2]), Verdicts([False], [0.5], ["x_bad"])),
                    (np.array([0, 1]), Verdicts([True, True], [0.1, None], [None, None]))])
    assert v.keep == [True, True, False] and v.score == [0.1, None, 0.5] and v.reason == [None, None, "x_bad"]
    with pytest.raises(ValueError, match="two units"):
        scatter(2, [(np.array([0, 1]), Verdicts([True] * 2, [None] * 2, [None] * 2)),
                    (np.array([1]), Verdicts([True], [None], [None]))])
    with pytest.raises(ValueError, match="no unit"):
        scatter(2, [(np.array([0]), Verdicts([True], [None], [None]))])


# ---- params ----

def test_engine_params_name_the_bad_key_in_one_line():
    good = {"kind": "ray", "address": "ray://head.example:10001", "workers": 4, "cpus_per_worker": 2,
            "block_rows": 128}
    assert parse_section(good, EngineParams, where="params.yaml: engine").workers == 4
    for address in ("auto", "local", "10.0.0.5:6379", None):
        assert parse_section({**good, "address": address}, EngineParams, where="p").address == address
    with pytest.raises(ParamsError, match=r"params.yaml: engine.address: .*ray://host:port") as e:
        parse_section({**good, "address": "http://head:8265"}, EngineParams, where="params.yaml: engine")
    assert "\n" not in str(e.value)
    with pytest.raises(ParamsError, match=r"engine.kind"):
        parse_section({**good, "kind": "spark"}, EngineParams, where="params.yaml: engine")
    with pytest.raises(ParamsError, match=r"engine.block_rows"):
        parse_section({**good, "block_rows": 0}, EngineParams, where="params.yaml: engine")


def test_refinery_check_lists_an_engine_error(tmp_path):
    from refinery.inspect.check import check_params

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["engine"]["workers"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    _, problems = check_params(tmp_path / "params.yaml")
    assert any("engine.workers" in p for p in problems), problems


def test_refinery_check_says_when_ray_is_named_but_missing(tmp_path, monkeypatch):
    import importlib.util

    from refinery.inspect.check import check_params

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["engine"]["kind"] = "ray"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    _, problems = check_params(tmp_path / "params.yaml")
    assert [p for p in problems if "engine.kind is ray but Ray is not installed" in p], problems


# ---- doubles whose scores depend on the rest of their call ----

class CallSensitive:
    """Verifier, reward and judge doubles: a row's score moves in its last bits with the size of its call.

    A real model's score does that through length-sorted, padded batches; here any engine that cut rows into
    calls differently from the local engine would change the outputs.
    """

    threshold = 0.5

    @staticmethod
    def _base(texts):
        return np.array([(sum(map(ord, t or "")) % 997) / 997.0 for t in texts])

    def score(self, a, b):  # verifier (passages, claims) and reward (questions, answers)
        return np.clip(self._base([x + y for x, y in zip(a, b)]) + 1e-13 * len(a), 0.0, 1.0)

    def loglikelihood(self, contexts, continuations):  # the judge: perplexity and the LLM judge
        n = len(contexts)
        return [(-1.0 - 3.0 * self._base([c])[0] - 1e-13 * n, max(len(c.split()), 1)) for c in continuations]


class CallSensitiveEmbedder:
    """Hashed bag-of-words vectors, nudged by the call's size (as a padded batch nudges real ones)."""

    dim = 32

    def embed(self, texts):
        import hashlib

        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, int(hashlib.sha256(w.encode()).hexdigest(), 16) % self.dim] += 1
        out += np.float32(1e-4 * len(texts))
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def doubles():
    from refinery.gates.run import Models

    m = CallSensitive()
    return Models(verifier=m, reward=m, judge=m, embedder=CallSensitiveEmbedder())


def seed_and_rows(copies: int = 3):
    """The tiny seed (train, documents) and generated + planted rows built from it (kinds, near copies, PII)."""
    from refinery.core.text import stable_id
    from schemas.injected import ARROW as INJECTED, INJECTION_FIELDS
    from tests.gates.conftest import rows as synthetic_rows

    docs = [json.loads(x) for x in (SEED / "documents.jsonl").read_text().splitlines() if x.strip()]
    qa = [json.loads(x) for x in (SEED / "qa.jsonl").read_text().splitlines() if x.strip()]
    documents = pa.table({"doc_id": [d["doc_id"] for d in docs], "text": [d["text"] for d in docs]})
    texts = dict(zip(documents.column("doc_id").to_pylist(), documents.column("text").to_pylist()))
    train = pa.table({"question": [r["question"] for r in qa[::2]], "answer": [r["answer"] for r in qa[::2]]})
    pairs, extra = [], {"doc_id": [], "evidence_start": [], "evidence_end": []}
    for c in range(copies):
        for i, r in enumerate(qa):
            start = texts[r["doc_id"]].find(r["evidence"])
            answer = r["answer"] if c == 0 else f"{r['answer']} See note {c}."
            if i % 7 == 3:
                answer += " Call +1 415 555 0134."  # PII the document does not hold
            pairs.append((f"{r['question']} ({c})" if c else r["question"], answer))
            extra["doc_id"].append(r["doc_id"])
            extra["evidence_start"].append(start if start >= 0 else None)
            extra["evidence_end"].append(start + len(r["evidence"]) if start >= 0 else None)
    n = len(pairs)
    synthetic = synthetic_rows(pairs, row_id=[stable_id("syn", str(i)) for i in range(n)], **extra)
    kinds = ["clean", "number_change", "entity_swap"]
    planted = synthetic.slice(0, 12)
    for f, v in zip(INJECTION_FIELDS, ([kinds[i % 3] for i in range(12)], ["qa_" + "0" * 16] * 12, ["answer"] * 12,
                                        [None] * 12)):
        planted = planted.append_column(f, pa.array(v, f.type))
    planted = planted.set_column(0, "row_id", pa.array([stable_id("inj", str(i)) for i in range(12)]))
    return train, documents, synthetic, planted.cast(INJECTED)


def gate_params():
    from refinery.gates.run import GateParams

    section = yaml.safe_load((ROOT / "params.yaml").read_text())["gate"]
    section["faithfulness"] = {**section["faithfulness"], "compare_modes": False}
    return parse_section(section, GateParams, where="gate")


def recipe_and_gates(models=None):
    from refinery.gates.run import GateRecipe, build_gates, calibrate, model_factory

    train, documents, synthetic, planted = seed_and_rows()
    models = models or doubles()
    ctx = GateContext(train, documents, models, None, calib=synthetic.slice(0, 10))
    thresholds = calibrate(gate_params(), ctx)
    return GateRecipe(thresholds, train, documents, model_factory(models), None), build_gates(thresholds, ctx), \
        synthetic, planted


def gate_both(engine, mode: str):
    from refinery.gates.run import GateRequest, gate_tables

    recipe, gates, synthetic, planted = recipe_and_gates()
    return gate_tables([GateRequest(synthetic, mode), GateRequest(planted, "full", by="injection_kind")], gates,
                       engine=engine, recipe=recipe)


def assert_same_rows(a: pa.Table, b: pa.Table):
    """Every column, row by row, floats to the last bit."""
    assert a.schema == b.schema
    assert a.num_rows == b.num_rows
    for name in a.column_names:
        x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
        for i, (p, q) in enumerate(zip(x, y)):
            same = (p == q) or (isinstance(p, float) and isinstance(q, float) and np.isnan(p) and np.isnan(q))
            assert same and type(p) is type(q), f"{name} row {i}: {p!r} != {q!r}"


# ---- the local engine ----

def test_the_local_engine_with_one_unit_per_gate_is_the_engineless_gate_run():
    # given the same rows and gates
    from refinery.gates.run import run_gates

    recipe, gates, synthetic, _ = recipe_and_gates()
    # when gated without an engine and with a local engine whose units hold every row
    plain = run_gates(synthetic, gates)
    _, gates2, _, _ = recipe_and_gates()
    engine = run_gates(synthetic, gates2, engine=LocalEngine(None, quiet=True), recipe=recipe)
    # then the outputs are equal to the last bit
    assert_same_rows(plain, engine)


class CountingEngine(LocalEngine):
    """A local engine that records each pass: per job, its gates and whether it is a cascade."""

    def __init__(self, block_rows):
        super().__init__(block_rows, quiet=True)
        self.passes = []

    def judge(self, jobs, gates, recipe=None):
        self.passes.append([(job.names, job.cascade) for job in jobs])
        return super().judge(jobs, gates, recipe)


@pytest.mark.parametrize("block_rows", [None, 4])
def test_a_cascade_is_one_engine_pass_per_run_of_row_by_row_gates_and_equals_gate_by_gate(block_rows):
    # given generated rows in cascade mode and planted rows in full mode
    from refinery.gates.registry import CASCADE
    from refinery.gates.run import GateRequest, compares_rows, gate_tables

    recipe, gates, synthetic, planted = recipe_and_gates()
    engine = CountingEngine(block_rows)
    # when both are gated
    gated, _ = gate_tables([GateRequest(synthetic, "cascade"), GateRequest(planted, "full", by="injection_kind")],
                           gates, engine=engine, recipe=recipe)
    # then the engine ran two passes: the gates before dedup (no model: light tasks on Ray), then every gate after
    # it with the planted rows (the one pass that loads models)
    from refinery.gates.registry import BY_NAME

    cut = [i for i, n in enumerate(CASCADE) if compares_rows(n)]
    assert cut == [1] and not BY_NAME[CASCADE[0]].needs_model
    assert engine.passes[0] == [(CASCADE[:1], True)]
    assert [cascade for _, cascade in engine.passes[1]] == [False, True] and engine.passes[1][1][0] == CASCADE[2:]
    assert len(engine.passes) == 2
    # and with one unit per gate (block_rows None) the verdicts are those of gates applied one after another
    if block_rows is None:
        _, fresh, _, _ = recipe_and_gates()
        standing = np.arange(synthetic.num_rows)
        for name in CASCADE:
            v = fresh[name].apply(synthetic.take(pa.array(standing)))
            keep = gated.column(f"{name}_keep").to_pylist()
            score = gated.column(f"{name}_score").to_pylist()
            assert [keep[i] for i in standing] == v.keep, name
            assert [score[i] for i in standing] == v.score, name
            assert all(keep[i] is None for i in set(range(synthetic.num_rows)) - set(standing.tolist())), name
            standing = standing[np.asarray(v.keep, bool)]
        assert gated.column("gate_keep").to_pylist() == [i in set(standing.tolist())
                                                        for i in range(synthetic.num_rows)]


def test_units_change_model_scores_in_their_last_bits_so_both_engines_must_share_them():
    # given call-size-sensitive doubles (as padded batches are)
    from refinery.gates.run import run_gates

    _, gates, synthetic, _ = recipe_and_gates()
    whole = run_gates(synthetic, gates, engine=LocalEngine(None, quiet=True))
    _, gates, _, _ = recipe_and_gates()
    cut = run_gates(synthetic, gates, engine=LocalEngine(8, quiet=True))
    # then the keep decisions agree but the reward scores differ: block_rows is part of what the stage computes
    assert whole.column("gate_keep").to_pylist() == cut.column("gate_keep").to_pylist()
    assert whole.column("reward_score").to_pylist() != cut.column("reward_score").to_pylist()


def test_the_dedup_gate_always_judges_the_whole_set_whatever_the_units():
    # given rows with near copies spread over many units
    from refinery.gates.run import compares_rows, run_gates

    assert compares_rows("dedup") and not compares_rows("reward")
    _, gates, synthetic, _ = recipe_and_gates()
    seen = []
    real = gates["dedup"].apply
    gates["dedup"].apply = lambda rows: (seen.append(rows.num_rows), real(rows))[1]
    run_gates(synthetic, gates, engine=LocalEngine(4, quiet=True))
    # then dedup saw every row in one call
    assert seen == [synthetic.num_rows]


# ---- the frozen embedding cache ----

class CompositionEmbedder:
    """An Embedder stand-in whose vectors depend on the whole encode call (as padded batches do)."""

    def __init__(self, folder):
        from refinery.models.embed import VectorCache

        self.model_id, self.computed, self.calls = "double@1", 0, []
        self.cache = VectorCache(folder, None, np.float32)

    def encode(self, texts):
        self.calls.append(list(texts))
        self.computed += len(texts)
        return np.array([[len(t), len(texts)] for t in texts], np.float32)


def test_a_frozen_cache_embedding_depends_only_on_its_call_and_the_cache_at_the_start(tmp_path):
    from refinery.engine.embed import FrozenCacheEmbedder

    # given a cache holding "old" from an earlier run
    CompositionEmbedder(tmp_path).cache.put(*_keyed("double@1", ["old"], [[9.0, 9.0]]))
    base = CompositionEmbedder(tmp_path)
    frozen = FrozenCacheEmbedder(base, FrozenCacheEmbedder.shards_of(base))
    # when one call embeds "a", and a later call embeds "a", "bb" and "old"
    first = frozen.embed(["a"])
    later = frozen.embed(["a", "bb", "old"])
    # then the later call embedded "a" again with its own call (not the vector the first call computed),
    # read "old" from the cache as it was at the start, and wrote what it computed for the next run
    assert first.tolist() == [[1.0, 1.0]]
    assert later.tolist() == [[1.0, 2.0], [2.0, 2.0], [9.0, 9.0]]
    assert sorted(base.calls[-1]) == ["a", "bb"]
    cold = CompositionEmbedder(tmp_path / "none")
    assert FrozenCacheEmbedder(cold, FrozenCacheEmbedder.shards_of(cold)).embed(["a", "bb"]).tolist() == \
        [[1.0, 2.0], [2.0, 2.0]]
    fresh = CompositionEmbedder(tmp_path)
    assert FrozenCacheEmbedder(fresh, FrozenCacheEmbedder.shards_of(fresh)).embed(["bb"]).tolist() == [[2.0, 2.0]]
    assert fresh.calls == []


def _keyed(model_id, texts, vecs):
    from refinery.models.embed import content_keys

    keys = content_keys(model_id, texts)
    order = np.argsort(keys)
    return keys[order], np.asarray(vecs, np.float32)[order]


# ---- the Ray engine on a cluster started here ----

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A two-CPU Ray cluster on 127.0.0.1, started with `ray start` as a user starts one; yields its address."""
    pytest.importorskip("ray")
    ray_bin = Path(sys.executable).parent / "ray"
    port = _free_port()
    temp = tmp_path_factory.mktemp("ray")
    # a loopback test cluster: no token (a real cluster's token reaches the driver as RAY_AUTH_TOKEN, docs/ray.md)
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = [str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"]
    proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=120)
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def ray_params(address: str, block_rows: int) -> EngineParams:
    return EngineParams(kind="ray", address=address, workers=2, cpus_per_worker=1, block_rows=block_rows)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "cascade"])
def test_the_ray_engine_gives_the_local_engines_rows_to_the_last_bit(ray_cluster, mode):
    from refinery.engine.raydata import RayEngine

    address, _ = ray_cluster
    # given the tiny seed's generated and planted rows, and units of 8 rows (so both workers get several)
    local = gate_both(LocalEngine(8, quiet=True), mode)
    # when the same gates run on the Ray cluster
    with RayEngine(ray_params(address, 8), quiet=True) as engine:
        remote = gate_both(engine, mode)
    # then both tables (generated and planted rows) are equal, every column, row by row
    for a, b in zip(local, remote):
        assert_same_rows(a, b)
    if mode == "cascade":  # and cascade kept its meaning: later gates judged only rows every earlier one kept
        assert remote[0].column("perplexity_keep").null_count > 0
        assert remote[1].column("perplexity_keep").null_count == 0  # planted rows get every verdict


@pytest.mark.slow
def test_ray_block_maps_and_teacher_batches_keep_their_order(ray_cluster):
    from refinery.engine.raydata import RayEngine
    from refinery.models.backends.base import GenRequest
    from refinery.models.backends.fake import FakeBackend

    address, _ = ray_cluster
    table = pa.table({"x": list(range(50))})
    with RayEngine(ray_params(address, 7), quiet=True) as engine:
        blocks = engine.map_blocks(_double_x, table)
        batches = [[GenRequest(prompt=f"p{i}-{j}", seed=j) for j in range(3)] for i in range(5)]
        backend = FakeBackend()
        got = dict(engine.generate_batches(backend, batches))
        actors = engine._teacher_pool(backend)
        again = dict(engine.generate_batches(backend, batches[:2]))  # a later pass of the same stage
        assert engine._teacher_pool(backend) is actors  # reuses the actors (and the teacher each one built)
    assert [[r.text for r in again[i]] for i in range(2)] == [[r.text for r in got[i]] for i in range(2)]
    assert pa.concat_tables(blocks).column("y").to_pylist() == [2 * x for x in range(50)]
    want = [FakeBackend().generate(b) for b in batches]
    assert sorted(got) == list(range(5))
    assert [[r.text for r in got[i]] for i in range(5)] == [[r.text for r in w] for w in want]


def _double_x(block: pa.Table) -> pa.Table:
    return pa.table({"y": [2 * x for x in block.column("x").to_pylist()]})


def test_a_bad_address_is_one_line_naming_the_key():
    pytest.importorskip("ray")
    from refinery.core.errors import RefineryError
    from refinery.engine.raydata import RayEngine

    engine = RayEngine(ray_params(f"127.0.0.1:{_free_port()}", 8), quiet=True)
    with pytest.raises(RefineryError, match=r"engine.address '127.0.0.1:\d+': nothing answers") as e:
        engine.connect()
    assert "\n" not in str(e.value)


# ---- teacher calls on an engine ----

class Recording:
    """A FakeBackend that records the prompts of each generate call (its batches)."""

    def __init__(self):
        from refinery.models.backends.fake import FakeBackend

        self.fake, self.batches = FakeBackend(), []

    def generate(self, requests):
        self.batches.append([r.prompt for r in requests])
        return self.fake.generate(requests)


class OutOfOrderEngine:
    """An engine double that answers batches last first, and can die after some batches (a kill -9)."""

    name = "double"

    def __init__(self, die_after=None):
        self.die_after, self.sent = die_after, []

    def generate_batches(self, backend, batches):
        for n, i in enumerate(reversed(range(len(batches)))):
            if self.die_after is not None and n == self.die_after:
                raise KeyboardInterrupt("killed")
            self.sent.append([r.prompt for r in batches[i]])
            yield i, backend.generate(batches[i])


def _jobs():
    from refinery.generation.teacher import Job, cache_key
    from refinery.models.backends.base import GenRequest

    reqs = [GenRequest(prompt=f"p{i % 9}", seed=i % 9) for i in range(20)]  # 9 distinct calls, repeated
    return [Job(r, cache_key("m", "t", r, 0)) for r in reqs]


def test_engine_teacher_batches_are_the_in_process_batches_and_results_keep_job_order(tmp_path):
    from refinery.generation.teacher import GenerationCache, run_jobs

    jobs = _jobs()
    # given the in-process run's batches and results
    local = Recording()
    want, _ = run_jobs(jobs, local, GenerationCache(tmp_path / "a.sqlite"), batch_size=4, quiet=True)
    # when an engine answers the same jobs, batches finishing in another order
    engine, remote = OutOfOrderEngine(), Recording()
    got, stats = run_jobs(jobs, remote, GenerationCache(tmp_path / "b.sqlite"), batch_size=4, quiet=True,
                          engine=engine)
    # then it sent the same batches (each key once, in the first batch holding it) and the results are the same
    assert sorted(map(tuple, engine.sent)) == sorted(map(tuple, local.batches))
    assert [r.text for r in got] == [r.text for r in want]
    assert stats.calls == 9 and len(GenerationCache(tmp_path / "b.sqlite")) == 9


def test_a_killed_engine_run_repeats_only_the_batches_in_flight(tmp_path):
    from refinery.generation.teacher import GenerationCache, run_jobs

    jobs = _jobs()
    cache = tmp_path / "c.sqlite"
    # given a run killed after two batches came back
    with pytest.raises(KeyboardInterrupt):
        run_jobs(jobs, Recording(), GenerationCache(cache), batch_size=4, quiet=True,
                 engine=OutOfOrderEngine(die_after=2))
    committed = len(GenerationCache(cache))
    # when it is run again
    engine = OutOfOrderEngine()
    got, stats = run_jobs(jobs, Recording(), GenerationCache(cache), batch_size=4, quiet=True, engine=engine)
    # then the two finished batches were not asked again, and the rows equal an uninterrupted run's
    assert committed > 0 and stats.calls == 9 - committed and stats.cache_hits > 0
    want, _ = run_jobs(jobs, Recording(), GenerationCache(tmp_path / "d.sqlite"), batch_size=4, quiet=True)
    assert [r.text for r in got] == [r.text for r in want]


# ---- validate's per-row checks ----

def test_validate_per_row_checks_through_an_engine_equal_the_one_pass_checks():
    from refinery.validation.expectations import NearDup, check_columns

    # given a dataset whose rows use several scripts
    texts = ["Plain text", "Cyrillic: привет", "Greek: γεια", "日本語のテキスト", "Mixed Ωmega", "12 34"] * 5
    table = pa.table({"row_id": [f"r{i}" for i in range(30)], "source": ["synthetic"] * 30,
                      "question": texts, "answer": texts[::-1], "intent": ["how_to"] * 30,
                      "doc_id": ["d1"] * 30, "teacher": ["t"] * 30, "prompt_template": ["p"] * 30,
                      "parent_ids": [["h1"]] * 30, "evidence_start": [0] * 30, "evidence_end": [1] * 30})
    seed = pa.table({"question": ["Plain"], "answer": ["text"], "intent": ["how_to"], "doc_id": ["d1"]})
    held = pa.table({"question": ["other"], "answer": ["row"], "doc_id": ["d9"]})
    args = (table, held, held, seed, {"d1": "c"}, NearDup(0.8, 32, 5))
    # when the per-row checks run in blocks of 7 rows, and in one pass
    blocks = LocalEngine(7, quiet=True)
    split = check_columns(*args, map_blocks=blocks.map_blocks)
    whole = check_columns(*args)
    # then the check columns and statistics are the same
    assert split.frame.equals(whole.frame) and split.stats == whole.stats
    assert whole.stats["scripts"]["foreign_rows"] > 0


def test_a_params_file_without_an_engine_section_runs_locally_one_call_per_gate(tmp_path):
    from refinery.engine.base import engine_of

    (tmp_path / "p.yaml").write_text("gate: {}\n")
    engine = engine_of(tmp_path / "p.yaml")
    assert engine.name == "local" and engine.block_rows is None
    (tmp_path / "q.yaml").write_text("engine: {kind: local, workers: 2, cpus_per_worker: 1, block_rows: 64}\n")
    assert engine_of(tmp_path / "q.yaml").block_rows == 64
    (tmp_path / "r.yaml").write_text("engine: {kind: local, workers: 2, cpus_per_worker: 1, blok_rows: 64}\n")
    with pytest.raises(ParamsError, match=r"r.yaml: engine.(block_rows|blok_rows)"):
        engine_of(tmp_path / "r.yaml")


def test_a_worker_with_other_code_than_the_driver_refuses_in_one_line():
    from refinery.core.errors import RefineryError
    from refinery.engine.raydata import check_code, code_digest

    check_code(code_digest())  # the same code: nothing to say
    with pytest.raises(RefineryError, match="differs from the driver's code") as e:
        check_code("0" * 16)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_the_ci_profiles_gate_stage_writes_the_same_files_on_ray(ci_project):
    # given the ci project after dvc repro (its gate outputs made by the local engine)
    # when its gate stage's own cmd runs again with engine.kind ray (a local cluster of 2 workers), and the
    # benchmark also measures Ray's fixed cost (a cluster whose 2 workers load the gate models, then stop)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_ray_gate.py"), "--project", str(ci_project),
                           "--reference", "dvc", "--check", "--fixed-cost"], cwd=ROOT, capture_output=True, text=True,
                          timeout=3600)
    # then accepted, rejected, injected, thresholds.json and both metrics files equal dvc's byte for byte
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-2])
    assert summary["outputs_equal"] and summary["reference"] == "dvc"
    assert summary["generated_rows"] > 0 and summary["planted_rows"] > 0
    # and the fixed cost was measured (its bound needs a local run: none with --reference dvc)
    assert summary["ray_fixed_s"] > 0 and summary["ray_bound_s"] is None
    if Path("/proc/stat").exists():
        assert summary["ray_busy_cpu_s"] > 0 and summary["ray_fixed_busy_cpu_s"] > 0
    shutil.rmtree(ci_project / ".bench-ray")  # the project as the repro left it
