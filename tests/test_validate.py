"""Validate: each threshold broken on purpose fails the run with one clear line; clean datasets pass."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from refinery.validation.diversity import HashingEmbedder, dcscore, distinct_n
from refinery.core.text import stable_id
from schemas import datasets as datasets_schema
from schemas import documents as documents_schema
from schemas import split as split_schema
from schemas import synthetic as synthetic_schema
from stages.validate import ChecksFailed, cli
from tests.conftest import offline, watched_page
from tests.test_assemble import documents, human_rows, run, synthetic_rows


ARMS = {"human": {"human": True}, "contaminated": {"sources": ["contaminated"], "dedup": False},
        "curated": {"human": True, "sources": ["accepted", "recovered"]}}
VALIDATE = {
    "near_duplicate": {"max_jaccard": 0.8, "num_perm": 64, "shingle": 5},
    "diversity": {"embedder": "hashing", "sample": 200, "clusters": 3, "seed": 1, "temperature": 0.1},
    "defaults": {"min_rows": 1, "max_synthetic_share": 0.5, "max_duplicate_rate": 0.005,
                 "max_cross_split_duplicates": 0, "max_test_question_leaks": 0, "max_test_document_leaks": 0,
                 "min_intent_count": 2, "max_provenance_missing": 0, "max_label_disagreement_rate": 0.05,
                 "min_script_coverage": 1.0, "max_foreign_script_share": 0.01, "min_cluster_coverage": 0.3,
                 "min_distinct_2": 0.3, "min_dcscore": 0.3, "min_intent_coverage": 1.0, "min_category_coverage": 1.0},
    "thresholds": {"human": {"max_synthetic_share": 0}, "contaminated": {"max_synthetic_share": 1.0}},
}
SUITE = str(Path(__file__).resolve().parents[1] / "schemas" / "expectations" / "curated.json")


@pytest.fixture(scope="module")
def clean():
    """Splits and the three assembled datasets of a tiny, clean seed (intent 'b' is the rare one)."""
    train = human_rows(["a"] * 6 + ["b"] * 2, seed=0, docs=["doc-0", "doc-1", "doc-2", "doc-3"])
    val = human_rows(["a", "b"], seed=1, split="val", docs=["doc-4"])
    test = human_rows(["a", "b"], seed=2, split="test", docs=["doc-5"])
    contaminated = synthetic_rows(["a"] * 6 + ["b"] * 2, seed=9, origin="contaminated", prefix="con",
                                  schema=synthetic_schema.ARROW)
    result = run(train, synthetic_rows(["a", "a", "b"]), contaminated=contaminated)
    return {"train": train, "val": val, "test": test, **result.tables}


def write(tmp: Path, tables: dict[str, pa.Table], datasets: list[str] = tuple(ARMS), **validate) -> list[str]:
    """Write the inputs and a params file (the arms named by ``datasets``) into ``tmp``; return the CLI arguments."""
    (tmp / "ds").mkdir(exist_ok=True)
    for kind in ("human", "contaminated", "curated"):
        pq.write_table(tables[kind], tmp / "ds" / f"{kind}.parquet")
    for split in ("train", "val", "test"):
        pq.write_table(tables[split].cast(split_schema.ARROW), tmp / f"{split}.parquet")
    pq.write_table(documents().cast(documents_schema.ARROW), tmp / "documents.parquet")
    base = {**VALIDATE, "thresholds": {k: v for k, v in VALIDATE["thresholds"].items() if k in datasets}}
    (tmp / "params.yaml").write_text(yaml.safe_dump({"validate": {**base, **validate},
                                                     "assemble": {"arms": {k: ARMS[k] for k in datasets}}}))
    root = Path(__file__).resolve().parents[1]
    return ["--params", str(tmp / "params.yaml"), "--datasets", str(tmp / "ds"), "--train", str(tmp / "train.parquet"),
            "--val", str(tmp / "val.parquet"), "--test", str(tmp / "test.parquet"),
            "--documents", str(tmp / "documents.parquet"), "--expectations", str(root / "schemas" / "expectations"),
            "--audit", "reports/audit", "--data-docs", "reports/data_docs", "--plots", "reports/plots",
            "--metrics", "metrics/validate.json", "--cache", "cache",
            "--models", str(tmp / "models")]  # not read: the hashing embedder needs no model


def validate(tmp: Path, tables: dict[str, pa.Table], *extra: str, **params):
    """Run the command as `refinery validate` does: a failed check raises ChecksFailed (exit status 1)."""
    res = CliRunner().invoke(cli, [*write(tmp, tables, **params), *extra])
    if res.exception and not isinstance(res.exception, (SystemExit, ChecksFailed)):
        raise res.exception
    if isinstance(res.exception, ChecksFailed):
        assert res.exception.exit_code == 1 and "failed check(s)" in str(res.exception)
    return res


def error_lines(res) -> list[str]:
    return [line for line in res.output.splitlines() if line.startswith(("error:", "warning:"))]


def with_rows(t: pa.Table, rows: list[dict]) -> pa.Table:
    return pa.concat_tables([t, pa.Table.from_pylist(rows, schema=datasets_schema.ARROW)])


def synthetic_copy(t: pa.Table, **change) -> dict:
    row = next(r for r in t.to_pylist() if r["source"] == "accepted")
    return {**row, "row_id": stable_id("syn", "copy", json.dumps(change, sort_keys=True)), **change}


def test_clean_datasets_pass_and_write_the_audit_log(clean, in_tmp):
    res = validate(in_tmp, clean)
    assert res.exit_code == 0, res.output
    logs = [json.loads((in_tmp / f"reports/audit/{k}.json").read_text()) for k in ARMS]
    assert all(log["decision"] == "accept" and log["failed_checks"] == [] for log in logs)
    audit = [r for log in logs for r in log["datasets"]]
    assert [r["dataset"] for r in audit] == ["human", "contaminated", "curated"]
    assert {r["decision"] for r in audit} == {"accept"}
    for key in ("event", "total_examples", "synthetic_share", "duplicate_rate", "leakage", "label_disagreement_rate",
                "decision", "failed_checks"):
        assert key in audit[2]
    assert audit[0]["synthetic_share"] == 0 and audit[2]["synthetic_share"] > 0
    metrics = json.loads((in_tmp / "metrics/validate.json").read_text())
    assert metrics["failed_checks"] == 0 and metrics["curated"]["passed"]
    assert (in_tmp / "reports/data_docs/index.html").is_file()
    assert (in_tmp / "reports/plots/validate_diversity.png").stat().st_size > 0
    assert "curated" in res.output and "accept" in res.output


def test_cross_split_duplicate_fails_the_run(clean, in_tmp):
    # given a curated row that copies a val row (re-cased)
    v = clean["val"].to_pylist()[0]
    tables = {**clean, "curated": with_rows(clean["curated"], [synthetic_copy(
        clean["curated"], question=v["question"].upper(), answer=v["answer"])])}
    res = validate(in_tmp, tables, datasets=["curated"])
    assert res.exit_code == 1
    assert any(line.startswith("error: curated: cross_split_duplicates 1 > max 0 (e.g. syn_") and line.endswith(
        f"{SUITE})") for line in error_lines(res)), res.output


def test_synthetic_share_over_the_cap_fails_the_run(clean, in_tmp):
    cur = clean["curated"]
    extra = synthetic_rows(["a"] * 12, seed=55).to_pylist()
    rows = [{**{k: r[k] for k in datasets_schema.ARROW.names if k in r}, "weight": 0.5, "source": "accepted"}
            for r in extra]
    res = validate(in_tmp, {**clean, "curated": with_rows(cur, rows)}, datasets=["curated"])
    assert res.exit_code == 1
    share = (cur.num_rows - 8 + 12) / (cur.num_rows + 12)
    assert f"error: curated: synthetic_share {share:.2f} > max 0.50 ({SUITE})" in error_lines(res), res.output


def test_synthetic_row_without_teacher_fails_the_run(clean, in_tmp):
    rows = clean["curated"].to_pylist()
    i = next(i for i, r in enumerate(rows) if r["source"] == "accepted")
    rows[i]["teacher"] = None
    res = validate(in_tmp, {**clean, "curated": pa.Table.from_pylist(rows, schema=datasets_schema.ARROW)},
                   datasets=["curated"])
    assert res.exit_code == 1
    assert f"error: curated: provenance_missing_teacher 1 > max 0 (e.g. {rows[i]['row_id']}) ({SUITE})" in \
        error_lines(res), res.output


def test_missing_provenance_column_fails_the_row_contract(clean, in_tmp):
    tables = {**clean, "curated": clean["curated"].drop_columns(["prompt_template"])}
    res = validate(in_tmp, tables, datasets=["curated"])
    assert res.exit_code == 1
    assert any(line.startswith("error: curated: row contract: curated dataset: field 'prompt_template': missing "
                               "column(s) prompt_template") for line in error_lines(res)), res.output


def test_starved_rare_intent_fails_the_run(clean, in_tmp):
    cur = clean["curated"]
    rows = cur.to_pylist()
    keep = [r for r in rows if r["intent"] != "b"] + [r for r in rows if r["intent"] == "b"][:1]
    res = validate(in_tmp, {**clean, "curated": pa.Table.from_pylist(keep, schema=datasets_schema.ARROW)},
                   datasets=["curated"])
    assert res.exit_code == 1
    assert f"error: curated: rare_intent_min_count 1 < min 2 (b) ({SUITE})" in error_lines(res), res.output


def test_test_question_and_document_leaks_fail_the_run(clean, in_tmp):
    t = clean["test"].to_pylist()[0]
    row = synthetic_copy(clean["curated"], question=t["question"], doc_id=t["doc_id"])
    res = validate(in_tmp, {**clean, "curated": with_rows(clean["curated"], [row])}, datasets=["curated"])
    lines = error_lines(res)
    assert res.exit_code == 1
    assert f"error: curated: test_question_leaks 1 > max 0 (e.g. {row['row_id']}) ({SUITE})" in lines, res.output
    assert f"error: curated: test_document_leaks 1 > max 0 (e.g. {row['row_id']}) ({SUITE})" in lines


def test_duplicates_within_a_dataset_fail_the_run(clean, in_tmp):
    row = synthetic_copy(clean["curated"])  # same question and answer, another row_id
    res = validate(in_tmp, {**clean, "curated": with_rows(clean["curated"], [row])}, datasets=["curated"])
    assert res.exit_code == 1
    n = clean["curated"].num_rows + 1
    assert f"error: curated: duplicate_rate {1 / n:.2f} > max 0.005 ({SUITE})" in error_lines(res), res.output


def test_human_dataset_must_be_synthetic_free(clean, in_tmp):
    res = validate(in_tmp, {**clean, "human": clean["curated"]}, datasets=["human"])
    lines = error_lines(res)
    assert res.exit_code == 1
    assert any(line.startswith("error: human: synthetic_share") and "> max 0.00" in line for line in lines), lines
    assert any(line.startswith("error: human: sources") for line in lines), lines


def test_diversity_floor_fails_the_run(clean, in_tmp):
    res = validate(in_tmp, clean, datasets=["curated"], thresholds={"curated": {"min_distinct_2": 0.999}})
    assert res.exit_code == 1
    assert any(line.startswith("error: curated: distinct_2 ") and "< min 1.00" in line for line in error_lines(res))


def test_warn_only_reports_and_exits_zero(clean, in_tmp):
    tables = {**clean, "curated": clean["curated"].drop_columns(["prompt_template"])}
    res = validate(in_tmp, tables, "--warn-only", datasets=["curated"])
    assert res.exit_code == 0
    assert any(line.startswith("warning: curated: row contract") for line in error_lines(res))


def test_thresholds_for_a_dataset_that_is_not_an_arm_are_one_line(clean, in_tmp):
    from refinery.core.errors import RefineryError

    with pytest.raises(RefineryError, match="validate.thresholds names gold, not an arm of assemble.arms"):
        validate(in_tmp, clean, datasets=["curated"], thresholds={"gold": {"min_rows": 2}})


def test_each_arm_gets_its_own_audit_file(clean, in_tmp):
    # given three arms, one of which breaks its cap
    res = validate(in_tmp, clean, thresholds={**VALIDATE["thresholds"], "curated": {"max_synthetic_share": 0.1}})
    assert res.exit_code == 1
    # then each arm has an audit file holding its own record and decision only
    logs = {k: json.loads((in_tmp / f"reports/audit/{k}.json").read_text()) for k in ARMS}
    assert {k: [r["dataset"] for r in v["datasets"]] for k, v in logs.items()} == {k: [k] for k in ARMS}
    assert {k: v["decision"] for k, v in logs.items()} == {"human": "accept", "contaminated": "accept",
                                                          "curated": "reject"}


def test_data_docs_render_offline_in_headless_chromium_styled_and_show_the_failed_expectation(clean, in_tmp,
                                                                                               chromium):
    browser, shoot = chromium
    # given a run where the synthetic cap is broken
    res = validate(in_tmp, clean, datasets=["curated"], thresholds={"curated": {"max_synthetic_share": 0.1}})
    assert res.exit_code == 1
    site = in_tmp / "reports/data_docs"
    page_file = next((site / "validations/curated").rglob("*.html"))
    # then no page names a CDN any more: every stylesheet and script is a file of the site
    for html in site.rglob("*.html"):
        tags = re.findall(r"<(?:link|script)\b[^>]*(?:href|src)=\"([^\"]+)\"", html.read_text())
        assert not [t for t in tags if t.startswith(("http:", "https:"))], html
    page, requests, errors = watched_page(browser)
    # when Chromium renders the validation page offline
    page.goto(page_file.as_uri())
    text = re.sub(r"\s+", " ", page.inner_text("body"))
    # then it is styled by the shipped Bootstrap: its grid makes rows flex boxes and its font stack is the page's
    assert page.evaluate("getComputedStyle(document.querySelector('.row')).display") == "flex"
    assert page.evaluate("getComputedStyle(document.body).fontFamily").startswith("-apple-system")
    assert "Status: Failed" in text and re.search(r"Unsuccessful Expectations\s*1\b", text), text[:1500]
    # ... the failed expectation shows with its observed value, and its icon font is loaded
    assert re.search(r"is_synthetic Status Expectation Observed Value mean must be less than or equal to 0\.1\.? ?≈0\.27", text), text[:3000]
    assert page.evaluate("document.fonts.check('900 16px \"Font Awesome 6 Free\"')")
    shoot(page, "data_docs_validation")
    # when the index renders: the stand-in draws the validation table from its data, and a row links to the page
    page.goto((site / "index.html").as_uri())
    row = page.locator("#section-1-content-block-2-1-body-table tbody tr")
    assert row.count() == 1 and "curated" in row.first.inner_text()
    shoot(page, "data_docs_index")
    row.first.click()
    page.wait_for_load_state()
    assert page.url.endswith(".html") and "/validations/curated/" in page.url
    assert errors == [] and offline(requests) == []


def test_distinct_n_and_dcscore_on_known_inputs():
    assert distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    v = HashingEmbedder()(["one two", "one two", "three four"])
    # two identical rows split their probability: (0.5 + 0.5 + 1) / 3
    assert dcscore(v, 0.01) == pytest.approx(2 / 3, abs=1e-3)
    assert dcscore(np.eye(4, dtype=np.float32), 0.01) == pytest.approx(1.0)


def test_empty_dataset_fails_with_one_line_and_skips_column_checks(clean):
    from refinery.validation.expectations import run_suites
    from stages.validate import ValidateParams, failure_lines, run_checks

    params = ValidateParams.model_validate({**VALIDATE, "diversity": {**VALIDATE["diversity"], "embedder": "none"}})
    checks = run_checks({"curated": datasets_schema.ARROW.empty_table()}, clean["val"], clean["test"], clean["train"],
                        documents(), params)
    suites = {"curated": Path(SUITE)}
    outcomes = run_suites(checks.frames, suites, {"curated": params.thresholds_for("curated").model_dump()})
    assert failure_lines(outcomes, checks.stats, checks.contract_errors) == {
        "curated": [f"curated: total_examples 0 < min 1 ({SUITE})"]}


def test_thresholds_merge_defaults_with_per_kind_overrides():
    from stages.validate import ValidateParams

    params = ValidateParams.model_validate(VALIDATE)
    assert params.thresholds_for("human").max_synthetic_share == 0.0
    assert params.thresholds_for("curated").max_synthetic_share == 0.5
    assert params.thresholds_for("contaminated").min_intent_count == 2


def test_refinery_cli_exits_1_with_one_line_per_failed_check(clean, in_tmp, monkeypatch, capsys):
    from refinery import cli as refinery_cli

    # given the command registered as the lead registers it, and a curated set over the synthetic cap
    monkeypatch.setitem(refinery_cli.COMMANDS, "validate", ("stages.validate:cli", "Validate datasets."))
    args = write(in_tmp, clean, datasets=["curated"], thresholds={"curated": {"max_synthetic_share": 0.1}})
    # when `refinery validate` runs
    rc = refinery_cli.main(["validate", *args])
    err = capsys.readouterr().err.splitlines()
    # then it exits 1, and the failed check and the summary are 'error:' lines
    assert rc == 1
    assert any(line.startswith("error: curated: synthetic_share 0.27 > max 0.10 (") for line in err), err
    assert err[-1].startswith("error: validate: 0/1 datasets pass, 1 failed check(s)")


def test_audit_log_lists_the_failed_checks_of_each_dataset(clean, in_tmp):
    res = validate(in_tmp, clean, datasets=["curated"], thresholds={"curated": {"max_synthetic_share": 0.1}})
    assert res.exit_code == 1
    log = json.loads((in_tmp / "reports/audit/curated.json").read_text())
    assert log["decision"] == "reject"
    (rec,) = log["datasets"]
    assert rec["decision"] == "reject" and rec["event"] == "dataset_validated"
    assert rec["failed_checks"] == [f"curated: synthetic_share 0.27 > max 0.10 ({SUITE})"] == log["failed_checks"]
    assert json.loads((in_tmp / "metrics/validate.json").read_text())["failed_checks"] == 1


def test_diversity_with_the_real_embedder_ranks_a_repetitive_set_below_a_varied_one(minilm_dir, tmp_path):
    from refinery.validation.diversity import kmeans_centroids, measure
    from refinery.models.embed import Embedder

    embed = Embedder(minilm_dir, cache_dir=tmp_path / "cache").embed
    varied = ["How do I reset my password?", "What does the Team plan cost per month?",
              "Can I export my notes as PDF?", "Why does sync fail with error E42?",
              "Who can see files in a shared folder?", "How long are deleted files kept in Trash?"]
    repetitive = ["How do I reset my password?", "How can I reset my password?", "How do I reset the password?",
                  "how do i reset my password", "How do I reset my account password?", "Reset my password, how?"]
    centroids = kmeans_centroids(embed(varied), 3, seed=1)
    a = measure(varied, np.zeros(6, bool), centroids, embed, 100, 1, 0.1)
    b = measure(repetitive, np.zeros(6, bool), centroids, embed, 100, 1, 0.1)
    assert a.dcscore > b.dcscore and a.cluster_coverage > b.cluster_coverage and a.distinct_2 > b.distinct_2
