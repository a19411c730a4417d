"""Assemble: human anchor kept whole, synthetic capped, rare intents topped up first, weights, exports."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from refinery.core.errors import InputError
from refinery.core.text import stable_id
from schemas import datasets as datasets_schema
from schemas import documents as documents_schema
from schemas import gated as gated_schema
from schemas import preference_pairs as pairs_schema
from schemas import split as split_schema
from schemas import synthetic as synthetic_schema
from stages.assemble import AssembleParams, assemble, cap_weights, cli
from tests.conftest import params_for

WORDS = ("amber bolt cedar delta ember fjord garnet harbor indigo juniper kestrel lantern meadow nectar onyx pepper "
         "quartz raven saffron timber umber velvet willow xenon yarrow zephyr anchor bramble cobalt dune falcon "
         "glacier hazel iris jasper kelp lotus maple nimbus orchid pebble quill reed sable thistle upland vale").split()

DEFAULTS = {pa.string(): "x", pa.int32(): 0, pa.int64(): 0, pa.float32(): 0.0, pa.float64(): 0.0, pa.bool_(): True}


def sentence(rng: random.Random, n: int) -> str:
    """A random sentence of made-up words (rows built from it are never near duplicates of each other)."""
    return " ".join(rng.choice(WORDS) for _ in range(n))


def table(schema: pa.Schema, rows: list[dict]) -> pa.Table:
    """Build a table of ``schema``: missing nullable fields are null, missing required ones a plain default."""
    cols = {}
    for f in schema:
        default = None if f.nullable else ([] if pa.types.is_list(f.type) else DEFAULTS[f.type])
        cols[f.name] = pa.array([r.get(f.name, default) for r in rows], f.type)
    return pa.table(cols, schema=schema)


def documents(n_docs: int = 6) -> pa.Table:
    rows = [{"doc_id": f"doc-{i}", "text": f"Passage {i}: " + sentence(random.Random(i), 30),
             "category": ["help_center", "billing"][i % 2], "stale": False, "content_hash": f"{i:016x}",
             "source_file": "documents.jsonl", "source_row": i + 1, "params_hash": "p", "code_version": "c"}
            for i in range(n_docs)]
    return table(documents_schema.ARROW, rows)


def human_rows(intents: list[str], seed: int = 0, split: str = "train", docs: list[str] | None = None) -> pa.Table:
    """Seed QA rows of the split contract, one per intent given, on the given documents (cycled)."""
    rng = random.Random(seed)
    docs = docs or [f"doc-{i}" for i in range(4)]
    rows = []
    for i, intent in enumerate(intents):
        q, a = sentence(rng, 8) + "?", sentence(rng, 10) + "."
        rows.append({"row_id": stable_id("qa", split, str(seed), str(i)), "origin": "human", "parent_ids": [],
                     "doc_id": docs[i % len(docs)], "evidence_start": 0, "evidence_end": 5, "attempt": 0,
                     "params_hash": "p", "code_version": "c", "qa_id": f"{split}-{seed}-{i}", "question": q,
                     "answer": a, "intent": intent, "evidence": "Passa", "source_file": "qa.jsonl",
                     "source_row": i + 1, "split": split})
    return table(split_schema.ARROW, rows)


def synthetic_rows(intents: list[str], seed: int = 100, origin: str = "synthetic", prefix: str = "syn",
                   schema: pa.Schema = gated_schema.SYNTHETIC_ARROW) -> pa.Table:
    """Generated rows with complete provenance (gated columns by default), one per intent given."""
    rng = random.Random(seed)
    rows = []
    for i, intent in enumerate(intents):
        q, a = sentence(rng, 8) + "?", sentence(rng, 10) + "."
        rows.append({"row_id": stable_id(prefix, str(seed), str(i)), "origin": origin,
                     "parent_ids": [stable_id("qa", "train", "0", "0")], "doc_id": f"doc-{i % 4}",
                     "evidence_start": 0, "evidence_end": 5, "strategy": "new_question",
                     "teacher": "embedded:smollm2@abc", "prompt_template": "new_question@0123",
                     "gen_params": "{}", "attempt": 0, "params_hash": "p", "code_version": "c", "question": q,
                     "answer": a, "intent": intent, "evidence": "Passa", "raw_output": a, "finish_reason": "stop",
                     "seed": i, "cache_key": "0" * 64, "gate_reasons": []})
    return table(schema, rows)


def pairs(train: pa.Table) -> pa.Table:
    rows = [{"pair_id": stable_id("pref", r["row_id"]), "prompt": r["question"], "chosen": r["answer"],
             "rejected": "I am not sure.", "category": "vagueness", "corruption": "vague", "detail": "d",
             "parent_id": r["row_id"], "doc_id": r["doc_id"], "category_source": "templated", "params_hash": "p",
             "code_version": "c"} for r in train.to_pylist()[:3]]
    return table(pairs_schema.ARROW, rows)


CURATED = ("max_synthetic_share", "max_synthetic_weight_share", "rare_intent_min", "rare_category_min")


def params(arms: dict | None = None, **over) -> AssembleParams:
    """The demo's three arms (curated's cap and top-up keys may be overridden by keyword), or ``arms``."""
    curated = {"human": True, "sources": ["accepted", "recovered"], "max_synthetic_share": 0.5,
               "max_synthetic_weight_share": 0.45, "rare_intent_min": 3, "rare_category_min": 0}
    curated.update({k: over.pop(k) for k in CURATED if k in over})
    arms = arms or {"human": {"human": True}, "contaminated": {"sources": ["contaminated"], "dedup": False},
                    "curated": curated}
    base = {"seed": 1, "weights": {"human": 1.0, "accepted": 0.5, "recovered": 0.5, "contaminated": 1.0},
            "dedup": {"max_jaccard": 0.55, "num_perm": 64, "shingle": 5}, "arms": arms}
    return AssembleParams.model_validate({**base, **over})


def run(train, accepted, recovered=None, contaminated=None, **over):
    contaminated = contaminated if contaminated is not None else \
        synthetic_rows(["a"] * 3, seed=7, origin="contaminated", prefix="con", schema=synthetic_schema.ARROW)
    return assemble(train, contaminated, accepted, recovered, documents(), pairs(train), params(**over))


def test_curated_keeps_every_human_row_and_adds_synthetic_rows_within_the_cap():
    # given 10 human rows and 20 accepted synthetic rows, cap 0.5
    train = human_rows(["a"] * 10)
    result = run(train, synthetic_rows(["a"] * 20))
    curated = result.tables["curated"]
    # then every human row is there, synthetic rows are capped at the human count, and the contract holds
    assert set(train.column("row_id").to_pylist()) <= set(curated.column("row_id").to_pylist())
    assert curated.column("source").to_pylist().count("accepted") == 10
    assert result.metrics["curated"]["synthetic_share"] == 0.5
    assert result.metrics["curated"]["dropped_cap"] == 10
    datasets_schema.CONTRACT.validate(curated, "curated")
    assert result.tables["human"].column("source").to_pylist() == ["human"] * 10


def test_rare_intents_are_topped_up_first_when_the_cap_binds():
    # given 8 'common' and 1 'rare' human rows; synthetic: 10 common, 3 rare; cap 0.2 -> 2 synthetic rows
    train = human_rows(["common"] * 8 + ["rare"])
    result = run(train, synthetic_rows(["common"] * 10 + ["rare"] * 3), max_synthetic_share=0.2)
    syn = [r for r in result.tables["curated"].to_pylist() if r["source"] != "human"]
    # then both slots go to the rare intent (target 3 = 1 human + 2 synthetic), never beyond the cap
    assert [r["intent"] for r in syn] == ["rare", "rare"]
    assert result.metrics["curated"]["topped_up"] == {"rare": 2}
    assert result.metrics["curated"]["cap"] == 2


def test_rows_generated_for_a_rare_intent_top_it_up_before_rows_that_inherited_it():
    # given 1 'rare' human row; synthetic: 6 rare rows that inherited the intent, 2 written for it (rare_intent)
    train = human_rows(["common"] * 8 + ["rare"])
    accepted = synthetic_rows(["common"] * 4 + ["rare"] * 8)
    strategy = ["new_question"] * 10 + ["rare_intent"] * 2
    accepted = accepted.set_column(accepted.schema.get_field_index("strategy"), "strategy",
                                   pa.array(strategy, pa.string()))
    result = run(train, accepted, max_synthetic_share=0.5, rare_intent_min=3)
    syn = [r for r in result.tables["curated"].to_pylist() if r["source"] != "human" and r["intent"] == "rare"]
    # then the two targeted rows are the top-up (target 3 = 1 human + 2), and the metrics say so
    assert result.metrics["curated"]["topped_up"] == {"rare": 2}
    assert result.metrics["curated"]["topped_up_targeted"] == {"rare": 2}
    assert sum(r["strategy"] == "rare_intent" for r in syn) == 2


def test_rare_intent_short_of_synthetic_rows_is_reported():
    result = run(human_rows(["common"] * 8 + ["rare"]), synthetic_rows(["common"] * 4))
    assert result.metrics["curated"]["rare_intents_short"] == {"rare": 2}


def test_rare_document_categories_are_topped_up_after_intents():
    # given human rows only on help_center documents (doc-0, doc-2); synthetic rows on all four documents
    train = human_rows(["a"] * 6, docs=["doc-0", "doc-2"])
    result = run(train, synthetic_rows(["a"] * 8), max_synthetic_share=0.25, rare_category_min=2)
    syn = [r for r in result.tables["curated"].to_pylist() if r["source"] != "human"]
    # then the two slots (cap 2) go to billing documents (doc-1, doc-3)
    assert sorted(r["doc_id"] for r in syn) in (["doc-1", "doc-1"], ["doc-1", "doc-3"], ["doc-3", "doc-3"])
    assert result.metrics["curated"]["topped_up_categories"] == {"billing": 2}


def test_synthetic_weight_share_is_capped():
    # given equal weights and as many synthetic rows as human rows (weight share 0.5)
    train = human_rows(["a"] * 6)
    result = run(train, synthetic_rows(["a"] * 6), weights={"human": 1.0, "accepted": 1.0, "recovered": 1.0,
                                                            "contaminated": 1.0}, max_synthetic_weight_share=0.25)
    t = result.tables["curated"]
    w = dict(zip(t.column("source").to_pylist(), t.column("weight").to_pylist()))
    syn = sum(x for s, x in zip(t.column("source").to_pylist(), t.column("weight").to_pylist()) if s != "human")
    # then synthetic rows weigh 1/3 each: 6/3 / (6 + 6/3) = 0.25
    assert syn / sum(t.column("weight").to_pylist()) == pytest.approx(0.25)
    assert w["human"] == 1.0
    assert result.metrics["curated"]["synthetic_weight_share"] == 0.25


def test_cap_weights_leaves_tables_under_the_bound_alone():
    t = datasets_schema.ARROW.empty_table()
    assert cap_weights(t, 0.3) == (t, 1.0)


def test_synthetic_duplicates_of_human_rows_and_of_each_other_are_dropped_and_counted():
    train = human_rows(["a"] * 4)
    acc = synthetic_rows(["a"] * 3)
    # a synthetic copy of a human row (re-cased), and a recovered copy of an accepted row
    copy = acc.to_pylist()[0]
    copy.update(question=train.column("question")[0].as_py().upper(), answer=train.column("answer")[0].as_py())
    acc = table(gated_schema.SYNTHETIC_ARROW, [copy] + acc.to_pylist()[1:])
    rec = synthetic_rows(["a"], origin="recovered", prefix="rec")
    rec_row = rec.to_pylist()[0]
    rec_row.update(question=acc.column("question")[1].as_py(), answer=acc.column("answer")[1].as_py())
    rec = table(gated_schema.SYNTHETIC_ARROW, [rec_row]).append_column("diagnosis", pa.array(["x"]))
    result = run(train, acc, recovered=rec)
    m = result.metrics["curated"]
    assert m["dropped_dedup_exact_seed"] == 1 and m["dropped_dedup_exact"] == 1
    assert m["accepted"] + m["recovered"] == 2


def test_recovered_rows_need_their_columns_by_name():
    rec = synthetic_rows(["a"], origin="recovered", prefix="rec").drop_columns(["teacher"])
    with pytest.raises(InputError, match="recovered rows.*missing column.*teacher"):
        run(human_rows(["a"] * 3), synthetic_rows(["a"]), recovered=rec)


def test_contaminated_set_drops_unparsed_rows_and_counts_them():
    con = synthetic_rows(["a"] * 3, seed=7, origin="contaminated", prefix="con", schema=synthetic_schema.ARROW)
    rows = con.to_pylist()
    rows[0]["answer"] = None
    result = run(human_rows(["a"] * 3), synthetic_rows(["a"]),
                 contaminated=table(synthetic_schema.ARROW, rows))
    assert result.tables["contaminated"].num_rows == 2
    assert result.metrics["contaminated"]["candidates"]["dropped_unparsed"] == 1
    assert set(result.tables["contaminated"].column("source").to_pylist()) == {"contaminated"}


def test_sft_and_dpo_exports_use_the_chat_shape():
    train = human_rows(["a"] * 3)
    result = run(train, synthetic_rows(["a"]))
    rec = result.sft["curated"][0]
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]
    assert rec["messages"][1]["content"].startswith("Passage:\nPassage 0")
    assert set(rec) == {"messages", "weight", "row_id"}
    dpo = result.dpo[0]
    assert [m["role"] for m in dpo["prompt"]] == ["system", "user"]
    assert dpo["chosen"][0]["role"] == "assistant" and dpo["rejected"][0]["content"] == "I am not sure."


def test_assemble_is_deterministic():
    train, acc = human_rows(["a"] * 6), synthetic_rows(["a"] * 12)
    a, b = run(train, acc), run(train, acc)
    assert a.tables["curated"].equals(b.tables["curated"])


def test_cli_writes_datasets_exports_and_metrics(tmp_path, in_tmp):
    # given tiny input files
    train = human_rows(["a"] * 5 + ["b"])
    files = {"train": (train, split_schema.ARROW),
             "accepted": (synthetic_rows(["a", "b"]), gated_schema.SYNTHETIC_ARROW),
             "contaminated": (synthetic_rows(["a"] * 6, seed=7, origin="contaminated", prefix="con",
                                             schema=synthetic_schema.ARROW), synthetic_schema.ARROW),
             "documents": (documents(), documents_schema.ARROW), "pairs": (pairs(train), pairs_schema.ARROW)}
    args = []
    for name, (t, schema) in files.items():
        pq.write_table(t.cast(schema), tmp_path / f"{name}.parquet")
        args += [f"--{name}", str(tmp_path / f"{name}.parquet")]
    p = params_for(tmp_path)
    text = p.read_text() + "\nassemble:\n" + "\n".join(
        f"  {k}: {json.dumps(v)}" for k, v in params().model_dump().items()) + "\n"
    p.write_text(text)
    # when the command runs
    (tmp_path / "decisions.json").write_text("[]\n")
    res = CliRunner().invoke(cli, ["--params", str(p), *args, "--decisions", str(tmp_path / "decisions.json"),
                                   "--out", "out", "--metrics", "m.json"])
    # then the three datasets, their chat exports and the DPO file exist
    assert res.exit_code == 0, res.output
    for kind in ("human", "contaminated", "curated"):
        t = pq.read_table(tmp_path / "out" / f"{kind}.parquet")
        assert t.schema.equals(datasets_schema.ARROW)
        lines = (tmp_path / "out" / f"{kind}.sft.jsonl").read_text().splitlines()
        assert len(lines) == t.num_rows
    assert len((tmp_path / "out" / "dpo.jsonl").read_text().splitlines()) == 3
    assert json.loads((tmp_path / "m.json").read_text())["curated"]["rows"] == 8


ISOLATING = {
    "curated": {"human": True, "sources": ["accepted", "recovered"], "max_synthetic_share": 0.5},
    "no_recovery": {"human": True, "sources": ["accepted"], "max_synthetic_share": 0.5},
    "unfiltered": {"human": True, "sources": ["generated"], "dedup": False, "synthetic_rows_of": "curated",
                   "max_synthetic_share": 0.5},
    "synthetic_only": {"sources": ["accepted", "recovered"]},
}


def test_arms_that_isolate_filtering_recovery_and_synthetic_data_draw_from_their_own_sources():
    # given 10 human rows, 3 accepted, 2 recovered and 12 generated rows (the generated pool holds everything)
    train = human_rows(["a"] * 10)
    acc = synthetic_rows(["a"] * 3, seed=101, prefix="acc")
    rec = synthetic_rows(["a"] * 2, seed=102, origin="recovered", prefix="rec")
    gen = synthetic_rows(["a"] * 12, seed=103, prefix="gen", schema=synthetic_schema.ARROW)
    contaminated = synthetic_rows(["a"] * 3, seed=7, origin="contaminated", prefix="con", schema=synthetic_schema.ARROW)
    result = assemble(train, contaminated, acc, rec, documents(), pairs(train), params(arms=ISOLATING), gen)
    src = {k: t.column("source").to_pylist() for k, t in result.tables.items()}
    # then curated = human + accepted + recovered; no_recovery lacks the recovered rows; synthetic_only no human row
    assert sorted(set(src["curated"])) == ["accepted", "human", "recovered"] and src["curated"].count("human") == 10
    assert sorted(set(src["no_recovery"])) == ["accepted", "human"] and len(src["no_recovery"]) == 13
    assert sorted(src["synthetic_only"]) == ["accepted"] * 3 + ["recovered"] * 2
    # and unfiltered holds exactly as many synthetic rows as curated, all drawn from the ungated pool
    assert src["unfiltered"].count("generated") == 5 == result.metrics["unfiltered"]["synthetic"]
    assert src["unfiltered"].count("human") == 10
    for t in result.tables.values():
        datasets_schema.CONTRACT.validate(t, "arm")


def test_an_arm_drawing_from_a_source_not_given_is_an_error():
    train = human_rows(["a"] * 4)
    with pytest.raises(InputError, match="assemble.arms.unfiltered.*generated"):
        assemble(train, train, synthetic_rows(["a"]), None, documents(), pairs(train), params(arms=ISOLATING))


@pytest.mark.parametrize("arms, message", [
    ({"x": {"human": False}}, "needs human: true or at least one synthetic source"),
    ({"x": {"sources": ["accepted"], "max_synthetic_share": 0.5}}, "needs human: true"),
    ({"x": {"human": True, "synthetic_rows_of": "y"}, "y": {"human": True}}, "not an arm listed before it"),
    ({"base": {"human": True}}, "'base' is the untuned model"),
    ({"x": {"sources": ["gated"]}}, "sources"),
])
def test_bad_arm_recipes_are_refused(arms, message):
    with pytest.raises(Exception, match=message):
        params(arms=arms)


def test_the_sft_export_holds_the_prompt_training_builds():
    # given rows on documents longer than the training window
    from refinery.training.lora import messages_for

    train = human_rows(["a"] * 3)
    docs = documents()
    passages = dict(zip(docs.column("doc_id").to_pylist(), docs.column("text").to_pylist()))
    result = assemble(train, train, synthetic_rows(["a"]), None, docs, pairs(train), params(), window_chars=60)
    # then each exported record is exactly what train builds for that row (same window around the evidence)
    for rec, row in zip(result.sft["human"], result.tables["human"].to_pylist()):
        assert rec["messages"] == messages_for(row, passages, 60, with_answer=True)
        assert len(rec["messages"][1]["content"]) < len(passages[row["doc_id"]]) + 100


def test_the_dpo_export_holds_the_prompt_training_builds_for_the_pairs_parent_row():
    # given pairs whose parents are human train rows, on documents longer than the training window
    from refinery.training.lora import messages_for

    train = human_rows(["a"] * 3)
    docs = documents()
    passages = dict(zip(docs.column("doc_id").to_pylist(), docs.column("text").to_pylist()))
    result = assemble(train, train, synthetic_rows(["a"]), None, docs, pairs(train), params(), window_chars=60)
    # then each DPO prompt is the parent's training prompt (its evidence window), without the answer
    for rec, parent in zip(result.dpo, train.to_pylist()):
        assert rec["prompt"] == messages_for(parent, passages, 60, with_answer=False)


def test_cli_writes_a_dataset_card_and_llamafactory_info_naming_every_file(tmp_path, in_tmp):
    import yaml

    test_cli_writes_datasets_exports_and_metrics(tmp_path, in_tmp)
    out = tmp_path / "out"
    text = (out / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    configs = {c["config_name"]: [f["path"] for f in c["data_files"]] for c in header["configs"]}
    assert configs == {"human": ["human.sft.jsonl"], "contaminated": ["contaminated.sft.jsonl"],
                       "curated": ["curated.sft.jsonl"], "dpo": ["dpo.jsonl"]}
    assert header["size_categories"] == ["n<1K"] and header["license"] == "other"
    info = json.loads((out / "dataset_info.json").read_text())
    for name, entry in info.items():
        assert (out / entry["file_name"]).is_file(), name
    assert info["refinery_dpo"]["ranking"] is True
    first = json.loads((out / "dpo.sharegpt.jsonl").read_text().splitlines()[0])
    assert first["chosen"]["role"] == "assistant" and first["messages"][0]["role"] == "system"
