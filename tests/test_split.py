"""Split: group-aware, stratified, deterministic, leakage-free; on tiny tables and on CosmosQA."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refinery.seed.adapters import read_source
from refinery.cli import main
from refinery.core.errors import ParamsError, RefineryError
from refinery.core.params import parse_section
from stages.ingest import IngestParams, ingest
from stages.split import SplitParams, check_leakage, split
from tests.conftest import COSMOSQA, ROOT, TINY_DOCS, TINY_QA, needs_cosmosqa, params_for, write_jsonl

PARAMS = SplitParams(seed=1, fractions={"train": 0.6, "val": 0.2, "test": 0.2})


def seed_tables(tmp_path, docs=TINY_DOCS, qa=TINY_QA):
    seed = tmp_path / "seed"
    write_jsonl(seed / "documents.jsonl", docs)
    write_jsonl(seed / "qa.jsonl", qa)
    params = IngestParams(input=str(seed), format="refinery", max_field_chars=10_000)
    result = ingest(read_source("refinery", str(seed)), params, "test")
    return result.documents, result.qa


def test_groups_never_cross_splits_and_stale_docs_stay_with_their_successor(tmp_path):
    # given a seed where d2 supersedes d1
    documents, qa = seed_tables(tmp_path)
    # when split runs
    result = split(documents, qa, PARAMS)
    # then each document sits in one split, and d1 sits with d2
    where = {}
    for name, t in result.tables.items():
        for d in t.column("doc_id").to_pylist():
            assert where.setdefault(d, name) == name
    assert where["d1"] == where["d2"]
    assert result.metrics["leakage"] == {"shared_documents": 0, "shared_questions": 0, "shared_qa_pairs": 0}
    assert sum(result.metrics["rows"].values()) == qa.num_rows


def test_same_question_on_two_documents_is_kept_in_one_split(tmp_path):
    # given the same question asked of two unrelated documents
    qa = TINY_QA + [{**TINY_QA[4], "qa_id": "q8", "doc_id": "d5", "evidence": "Forgot link"}]
    documents, table = seed_tables(tmp_path, qa=qa)
    result = split(documents, table, PARAMS)
    # then both documents land in the same split (no question leaks)
    splits_of = {n for n, t in result.tables.items() if {"d4", "d5"} & set(t.column("doc_id").to_pylist())}
    assert len(splits_of) == 1


def test_split_is_deterministic_for_a_seed(tmp_path):
    documents, qa = seed_tables(tmp_path)
    a = split(documents, qa, PARAMS)
    b = split(documents, qa, PARAMS)
    assert {k: t.column("row_id").to_pylist() for k, t in a.tables.items()} == \
           {k: t.column("row_id").to_pylist() for k, t in b.tables.items()}


def test_check_leakage_counts_a_planted_leak(tmp_path):
    documents, qa = seed_tables(tmp_path)
    labelled = qa.append_column("split", pa.array(["train"] * qa.num_rows))
    leaky = {"train": labelled, "test": labelled.slice(0, 1)}
    assert check_leakage(leaky) == {"shared_documents": 1, "shared_questions": 1, "shared_qa_pairs": 1}


def test_unknown_stratify_column_is_a_clear_error(tmp_path):
    documents, qa = seed_tables(tmp_path)
    with pytest.raises(RefineryError, match="no column 'topic'"):
        split(documents, qa, SplitParams(seed=1, fractions=PARAMS.fractions, stratify_by="topic"))


def test_fractions_must_name_three_splits_and_sum_to_one():
    with pytest.raises(ParamsError, match=r"split\.fractions|sum to 1"):
        parse_section({"seed": 1, "fractions": {"train": 0.9, "val": 0.2, "test": 0.1}}, SplitParams,
                      where="params.yaml: split")
    with pytest.raises(ParamsError, match="exactly the keys"):
        parse_section({"seed": 1, "fractions": {"train": 1.0}}, SplitParams, where="params.yaml: split")


def test_split_command_rejects_an_input_missing_a_column(in_tmp, tmp_path, capsys):
    # given an ingest output whose qa.parquet lost its 'answer' column
    documents, qa = seed_tables(tmp_path)
    src = in_tmp / "in"
    src.mkdir()
    pq.write_table(documents, src / "documents.parquet")
    pq.write_table(qa.drop_columns(["answer"]), src / "qa.parquet")
    params = params_for(in_tmp)
    rc = main(["split", "--params", str(params), "--in", str(src), "--out", str(in_tmp / "out"),
               "--metrics", str(in_tmp / "m.json")])
    # then the command fails with one line naming the file and field, and writes nothing
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "qa.parquet: field 'answer': missing column(s) answer" in err[0]
    assert not (in_tmp / "out").exists()


def test_demo_seed_splits_with_every_intent_in_train(in_tmp):
    seed = ROOT / "data" / "00_seed"
    if not (seed / "qa.jsonl").exists():
        pytest.skip("demo seed not written yet")
    params = IngestParams(input=str(seed), format="refinery", max_field_chars=200_000)
    r = ingest(read_source("refinery", str(seed)), params, "test")
    result = split(r.documents, r.qa, SplitParams(seed=42, fractions={"train": 0.8, "val": 0.1, "test": 0.1}))
    assert result.metrics["classes_missing_from_train"] == []
    assert sum(result.metrics["leakage"].values()) == 0
    assert 0.7 <= result.metrics["share"]["train"] <= 0.9


@needs_cosmosqa()
def test_cosmosqa_splits_share_no_context(in_tmp):
    # given the shared CosmosQA dev part, ingested
    params = IngestParams(input=str(COSMOSQA), format="cosmosqa", max_field_chars=200_000)
    r = ingest(read_source("cosmosqa", str(COSMOSQA)), params, "test")
    # when split by context
    result = split(r.documents, r.qa, SplitParams(seed=42, fractions={"train": 0.8, "val": 0.1, "test": 0.1}))
    # then no context text appears in two splits, and sizes are near their targets
    docs = dict(zip(r.documents.column("doc_id").to_pylist(), r.documents.column("text").to_pylist()))
    contexts = {n: {docs[d] for d in t.column("doc_id").to_pylist()} for n, t in result.tables.items()}
    assert not contexts["train"] & contexts["val"] and not contexts["train"] & contexts["test"]
    assert not contexts["val"] & contexts["test"]
    assert abs(result.metrics["share"]["test"] - 0.1) < 0.02
    print(json.dumps(result.metrics["rows"]))


# ---- val cut in two: the rows that calibrate thresholds and the controls that measure the gates ----

def test_val_calibration_and_val_control_are_disjoint_by_group_and_make_up_val(tmp_path):
    # given a seed with several val groups (the tiny seed repeated on fresh documents)
    docs = [{**d, "doc_id": f"{d['doc_id']}_{k}", "supersedes": f"{d['supersedes']}_{k}" if d["supersedes"] else None}
            for k in range(4) for d in TINY_DOCS]
    qa = [{**r, "qa_id": f"{r['qa_id']}_{k}", "doc_id": f"{r['doc_id']}_{k}", "question": f"{r['question']} ({k})"}
          for k in range(4) for r in TINY_QA]
    documents, table = seed_tables(tmp_path, docs=docs, qa=qa)
    result = split(documents, table, SplitParams(seed=3, fractions={"train": 0.5, "val": 0.5, "test": 0.0}))
    cal, ctl, val = (result.parts["val_calibration"], result.parts["val_control"], result.tables["val"])
    ids = lambda t, c: set(t.column(c).to_pylist())  # noqa: E731
    # then they share no row and no document, and together they are val
    assert cal.num_rows and ctl.num_rows
    assert not ids(cal, "row_id") & ids(ctl, "row_id") and not ids(cal, "doc_id") & ids(ctl, "doc_id")
    assert ids(cal, "row_id") | ids(ctl, "row_id") == ids(val, "row_id")
    # and a stale document stays on the side of the one that supersedes it
    stale = {d["doc_id"]: d["superseded_by"] for d in documents.to_pylist() if d["superseded_by"]}
    in_val = [(old, new) for old, new in stale.items() if old in ids(val, "doc_id")]
    assert in_val and all((old in ids(cal, "doc_id")) == (new in ids(cal, "doc_id")) for old, new in in_val)
    assert result.metrics["val_parts"]["val_control"]["rows"] == ctl.num_rows


def test_every_threshold_is_calibrated_on_val_calibration_and_every_measurement_uses_val_control():
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    cmd = {name: " ".join(s.get("do", s)["cmd"].split()) for name, s in stages.items()}
    for name in ("train_verifier", "gate"):  # the faithfulness threshold, reward and perplexity bounds
        assert "--val data/02_split/val_calibration.parquet" in cmd[name], name
        assert "val_control" not in cmd[name], name
    # recover calibrates nothing: it judges with the bounds the gate stage wrote
    assert "--thresholds data/04_gated/thresholds.json" in cmd["recover"] and "val_" not in cmd["recover"]
    assert "--val data/02_split/val_control.parquet" in cmd["inject"]  # clean controls and planted errors
    assert "val_calibration" not in cmd["inject"]



@needs_cosmosqa()
def test_rows_target_counts_by_group_and_leave_the_rest_unused():
    # given the CosmosQA file and split.rows asking for a scarce train set and a large test set
    r = read_source("cosmosqa", str(COSMOSQA))
    seed = ingest(r, IngestParams(input=str(COSMOSQA), format="cosmosqa", max_field_chars=10_000), "t")
    documents, qa = seed.documents, seed.qa
    params = SplitParams(seed=42, fractions={"train": 0.8, "val": 0.1, "test": 0.1},
                         rows={"train": 150, "val": 200, "test": 400})
    result = split(documents, qa, params)
    rows = result.metrics["rows"]
    # then each split is near its target (whole context groups), no context is shared, the rest is counted
    assert abs(rows["train"] - 150) <= 10 and abs(rows["val"] - 200) <= 10 and abs(rows["test"] - 400) <= 10
    assert result.metrics["leakage"]["shared_documents"] == 0
    assert sum(rows.values()) + result.metrics["unused_rows"] == qa.num_rows
    assert result.metrics["unused_rows"] > 0


def test_rows_asking_for_more_than_the_seed_is_an_error(tmp_path):
    documents, qa = seed_tables(tmp_path)
    params = SplitParams(seed=1, fractions=PARAMS.fractions, rows={"train": 100, "val": 1, "test": 1})
    with pytest.raises(RefineryError, match="split.rows asks for 102 rows"):
        split(documents, qa, params)
