"""Scale fixes keep their results: each faster algorithm against the one it replaced, on random inputs."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pytest

from refinery.generation.few_shot import ShotPool, sample_shots
from refinery.generation.teacher import GenerationCache, cache_key, request_fields
from refinery.models.backends.base import GenRequest, GenResult


def old_sample_shots(rows, doc_id, n, rng):
    """The list scan sample_shots did before ShotPool (one pass over every row per draw)."""
    others = [r for r in rows if r["doc_id"] != doc_id]
    if not others:
        return []
    return [others[i] for i in rng.choice(len(others), size=min(n, len(others)), replace=False)]


@pytest.mark.parametrize("seed", range(5))
def test_shot_pool_draws_what_the_list_scan_drew(seed):
    # given seed rows spread unevenly over documents, with runs of one document and a document holding most rows
    r = np.random.default_rng(seed)
    docs = [f"d{i}" for i in range(int(r.integers(1, 12)))]
    weights = r.dirichlet(np.ones(len(docs)))
    rows = [{"row_id": f"r{i}", "doc_id": docs[int(r.choice(len(docs), p=weights))]}
            for i in range(int(r.integers(0, 60)))]
    pool = ShotPool(rows)
    for doc in docs + ["absent"]:
        for n in (0, 1, 2, 5, 100):
            # when both draw with the same generator state
            old = old_sample_shots(rows, doc, n, np.random.default_rng(seed * 1000 + n))
            new_rng = np.random.default_rng(seed * 1000 + n)
            new = pool.sample(doc, n, new_rng)
            # then they draw the same rows and leave the generator in the same state
            assert [x["row_id"] for x in new] == [x["row_id"] for x in old]
            ref = np.random.default_rng(seed * 1000 + n)
            old_sample_shots(rows, doc, n, ref)
            assert new_rng.integers(1 << 30) == ref.integers(1 << 30)
            assert [x["row_id"] for x in sample_shots(rows, doc, n, np.random.default_rng(seed * 1000 + n))] == \
                [x["row_id"] for x in old]


def _requests(seed: int) -> list[GenRequest]:
    r = np.random.default_rng(seed)
    out = []
    for i in range(40):
        text = "".join(r.choice(list("ab é\n\"{}"), size=int(r.integers(1, 30))))
        kind = dict(prompt=text) if i % 2 else dict(messages=(("system", "x"), ("user", text)))
        out.append(GenRequest(**kind, max_new_tokens=int(r.integers(1, 200)), temperature=float(r.random()),
                              top_p=float(r.uniform(0.1, 1.0)), stop=tuple(r.choice(["\n", "###", "Q:"], size=i % 3)),
                              seed=int(r.integers(0, 1 << 40)), require_text=bool(i % 4 == 0),
                              require="Answer:" if i % 5 == 0 else ""))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_cache_keys_are_what_as_dict_gave(seed):
    for req in _requests(seed):
        # given a request of any shape, when its fields are read for the key
        assert request_fields(req) == req.as_dict()
        old = hashlib_key("m@1", "t@abc", req, 3)
        # then the cache key is the one earlier runs stored results under
        assert cache_key("m@1", "t@abc", req, 3) == old


def hashlib_key(model, template, request, sample_index):
    import hashlib

    payload = {"model": model, "template": template, "request": request.as_dict(), "sample_index": sample_index}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def test_cached_results_are_stored_as_before_and_read_back(tmp_path):
    # given results with text, errors and non-ASCII
    results = [GenResult(text=f"é {i}\n", finish_reason="stop", prompt_tokens=i, completion_tokens=2 * i,
                         latency_s=0.5 * i, error=None if i % 3 else "transport_timeout: x") for i in range(10)]
    store = GenerationCache(tmp_path / "c.sqlite")
    store.put_many([(f"k{i}", r) for i, r in enumerate(results)])
    # then each is stored as the JSON text asdict gave, and read back equal
    with sqlite3.connect(tmp_path / "c.sqlite") as db:
        stored = dict(db.execute("select key, result from results").fetchall())
    assert stored == {f"k{i}": json.dumps(asdict(r), ensure_ascii=False) for i, r in enumerate(results)}
    assert store.get_many([f"k{i}" for i in range(10)]) == {f"k{i}": r for i, r in enumerate(results)}
    store.close()


def old_to_rows(planned, results, documents, *, origin, teacher_id, phash, code_version):
    """to_rows as it was: one dict per row, then Table.from_pylist."""
    from refinery.core.text import stable_id
    from refinery.generation import strategies as strat
    from schemas import synthetic as synthetic_schema

    texts = dict(zip(documents.column("doc_id").to_pylist(), documents.column("text").to_pylist()))
    out = []
    for p, r in zip(planned, results):
        s = strat.STRATEGIES[p.strategy]
        question, answer, parse_error = (None, None, None)
        if r.ok:
            question, answer, parse_error = strat.parse_output(s, r.text)
            if parse_error is None and s.output == "answer":
                question = p.parent["question"]
            elif parse_error is None and s.output == "question":  # answer_first: the span is the answer
                answer = texts[p.parent["doc_id"]][p.span[0]:p.span[1]] if s.answer_from == "span" \
                    else p.parent["answer"]
        req = p.job.request
        out.append({
            "row_id": stable_id("syn" if origin == "synthetic" else origin[:3], p.job.key), "origin": origin,
            "parent_ids": [p.parent["row_id"]], "doc_id": p.parent["doc_id"], "evidence_start": p.span[0],
            "evidence_end": p.span[1], "strategy": p.strategy, "teacher": teacher_id,
            "prompt_template": p.template_ref,
            "gen_params": json.dumps({"max_new_tokens": req.max_new_tokens, "temperature": req.temperature,
                                      "top_p": req.top_p, "stop": list(req.stop)}, sort_keys=True),
            "attempt": 0, "recovery_action": None, "params_hash": phash, "code_version": code_version,
            "question": question, "answer": answer, "intent": p.parent["intent"],
            "evidence": texts[p.parent["doc_id"]][p.span[0]:p.span[1]], "raw_output": r.text,
            "parse_error": parse_error, "error": r.error, "finish_reason": r.finish_reason,
            "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "seed": req.seed, "sample_index": p.sample_index, "cache_key": p.job.key,
        })
    return pa.Table.from_pylist(out, schema=synthetic_schema.ARROW)


def _plan(tmp_path, budget=60, shots=2, sample_shots_fn=None, monkeypatch=None):
    from refinery.generation import strategies as strat
    from refinery.generation.calls import load_templates
    from stages import generate
    from stages.generate import GenerateParams, TokenBudget
    from stages.split import SplitParams, split
    from tests.conftest import ROOT
    from tests.test_split import seed_tables

    documents, qa = seed_tables(tmp_path)
    train = split(documents, qa, SplitParams(seed=1, fractions={"train": 1.0, "val": 0.0, "test": 0.0})).tables["train"]
    params = GenerateParams(seed=3, budget=budget, strategy_mix=None, temperature=0.7, top_p=0.95, shots=shots,
                            max_new_tokens=TokenBudget(answer=16, question=16, qa=24), batch_size=4, threads=1,
                            skip_stale=True, window_sentences=1, max_failure_share=0.5)
    if sample_shots_fn is not None:
        monkeypatch.setattr(generate, "sample_shots", sample_shots_fn)
    templates = load_templates(ROOT / "prompts", list(strat.GENERATION_STRATEGIES))
    planned, _ = generate.plan(train, documents, templates, params, "fake@1")
    return planned, documents


def test_generate_plans_the_same_calls_as_with_the_list_scan(tmp_path, monkeypatch):
    # given the demo-shaped seed and a budget of several calls per seed row
    new, _ = _plan(tmp_path / "a")
    # when the shots are drawn by the list scan instead of the pool
    old, _ = _plan(tmp_path / "b", sample_shots_fn=lambda pool, doc, n, rng: old_sample_shots(pool.rows, doc, n, rng),
                   monkeypatch=monkeypatch)
    # then every planned call (prompt, seed, cache key, passage span) is the same
    assert [(p.job.key, p.job.request, p.span, p.strategy) for p in new] == \
        [(p.job.key, p.job.request, p.span, p.strategy) for p in old]


def test_rows_are_built_as_before(tmp_path):
    from refinery.generation.calls import to_rows
    from refinery.models.backends.fake import FakeBackend

    # given planned calls and results with failures, unparsable text and sampling settings that differ
    planned, documents = _plan(tmp_path)
    results = FakeBackend(fail_every=7).generate([p.job.request for p in planned])
    results = [GenResult(text="Q?\nAnswer: yes.", finish_reason="stop", prompt_tokens=3, completion_tokens=4,
                         latency_s=0.1)
               if i % 5 == 0 else r for i, r in enumerate(results)]
    kw = dict(origin="synthetic", teacher_id="fake@1", phash="p", code_version="c")
    # then the table is the one the row-by-row build gave, to the byte
    new, old = to_rows(planned, results, documents, **kw), old_to_rows(planned, results, documents, **kw)
    assert new.equals(old) and new.schema == old.schema
    assert to_rows(planned, results, documents, **{**kw, "origin": "recovered"}).equals(
        old_to_rows(planned, results, documents, **{**kw, "origin": "recovered"}))


def _qa(r: np.random.Generator, n: int, prefix: str, base: list[tuple[str, str]] | None = None) -> pa.Table:
    """Random question/answer rows from a small vocabulary; some copy or lightly edit a ``base`` row."""
    words = [f"w{i}" for i in range(40)]
    qs, ans = [], []
    for _ in range(n):
        if base and r.random() < 0.4:
            q, a = base[int(r.integers(len(base)))]
            if r.random() < 0.5:  # a near copy: one word changed
                parts = a.split()
                parts[int(r.integers(len(parts)))] = str(r.choice(words))
                a = " ".join(parts)
        else:
            q = " ".join(r.choice(words, size=int(r.integers(3, 9)))) + "?"
            a = " ".join(r.choice(words, size=int(r.integers(4, 14)))) + "."
        qs.append(q), ans.append(a)
    return pa.table({"row_id": [f"{prefix}_{i:016x}" for i in range(n)], "question": qs, "answer": ans})


@pytest.mark.parametrize("seed", range(4))
def test_an_extended_dedup_gate_judges_as_one_built_on_the_whole_pool(seed, tmp_path):
    from refinery.gates.dedup import DedupGate

    r = np.random.default_rng(seed)
    pool = _qa(r, 120, "acc")
    base = list(zip(pool.column("question").to_pylist(), pool.column("answer").to_pylist()))
    more = _qa(r, 30, "rec", base)
    cands = _qa(r, 80, "cnd", base + list(zip(more.column("question").to_pylist(), more.column("answer").to_pylist())))
    whole = DedupGate(pa.concat_tables([pool, more]), max_jaccard=0.5, cache_dir=tmp_path / "a")
    for warm in (False, True):
        gate = DedupGate(pool, max_jaccard=0.5, cache_dir=tmp_path / "b")
        if warm:  # the base gate has judged once, so its seed signatures are held and reused
            gate.apply(cands.slice(0, 5))
        got, want = gate.extended(more).apply(cands), whole.apply(cands)
        assert (got.keep, got.score, got.reason) == (want.keep, want.score, want.reason)
        assert not all(want.keep)  # the case is not vacuous


def test_recovery_regates_each_round_as_with_a_fresh_pool_gate(tmp_path):
    from refinery.gates.dedup import DedupGate, PooledDedup
    from refinery.recovery.loop import pool_of
    from refinery.recovery.run import Regater
    from tests.gates.conftest import rows as synthetic_rows

    r = np.random.default_rng(7)
    seed_rows = _qa(r, 60, "qa")
    accepted = _qa(r, 150, "acc", list(zip(seed_rows.column("question").to_pylist(),
                                           seed_rows.column("answer").to_pylist())))
    bounds = {"max_jaccard": 0.5, "num_perm": 128, "shingle": 5}
    base = DedupGate(seed_rows, **bounds)

    class Only:  # every other gate keeps every row: the comparison is about dedup
        def __init__(self, name):
            self.name = name

        def apply(self, rows):
            from refinery.gates.base import Verdicts

            return Verdicts([True] * rows.num_rows, [None] * rows.num_rows, [None] * rows.num_rows)

    from refinery.gates.registry import GATES

    gates = {g: Only(g) for g in GATES}
    gates["dedup"] = base
    regate = Regater(gates, bounds, tmp_path / "cache", "full")
    recovered: list[pa.Table] = []
    reasons: set[str] = set()
    known = list(zip(accepted.column("question").to_pylist(), accepted.column("answer").to_pylist()))
    for round_ in range(4):
        for method_pool in (pool_of(accepted), pool_of(accepted, *recovered)):  # naive restarts from the base pool
            cands = _qa(r, 40, f"c{round_}", known)
            cand_rows = synthetic_rows(list(zip(cands.column("question").to_pylist(),
                                                cands.column("answer").to_pylist())),
                                       row_id=cands.column("row_id").to_pylist())
            got = regate(cand_rows, method_pool)
            fresh = PooledDedup.over(base, method_pool, bounds, tmp_path / "cache")
            from refinery.gates.run import run_gates

            want = run_gates(cand_rows, {**gates, "dedup": fresh}, "full")
            assert got.equals(want)
            reasons.update(x for x in got.column("dedup_reason").to_pylist() if x)
        recovered.append(cands.slice(0, 10))
        known += list(zip(cands.column("question").to_pylist()[:10], cands.column("answer").to_pylist()[:10]))
    assert {"dedup_exact_accepted", "dedup_near_accepted"} <= reasons  # the pool did reject rows


@pytest.mark.parametrize("seed", range(3))
def test_a_dedup_gate_judges_each_table_as_a_fresh_one_would(seed):
    # assemble deduplicates every arm, and validate checks every dataset, with one gate that keeps its signatures
    from refinery.gates.dedup import DedupGate

    r = np.random.default_rng(seed)
    anchor = _qa(r, 80, "qa")
    known = list(zip(anchor.column("question").to_pylist(), anchor.column("answer").to_pylist()))
    shared = DedupGate(anchor, max_jaccard=0.5)
    judged = []
    for k in range(4):  # overlapping tables, as arms share rows
        table = _qa(r, 60, f"t{k}", known)
        known += list(zip(table.column("question").to_pylist()[:20], table.column("answer").to_pylist()[:20]))
        got, want = shared.apply(table), DedupGate(anchor, max_jaccard=0.5).apply(table)
        assert (got.keep, got.score, got.reason) == (want.keep, want.score, want.reason)
        judged.append(not all(want.keep))
    assert any(judged)


def test_assemble_fails_on_an_unknown_document_as_the_eager_export_did():
    from refinery.core.errors import InputError
    from stages.assemble import SftRecords, check_documents, sft_records

    r = np.random.default_rng(3)
    passages = {f"d{i}": f"Passage {i} text." for i in range(5)}
    tables = {}
    for arm in ("a", "b", "c"):
        n = 30
        docs = [f"d{int(x)}" for x in r.integers(0, 7, n)]  # d5, d6 are unknown
        tables[arm] = pa.table({"row_id": [f"{arm}{i}" for i in range(n)], "doc_id": docs, "question": ["q?"] * n,
                                "answer": ["a."] * n, "weight": [1.0] * n, "evidence": ["x"] * n,
                                "evidence_start": [0] * n, "evidence_end": [3] * n})
    # the eager export failed on the first arm's first unknown document
    with pytest.raises(InputError) as eager:
        for arm, t in tables.items():
            sft_records(t, passages, 300, f"{arm} dataset")
    with pytest.raises(InputError) as checked:
        check_documents(tables, passages)
    assert str(checked.value) == str(eager.value)
    # and with every document known, the lazy records are the eager ones
    known = {arm: t.filter(pa.compute.is_in(t.column("doc_id"), value_set=pa.array(list(passages))))
             for arm, t in tables.items()}
    check_documents(known, passages)
    lazy = SftRecords(known, passages, 300)
    assert list(lazy) == list(known) and len(lazy) == 3
    assert all(lazy[arm] == sft_records(t, passages, 300, f"{arm} dataset") for arm, t in known.items())


def test_the_recovery_pool_grown_round_by_round_is_the_pool_rebuilt_from_every_recovered_row():
    from refinery.recovery.loop import pool_of

    r = np.random.default_rng(5)

    def gated(n, prefix):  # gated-like rows: extra columns, some without an answer
        t = _qa(r, n, prefix)
        answers = [None if r.random() < 0.2 else a for a in t.column("answer").to_pylist()]
        t = t.set_column(2, "answer", pa.array(answers, pa.string()))
        return t.append_column("gate_keep", pa.array([True] * n))

    accepted = gated(50, "acc")
    grown, one_by_one = pool_of(pool_of(accepted)), []
    for round_ in range(5):
        cands = gated(20, f"r{round_}")
        got = sorted(r.choice(20, size=int(r.integers(0, 8)), replace=False).tolist())
        one_by_one += [cands.slice(k, 1) for k in got]  # as run_method keeps them, one table per recovered row
        if got:
            grown = pool_of(grown, cands.take(pa.array(got, pa.int64())))
        assert grown.equals(pool_of(pool_of(accepted), *one_by_one))


@pytest.mark.parametrize("seed", range(6))
def test_seed_bands_pair_new_rows_as_candidate_pairs_on_the_concatenation(seed):
    from refinery.gates.dedup import SeedBands, candidate_pairs

    r = np.random.default_rng(seed)
    # few distinct values, so buckets hold many rows (more than the first + 8 neighbours each row is paired with)
    values = int(r.integers(2, 6))
    n_seed, n_more, n_new = (int(x) for x in r.integers(0, 60, 3))
    bands, rows = int(r.integers(1, 5)), int(r.integers(1, 3))
    sigs = r.integers(0, values, (n_seed + n_more + n_new, bands * rows)).astype(np.uint32)
    seed_sigs, more, new = sigs[:n_seed], sigs[n_seed:n_seed + n_more], sigs[n_seed + n_more:]

    def expected(upto: int, rows_: np.ndarray) -> np.ndarray:
        pairs = candidate_pairs(rows_, bands, rows)
        return pairs[pairs[:, 1] >= upto]

    got = SeedBands(seed_sigs, bands, rows).pairs(np.concatenate([more, new]))
    assert np.array_equal(got, expected(n_seed, sigs))
    grown = SeedBands(seed_sigs, bands, rows).extended(more)
    assert np.array_equal(grown.pairs(new), expected(n_seed + n_more, sigs))
    assert np.array_equal(grown.pairs(new), SeedBands(sigs[:n_seed + n_more], bands, rows).pairs(new))


def old_merge(keys, vecs, new_keys, new_vecs):
    """VectorCache._merge before the sorted insert: concatenate everything, keep each key's first vector."""
    all_keys = np.concatenate([keys, new_keys])
    uniq, first = np.unique(all_keys, return_index=True)
    return uniq, np.concatenate([vecs, new_vecs])[first]


