"""Review page: rows with gates, lineage and evidence; the human-review sample; the page in headless Chromium."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from refinery.core.errors import InputError
from refinery.inspect.review import (ARGILLA_SETTINGS, LABEL_STUDIO_CONFIG, SampleSpec, argilla_records, build_review,
                             label_studio_tasks, render_html, review_sample)
from stages.review import cli
from tests.conftest import offline, watched_page
from tests.test_trace import DOC_TEXT, build_lineage

REVIEW_ROWS = ("data/04_gated/accepted.parquet", "data/04_gated/rejected.parquet",
               "data/05_recovered/recovered.parquet", "data/06_datasets/curated.parquet")


def _tables(root: Path, names=REVIEW_ROWS) -> dict[str, pa.Table]:
    return {n: pq.read_table(root / n) for n in names}


def test_build_review_gives_each_row_its_gates_evidence_span_and_lineage(tmp_path):
    # given the tiny lineage: seed -> rejected synthetic -> recovered (also in curated), and an accepted row
    build_lineage(tmp_path)
    data = build_review(_tables(tmp_path), pq.read_table(tmp_path / "data/01_seed/documents.parquet"),
                        pq.read_table(tmp_path / "data/02_split/train.parquet"))
    rows = {r["row_id"]: r for r in data["rows"]}
    # then the seed rows are lineage only, each reviewed row appears once with its place(s)
    assert set(rows) == {"syn_00000000000000aa", "syn_00000000000000bb", "rec_00000000000000cc",
                         "qa_0000000000000001"}
    rec = rows["rec_00000000000000cc"]
    assert rec["status"] == "recovered" and rec["datasets"] == ["data/05_recovered/recovered.parquet",
                                                                "data/06_datasets/curated.parquet"]
    assert rec["weights"] == {"data/06_datasets/curated.parquet": 0.5}
    assert [s["row_id"] for s in rec["lineage"]] == ["syn_00000000000000aa", "qa_0000000000000001"]
    assert rec["lineage"][0]["status"] == "rejected" and rec["lineage"][1]["origin"] == "human"
    rej = rows["syn_00000000000000aa"]
    assert rej["failed_gates"] == ["faithfulness"] and rej["gate_reasons"] == ["faithfulness_unsupported"]
    assert rej["gates"]["faithfulness"] == {"keep": False, "score": 0.12, "reason": "faithfulness_unsupported"}
    doc = data["documents"][rej["doc_id"]]
    assert doc["text"][slice(*rej["span"])] == "Refunds are issued within 30 days."
    assert data["gates"] == ["rules", "faithfulness"]


def _synthetic(n_common: int, n_rare: int) -> tuple[dict[str, pa.Table], pa.Table]:
    rows = [{"row_id": f"syn_{i:016x}", "origin": "synthetic", "intent": "billing" if i < n_common else "escalation",
             "question": f"q{i}", "answer": f"a{i}", "doc_id": "d1"} for i in range(n_common + n_rare)]
    seeds = [{"row_id": f"qa_{i:016x}", "origin": "human", "intent": "billing" if i < 40 else "escalation"}
             for i in range(41)]
    return {"data/04_gated/accepted.parquet": pa.Table.from_pylist(rows)}, pa.Table.from_pylist(seeds)


def test_review_sample_takes_at_least_20_percent_of_each_rare_intent_and_is_deterministic():
    # given 90 synthetic rows of a common intent and 12 of a rare one (1 of 41 seed rows, under 5%)
    tables, seeds = _synthetic(90, 12)
    data = build_review(tables, None, seeds, SampleSpec(seed=3))
    per = data["sample"]["per_class"]
    # then the rare intent is sampled at >= 20% (rounded up), the common one at the other share
    assert data["rare"] == ["escalation"]
    assert per["escalation"] == {"rare": True, "rows": 12, "sampled": math.ceil(0.2 * 12), "share": 0.25}
    assert per["billing"]["sampled"] == math.ceil(0.05 * 90)
    sampled = {r["row_id"] for r in data["rows"] if r["in_sample"]}
    assert sampled == set(data["sample"]["row_ids"])
    # and the same seed draws the same rows, another seed others
    rows = {r["row_id"]: r for r in data["rows"]}
    rare = ["escalation"]
    assert review_sample(rows, rare, SampleSpec(seed=3)) == data["sample"]
    assert review_sample(rows, rare, SampleSpec(seed=4))["row_ids"] != data["sample"]["row_ids"]


def test_exports_are_label_studio_tasks_and_argilla_records_that_match_their_configs(tmp_path):
    tables, seeds = _synthetic(20, 10)
    data = build_review(tables, None, seeds, SampleSpec(seed=3, other_share=0.0))
    tasks = label_studio_tasks(data)
    assert len(tasks) == math.ceil(0.2 * 10) and all(t["data"]["row_id"].startswith("syn_") for t in tasks)
    # every $variable of the labeling config is in each task's data
    variables = set(re.findall(r"\$(\w+)", LABEL_STUDIO_CONFIG))
    assert variables == {"question", "answer", "evidence", "gate_reasons"} and \
        all(variables <= set(t["data"]) for t in tasks)
    # the gates' verdict is pre-filled as a prediction of the verdict choice
    for t in tasks:
        [pred] = t["predictions"]
        [choice] = pred["result"]
        assert (choice["from_name"], choice["to_name"], choice["type"]) == ("verdict", "answer", "choices")
        assert choice["value"]["choices"][0] in ("accept", "reject") and 'name="verdict"' in LABEL_STUDIO_CONFIG
    records = argilla_records(data)
    assert all(set(r["fields"]) == {f["name"] for f in ARGILLA_SETTINGS["fields"]} and
               set(r["metadata"]) == {m["name"] for m in ARGILLA_SETTINGS["metadata"]} and r["id"] for r in records)
    assert all(r["suggestions"]["verdict"]["agent"] == "refinery-gates" for r in records)


def test_argilla_settings_and_records_load_in_the_argilla_sdk_without_a_server(tmp_path, monkeypatch):
    rg = pytest.importorskip("argilla", reason="the argilla SDK is a dev dependency (make install)")
    from unittest import mock

    from argilla.client import Argilla

    # the SDK's objects ask for a default client; a stand-in keeps it off the network (nothing is sent)
    monkeypatch.setattr(Argilla, "_default_client", mock.MagicMock(), raising=False)
    path = tmp_path / "argilla_settings.json"
    path.write_text(json.dumps(ARGILLA_SETTINGS))
    settings = rg.Settings.from_json(path)
    assert [q.name for q in settings.questions] == ["verdict", "corrected_answer"]
    assert settings.questions["verdict"].labels == ["accept", "reject", "fix"]
    assert [f.name for f in settings.fields] == ["question", "answer", "evidence"]
    tables, seeds = _synthetic(20, 10)
    data = build_review(tables, None, seeds, SampleSpec(seed=3, other_share=0.0))
    for r in argilla_records(data):
        record = rg.Record.from_dict(r)
        assert record.id == r["id"] and record.suggestions["verdict"].value in ("accept", "reject")


def _params(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"review": {"seed": 3, "rare_max_share": 0.6, "rare_share": 0.2,
                                               "other_share": 0.05}}))
    return path


def _write_page(tmp_path: Path, judge: bool = False) -> Path:
    build_lineage(tmp_path)
    out = tmp_path / "reports" / "review"
    extra = []
    if judge:  # the audit judge sampled the rejected row and would have kept it: a disagreement
        from schemas import judge_audit

        audit = pa.Table.from_pylist([{"row_id": "syn_00000000000000aa", "status": "rejected", "gate_keep": False,
                                       "gate_reasons": ["faithfulness_unsupported"], "heuristic_keep": True,
                                       "model_keep": False, "judge_p_yes": 0.81, "judge_keep": True, "agree": False,
                                       "judge": "j", "prompt_template": "audit_judge@x"}], schema=judge_audit.ARROW)
        pq.write_table(audit, tmp_path / "judge_audit.parquet")
        extra = ["--judge-audit", str(tmp_path / "judge_audit.parquet")]
    cli.main(["--rows", str(tmp_path / "data/04_gated"), "--rows", str(tmp_path / "data/05_recovered"),
              "--rows", str(tmp_path / "data/06_datasets"), "--documents",
              str(tmp_path / "data/01_seed/documents.parquet"), "--seeds", str(tmp_path / "data/02_split"),
              "--params", str(_params(tmp_path)), "--out", str(out), "--metrics",
              str(tmp_path / "metrics/review.json"), *extra], standalone_mode=False)
    return out


def test_review_stage_writes_the_page_and_both_exports(tmp_path):
    out = _write_page(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["argilla_records.jsonl", "argilla_settings.json", "index.html",
                                                      "label_studio_config.xml", "label_studio_tasks.json"]
    html = (out / "index.html").read_text()
    assert "http://" not in html and "https://" not in html  # nothing fetched: works offline
    metrics = json.loads((tmp_path / "metrics/review.json").read_text())
    assert metrics["rows"] == 4 and metrics["sampled"] == len(json.loads((out / "label_studio_tasks.json").read_text()))


def test_review_stage_fails_naming_a_missing_input_and_writes_nothing(tmp_path):
    with pytest.raises(InputError, match="recovered.parquet: file not found"):
        cli.main(["--rows", str(tmp_path / "recovered.parquet"), "--documents", str(tmp_path / "d.parquet"),
                  "--params", str(_params(tmp_path)), "--out", str(tmp_path / "review"),
                  "--metrics", str(tmp_path / "review.json")], standalone_mode=False)
    assert not (tmp_path / "review").exists() and not (tmp_path / "review.json").exists()


def test_embedded_data_cannot_close_the_script_tag():
    html = render_html({"rows": [{"question": "</script><script>alert(1)</script>"}], "documents": {}, "gates": [],
                        "sample": {"row_ids": []}, "rare": []})
    assert html.count("</script>") == 2  # the page's own two script elements only


def test_review_page_in_headless_chromium_filters_rows_and_highlights_the_evidence(tmp_path, chromium):
    browser, shoot = chromium
    out = _write_page(tmp_path, judge=True)
    assert json.loads((tmp_path / "metrics/review.json").read_text())["judge_audit"] == {"rows": 1, "disagree": 1}
    page, requests, errors = watched_page(browser)
    page.goto((out / "index.html").as_uri())
    # given the page, all four rows are shown
    assert page.text_content("#count") == "4 of 4 rows"
    shoot(page, "review_page")
    # when filtered on a rejection reason
    page.select_option("#f-reason", "faithfulness_unsupported")
    # then only the rejected row is shown, with its failing gate and its evidence span highlighted
    cards = page.locator("article.row")
    assert page.text_content("#count") == "1 of 4 rows" and cards.count() == 1
    card = cards.first
    assert card.get_attribute("data-row-id") == "syn_00000000000000aa"
    assert card.locator("mark").text_content() == "Refunds are issued within 30 days."
    assert card.locator("tr[data-gate=faithfulness] td.drop").text_content() == "drop"
    assert "0.12" in card.locator("tr[data-gate=faithfulness]").text_content()
    shoot(page, "review_page_filtered")
    # when filtered on status recovered instead: the lineage reaches the seed row
    page.select_option("#f-reason", "")
    page.select_option("#f-status", "recovered")
    assert page.text_content("#count") == "1 of 4 rows"
    lineage = page.locator("article.row ol.lineage").text_content()
    assert "syn_00000000000000aa" in lineage and "qa_0000000000000001" in lineage
    # the strategy and intent filters combine
    page.select_option("#f-status", "")
    page.select_option("#f-strategy", "new_question")
    page.select_option("#f-intent", "legal_request")
    assert page.locator("article.row").get_attribute("data-row-id") == "syn_00000000000000bb"
    # exporting the shown rows downloads Label Studio tasks
    with page.expect_download() as dl:
        page.click("#export")
    tasks = json.loads(Path(dl.value.path()).read_text())
    assert [t["data"]["row_id"] for t in tasks] == ["syn_00000000000000bb"]
    assert tasks[0]["data"]["evidence"] == DOC_TEXT[35:67]
    # the rows where the audit judge disagrees with the gates: the rejected row it would have kept
    page.select_option("#f-strategy", "")
    page.select_option("#f-intent", "")
    page.check("#f-judge")
    assert page.text_content("#count") == "1 of 4 rows"
    assert "audit judge P(yes) 0.810 · disagrees" in page.locator("article.row").inner_text()
    assert errors == [] and offline(requests) == []
