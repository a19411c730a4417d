"""Seed coverage audit: clusters, intents, categories, passages; least-covered-first order; gaps closed."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from refinery.seed.coverage import audit, gaps_closed, passage_windows, priority_order
from refinery.validation.diversity import HashingEmbedder
from stages.split import SplitParams, split
from tests.test_split import seed_tables


@pytest.fixture
def tables(tmp_path):
    documents, qa = seed_tables(tmp_path)
    train = split(documents, qa, SplitParams(seed=1, fractions={"train": 1.0, "val": 0.0, "test": 0.0}))
    return documents, train.tables["train"]


def embed(texts):
    return HashingEmbedder()(texts)


def test_passage_windows_cut_consecutive_sentences_without_overlap():
    text = "One is here. Two is here. Three is here. Four is here. Five."
    windows = passage_windows(text, 2)
    assert [text[a:b] for a, b in windows] == ["One is here. Two is here.", "Three is here. Four is here.", "Five."]


def test_audit_counts_clusters_intents_categories_and_marks_uncovered_passages(tables):
    documents, train = tables
    result = audit(train, documents, embed, clusters=2, seed=1, window_sentences=1, rare_share=0.2)
    rows, groups, passages = result.rows.to_pylist(), result.groups.to_pylist(), result.passages.to_pylist()
    assert [r["row_id"] for r in rows] == train.column("row_id").to_pylist()
    assert {r["cluster"] for r in rows} <= {0, 1} and len(result.centroids) == 2
    # every passage is a window of a train document; covered exactly when a seed evidence span overlaps it
    spans = {}
    for r in train.to_pylist():
        spans.setdefault(r["doc_id"], []).append((r["evidence_start"], r["evidence_end"]))
    assert {p["doc_id"] for p in passages} == set(spans)
    for p in passages:
        hits = sum(s < p["end"] and p["start"] < e for s, e in spans[p["doc_id"]])
        assert p["seed_rows"] == hits and p["covered"] == (hits > 0)
    assert any(not p["covered"] for p in passages)  # the tiny seed leaves sentences without a question
    intents = {g["key"]: g for g in groups if g["kind"] == "intent"}
    n = train.num_rows
    for key, g in intents.items():
        assert g["seed_rows"] == train.column("intent").to_pylist().count(key)
        assert g["gap"] == (g["seed_rows"] / n < 0.2)
    m = result.metrics
    assert m["rare_intents"] == sorted(k for k, g in intents.items() if g["gap"])
    assert sum(m["cluster_rows"]) == n
    fresh = [p for p in passages if not p["stale"]]
    assert (m["passages"], m["passages_uncovered"]) == (len(fresh), sum(not p["covered"] for p in fresh))


def test_priority_order_takes_one_row_per_cluster_in_turn_smallest_cluster_and_rarest_intent_first():
    rows = [{"row_id": f"r{i}", "intent": intent} for i, intent in
            enumerate(["how_to", "how_to", "how_to", "escalation", "billing", "billing"])]
    cluster_of = {"r0": 0, "r1": 0, "r2": 0, "r3": 0, "r4": 1, "r5": 1}
    order = [r["row_id"] for r in priority_order(rows, cluster_of, np.random.default_rng(0))]
    assert order[0] in {"r4", "r5"}  # cluster 1 is the smaller one
    assert order[1] == "r3"  # the rare intent of cluster 0 goes first within it
    assert set(order[:4]) >= {"r3", "r4", "r5"} and sorted(order) == sorted(cluster_of)


def test_gaps_closed_counts_the_uncovered_windows_synthetic_rows_reach(tables):
    documents, train = tables
    result = audit(train, documents, embed, clusters=2, seed=1, window_sentences=1, rare_share=0.2)
    open_window = next(p for p in result.passages.to_pylist() if not p["covered"] and not p["stale"])
    dataset = pa.table({"source": ["human", "accepted"], "doc_id": [open_window["doc_id"]] * 2,
                        "evidence_start": [open_window["start"]] * 2, "evidence_end": [open_window["end"]] * 2,
                        "question": ["q one", "q two"], "answer": ["a one", "a two"]})
    got = gaps_closed(dataset, result.passages, result.centroids, embed)
    before = result.metrics["passages_uncovered"]
    assert (got["uncovered_before"], got["closed"], got["still_open"]) == (before, 1, before - 1)
    assert got["synthetic_rows"] == 1 and got["clusters_reached_by_synthetic"] == 1
    human_only = gaps_closed(dataset.slice(0, 1), result.passages)
    assert human_only["closed"] == 0  # a human row closes no gap: it was in the seed already


def test_cli_writes_tables_report_map_and_metrics_with_the_real_embedder(tmp_path, tables, minilm_dir,
                                                                          monkeypatch):
    import yaml

    documents, train = tables
    monkeypatch.chdir(tmp_path)
    pq.write_table(train, "train.parquet")
    pq.write_table(documents, "documents.parquet")
    models = tmp_path / "models"
    (models / "embedder").mkdir(parents=True)
    (models / "embedder" / "PROVENANCE.json").write_text(json.dumps(
        {"kind": "local", "spec": str(minilm_dir), "load": {"path": str(minilm_dir)}}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"coverage": {"clusters": 2, "seed": 1, "window_sentences": 1, "rare_share": 0.2}}))
    from stages.coverage import cli

    res = CliRunner().invoke(cli, ["--params", "params.yaml", "--train", "train.parquet", "--documents",
                                   "documents.parquet", "--models", str(models), "--cache", "cache", "--out", "cov",
                                   "--report", "reports/coverage.md", "--plots", "reports/plots", "--metrics",
                                   "coverage.json"])
    assert res.exit_code == 0, res.output
    for name in ("rows", "groups", "passages", "centroids"):
        assert pq.read_table(tmp_path / "cov" / f"{name}.parquet").num_rows > 0
    md = (tmp_path / "reports" / "coverage.md").read_text()
    assert "](plots/coverage_map.png)" in md and "## Uncovered passages" in md
    assert (tmp_path / "reports" / "plots" / "coverage_map.png").stat().st_size > 1000
    metrics = json.loads((tmp_path / "coverage.json").read_text())
    assert metrics["seed_rows"] == train.num_rows and metrics["clusters"] == 2