@pytest.mark.parametrize("seed", range(5))
def test_vector_cache_merges_as_the_concatenation_did(seed):
    from refinery.models.embed import VectorCache

    # given keys drawn from a small space, so puts repeat keys already held and keys within one put
    r = np.random.default_rng(seed)
    cache = VectorCache(None, 3, np.float32)
    keys, vecs = np.zeros(0, "S16"), np.zeros((0, 3), np.float32)
    for _ in range(6):
        n = int(r.integers(0, 40))
        new_keys = np.array([bytes([int(x)]) * 16 for x in r.integers(0, 50, n)], "S16")
        new_vecs = r.random((n, 3)).astype(np.float32)
        # when both merge the same puts
        cache._merge(new_keys, new_vecs)
        keys, vecs = old_merge(keys, vecs, new_keys, new_vecs)
        # then they hold the same keys, in order, with the same vectors
        assert cache._keys.tolist() == keys.tolist()
        assert np.array_equal(cache._vecs, vecs)


def test_minhash_signatures_do_not_depend_on_the_rows_per_rensa_call(monkeypatch):
    import refinery.gates.dedup as dedup

    # given texts of varied lengths (empty, shorter than a shingle, long) in more rows than one call takes
    r = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "é", "ß", "x"]
    texts = pa.array(["", "ab"] + [" ".join(r.choice(words, int(r.integers(1, 60)))) for _ in range(300)])
    # when signed 1,024 rows per call (the setting), 7 rows per call and all at once
    sigs = []
    for rows in (dedup._SIG_ROWS_PER_CALL, 7, 10_000):
        monkeypatch.setattr(dedup, "_SIG_ROWS_PER_CALL", rows)
        sigs.append(dedup.SignatureStore(None).compute(texts))
    # then every signature is the same
    assert np.array_equal(sigs[0], sigs[1]) and np.array_equal(sigs[0], sigs[2])


