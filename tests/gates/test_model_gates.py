"""Model gates (faithfulness, reward, perplexity) on inline rows with deterministic doubles: codes and fail-closed."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from refinery.gates.faithfulness import FaithfulnessGate, LLMJudge, PassageRetriever
from refinery.gates.perplexity import PerplexityGate
from refinery.gates.reward import RewardGate

DOCS = pa.table({"doc_id": ["d1", "d2"], "text": ["Refunds take 30 days. Contact billing first.",
                                                  "Sync runs every 5 minutes on Pro."]})


def rows(answers, questions=None, spans=None, docs=None):
    n = len(answers)
    spans = spans or [(0, 21)] * n
    return pa.table({"question": questions or ["How long do refunds take?"] * n, "answer": answers,
                     "doc_id": docs or ["d1"] * n, "evidence_start": [s[0] if s else None for s in spans],
                     "evidence_end": [s[1] if s else None for s in spans]})


class WordScorer:
    """Support = 1 when every number in the claim appears in the passage, else 0 (a stand-in verifier)."""

    def __init__(self):
        self.seen = []

    def score(self, passages, claims):
        self.seen += list(passages)
        import re
        return np.array([float(all(n in p for n in re.findall(r"\d+", c))) for p, c in zip(passages, claims)])


def test_grounded_mode_checks_the_exact_evidence_span():
    scorer = WordScorer()
    gate = FaithfulnessGate(scorer, DOCS, mode="grounded", min_support=0.5)
    v = gate.apply(rows(["Thirty days: 30.", "About 14 days."]))
    assert v.keep == [True, False] and v.reason == [None, "faithfulness_unsupported"]
    assert scorer.seen == ["Refunds take 30 days.", "Refunds take 30 days."]  # the span, not the document


def test_no_evidence_and_no_answer_are_rejected_with_their_own_codes():
    gate = FaithfulnessGate(WordScorer(), DOCS, mode="grounded", min_support=0.5)
    v = gate.apply(rows(["30 days", None, "30"], spans=[None, (0, 21), (5, 500)]))
    assert v.reason == ["faithfulness_no_evidence", "faithfulness_no_answer", "faithfulness_no_evidence"]
    assert v.keep == [False, False, False]


class NaNScorer:
    def score(self, passages, claims):
        return np.array([math.nan] * len(claims))


class Broken:
    def score(self, *a):
        raise RuntimeError("CUDA out of memory")


def test_faithfulness_fails_closed_on_nan_and_on_errors():
    assert FaithfulnessGate(NaNScorer(), DOCS).apply(rows(["30 days"])).reason == ["faithfulness_error"]
    v = FaithfulnessGate(Broken(), DOCS).apply(rows(["30 days", "x"]))
    assert v.keep == [False, False] and v.reason == ["faithfulness_error"] * 2


def test_ungrounded_mode_never_sees_the_passage():
    scorer = WordScorer()
    FaithfulnessGate(scorer, DOCS, mode="ungrounded").apply(rows(["30 days"]))
    assert scorer.seen == ["How long do refunds take?"]


class FixedEmbedder:
    def embed(self, texts):
        return np.array([[1.0, 0.0] if ("Refund" in t or "refund" in t) else [0.0, 1.0] for t in texts], np.float32)


def test_retrieved_mode_finds_evidence_post_hoc():
    scorer = WordScorer()
    retriever = PassageRetriever(DOCS, FixedEmbedder(), window_sentences=1)
    FaithfulnessGate(scorer, DOCS, mode="retrieved", retriever=retriever).apply(rows(["30 days for a refund"]))
    assert scorer.seen == ["Refunds take 30 days."]


class LL:
    """A backend double: log-likelihoods chosen per continuation."""

    def __init__(self, table):
        self.table = table

    def loglikelihood(self, contexts, continuations):
        return [self.table(c, x) for c, x in zip(contexts, continuations)]


def test_llm_judge_reads_probabilities_not_generated_text():
    judge = LLMJudge(LL(lambda c, x: (math.log(0.8), 1) if x == " yes" else (math.log(0.2), 1)))
    assert judge.score(["p"], ["c"]).tolist() == pytest.approx([0.8])
    broken = LLMJudge(LL(lambda c, x: (math.nan, 1)))
    assert math.isnan(broken.score(["p"], ["c"])[0])  # NaN -> the gate rejects it as faithfulness_error


class RewardDouble:
    def score(self, questions, answers):
        return np.array([0.1 if "idk" in a else (math.nan if a == "nan" else 0.9) for a in answers])


def test_reward_gate_codes():
    v = RewardGate(RewardDouble(), min_reward=0.5).apply(rows(["30 days.", "idk", "nan", ""]))
    assert v.reason == [None, "reward_low", "reward_error", "reward_no_answer"]
    assert RewardGate(Broken(), 0.5).apply(rows(["a"])).reason == ["reward_error"]


def test_perplexity_gate_rejects_nonsense_and_repetition():
    # log-prob per token: -1 -> ppl e (kept), -8 -> ppl ~2981 (too high), -0.01 -> ~1.01 (too low)
    per_token = {" fine answer": -1.0, " zq xv blorp": -8.0, " the the the": -0.01, " broken": math.nan}
    gate = PerplexityGate(LL(lambda c, x: (per_token[x] * 3, 3)), min_perplexity=1.5, max_perplexity=100)
    v = gate.apply(rows(["fine answer", "zq xv blorp", "the the the", "broken", None]))
    assert v.reason == [None, "perplexity_too_high", "perplexity_too_low", "perplexity_error",
                        "perplexity_no_answer"]
    assert v.score[0] == pytest.approx(math.e)


def test_evidence_modes_are_compared_for_both_judges_with_intervals():
    from types import SimpleNamespace

    from refinery.gates.run import compare_modes

    # given planted rows: 6 clean controls and 6 number changes, the exact evidence span on each
    answers = ["It takes 30 days."] * 6 + [f"It takes {n} days." for n in (14, 21, 40, 45, 60, 90)]
    table = rows(answers).append_column("injection_kind", pa.array(["clean"] * 6 + ["number_change"] * 6))
    # and a verifier that checks numbers against the passage, an LLM judge that cannot tell (always 0.5)
    verifier = WordScorer()
    models = SimpleNamespace(verifier=verifier, embedder=FixedEmbedder(),
                             judge=LL(lambda c, x: (math.log(0.5), 1)))
    gates = {"faithfulness": FaithfulnessGate(verifier, DOCS)}
    out = compare_modes(table, gates, DOCS, models, target_frr=0.0, bootstrap=200)
    # then the configured judge's modes stay at the top level, and both judges are measured
    assert out["judge"] == "verifier" and out["grounded"] == out["by_judge"]["verifier"]["modes"]["grounded"]
    v, llm = out["by_judge"]["verifier"], out["by_judge"]["llm"]
    assert v["modes"]["grounded"]["recall_factual"] == 1.0 and v["modes"]["ungrounded"]["recall_factual"] == 0.0
    assert v["modes"]["grounded"]["recall_ci95"]["low"] > 0.5
    # grounded beats ungrounded for the verifier with an interval that excludes 0; the blind judge shows nothing
    d = v["differences"]["grounded_minus_ungrounded"]
    assert d["mean"] == 1.0 and d["low"] > 0
    assert llm["differences"]["grounded_minus_ungrounded"] == {"mean": 0.0, "low": 0.0, "high": 0.0}
