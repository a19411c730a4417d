"""The collapse check: samples, rare items, synthetic rows (empty answers kept with a reason), the measures, and
the stage end to end on a tiny model (off: empty outputs at once; on: every generation of both arms)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from refinery.training import collapse as col
from schemas import collapse as schema
from tests.test_train import TINY_EVALUATE, TINY_TRAIN, project, seed_tables, tiny_causal, with_split  # noqa: F401

PARAMS = dict(generations=2, arms=["replace", "accumulate"], train_rows=None, test_rows=None, max_steps=2,
              correct_f1=0.5, rare_min_rows=2, clusters=2, rare_share=0.4, seed=0, bootstrap=200, ci=0.95)


def _train(tmp_path) -> pa.Table:
    _, qa = seed_tables(tmp_path)
    return with_split(qa, "train")


def test_a_sample_is_seeded_and_keeps_file_order(tmp_path):
    t = _train(tmp_path)
    a, b = col.sample(t, 3, 7), col.sample(t, 3, 7)
    assert a.column("row_id").to_pylist() == b.column("row_id").to_pylist()
    ids = t.column("row_id").to_pylist()
    picked = [ids.index(i) for i in a.column("row_id").to_pylist()]
    assert picked == sorted(picked) and a.num_rows == 3
    assert col.sample(t, None, 7).num_rows == t.num_rows == col.sample(t, 10_000, 7).num_rows


def test_rare_intents_are_those_with_few_train_rows():
    t = pa.table({"intent": ["a", "a", "a", "b", None]})
    assert col.rare_intents(t, 2) == {"b"} and col.rare_intents(t, 4) == {"a", "b"}
    assert col.rare_intents(pa.table({"x": [1]}), 2) == set()


def test_an_empty_answer_is_kept_out_of_training_with_its_reason(tmp_path):
    t = _train(tmp_path).slice(0, 3)
    rows = col.synthetic_rows(t, [" An answer. ", "", "Another."], arm="replace", generation=2, writer="replace-g1")
    assert [r["kept"] for r in rows] == [True, False, True]
    assert rows[1]["reason"] == "collapse_empty_answer" and rows[0]["answer"] == "An answer."
    assert {r["parent_id"] for r in rows} == set(t.column("row_id").to_pylist())
    schema.SYNTHETIC.validate(pa.Table.from_pylist(rows, schema=schema.SYNTHETIC_ARROW), "synthetic")
    alone = col.training_table(t, rows, with_human=False)
    anchored = col.training_table(t, rows, with_human=True)
    assert alone.num_rows == 2 and anchored.num_rows == 5
    assert alone.column("answer").to_pylist() == ["An answer.", "Another."]
    assert set(alone.column("origin").to_pylist()) == {"synthetic"} and alone.schema == t.schema


def test_spread_is_zero_for_identical_answers_and_grows_with_their_spread():
    same = np.tile([[1.0, 0.0]], (4, 1))
    apart = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert col.spread(same) == pytest.approx(0.0) and col.spread(apart) > 0.5


def _rows(model, f1s, rare):
    return [{"item_id": f"{model}:r{i}", "arm": model.split("-")[0], "generation": int(model[-1]), "model": model,
             "row_id": f"r{i}", "question": "q", "reference": "a", "prediction": f"answer {i} {model}", "f1": f,
             "correct": f >= 0.5, "factual_verifiable": i % 2 == 0,
             "factual_correct": f >= 0.5 if i % 2 == 0 else None,
             "intent": "x", "rare_intent": r, "cluster": 0, "rare_cluster": not r} for i, (f, r) in enumerate(zip(f1s, rare))]


def test_measure_and_compare_count_what_they_say():
    def embed(texts):
        v = np.array([[len(t), 1.0] for t in texts])
        return v / np.linalg.norm(v, axis=1, keepdims=True)
    a = _rows("accumulate-g1", [1.0, 0.0, 1.0, 0.6], [True, True, False, False])
    m = col.measure(a, embed)
    assert m["f1"] == 0.65 and m["correct_share"] == 0.75
    assert m["factual_items"] == 2 and m["factual_accuracy"] == 1.0
    assert m["rare_intent_items"] == 2 and m["rare_intent_correct_share"] == 0.5
    assert m["rare_intent_f1"] == 0.5 and m["rare_cluster_f1"] == 0.8
    assert m["rare_cluster_correct_share"] == 1.0 and m["empty_answers"] == 0
    r = _rows("replace-g1", [0.0, 0.0, 1.0, 0.0], [True, True, False, False])
    table = pa.Table.from_pylist(a + r, schema=schema.ANSWERS_ARROW)
    d = col.compare(table, "accumulate-g1", "replace-g1", n=200, ci=0.95, seed=0)
    assert d["rows"] == 4 and d["f1"]["mean"] == pytest.approx(0.4) and d["correct"]["mean"] == 0.5


def _write_project(tmp_path, student, minilm, collapse):
    p = project(tmp_path, student, minilm)
    docs, qa = seed_tables(tmp_path)
    p["train"] = tmp_path / "train.parquet"
    pq.write_table(with_split(qa, "train"), p["train"])
    p["params"].write_text(yaml.safe_dump({"train": {**TINY_TRAIN, "max_steps": 2}, "evaluate": TINY_EVALUATE,
                                           "collapse": collapse}))
    return p


def _args(p, out):
    return ["--params", str(p["params"]), "--train", str(p["train"]), "--val", str(p["val"]), "--test",
            str(p["test"]), "--documents", str(p["documents"]), "--models", str(p["models"]), "--out", str(out),
            "--metrics", str(out / "m.json"), "--plot", str(out / "c.png"), "--no-progress"]


def test_off_writes_empty_outputs_without_loading_a_model(tmp_path, monkeypatch):
    from stages.collapse import cli

    p = _write_project(tmp_path, tmp_path / "no-model", None, {**PARAMS, "generations": 0})
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, _args(p, tmp_path / "out"))
    assert res.exit_code == 0, res.output
    assert pq.read_table(tmp_path / "out" / "answers.parquet").num_rows == 0
    assert pq.read_table(tmp_path / "out" / "synthetic.parquet").schema == schema.SYNTHETIC_ARROW
    assert json.loads((tmp_path / "out" / "m.json").read_text())["generations"] == 0
    assert (tmp_path / "out" / "c.png").stat().st_size > 0


@pytest.mark.slow
def test_every_generation_of_both_arms_trains_on_its_own_data_and_is_measured(tmp_path, tiny_causal, minilm_dir,
                                                                              monkeypatch):
    from stages.collapse import cli

    from refinery.training import lora

    real = lora.generate

    def speak(*args, **kwargs):  # the random tiny model mostly says nothing: give it words, and one empty answer
        out = real(*args, **kwargs)
        return [""] + [f"{o} answer {i % 3}".strip() for i, o in enumerate(out[1:])]

    monkeypatch.setattr(lora, "generate", speak)
    p = _write_project(tmp_path, tiny_causal, minilm_dir, PARAMS)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, _args(p, out))
    assert res.exit_code == 0, res.output
    answers = schema.ANSWERS.validate(pq.read_table(out / "answers.parquet"), "answers")
    n_test = pq.read_table(p["test"]).num_rows
    models = answers.column("model").to_pylist()
    assert sorted(set(models)) == ["accumulate-g1", "accumulate-g2", "base-g0", "replace-g1", "replace-g2"]
    assert all(models.count(m) == n_test for m in set(models))
    syn = schema.SYNTHETIC.validate(pq.read_table(out / "synthetic.parquet"), "synthetic").to_pylist()
    n_train = pq.read_table(p["train"]).num_rows
    # generation 1 of both arms trains on the untuned student's answers; generation 2 on its own arm's generation 1
    assert {(r["arm"], r["generation"], r["writer"]) for r in syn} == {
        ("replace", 1, "base-g0"), ("accumulate", 1, "base-g0"), ("replace", 2, "replace-g1"),
        ("accumulate", 2, "accumulate-g1")}
    assert len(syn) == 4 * n_train
    m = json.loads((out / "m.json").read_text())
    train = {arm: [t["rows"] for t in m["training"][arm]] for arm in ("replace", "accumulate")}
    replace_kept = [s["kept"] for s in m["synthetic"]["replace"]]
    acc_kept = [s["kept"] for s in m["synthetic"]["accumulate"]]
    # replace trains on that generation's answers alone; accumulate on the human rows plus every generation so far
    assert train["replace"] == replace_kept
    assert train["accumulate"] == [n_train + acc_kept[0], n_train + acc_kept[0] + acc_kept[1]]
    assert [c["generation"] for c in m["curves"]["replace"]] == [0, 1, 2]
    assert m["curves"]["replace"][0] == m["curves"]["accumulate"][0]  # generation 0 is shared
    assert set(m["compare"]) == {"accumulate - replace, generation 1", "accumulate - replace, generation 2",
                                 "replace generation 2 - generation 0", "accumulate generation 2 - generation 0"}
    assert (out / "c.png").stat().st_size > 0


@pytest.mark.slow
def test_a_generation_that_says_nothing_is_one_clear_error(tmp_path, tiny_causal, minilm_dir, monkeypatch):
    from refinery.training import lora
    from stages.collapse import cli

    monkeypatch.setattr(lora, "generate", lambda model, tok, prompts, **kw: [""] * len(prompts))
    p = _write_project(tmp_path, tiny_causal, minilm_dir, PARAMS)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, _args(p, tmp_path / "out"))
    assert res.exit_code != 0 and "every answer of base-g0 is empty; nothing to train on" in str(res.exception)
    assert not (tmp_path / "out").exists()  # no partial output