@pytest.mark.parametrize("batch", [1, 10, 65_536])
def test_vector_cache_loads_its_shards_as_merging_them_one_by_one_did(tmp_path, monkeypatch, batch):
    import refinery.models.embed as embed
    from refinery.models.embed import VectorCache

    monkeypatch.setattr(embed, "_LOAD_BATCH", batch)  # merged shard by shard, a few at a time, all at once

    # given shards written by separate puts whose keys overlap (a key cached twice with different vectors)
    r = np.random.default_rng(3)
    for _ in range(5):
        writer = VectorCache(tmp_path / "c", 3, np.float32)
        new_keys = np.unique(np.array([bytes([int(x)]) * 16 for x in r.integers(0, 30, 12)], "S16"))
        writer.put(new_keys, r.random((len(new_keys), 3)).astype(np.float32))
    # when a fresh cache loads them, and the old way merges the shards one at a time in file order
    loaded = VectorCache(tmp_path / "c", 3, np.float32)
    assert len(loaded) > 0
    from refinery.models.embed import _keys_from_arrow

    keys, vecs = np.zeros(0, "S16"), np.zeros((0, 3), np.float32)
    shards = sorted((tmp_path / "c").glob("part-*.arrow"))
    assert len(shards) == 5
    for shard in shards:
        t = pa.ipc.open_file(str(shard)).read_all()
        shard_vecs = np.asarray(t.column("vec").to_pylist(), np.float32)
        keys, vecs = old_merge(keys, vecs, _keys_from_arrow(t.column("key")), shard_vecs)
    # then both hold the same keys and vectors
    assert loaded._keys.tolist() == keys.tolist()
    assert np.array_equal(loaded._vecs, vecs)


