"""RAFT export: gold passage kept, distractors never the gold document nor answer-bearing, stale versions marked,
hard negatives harder than random ones."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from refinery.validation.diversity import HashingEmbedder
from refinery.core.errors import InputError
from schemas import datasets as datasets_schema
from schemas import documents as documents_schema
from schemas import raft as raft_schema
from stages.raft import RaftParams, chains, holds_answer, jsonl, raft
from tests.test_assemble import table

TOPICS = {
    "billing": "Invoices are sent monthly. Refunds for annual plans are issued within 14 days of a request.",
    "billing_old": "Invoices are sent monthly. Refunds for annual plans are issued within 30 days of a request.",
    "billing_faq": "Invoices list every seat. Billing contacts can download invoices from the billing page.",
    "export": "Reports can be exported as PDF or Markdown from the File menu of any dashboard.",
    "export_faq": "Dashboards export to PDF. Large exports are emailed when they are ready.",
    "sync": "Sync runs every five minutes for connected calendars and contacts.",
    "sso": "Single sign-on supports SAML and OIDC identity providers on the enterprise plan.",
    "api": "API keys are created in the developer settings and can be rotated at any time.",
}
PARAMS = RaftParams(arm="curated", seed=1, hard_negatives=2, random_negatives=2, window_chars=0, eval_k=2)


def documents() -> pa.Table:
    rows = []
    for i, (doc_id, text) in enumerate(TOPICS.items()):
        rows.append({"doc_id": doc_id, "text": text, "category": "help", "updated_at": f"2026-0{1 + i % 9}-01",
                     "stale": doc_id == "billing_old", "supersedes": "billing_old" if doc_id == "billing" else None,
                     "superseded_by": "billing" if doc_id == "billing_old" else None, "content_hash": f"{i:016x}",
                     "source_file": "documents.jsonl", "source_row": i + 1, "params_hash": "p", "code_version": "c"})
    return table(documents_schema.ARROW, rows)


def qa(rows: list[tuple[str, str, str]], source: str = "human") -> pa.Table:
    out = []
    for i, (doc_id, q, a) in enumerate(rows):
        out.append({"row_id": f"qa_{i:016x}", "origin": "human", "parent_ids": [], "doc_id": doc_id,
                    "attempt": 0, "params_hash": "p", "code_version": "c", "question": q, "answer": a,
                    "evidence": a, "weight": 1.0, "source": source})
    return table(datasets_schema.ARROW, out)


ROWS = [("billing", "How long do refunds for annual plans take?", "within 14 days of a request"),
        ("export", "Which formats can reports be exported as?", "PDF or Markdown"),
        ("sync", "How often does sync run?", "every five minutes")]


def test_each_row_keeps_its_gold_passage_and_gets_marked_distractors():
    result = raft(qa(ROWS), documents(), qa(ROWS[1:]), HashingEmbedder(), PARAMS, code_version="t")
    t = raft_schema.CONTRACT.validate(result.table, "raft")
    raft_schema.check_dataset(t, "raft")
    billing = t.to_pylist()[0]
    assert billing["gold_doc_id"] == "billing" and "14 days" in billing["gold_passage"]
    # the older version of the page is a distractor, marked stale; the gold document never is
    assert billing["distractor_kinds"][0] == "stale_version" and billing["distractor_doc_ids"][0] == "billing_old"
    assert billing["distractor_stale"][0] is True
    for r in t.to_pylist():
        assert r["gold_doc_id"] not in r["distractor_doc_ids"]
        assert len(set(r["distractor_doc_ids"])) == len(r["distractor_doc_ids"])
        assert r["distractor_kinds"].count("hard") == 2 and r["distractor_kinds"].count("random") <= 2
    assert result.metrics["rows_with_stale_distractor"] == 1 and result.metrics["stale_share"] == pytest.approx(1 / 3, abs=1e-4)


def test_a_candidate_that_states_the_answer_is_dropped_and_counted():
    # given a second page that also says how often sync runs
    docs = documents().to_pylist() + [{**documents().to_pylist()[5], "doc_id": "sync_copy", "content_hash": "f" * 16,
                                       "text": "Calendars: sync runs every five minutes, contacts too."}]
    result = raft(qa(ROWS[2:]), table(documents_schema.ARROW, docs), qa([]), HashingEmbedder(), PARAMS,
                  code_version="t")
    row = result.table.to_pylist()[0]
    assert "sync_copy" not in row["distractor_doc_ids"] and row["excluded_answer_bearing"] >= 1
    assert holds_answer("Sync runs EVERY five minutes.", "every five minutes", None)
    assert not holds_answer("Sync runs every five.", "every five minutes", None)


def test_hard_negatives_are_harder_for_the_retriever_than_random_ones():
    rows = [("billing", "Where can billing contacts download invoices?", "from the billing page"),
            ("export", "Which formats can dashboards be exported as?", "PDF or Markdown"),
            ("export_faq", "When are large dashboard exports emailed?", "when they are ready"),
            ("billing_faq", "What do invoices list?", "every seat")]
    check = raft(qa(rows), documents(), qa(rows), HashingEmbedder(), PARAMS, code_version="t") \
        .metrics["retrieval_check"]
    assert check["hard"]["rows"] == check["random"]["rows"] == 4
    assert check["hard"]["recall_at_1"] <= check["random"]["recall_at_1"]


def test_supersedes_chains_are_transitive():
    docs = [{"doc_id": "a", "supersedes": None, "superseded_by": "b"}, {"doc_id": "b", "supersedes": "a",
            "superseded_by": "c"}, {"doc_id": "c", "supersedes": "b", "superseded_by": None},
            {"doc_id": "d", "supersedes": None, "superseded_by": None}]
    got = chains(docs)
    assert got["a"] == got["c"] == {"a", "b", "c"} and got["d"] == {"d"}


def test_the_contract_refuses_the_gold_document_as_a_distractor():
    result = raft(qa(ROWS[:1]), documents(), qa([]), HashingEmbedder(), PARAMS, code_version="t")
    bad = result.table.to_pylist()
    bad[0]["distractor_doc_ids"][1] = "billing"
    with pytest.raises(InputError, match="gold document billing is also a distractor"):
        raft_schema.check_dataset(pa.Table.from_pylist(bad, schema=raft_schema.ARROW), "raft.parquet")


def test_jsonl_shuffles_the_gold_passage_in_with_its_role(tmp_path):
    result = raft(qa(ROWS), documents(), qa([]), HashingEmbedder(), PARAMS, code_version="t")
    lines = [json.loads(x) for x in jsonl(result.table, 1).splitlines()]
    assert len(lines) == 3
    for line in lines:
        roles = [d["role"] for d in line["documents"]]
        assert roles.count("gold") == 1 and line["oracle_context"] in [d["text"] for d in line["documents"]]


def test_cli_writes_parquet_jsonl_and_metrics_with_the_real_embedder(tmp_path, minilm_dir, monkeypatch):
    # given the tiny tables on disk and a models folder whose embedder is the provisioned MiniLM
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds").mkdir()
    pq.write_table(qa(ROWS), tmp_path / "ds" / "curated.parquet")
    pq.write_table(documents(), tmp_path / "documents.parquet")
    from schemas import split as split_schema

    test = qa(ROWS[1:]).drop_columns(["weight", "source"]).append_column(
        "qa_id", pa.array(["t1", "t2"])).append_column("split", pa.array(["test", "test"]))
    test = test.append_column("source_file", pa.array(["qa.jsonl"] * 2)).append_column(
        "source_row", pa.array([1, 2], pa.int32()))
    for name in ("evidence_start", "evidence_end"):
        test = test.set_column(test.schema.get_field_index(name), name, pa.array([0, 0], pa.int32()))
    pq.write_table(test.select(split_schema.ARROW.names).cast(split_schema.ARROW), tmp_path / "test.parquet")
    models = tmp_path / "models"
    (models / "embedder").mkdir(parents=True)
    (models / "embedder" / "PROVENANCE.json").write_text(json.dumps(
        {"kind": "local", "spec": str(minilm_dir), "load": {"path": str(minilm_dir)}}))
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"raft": PARAMS.model_dump()}))
    from stages.raft import cli

    res = CliRunner().invoke(cli, ["--params", "params.yaml", "--datasets", "ds", "--documents", "documents.parquet",
                                   "--test", "test.parquet", "--models", str(models), "--cache", "cache", "--out",
                                   "out", "--metrics", "raft.json"])
    assert res.exit_code == 0, res.output
    assert pq.read_table(tmp_path / "out" / "raft.parquet").num_rows == 3
    assert len((tmp_path / "out" / "raft.jsonl").read_text().splitlines()) == 3
    metrics = json.loads((tmp_path / "raft.json").read_text())
    assert metrics["rows"] == 3 and metrics["retrieval_check"]["hard"]["rows"] == 2
