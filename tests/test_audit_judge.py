"""Judge audit: the sample, the judge's P(yes) from log-likelihoods, and its agreement with the gates (kappa)."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from refinery.gates.registry import GATES
from schemas import judge_audit as audit_schema
from stages.audit_judge import agreement, audit, family_keep, judge_rows, ranking_auc, sample

DOC = "Refunds are issued within 30 days. Start one in Settings > Billing."


def gated(n: int, keep: bool, prefix: str, **overrides) -> pa.Table:
    cols = {"row_id": [f"{prefix}{i}" for i in range(n)], "doc_id": ["d1"] * n,
            "question": [f"How long do refunds take {i}?" for i in range(n)], "answer": ["Within 30 days."] * n,
            "evidence": ["Refunds are issued within 30 days."] * n, "evidence_start": [0] * n,
            "evidence_end": [34] * n, "gate_keep": [keep] * n,
            "gate_reasons": [[] if keep else ["faithfulness_unsupported"]] * n}
    for g in GATES:
        cols[f"{g}_keep"] = [True] * n
    if not keep:
        cols["faithfulness_keep"] = [False] * n
    cols.update(overrides)
    return pa.table(cols)


def test_agreement_counts_the_confusion_and_kappa():
    # 4 rows both keep, 1 gates keep judge rejects, 1 the reverse, 2 both reject
    g = [True] * 5 + [False] * 3
    j = [True] * 4 + [False] + [True] + [False] * 2
    a = agreement(g, j)
    assert a["confusion"] == {"gates_keep_judge_keep": 4, "gates_keep_judge_reject": 1,
                              "gates_reject_judge_keep": 1, "gates_reject_judge_reject": 2}
    po, pe = 6 / 8, (5 / 8) * (5 / 8) + (3 / 8) * (3 / 8)
    assert a["agreement"] == 0.75 and a["kappa"] == pytest.approx((po - pe) / (1 - pe), abs=1e-4)
    assert agreement([True, None, False], [True, True, None])["rows"] == 1  # a missing verdict leaves the row out
    assert agreement([True, True], [True, True])["kappa"] is None  # one verdict everywhere: kappa undefined


def test_sample_takes_a_share_of_each_with_a_floor_and_is_seeded():
    acc, rej = gated(50, True, "a"), gated(8, False, "r")
    s = sample(acc, rej, share=0.1, min_rows=6, seed=1)
    assert s.column("status").to_pylist().count("accepted") == 6  # max(6, 5)
    assert s.column("status").to_pylist().count("rejected") == 6
    assert s.column("row_id").to_pylist() == sample(acc, rej, share=0.1, min_rows=6, seed=1).column("row_id").to_pylist()
    assert sample(acc, rej, share=1.0, min_rows=0, seed=1).num_rows == 58


class Backend:
    """Log-likelihoods of ' yes' and ' no' per prompt: yes wins where the prompt's answer says 30 days."""

    def __init__(self):
        self.calls = []

    def loglikelihood(self, contexts, continuations):
        self.calls.append(list(continuations))
        out = []
        for c, cont in zip(contexts, continuations):
            good = "Answer: Within 30 days." in c
            out.append((math.log(0.8 if (cont == " yes") == good else 0.2), 1))
        return out


def test_judge_rows_reads_p_yes_from_log_likelihoods_and_skips_rows_without_text():
    from refinery.generation.prompts import load_template
    from tests.conftest import ROOT

    rows = gated(3, True, "a", answer=["Within 30 days.", "Within 90 days.", None])
    backend = Backend()
    p = judge_rows(backend, load_template(ROOT / "prompts/audit_judge.txt"), rows, {"d1": DOC}, 300)
    assert p[0] == pytest.approx(0.8) and p[1] == pytest.approx(0.2) and p[2] is None
    assert backend.calls == [[" yes", " yes"], [" no", " no"]]


def test_audit_table_keeps_both_verdicts_and_families_with_cascade_gaps():
    rows = sample(gated(2, True, "a"), gated(2, False, "r", reward_keep=[None, False]), share=1.0, min_rows=0, seed=0)
    table, m = audit(rows, [0.9, 0.1, 0.2, None], threshold=0.5, judge_id="j", template_ref="audit_judge@x")
    audit_schema.CONTRACT.validate(table, "judge_audit.parquet")
    assert table.column("judge_keep").to_pylist() == [True, False, False, None]
    assert table.column("agree").to_pylist() == [True, False, True, None]
    assert family_keep(rows, "model") == [True, True, None, False]  # reward skipped by the cascade: unknown
    assert m["sampled"] == {"accepted": 2, "rejected": 2} and m["unjudgeable"] == 1
    assert m["overall"]["confusion"]["gates_keep_judge_reject"] == 1
    assert set(m["gates"]) == {"faithfulness", "reward"}  # only gates that rejected a sampled row
    assert m["judge_keep_rate"] == {"accepted": 0.5, "rejected": 0.0}


def test_ranking_auc_is_threshold_free():
    # every P(yes) is below 0.5 (the judge rejects all), yet it ranks the kept rows first: AUC 1
    assert ranking_auc([True, True, False, False], [0.3, 0.2, 0.1, 0.05]) == 1.0
    assert ranking_auc([True, False, None], [0.1, 0.3, 0.9]) == 0.0
    assert ranking_auc([True, True], [0.1, 0.2]) is None