def _run_recovery_rounds(monkeypatch, lean: bool, rediagnose: bool):
    """run_method over 40 rows with a fake teacher and gates; ``lean`` False: every candidate read whole, as before."""
    from refinery.recovery import loop
    from refinery.recovery.diagnose import Diagnosis
    from refinery.recovery.loop import RowState, run_method

    if not lean:
        monkeypatch.setattr(loop, "_candidates", lambda gated, full: gated.to_pylist())
    r = np.random.default_rng(11)
    rows = [{"row_id": f"rej{i:03d}", "question": f"q{i}?", "answer": f"a{i}."} for i in range(40)]
    states = [RowState(Diagnosis("low_quality", 0.9, "", bool(r.random() < 0.9))) for _ in rows]
    keep_draw = r.random(400) < 0.35
    calls = iter(range(400))

    def plan(row, s, attempt):
        return "resample", row["row_id"]

    def execute(planned, actions):
        n = len(planned)
        return pa.table({"row_id": [f"c{next(calls):03d}" for _ in range(n)], "parent_ids": [[p] for p in planned],
                         "question": [f"cq{p}?" for p in planned], "answer": [f"ca{p}." for p in planned],
                         "prompt_tokens": pa.array(r.integers(5, 50, n), pa.int64()),
                         "completion_tokens": pa.array(r.integers(5, 50, n), pa.int64()),
                         "extra": ["x" * 30] * n})

    def regate(cands, pool):
        keep = [bool(keep_draw[int(x[1:])]) for x in cands.column("row_id").to_pylist()]
        return cands.append_column("gate_keep", pa.array(keep)).append_column(
            "gate_reasons", pa.array([[] if k else ["rules_short"] for k in keep], pa.list_(pa.string())))

    again = (lambda cand: Diagnosis("truncated", 0.5, cand["extra"], True)) if rediagnose else None
    trail: list[pa.Table] = []
    got = run_method(rows, states, plan, execute, regate, pa.table({"row_id": ["p"], "question": ["pq?"],
                                                                     "answer": ["pa."]}),
                     budget=90, max_attempts=3, rediagnose=again, check_error=None, trail=trail)
    return got, states, trail


