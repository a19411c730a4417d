"""Report stage: every number traced to a metrics file, missing stages reported as not run, honest gap signs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from schemas import predictions as pred_schema
from refinery.report.render import check_report
from refinery.report.stats import ADAPTERS, MODELS, NOT_RUN, gap_analysis, paired_bootstrap, verdict
from stages.report import ReportParams, cli, report_core

PARAMS = ReportParams(right_f1=0.5, bootstrap=200, ci=0.95, seed=0, min_factual_recall=0.5)
ROWS = [("r1", "How long do refunds take?", "Within 14 days."), ("r2", "Where is export?", "In the File menu."),
        ("r3", "How often does sync run?", "Every 5 minutes."), ("r4", "Which formats?", "PDF and Markdown.")]
# predictions per model: r1 all right; r2 B wrong, C right; r3 all wrong; r4 mixed
ANSWERS = {"base": ["No idea.", "Somewhere.", "Daily.", "Word."],
           "human": ["Within 14 days.", "In the File menu.", "Hourly.", "PDF and Markdown."],
           "contaminated": ["Within 14 days.", "Ask support.", "Weekly.", "Only PDF."],
           "curated": ["Within 14 days.", "In the File menu.", "Monthly.", "PDF."]}


def predictions(model: str) -> pa.Table:
    from refinery.training.evaluation import score_rows

    test = pa.table({"row_id": [r[0] for r in ROWS], "qa_id": [r[0] for r in ROWS], "doc_id": ["d"] * len(ROWS),
                     "question": [r[1] for r in ROWS], "answer": [r[2] for r in ROWS]})
    return score_rows(test, ANSWERS[model], [r[2] for r in ROWS], name=model, bert_f1=[0.9] * len(ROWS), min_facts=1)


def eval_metrics(model: str, table: pa.Table) -> dict:
    from refinery.training.evaluation import summarise

    return summarise(table, name=model, model_id=f"local:student+{model}", bert_info={"model": "local:minilm@abc",
                                                                                       "num_layers": 6}, extra={})


SEED = 42
ARMS = {"human": {"human": True}, "contaminated": {"sources": ["contaminated"]},
        "curated": {"human": True, "sources": ["accepted", "recovered"]}}


def run_of(m: str) -> str:
    return m if m == "base" else f"{m}-s{SEED}"


def write_metrics(folder: Path, *, with_gate: bool = True, models=MODELS) -> dict[str, Path]:
    """Write a metrics folder, predictions and datasets as the upstream stages would (one seed per arm)."""
    for sub in ("metrics/eval", "metrics/train", "eval", "datasets", "audit"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    if with_gate:
        for m in ARMS:
            (folder / f"audit/{m}.json").write_text(json.dumps({"event": "validate", "decision": "accept",
                                                                "failed_checks": [], "datasets": []}))
    (folder / "metrics/split.json").write_text(json.dumps({"rows": {"train": 3, "val": 2, "test": 4},
                                                           "leakage": {"shared_documents": 0}}))
    if with_gate:
        gates = ["rules", "faithfulness"]
        (folder / "metrics/gate.json").write_text(json.dumps({
            "total": 10, "kept": 6, "rejected": 4, "dropped_rules_too_short": 3, "dropped_faithfulness_unsupported": 1,
            "reasons_all": {"rules_too_short": 3, "faithfulness_unsupported": 2},
            "overlap": {"gates": gates, "rejected": {"rules": 3, "faithfulness": 2}, "only": {"rules": 2,
                                                                                              "faithfulness": 1},
                        "jaccard": {a: {b: 1.0 if a == b else 0.25 for b in gates} for a in gates}}}))
        (folder / "metrics/gate_injection.json").write_text(json.dumps({"cascade_and_gates": {
            "cascade": {"recall_factual": 0.62, "false_rejection_rate": 0.1},
            "gates": {g: {"recall_factual": 0.3, "false_rejection_rate": 0.05} for g in gates}}}))
        arm = lambda rec: {"per_mode": {"faithfulness": {"attempted": 10, "recovered": rec, "recovery_rate": rec / 10}},
                           "overall": {"attempted": 10, "recovered": rec, "recovery_rate": rec / 10}}  # noqa: E731
        (folder / "metrics/recover.json").write_text(json.dumps({"budget": 20, "adaptive": arm(9), "naive": arm(2)}))
        (folder / "metrics/assemble.json").write_text(json.dumps({
            "curated": {"topped_up": {"escalation": 3}, "topped_up_targeted": {"escalation": 2}}}))
        (folder / "metrics/coverage.json").write_text(json.dumps({
            "seed_rows": 3, "clusters": 2, "smallest_cluster_share": 0.3333, "rare_share": 0.05,
            "rare_intents": ["escalation"], "intents": {"escalation": 1}, "passages": 12, "passages_uncovered": 7,
            "passage_coverage": 0.4167}))
        (folder / "metrics/validate.json").write_text(json.dumps({"failed_checks": 0, "coverage_gaps": {"curated": {
            "synthetic_rows": 5, "closed": 3, "still_open": 4, "passage_coverage_before": 0.4167,
            "passage_coverage_after": 0.6667, "clusters_reached_by_synthetic": 2}}}))
        (folder / "metrics/verifiable.json").write_text(json.dumps({
            "isolation": "audit_hook", "seed_items": {"math": 24, "code": 12}, "seed_self_check": "passed",
            "math": {"calls": 24, "parsed": 14, "kept": 2, "pass_rate_parsed": 0.1429,
                     "reasons": {"verifiable_wrong_answer": 12}, "parse_errors": {"parse_missing_answer": 10}},
            "code": {"calls": 12, "parsed": 9, "kept": 0, "pass_rate_parsed": 0.0,
                     "reasons": {"verifiable_error": 9}, "parse_errors": {"parse_missing_function": 3}}}))
        m = {"pairs": 3, "accuracy": 0.6667, "mean_margin": 0.25}
        (folder / "metrics/dpo.json").write_text(json.dumps({
            "pairs": 30, "pairs_by_source": {"teacher": 18, "templated": 12},
            "categories": {"safety": {"check": "pii", "calls": 40, "parsed": 36, "failed_check_share": 0.5,
                                      "pairs": {"teacher": 18, "templated": 0}},
                           "tone": {"check": "reward", "calls": 10, "parsed": 0, "failed_check_share": None,
                                    "pairs": {"teacher": 0, "templated": 12}}},
            "reward_margin": {"templated": {"tone": {"pairs": 12, "accuracy": 1.0, "mean_margin": 0.9}},
                              "teacher_candidates": {"safety": m}, "teacher_pairs": {"safety": m}}}))
        from stages.audit_judge import agreement

        judged = agreement([True] * 6 + [False] * 4, [True] * 5 + [False] + [True] + [False] * 3)
        (folder / "metrics/audit_judge.json").write_text(json.dumps({
            "judge": "embedded:smollm2-135m-instruct@abc", "same_model_as_teacher": True,
            "prompt_template": "audit_judge@0123456789ab", "threshold": 0.5, "sampled": {"accepted": 6, "rejected": 4},
            "unjudgeable": 0, "judge_keep_rate": {"accepted": 0.8333, "rejected": 0.25}, "overall": judged,
            "families": {"heuristic": judged, "model": agreement([True] * 3, [True] * 3)},
            "gates": {"faithfulness": judged}}))
    for m in models:
        table = predictions(m)
        pq.write_table(table, folder / f"eval/{run_of(m)}.parquet")
        (folder / f"metrics/eval/{run_of(m)}.json").write_text(json.dumps(eval_metrics(m, table)))
        if m != "base":
            (folder / f"metrics/train/{run_of(m)}.json").write_text(json.dumps(
                {"val_loss_best": 1.2345, "val_loss_initial": 1.5, "steps": 12, "architecture": "causal", "effective_batch": 8}))
            pq.write_table(pa.table({"row_id": ["a", "b"], "origin": ["human", "synthetic" if m == "curated" else
                                                                      "human"], "question": ["Q one?", "Q two?"],
                                     "answer": ["A.", "B b."], "weight": [1.0, 0.5]}),
                           folder / f"datasets/{m}.parquet")
    return {"metrics": folder / "metrics", "eval": folder / "eval", "datasets": folder / "datasets"}


def run_cli(tmp_path: Path, monkeypatch) -> tuple[str, dict]:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"report": PARAMS.model_dump(), "assemble": {"arms": ARMS},
                                                          "train": {"seeds": [SEED]}}))
    res = CliRunner().invoke(cli, ["--params", "params.yaml", "--metrics-dir", "metrics", "--predictions-dir", "eval",
                                   "--datasets-dir", "datasets", "--adapters-dir", "adapters", "--audit", "audit",
                                   "--gated", "gated",
                                   "--out", "reports/report.md", "--summary", "metrics/report.json", "--trace",
                                   "reports/trace.json", "--plots", "reports/plots"])
    assert res.exit_code == 0, res.output
    return (tmp_path / "reports/report.md").read_text(), json.loads((tmp_path / "reports/trace.json").read_text())


def check(tmp_path: Path, md: str, trace: dict) -> list[str]:
    from refinery.core.io import read_json

    return check_report(md, trace, lambda f: read_json(tmp_path / f), lambda f: pq.read_table(tmp_path / f))


# ------------------------------------------------------------------------------------------ rules
def test_gap_share_keeps_its_sign_and_is_undefined_without_a_gap():
    evals = {"human": {"f1": 0.6}, "contaminated": {"f1": 0.4}, "curated": {"f1": 0.3}}
    boot = dict(n=PARAMS.bootstrap, ci=PARAMS.ci, seed=PARAMS.seed)
    assert gap_analysis(evals, {}, **boot)["metrics"]["f1"] == {"lost": 0.2, "recovered": -0.1, "recovered_share": -0.5}
    evals["contaminated"]["f1"] = 0.7
    assert gap_analysis(evals, {}, **boot)["metrics"]["f1"]["recovered_share"] is None


def test_verdicts_follow_the_bootstrap_interval():
    assert verdict(paired_bootstrap([1, 1, 1, 1], [0, 0, 0, 0], n=200, ci=0.95, seed=0)) == "supported"
    assert verdict(paired_bootstrap([0, 0, 0, 0], [1, 1, 1, 1], n=200, ci=0.95, seed=0)).startswith("rejected")
    assert verdict(paired_bootstrap([1, 0, 1, 0], [0, 1, 0, 0], n=200, ci=0.95, seed=0)).startswith("not supported")
    assert verdict(None) == NOT_RUN


def test_check_report_catches_placeholders_and_untraced_numbers():
    trace = {"numbers": [], "quotes": []}
    assert any("placeholder" in p for p in check_report("F1 is [FILL].", trace, dict, dict))
    assert any("placeholder" in p for p in check_report("F1 is X.XXX.", trace, dict, dict))
    assert check_report("F1 is 0.412.", trace, dict, dict) == ["number 0.412 is not traced to a metrics file"]


# ------------------------------------------------------------------------------------------ stage
def test_report_fills_every_section_from_metrics_files(tmp_path, monkeypatch):
    # given every upstream metrics file
    write_metrics(tmp_path)
    # when the report is written
    md, trace = run_cli(tmp_path, monkeypatch)
    # then no placeholder or untraced number remains, and every traced number still matches its file
    assert check(tmp_path, md, trace) == []
    assert f": {NOT_RUN}" not in md and f"| {NOT_RUN}" not in md
    # and the base is reported beside A/B/C, the gap keeps its sign, and all three sample cases are found
    for label in ("Base (untuned)", "A: human", "B: contaminated", "C: curated"):
        assert f"| {label} |" in md
    summary = json.loads((tmp_path / "metrics/report.json").read_text())
    f1 = {m: json.loads((tmp_path / f"metrics/eval/{run_of(m)}.json").read_text())["f1"] for m in MODELS}
    share = summary["gap"]["metrics"]["f1"]["recovered_share"]
    assert share == pytest.approx((f1["curated"] - f1["contaminated"]) / (f1["human"] - f1["contaminated"]), abs=1e-3)
    assert f"C recovers {100 * share:.1f}%" in md
    assert summary["samples"] == {"all_right": "r1", "b_wrong_c_right": "r2", "all_wrong": "r3"}
    assert "| `overall` | 10 | 9 | 0.900 | 10 | 2 | 0.200 |" in md
    assert summary["verdicts"]["h5"] == "supported"  # 9 vs 2: one-sided exact p = 67 / 2048
    assert summary["h5_p"] == pytest.approx(67 / 2048, abs=1e-4)
    assert "decision **accept**, 0 failed checks" in md
    assert "| `curated` | 5 | 3 | 4 | 41.7% → 66.7% | 2 of 2 |" in md  # seed coverage before -> after
    assert "| math | 24 | 14 | 2 | 14.3% | `parse_missing_answer` 10, `verifiable_wrong_answer` 12 |" in md
    assert "| code | 12 | 9 | 0 | 0.0% | `parse_missing_function` 3, `verifiable_error` 9 |" in md
    assert "| `safety` | `pii` | 40 | 36 | 50.0% | 18 | 0 | – | 0.667 (0.250, n=3) | 0.667 (0.250, n=3) |" in md
    assert "| `tone` | `reward` | 10 | 0 | – | 0 | 12 | 1.000 (0.900, n=12) | – | – |" in md
    assert "| `escalation` | 1 | 3 (2) |" in md  # a rare intent: seed rows, topped up (of them targeted)
    assert "Human review decisions" not in md  # no assemble metrics here: the line is left out, not "not run"
    # and the first section answers the seed questions from the arms, saying the noise floor is unmeasured
    first = md.split("## The seed questions")[1].split("\n## ")[0]
    assert "Does teacher contamination cost accuracy" in first and "Noise floor: **unmeasured**" in first
    assert "filtering" not in summary["experiment"]["questions"]  # no unfiltered arm declared here
    for name in ("f1", "arms", "metrics", "gap", "gate_overlap", "recovery"):
        assert (tmp_path / f"reports/plots/report_{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_stages_are_reported_as_not_run(tmp_path, monkeypatch):
    # given no gate, injection or recovery metrics and only the base evaluated
    write_metrics(tmp_path, with_gate=False, models=("base",))
    # when the report is written
    md, trace = run_cli(tmp_path, monkeypatch)
    # then it says which sections did not run, invents nothing, and passes the placeholder check
    assert "Gate stage: not run" in md and "Recovery stage: not run" in md and "Gap analysis: not run" in md
    assert "Data validation: not run" in md
    assert "| B: contaminated | not run |" in md and "Sample predictions: not run" in md
    assert check(tmp_path, md, trace) == []


def test_a_number_edited_into_the_report_is_caught(tmp_path, monkeypatch):
    write_metrics(tmp_path)
    md, trace = run_cli(tmp_path, monkeypatch)
    assert check(tmp_path, md + "\nAccuracy was 0.987 overall.\n", trace) == [
        "number 0.987 is not traced to a metrics file"]
    # and a metrics file changed after the report was written makes its numbers stale
    eval_file = tmp_path / f"metrics/eval/{run_of('human')}.json"
    eval_file.write_text(json.dumps({**json.loads(eval_file.read_text()), "f1": 0.1234}))
    assert any(f"eval/{run_of('human')}.json:f1" in p for p in check(tmp_path, md, trace))


def test_report_core_needs_no_files(tmp_path):
    result = report_core({}, {}, {}, None, PARAMS, metrics_dir="metrics", summary_file="metrics/report.json",
                         preds_files={m: f"p_{m}" for m in MODELS}, plots_rel="plots")
    assert "Gate stage: not run" in result.markdown and result.summary["gap"] == {}
    assert "Sample predictions: not run" in result.markdown
    assert all(m not in result.summary["datasets"] for m in ADAPTERS)
    assert pred_schema.ARROW.names[0] == "model"


def test_the_committed_report_has_no_placeholder_or_untraced_number():
    # given the project's own report (written by `dvc repro`), when checked, then nothing in it is untraced
    from refinery.core.io import read_json
    from tests.conftest import ROOT

    md, trace = ROOT / "reports/report.md", ROOT / "reports/report_trace.json"
    if not (md.is_file() and trace.is_file()):
        pytest.skip("reports/report.md not written yet: run `dvc repro report`")
    # Metrics files are committed; the prediction tables that sample quotes come from are DVC outputs, absent
    # from a fresh clone until `dvc pull` / `dvc repro`: their quotes are checked only where present.
    assert check_report(md.read_text(), read_json(trace), lambda f: read_json(ROOT / f),
                        lambda f: pq.read_table(ROOT / f) if (ROOT / f).is_file() else None) == []


def test_h5_needs_more_than_a_lead_of_a_row_or_two():
    from refinery.report.stats import recovery_p_value, recovery_verdict

    assert recovery_p_value(4, 3) == pytest.approx(0.5)  # P(X >= 4), X ~ Bin(7, 1/2)
    assert recovery_p_value(0, 0) == 1.0
    assert recovery_verdict(4, 3, 0.05).startswith("not supported at this sample size")
    assert "in the predicted direction" in recovery_verdict(4, 3, 0.05)
    assert "against it" in recovery_verdict(8, 9, 0.05)
    assert "even" in recovery_verdict(5, 5, 0.05)
    assert recovery_verdict(9, 2, 0.05) == "supported"
    assert recovery_verdict(1, 12, 0.05) == "rejected (the opposite holds)"
    assert recovery_verdict(None, 3, 0.05) is None and recovery_verdict(3, None, 0.05) is None


def test_audit_decision_rejects_a_failed_check_or_an_arm_without_an_audit():
    from refinery.report.stats import audit_decision

    assert audit_decision({}, ["human"]) is None
    assert audit_decision({"human": {"failed_checks": []}}, ["human"]) == {"decision": "accept", "failed_checks": 0,
                                                                           "arms_validated": 1}
    assert audit_decision({"human": {"failed_checks": ["dup_rate"]}}, ["human"])["decision"] == "reject"
    assert audit_decision({"human": {"failed_checks": []}}, ["human", "curated"])["decision"] == "reject"


def test_report_says_what_the_review_decisions_did(tmp_path, monkeypatch):
    write_metrics(tmp_path)
    (tmp_path / "metrics/assemble.json").write_text(json.dumps({"review_decisions": {
        "decisions": 4, "kept": 1, "removed": 1, "replaced": 1, "replacement_rejected": 1, "not_found": 0}}))
    md, trace = run_cli(tmp_path, monkeypatch)
    assert check(tmp_path, md, trace) == []
    assert ("Human review decisions read back (`reviews/decisions.json`): 4; kept 1, removed from every arm 1, "
            "replaced by the reviewer's answer after every gate passed it 1, correction refused by a gate 1, row not "
            "found 0") in md
