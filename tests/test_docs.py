"""`refinery docs`: the static site shows the DAG, contracts, expectation results and sample rows, offline."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from refinery.core.errors import RefineryError
from refinery.inspect.docs import build_site, contracts, edges, load_params
from refinery.core import dag
from schemas import documents as documents_schema
from tests.conftest import ROOT, TINY_DOCS, offline, watched_page

FAILED = "curated: synthetic_share 0.27 > max 0.10 (schemas/expectations/curated.json)"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The real dvc.yaml, params and schemas, with one seed table, an audit with a failed check, a review page."""
    for name in ("dvc.yaml", "params.yaml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    (tmp_path / "schemas").symlink_to(ROOT / "schemas")
    rows = [{**d, "superseded_by": None, "stale": False, "content_hash": f"{i:016x}", "source_file": "docs.jsonl",
             "source_row": i + 1, "params_hash": "p", "code_version": "c"} for i, d in enumerate(TINY_DOCS)]
    (tmp_path / "data/01_seed").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=documents_schema.ARROW), tmp_path / "data/01_seed/documents.parquet")
    (tmp_path / "reports/audit").mkdir(parents=True)
    (tmp_path / "reports/audit/curated.json").write_text(json.dumps({"decision": "reject", "datasets": [{
        "dataset": "curated", "suite": "schemas/expectations/curated.json", "decision": "reject",
        "failed_checks": [FAILED], "thresholds": {"min_rows": 1, "max_synthetic_share": 0.1},
        "total_examples": 11, "synthetic_share": 0.27}]}))
    (tmp_path / "reports/review").mkdir()
    (tmp_path / "reports/review/index.html").write_text("<!DOCTYPE html><title>review</title><p>review page</p>")
    return tmp_path


def test_edges_follow_files_and_resolve_params_in_paths():
    stages = dag.load(ROOT)
    links = {(a, b) for a, b, _ in edges(stages, load_params(ROOT))}
    # the seed path is a params value (${ingest.input}), not a wildcard: nothing writes it, so ingest has no input
    assert not [a for a, b in links if b == "ingest" and a != "fingerprint"]
    assert {("ingest", "split"), ("gate", "recover"), ("assemble", "validate"), ("train", "evaluate")} <= links
    assert ("evaluate", "train") not in links


def test_every_contract_is_documented_with_the_comments_beside_its_fields():
    docs = {c.name: c for c in contracts(ROOT)}
    assert {"documents", "seed_qa", "split", "synthetic", "gated", "recovered", "datasets", "predictions"} <= set(docs)
    cols = {c[0]: c for c in docs["documents"].columns}
    assert cols["stale"][1:] == ("bool", False, "superseded by a newer document")
    assert docs["documents"].summary.startswith("Contract of data/01_seed/documents.parquet")


def test_site_without_a_project_is_one_line(tmp_path):
    with pytest.raises(RefineryError, match=r"dvc\.yaml: not found"):
        build_site(tmp_path / "site", tmp_path, plots=False)


def test_docs_site_in_headless_chromium(project, chromium, tmp_path):
    browser, shoot = chromium
    index = build_site(tmp_path / "site", project, plots=False)
    n_stages = len(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    page, requests, errors = watched_page(browser, 1400, 1000)
    page.goto(index.as_uri())
    # the DAG draws one box per stage of dvc.yaml, with curves between them
    assert page.locator("svg.dag g.node").count() == n_stages
    assert page.locator("svg.dag path.edge").count() > n_stages
    shoot(page, "docs_site", full_page=False)
    # a box links to its stage's section, which shows its command and what it reads
    page.click("svg.dag g.node[data-stage=gate]")
    assert page.url.endswith("#stage-gate")
    assert "refinery gate" in page.locator("#stage-gate pre").inner_text()
    # the dataset's expectations show the latest result: the failed cap, with its threshold and observed value
    row = page.locator("#expectations-curated tr", has_text="synthetic_share")
    assert re.sub(r"\s+", " ", row.inner_text()).startswith("synthetic_share expect_column_mean_to_be_between "
                                                            "max_synthetic_share = 0.1 0.27 fail")
    assert "pass" in page.locator("#expectations-curated tr", has_text="total_examples").inner_text()
    page.locator("#expectations-curated").scroll_into_view_if_needed()
    shoot(page, "docs_site_expectations", full_page=False)
    # the seed table is an artifact of its contract, with sample rows and their trace commands
    art = page.locator("#artifact-data-01-seed-documents-parquet")
    assert "5 rows · contract: documents" in art.inner_text()
    assert art.locator("table.sample tbody tr").count() == 3 and "Refunds are issued within 14 days." in \
        art.inner_text()
    contract = page.locator("#contract-documents")
    assert "data/01_seed/documents.parquet" in contract.locator("p", has_text="files:").inner_text()
    assert "NFC-normalised passage" in contract.inner_text()
    # the review page is copied in and linked; nothing is fetched from the network
    page.click("nav a:has-text('Review page')")
    assert page.url.endswith("/review/index.html") and "review page" in page.inner_text("body")
    assert errors == [] and offline(requests) == []


def test_docs_of_this_project_draw_its_plots_offline(tmp_path, chromium):
    browser, shoot = chromium
    index = build_site(tmp_path / "site", ROOT, plots=True)
    plots = tmp_path / "site/plots/index.html"
    assert plots.is_file() and '<a href="plots/index.html">Plots</a>' in index.read_text()
    page, requests, _ = watched_page(browser, 1400, 1000)
    page.goto(plots.as_uri())
    page.wait_for_function("document.querySelectorAll('.vega-embed svg.marks').length >= 4", timeout=30_000)
    shoot(page, "docs_site_plots", full_page=False)
    assert offline(requests) == []