@pytest.mark.parametrize("rediagnose", [False, True])
def test_recovery_rounds_read_only_what_they_need_and_keep_what_they_kept(monkeypatch, rediagnose):
    # run_method reads whole candidates only to diagnose them again, and stacks recovered rows once per round
    new, new_states, new_trail = _run_recovery_rounds(monkeypatch, lean=True, rediagnose=rediagnose)
    old, old_states, old_trail = _run_recovery_rounds(monkeypatch, lean=False, rediagnose=rediagnose)
    assert new.equals(old) and new.num_rows > 5
    assert new.column("row_id").num_chunks == 1  # not one chunk per recovered row (Parquet wrote it row by row)
    assert [(s.outcome, s.attempts, s.calls, s.tokens, s.last_reasons, (s.recovered or {}).get("row_id"), s.next)
            for s in new_states] == \
           [(s.outcome, s.attempts, s.calls, s.tokens, s.last_reasons, (s.recovered or {}).get("row_id"), s.next)
            for s in old_states]
    assert all(a.equals(b) for a, b in zip(new_trail, old_trail)) and len(new_trail) == len(old_trail) > 1


def test_vector_cache_reads_its_arrow_shards_and_the_parquet_shards_of_earlier_versions(tmp_path):
    import pyarrow.parquet as pq

    from refinery.engine.embed import FrozenCacheEmbedder
    from refinery.models.embed import VectorCache, _keys_to_arrow

    # given a shard written the earlier way (Parquet) and one written now (Arrow IPC, by put)
    old_keys = np.array([b"a" * 16, b"b" * 16], "S16")
    old_vecs = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    folder = tmp_path / "c"
    folder.mkdir()
    pq.write_table(pa.table({"key": _keys_to_arrow(old_keys), "vec": pa.FixedSizeListArray.from_arrays(
        pa.array(old_vecs.reshape(-1), pa.float32()), 3)}), folder / "part-0000000000000000.parquet")
    new_keys = np.array([b"c" * 16], "S16")
    VectorCache(folder, 3, np.float32).put(new_keys, np.array([[7, 8, 9]], np.float32))
    written = [p.name for p in folder.iterdir() if p.suffix == ".arrow"]
    assert len(written) == 1 and pa.ipc.open_file(str(folder / written[0])).read_all().num_rows == 1
    # when a fresh cache and a frozen view of the folder read them
    found, vecs = VectorCache(folder, 3, np.float32).get(np.concatenate([old_keys, new_keys]))

    class Base:
        cache = VectorCache(folder, 3, np.float32)
        model_id = "m"

    view = FrozenCacheEmbedder(Base(), FrozenCacheEmbedder.shards_of(Base()))._frozen()
    # then both hold every vector of both shards
    assert found.all() and np.array_equal(vecs, np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], np.float32))
    assert len(view) == 3 and np.array_equal(view.get(old_keys)[1], old_vecs)


