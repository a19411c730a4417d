"""Injection evaluation: recall, false rejections, precision, who caught what, gate overlap, recall at equal FRR."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from refinery.core.errors import RefineryError
from refinery.gates.base import Verdicts
from refinery.planted.measure import apply_by_kind, evaluate_injection, gate_overlap, plot_overlap, recall_at_frr

# (kind, rules_keep, faithfulness_keep); dedup keeps every row
VERDICTS = [
    ("entity_swap", True, False),  # faithfulness only
    ("entity_swap", True, True),  # missed
    ("number_change", True, False),  # faithfulness only
    ("refusal", False, False),  # both
    ("refusal", False, True),  # rules only
    ("clean", True, True),
    ("clean", True, False),  # a false rejection by faithfulness
    ("clean", True, True),
    ("clean", True, True),
]
GATES = ["rules", "faithfulness"]


def verdict_table(rows=VERDICTS) -> pa.Table:
    return pa.table({"injection_kind": [k for k, _, _ in rows], "rules_keep": [r for _, r, _ in rows],
                     "faithfulness_keep": [f for _, _, f in rows], "dedup_keep": [True] * len(rows)})


def test_evaluate_injection_reports_exact_recall_frr_precision_and_catches():
    # given a hand-built verdict table
    # when it is evaluated for two gates
    result = evaluate_injection(verdict_table(), GATES)
    # then every number is as counted by hand
    assert result["counts"] == {"entity_swap": 2, "number_change": 1, "refusal": 2, "clean": 4}
    assert result["factual_kinds"] == ["entity_swap", "number_change"]
    for block in [*result["gates"].values(), result["cascade"]]:  # intervals and families: their own test below
        block.pop("recall_ci95"), block.pop("families")
    assert result["gates"]["rules"] == {
        "recall": {"entity_swap": 0.0, "number_change": 0.0, "refusal": 1.0}, "recall_factual": 0.0,
        "recall_injected": 0.4, "false_rejection_rate": 0.0, "precision": 1.0, "rejected": 2,
        "rejected_injected": 2, "rejected_clean": 0}
    assert result["gates"]["faithfulness"] == {
        "recall": {"entity_swap": 0.5, "number_change": 1.0, "refusal": 0.5}, "recall_factual": 0.6667,
        "recall_injected": 0.6, "false_rejection_rate": 0.25, "precision": 0.75, "rejected": 4,
        "rejected_injected": 3, "rejected_clean": 1}
    assert result["cascade"] == {
        "recall": {"entity_swap": 0.5, "number_change": 1.0, "refusal": 1.0}, "recall_factual": 0.6667,
        "recall_injected": 0.8, "false_rejection_rate": 0.25, "precision": 0.8, "rejected": 5,
        "rejected_injected": 4, "rejected_clean": 1}
    assert result["caught_by"] == {
        "entity_swap": {"rules": {"rejected": 0, "only": 0}, "faithfulness": {"rejected": 1, "only": 1}},
        "number_change": {"rules": {"rejected": 0, "only": 0}, "faithfulness": {"rejected": 1, "only": 1}},
        "refusal": {"rules": {"rejected": 2, "only": 1}, "faithfulness": {"rejected": 1, "only": 0}},
        "clean": {"rules": {"rejected": 0, "only": 0}, "faithfulness": {"rejected": 1, "only": 1}},
    }
    assert result["missed"] == {"entity_swap": 1, "number_change": 0, "refusal": 0, "clean": 3}
    assert json.loads(json.dumps(result)) == result  # JSON-ready


def test_recall_comes_with_wilson_intervals_and_seen_and_unseen_families():
    from refinery.planted.measure import wilson

    # given verdicts where number_change is a kind the learned gates never trained on
    result = evaluate_injection(verdict_table(), GATES, unseen=["number_change"])
    faith = result["gates"]["faithfulness"]
    # then each kind's recall has its 95% Wilson interval, and factual kinds are pooled as seen / unseen
    assert faith["recall_ci95"]["entity_swap"] == wilson(1, 2)
    assert faith["families"]["seen"] == {"kinds": ["entity_swap"], "planted": 2, "rejected": 1, "recall": 0.5,
                                         "ci95": wilson(1, 2)}
    assert faith["families"]["unseen"] == {"kinds": ["number_change"], "planted": 1, "rejected": 1, "recall": 1.0,
                                           "ci95": wilson(1, 1)}
    assert result["unseen_kinds"] == ["number_change"]
    # and the interval is the textbook one: 1 of 2 -> 0.0945 to 0.9055; 0 of 0 has none
    assert wilson(1, 2) == {"low": 0.0945, "high": 0.9055} and wilson(0, 0) is None
    assert wilson(10, 10)["high"] == 1.0 and 0.69 < wilson(10, 10)["low"] < 0.73


def test_shares_without_a_denominator_are_null():
    # no clean rows, and a gate that rejects nothing
    result = evaluate_injection(verdict_table(VERDICTS[:5]), ["dedup"])
    assert result["gates"]["dedup"]["false_rejection_rate"] is None
    assert result["gates"]["dedup"]["precision"] is None


def test_evaluate_injection_names_a_missing_gate_column_and_null_verdicts():
    with pytest.raises(RefineryError, match=r"no column\(s\) reward_keep"):
        evaluate_injection(verdict_table(), ["rules", "reward"])
    with pytest.raises(RefineryError, match="no column injection_kind"):
        evaluate_injection(verdict_table().drop_columns(["injection_kind"]), GATES)
    nulls = verdict_table().set_column(1, "rules_keep", pa.array([None] + [True] * 8, pa.bool_()))
    with pytest.raises(RefineryError, match="rules_keep has 1 null"):
        evaluate_injection(nulls, GATES)


def test_gate_overlap_exact_jaccard_and_exclusive_counts():
    # when three gates (one rejecting nothing) are compared
    result = gate_overlap(verdict_table(), ["rules", "faithfulness", "dedup"])
    # then rules {4,5} and faithfulness {1,3,4,7} share one row of five
    assert result["rejected"] == {"rules": 2, "faithfulness": 4, "dedup": 0}
    assert result["jaccard"] == {
        "rules": {"rules": 1.0, "faithfulness": 0.2, "dedup": 0.0},
        "faithfulness": {"rules": 0.2, "faithfulness": 1.0, "dedup": 0.0},
        "dedup": {"rules": 0.0, "faithfulness": 0.0, "dedup": None},
    }
    assert result["intersection"]["rules"]["faithfulness"] == 1
    assert result["only"] == {"rules": 1, "faithfulness": 3, "dedup": 0}
    assert (result["rejected_by_none"], result["rejected_by_any"], result["rows"]) == (4, 5, 9)
    # and it needs no injection labels (works on synthetic rows too)
    assert gate_overlap(verdict_table().drop_columns(["injection_kind"]), GATES)["rejected_by_any"] == 5


def test_recall_at_frr_counts_nan_as_rejected():
    # clean: 1 NaN + up to 1 finite rejection allowed (0.4 * 5 = 2); injected NaN is a catch
    threshold, recall, frr = recall_at_frr([0.1, 0.2, 0.2, 0.9, math.nan], [0.05, 0.2, 0.15, math.nan], 0.4)
    assert (threshold, recall, frr) == (0.2, 0.75, 0.4)


def test_recall_at_frr_never_cuts_a_tie_block():
    # one rejection allowed, but three clean rows tie at the lowest score: none is rejected
    threshold, recall, frr = recall_at_frr(np.array([0.5, 0.5, 0.5, 0.9]), np.array([0.4, 0.5, 0.6]), 0.25)
    assert (threshold, frr) == (0.5, 0.0)
    assert recall == pytest.approx(1 / 3)


def test_recall_at_frr_at_zero_and_full_targets():
    assert recall_at_frr([0.3, 0.6], [0.1, 0.3, 0.5], 0.0) == (0.3, pytest.approx(1 / 3), 0.0)
    threshold, recall, frr = recall_at_frr([0.2, 0.4], [0.9, math.nan], 1.0)
    assert threshold > 0.9 and (recall, frr) == (1.0, 1.0)


def test_recall_at_frr_reports_a_target_the_nan_rows_already_break():
    # two NaN clean rows of four exceed a 25% target: no finite clean row is rejected, the excess is reported
    assert recall_at_frr([math.nan, math.nan, 0.8, 0.9], [0.7, 0.85], 0.25) == (0.8, 0.5, 0.5)


def test_recall_at_frr_rejects_empty_inputs_and_bad_targets():
    with pytest.raises(ValueError, match="at least one clean"):
        recall_at_frr([], [0.1], 0.1)
    with pytest.raises(ValueError, match="target_frr"):
        recall_at_frr([0.1], [0.1], 1.5)


def test_plot_overlap_writes_a_png(tmp_path):
    overlap = gate_overlap(verdict_table(), ["rules", "faithfulness", "dedup"])
    path = plot_overlap(overlap, tmp_path / "overlap.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class SameAnswerGate:
    """A within-set gate double: rejects every row whose answer another row of the batch also has."""

    name = "same"

    def apply(self, rows: pa.Table) -> Verdicts:
        answers = rows.column("answer").to_pylist()
        keep = [answers.count(a) == 1 for a in answers]
        return Verdicts(keep, [float(not k) for k in keep], [None if k else "same_answer" for k in keep])


def test_apply_by_kind_keeps_siblings_of_one_source_apart():
    # given a clean control and its refusal sibling with the same answer, plus two refusals sharing one
    table = pa.table({"injection_kind": ["clean", "entity_swap", "refusal", "refusal"],
                      "answer": ["Within 14 days.", "Within 14 days.", "Sorry.", "Sorry."]})
    # when the gate judges the whole table, the siblings reject each other; kind by kind, they do not
    assert SameAnswerGate().apply(table).keep == [False, False, False, False]
    verdicts = apply_by_kind(SameAnswerGate(), table)
    # then only the two refusals (one kind) still meet, and verdicts come back in row order
    assert verdicts.keep == [True, True, False, False]
    assert verdicts.reason == [None, None, "same_answer", "same_answer"]
