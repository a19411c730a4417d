"""refinery trace: a recovered row's lineage reaches its rejected parent, the human seed row and the document span."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from refinery.core.errors import RefineryError
from refinery.inspect.trace import Sources, cli, trace

DOC_TEXT = "Refunds are issued within 30 days. Start one in Settings > Billing. Fees are never refunded."
SPAN = (0, 34)  # "Refunds are issued within 30 days."

GATES = ("rules", "faithfulness")


def _prov(row_id, origin, parents, strategy=None, attempt=0, recovery_action=None, start=SPAN[0], end=SPAN[1]):
    return {"row_id": row_id, "origin": origin, "parent_ids": parents, "doc_id": "d1", "evidence_start": start,
            "evidence_end": end, "strategy": strategy, "teacher": "embedded:tiny@abc" if strategy else None,
            "prompt_template": f"{strategy}@0123" if strategy else None, "attempt": attempt,
            "recovery_action": recovery_action}


def _gated(keep_faith: bool, score: float) -> dict:
    return {"rules_keep": True, "rules_score": 0.0, "rules_reason": None, "faithfulness_keep": keep_faith,
            "faithfulness_score": score, "faithfulness_reason": None if keep_faith else "faithfulness_unsupported",
            "gate_keep": keep_faith, "gate_reasons": [] if keep_faith else ["faithfulness_unsupported"]}


def build_lineage(root: Path) -> dict[str, Path]:
    """Write a tiny project's artifacts: document → seed row → rejected synthetic row → recovered row → curated.

    Returns ``{artifact path relative to root: file}``; also an accepted row and a human row in the datasets.
    """
    qa = {"question": "How long do refunds take?", "answer": "Within 30 days.", "intent": "billing",
          "evidence": DOC_TEXT[SPAN[0]:SPAN[1]]}
    tables = {
        "data/01_seed/documents.parquet": [{"doc_id": "d1", "title": "Refunds", "text": DOC_TEXT}],
        "data/02_split/train.parquet": [{**_prov("qa_0000000000000001", "human", []), **qa, "split": "train"},
                                        {**_prov("qa_0000000000000002", "human", []), **qa,
                                         "question": "Refund window?", "split": "train", "intent": "legal_request"}],
        "data/04_gated/rejected.parquet": [
            {**_prov("syn_00000000000000aa", "synthetic", ["qa_0000000000000001"], "answer_augmentation"),
             **qa, "answer": "Within 90 days.", **_gated(False, 0.12)}],
        "data/04_gated/accepted.parquet": [
            {**_prov("syn_00000000000000bb", "synthetic", ["qa_0000000000000002"], "new_question"),
             **qa, "question": "Where do I start a refund?", "answer": "In Settings > Billing.",
             "intent": "legal_request", "evidence_start": 35, "evidence_end": 67, "evidence": DOC_TEXT[35:67],
             **_gated(True, 0.91)}],
        "data/05_recovered/recovered.parquet": [
            {**_prov("rec_00000000000000cc", "recovered", ["syn_00000000000000aa"], "answer_augmentation", attempt=1,
                     recovery_action="regenerate_grounded"),
             **qa, "answer": "They are issued within 30 days.", **_gated(True, 0.88),
             "diagnosis": "unsupported_claim", "diagnosis_confidence": 0.8, "recovery_method": "targeted",
             "recovery_calls": 1, "recovery_tokens": 40}],
        "data/06_datasets/curated.parquet": [
            {**_prov("rec_00000000000000cc", "recovered", ["syn_00000000000000aa"], "answer_augmentation", attempt=1,
                     recovery_action="regenerate_grounded"), **qa, "answer": "They are issued within 30 days.",
             "weight": 0.5, "source": "recovered"},
            {**_prov("qa_0000000000000001", "human", []), **qa, "weight": 1.0, "source": "human"}],
    }
    files = {}
    for rel, rows in tables.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(rows)
        if "parent_ids" in table.column_names:
            table = table.set_column(table.column_names.index("parent_ids"), "parent_ids",
                                     pa.array([r["parent_ids"] for r in rows], pa.list_(pa.string())))
        pq.write_table(table, path)
        files[rel] = path
    return files


def test_trace_of_a_recovered_row_reaches_the_seed_row_and_document_span(tmp_path):
    # given a recovered row whose parent was rejected, whose parent is a human seed row on document d1
    sources = Sources.from_files(build_lineage(tmp_path))
    # when it is traced
    result = trace("rec_00000000000000cc", sources)
    # then the steps go recovered -> rejected synthetic -> human seed, with how each was made and judged
    assert [s["row_id"] for s in result["steps"]] == ["rec_00000000000000cc", "syn_00000000000000aa",
                                                      "qa_0000000000000001"]
    rec, rej, seed = result["steps"]
    assert rec["origin"] == "recovered" and rec["recovery_action"] == "regenerate_grounded"
    assert rec["diagnosis"] == "unsupported_claim" and rec["attempt"] == 1
    assert set(rec["datasets"]) == {"data/05_recovered/recovered.parquet", "data/06_datasets/curated.parquet"}
    assert rej["gates"]["faithfulness"] == {"keep": False, "score": 0.12, "reason": "faithfulness_unsupported"}
    assert rej["teacher"] == "embedded:tiny@abc" and rej["prompt_template"] == "answer_augmentation@0123"
    assert seed["origin"] == "human"
    assert seed["datasets"] == ["data/02_split/train.parquet", "data/06_datasets/curated.parquet"]
    assert result["seeds"] == ["qa_0000000000000001"]
    # and the document span is the seed row's evidence
    (doc,) = result["documents"]
    assert doc["doc_id"] == "d1" and doc["span"] == "Refunds are issued within 30 days."
    # and it ended in the curated dataset with its weight
    assert {"row_id": "rec_00000000000000cc", "dataset": "data/06_datasets/curated.parquet",
            "origin": "recovered", "weight": 0.5, "gate_keep": None} in result["ended"]


def test_trace_forward_from_a_rejected_row_finds_its_recovered_child(tmp_path):
    sources = Sources.from_files(build_lineage(tmp_path))
    result = trace("syn_00000000000000aa", sources)
    assert result["descendants"] == ["rec_00000000000000cc"]
    assert "data/06_datasets/curated.parquet" in {e["dataset"] for e in result["ended"]}


def test_trace_of_an_unknown_row_fails_with_one_line(tmp_path):
    sources = Sources.from_files(build_lineage(tmp_path))
    with pytest.raises(RefineryError, match="row syn_ffffffffffffffff not found"):
        trace("syn_ffffffffffffffff", sources)


def test_trace_cli_discovers_the_dvc_outs_and_prints_json_and_text(tmp_path):
    # given a git repo whose dvc.yaml declares the artifacts as outs
    build_lineage(tmp_path)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    stages = {"stages": {"s": {"cmd": "true", "outs": ["data/01_seed", "data/02_split", "data/04_gated",
                                                      "data/05_recovered", "data/06_datasets"]}}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(stages))
    runner = CliRunner()
    # when traced with --json, then the JSON holds the chain
    res = runner.invoke(cli, ["rec_00000000000000cc", "--json", "--repo", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["seeds"] == ["qa_0000000000000001"]
    # and the text form names each step, the gate verdicts and the span
    res = runner.invoke(cli, ["rec_00000000000000cc", "--repo", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "← syn_00000000000000aa (synthetic)" in res.output
    assert "faithfulness ✗ 0.12 faithfulness_unsupported" in res.output
    assert "«Refunds are issued within 30 days.»" in res.output
    assert "data/06_datasets/curated.parquet (rec_00000000000000cc weight 0.5)" in res.output