def _generated_table(n: int, seed: int) -> pa.Table:
    """Generated rows with every outcome: parsed, call errors, parse errors, empty and missing texts."""
    from refinery.generation import strategies as strat

    r = np.random.default_rng(seed)
    names = sorted(strat.STRATEGIES)
    cols: dict[str, list] = {c: [] for c in ("row_id", "parent_ids", "doc_id", "evidence_start", "evidence_end",
                                             "evidence", "question", "answer", "intent", "strategy", "error",
                                             "parse_error", "completion_tokens", "raw_output")}
    for i in range(n):
        outcome = r.integers(0, 5)
        cols["row_id"].append(f"syn{i}")
        cols["parent_ids"].append([f"seed{i % 7}", f"syn{max(i - 1, 0)}"][: 1 + i % 2])
        cols["doc_id"].append(f"d{i % 5}")
        cols["evidence_start"].append(i)
        cols["evidence_end"].append(i + 10)
        cols["evidence"].append(f"evidence {i}")
        cols["question"].append(None if outcome == 1 else ("" if outcome == 2 else f"q{i}?"))
        cols["answer"].append(None if outcome == 1 else ("" if outcome == 3 else f"a{i}"))
        cols["intent"].append(f"intent{i % 3}")
        cols["strategy"].append(names[int(r.integers(0, len(names)))])
        cols["error"].append(["http_503: busy", "timeout", ""][i % 3] if outcome == 1 else None)
        cols["parse_error"].append(["parse_empty", "parse_format", ""][i % 3] if outcome == 4 else None)
        cols["completion_tokens"].append(int(r.integers(0, 50)))
        cols["raw_output"].append(f"output {i}")
    return pa.table(cols)


