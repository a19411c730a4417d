"""Evaluate stage: SQuAD EM/F1, ROUGE, the passage fact check, and a tiny model answering the test split."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from refinery.training import textmetrics as tm
from refinery.core.errors import RefineryError
from schemas import predictions as pred_schema
from tests.test_train import project, tiny_causal  # noqa: F401 - a fixture


# ------------------------------------------------------------------------------------------ rules
def test_squad_normalisation_ignores_case_punctuation_and_articles():
    assert tm.normalize_answer("The  Refund, window!") == "refund window"
    assert tm.exact_match("the 30 days.", "30 Days") == 1.0
    assert tm.exact_match("30 days", "14 days") == 0.0


def test_token_f1_is_the_harmonic_mean_of_token_precision_and_recall():
    # prediction "refunds take 14 days" vs reference "within 14 days": common {14, days}; P = 2/4, R = 2/3
    assert tm.token_f1("Refunds take 14 days", "Within 14 days.") == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert tm.token_f1("", "") == 1.0 and tm.token_f1("", "x") == 0.0 and tm.token_f1("a b", "c") == 0.0


def test_rouge_scores_come_from_rouge_score():
    r = tm.rouge(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert r["rouge1"] == [1.0] and r["rouge2"] == [1.0] and r["rougeL"] == [1.0]


def test_facts_are_numbers_and_inner_capitalised_words():
    assert tm.facts("Sync runs every 5 minutes on the Pro plan.") == {"5", "Pro"}
    assert tm.facts("Use the File menu, then Export as PDF.") == {"File", "Export", "PDF"}


def test_factual_check_needs_every_reference_fact_and_no_invented_number():
    passage = "Refunds are issued within 14 days. Contact Billing to start one."
    assert tm.factual_check("They take 14 days.", "Within 14 days.", passage) == (True, True)
    # a changed figure is wrong, and so is an extra number the passage never states
    assert tm.factual_check("They take 21 days.", "Within 14 days.", passage) == (True, False)
    assert tm.factual_check("14 days, or 3 weeks.", "Within 14 days.", passage) == (True, False)
    # a reference whose facts are not in the passage cannot be checked; nor one without facts
    assert tm.factual_check("30 days", "It is 30 days.", passage) == (False, None)
    assert tm.factual_check("yes", "yes, you can.", passage) == (False, None)
    # a UI label is a fact with its case: the verb "restore" does not state the button "Restore"
    ui = "Preview a version, then click Restore."
    assert tm.factual_check("you can restore it", "Click Restore.", ui) == (True, False)


def test_bertscore_runs_offline_on_the_local_minilm(minilm_dir):
    res = tm.bertscore(["Refunds take 14 days.", ""], ["Within 14 days.", "x"], model_path=minilm_dir,
                       model_id="minilm", num_layers=6)
    assert 0.5 < res.f1[0] <= 1.0 and res.f1[1] == 0.0
    assert res.info["model"] == "minilm" and res.info["num_layers"] == 6 and res.info["empty_predictions_scored_0"] == 1


# ------------------------------------------------------------------------------------------ stage
def test_evaluate_scores_the_untuned_base_and_an_adapter(tmp_path, tiny_causal, minilm_dir, monkeypatch):
    # given a tiny project and an adapter trained on its human dataset
    from stages.evaluate import cli as evaluate
    from stages.train import cli as train

    p = project(tmp_path, tiny_causal, minilm_dir)
    monkeypatch.chdir(tmp_path)
    common = ["--params", str(p["params"]), "--documents", str(p["documents"]), "--models", str(p["models"])]
    res = CliRunner().invoke(train, common + ["--dataset", str(p["human"]), "--name", "human", "--val", str(p["val"]),
                                              "--out", "adapters/human", "--metrics", "m/train_human.json",
                                              "--plots", "plots", "--no-progress"])
    assert res.exit_code == 0, res.output
    # when the base and the adapter answer the test split
    for name, extra in (("base", []), ("human", ["--adapter", "adapters/human"])):
        res = CliRunner().invoke(evaluate, common + ["--name", name, "--test", str(p["test"]), "--out",
                                                     f"eval/predictions_{name}.parquet", "--metrics",
                                                     f"m/eval_{name}.json", "--no-progress"] + extra)
        assert res.exit_code == 0, res.output
    # then every test row has a scored prediction, and the metrics name the models used
    for name in ("base", "human"):
        table = pq.read_table(tmp_path / f"eval/predictions_{name}.parquet")
        assert table.schema == pred_schema.ARROW and table.num_rows == 7
        m = json.loads((tmp_path / f"m/eval_{name}.json").read_text())
        assert m["test_rows"] == 7 and {"exact_match", "f1", "rouge1", "rouge2", "rougeL", "bertscore_f1",
                                        "factual_accuracy", "factual_items"} <= set(m)
        assert m["bertscore"]["model"].startswith("local:")
    assert json.loads((tmp_path / "m/eval_base.json").read_text())["adapter"] is None
    assert json.loads((tmp_path / "m/eval_human.json").read_text())["adapter_sha256"]


def test_base_takes_no_adapter_and_others_need_one(tmp_path, tiny_causal, minilm_dir, monkeypatch):
    from stages.evaluate import cli as evaluate

    p = project(tmp_path, tiny_causal, minilm_dir)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(evaluate, ["--params", str(p["params"]), "--name", "human", "--test", str(p["test"]),
                                        "--documents", str(p["documents"]), "--models", str(p["models"]),
                                        "--out", "x.parquet", "--metrics", "x.json"])
    assert isinstance(res.exception, RefineryError) and "needs one" in str(res.exception)