@pytest.mark.parametrize("seed", [0, 1])
def test_outcome_metrics_count_in_arrow_what_the_row_dicts_counted(seed):
    from collections import Counter

    from refinery.generation.calls import outcome_metrics

    def old(table):  # the earlier implementation: one dict per row
        rows = table.select(["strategy", "error", "parse_error", "completion_tokens"]).to_pylist()

        def counts(sub):
            call = sum(r["error"] is not None for r in sub)
            parse = sum(r["error"] is None and r["parse_error"] is not None for r in sub)
            return {"rows": len(sub), "parsed": len(sub) - call - parse, "call_errors": call, "parse_errors": parse,
                    "failure_share": round((call + parse) / max(len(sub), 1), 4)}

        per = {name: counts([r for r in rows if r["strategy"] == name])
               for name in sorted({r["strategy"] for r in rows})}
        return {**counts(rows),
                "call_errors_by_reason": dict(sorted(Counter(r["error"].split(":", 1)[0] for r in rows
                                                             if r["error"]).items())),
                **{f"dropped_{k}": v for k, v in sorted(Counter(r["parse_error"] for r in rows
                                                                 if r["parse_error"]).items())},
                "per_strategy": per, "completion_tokens": sum(r["completion_tokens"] for r in rows)}

    # given generated rows of every outcome (and an empty table)
    for table in (_generated_table(300, seed), _generated_table(300, seed).slice(0, 0)):
        # when both count them, then the metrics are the same, key order included
        new, before = outcome_metrics(table), old(table)
        assert json.dumps(new) == json.dumps(before)


def test_a_round_rewrites_the_rows_it_did_when_every_row_became_a_dict(monkeypatch):
    from refinery.generation import strategies as strat
    from stages import generate

    table = _generated_table(400, 3)
    # given the earlier selection: every row as a dict, filtered in Python
    before = [r for r in table.to_pylist() if r["strategy"] in strat.EVOL_STRATEGIES and r["error"] is None
              and r["parse_error"] is None and r["question"] and r["answer"]]
    # when the round's rows are selected in Arrow
    now = generate._rewritable(table)
    # then the same rows, in the same order, with the same values of every field a rewrite reads
    assert len(now) == len(before) > 0
    assert [{k: r[k] for k in generate._REWRITE_FIELDS} for r in before] == now
