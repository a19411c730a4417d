"""Realistic DPO rejected answers: constraints, eligibility, the checks, rounds, the templated fallback, the contract."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import yaml

from refinery.core.errors import RefineryError
from refinery.gates.base import Verdicts
from refinery.generation.prompts import load_template
from refinery.models.backends.base import GenResult
from refinery.training import preferences as prefs
from schemas import preference_pairs as pairs_schema

ROWS = [
    {"row_id": "r1", "question": "How long does a refund take?", "answer": "Refunds are issued within 14 days.",
     "doc_id": "d1", "evidence_start": 0, "evidence_end": 30, "evidence": "Refunds are issued within 14 days."},
    {"row_id": "r2", "question": "My invoice is wrong. What do I do?",
     "answer": "Check the billing page first. If it is still wrong, contact billing@example.com.",
     "doc_id": "d2", "evidence_start": 0, "evidence_end": 40, "evidence": "Contact billing@example.com."},
    {"row_id": "r3", "question": "Can I export my data?", "answer": "Yes. Go to Settings and click Export.",
     "doc_id": "d3", "evidence_start": 0, "evidence_end": 20, "evidence": "Settings has Export."},
]


def _params(**over):
    with open("params.yaml", encoding="utf-8") as f:
        base = yaml.safe_load(f)["dpo"]
    base.update(target_per_category=2, max_calls_per_category=6, rounds=2, oversample=1.0)
    base.update(over)
    return prefs.DpoParams(**base)


class Words:
    """Embeds a text as its bag of lower-case words (cosine = word overlap)."""

    def embed(self, texts):
        vocab = sorted({w for t in texts for w in t.lower().split()} | {"<pad>"})
        pos = {w: i for i, w in enumerate(vocab)}
        out = np.zeros((len(texts), len(vocab)))
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, pos[w]] += 1
        return out


class Gate:
    """Rejects an answer holding ``word`` (reason ``<name>_bad``)."""

    def __init__(self, name, word):
        self.name, self.word, self.seen = name, word, 0

    def apply(self, rows):
        answers = rows.column("answer").to_pylist()
        self.seen += len(answers)
        keep = [self.word not in a for a in answers]
        return Verdicts(keep, [0.5] * len(keep), [None if k else f"{self.name}_bad" for k in keep])


def _gates():
    return {"faithfulness": Gate("faithfulness", "30"), "pii": Gate("pii", "@"), "reward": Gate("reward", "whatever"),
            "perplexity": Gate("perplexity", "zzz")}


REWRITES = {  # instruction's first word -> rewrite of the chosen answer
    "Change": lambda a: a.replace("14", "30"),
    "Ignore": lambda a: a + " It also depends on many things. Please be patient with us.",
    "Make the answer give": lambda a: a + " Call jane@example.org.",
    "Make the answer dismissive": lambda a: "whatever, " + a,
    "Remove": lambda a: a.split(". ")[0] + ".",
}


def _teacher(rewrite=None, log=None):
    def run_calls(jobs, desc):
        out = []
        for j in jobs:
            prompt = j.request.prompt
            block = prompt.split("\n\nInstruction: ")[-1]
            instruction = block.split("\n")[0]
            answer = block.split("\nAnswer: ")[1].split("\n")[0]
            f = rewrite or next(f for k, f in REWRITES.items() if instruction.startswith(k))
            out.append(GenResult(f(answer), "stop", 10, 10, 0.0))
            if log is not None:
                log.append(desc)
        return out
    return run_calls


def _templated(categories=("factuality", "safety", "tone")):
    rows = []
    for i, cat in enumerate(categories):
        rows.append({"pair_id": f"pref_{i:016x}", "prompt": "q", "chosen": "a", "rejected": f"b{i}", "category": cat,
                     "corruption": "entity_swap", "detail": "x", "parent_id": "r1", "doc_id": "d1",
                     "category_source": "templated", "params_hash": "p", "code_version": "c"})
    return pa.Table.from_pylist(rows, schema=pairs_schema.ARROW)


def _build(params, run_calls, gates=None, templated=None):
    template = load_template("prompts/dpo_rejected.txt")
    checks = prefs.Checks(gates or _gates(), Words(), params.min_similarity)
    return prefs.build([("human", r) for r in ROWS], templated if templated is not None else _templated(), params,
                       template, "teacher@x", run_calls, checks, phash="p", code_version="c",
                       schema=pairs_schema.ARROW)


def test_constraint_is_one_the_chosen_answer_keeps_and_counting_finds_it_broken():
    one = prefs.constraint_for("Refunds are issued within 14 days.")
    assert one.text == "Answer in one sentence." and one.broken_by("Refunds are issued within 14 days.") is None
    assert one.broken_by("Refunds take 14 days. Ask us.") == "2 sentences > 1"
    many = prefs.constraint_for("Check the billing page first. If it is still wrong, contact billing.")
    assert many.text == "Answer in at most 20 words." and many.max_words == 20
    assert many.broken_by(" ".join(["word"] * 21)) == "21 words > 20"


def test_escalation_rewrites_start_only_from_answers_with_a_handoff():
    assert [r["row_id"] for r in prefs.eligible("missing_escalation", ROWS)] == ["r2"]
    only = [{**ROWS[0], "row_id": "r9", "answer": "Contact support@example.com."}]
    # the teacher may rewrite a one-sentence handoff (into an answer that offers none) ...
    assert [r["row_id"] for r in prefs.eligible("missing_escalation", only)] == ["r9"]
    # ... but the templated fallback cannot: cutting the handoff would leave nothing
    assert prefs.templated_edit("missing_escalation", only[0]["answer"], np.random.default_rng(0)) is None
    assert len(prefs.eligible("tone", ROWS)) == 3


def test_parse_takes_the_first_line_without_a_marker():
    assert prefs.parse_rejected("\nNew answer: It takes 30 days.\nQuestion: x") == "It takes 30 days."
    assert prefs.parse_rejected("  \n ") is None


def test_unknown_category_is_one_clear_error():
    with pytest.raises(RefineryError, match="dpo.categories: unknown category 'spoilers'"):
        prefs.check_params(_params(categories={**_params().categories, "spoilers": _params().categories["tone"]}))


def test_each_category_keeps_rewrites_that_fail_their_own_check():
    result = _build(_params(), _teacher())
    pairs = pairs_schema.CONTRACT.validate(result.pairs, "pairs")
    pairs_schema.check_dataset(pairs, "pairs")
    teacher = [r for r in pairs.to_pylist() if r["category_source"] == "teacher"]
    by_cat = {}
    for r in teacher:
        by_cat.setdefault(r["category"], []).append(r)
    assert set(by_cat) == set(prefs.CHECKS)
    assert all("30 days" in r["rejected"] for r in by_cat["factuality"])
    assert all("@example.org" in r["rejected"] for r in by_cat["safety"])
    assert all(r["prompt"].endswith(("Answer in one sentence.", "words.")) for r in by_cat["constraint_following"])
    assert all(not prefs.has_handoff(r["rejected"]) for r in by_cat["missing_escalation"])
    assert {r["detail"] for r in by_cat["factuality"]} == {"faithfulness_bad"}
    # only r2 has a handoff: the escalation pairs are its samples 0 and 1, with different seeds
    assert {r["parent_id"] for r in by_cat["missing_escalation"]} == {"r2"}
    cands = result.candidates.to_pylist()
    esc = [c for c in cands if c["category"] == "missing_escalation"]
    assert [c["sample_index"] for c in esc] == [0, 1]
    m = result.metrics
    assert m["safety"]["pairs"] == {"teacher": 2, "templated": 0}
    # only r1's answer has a number to change: the others come back unchanged, and the fallback fills the rest
    assert m["factuality"]["pairs"] == {"teacher": 1, "templated": 1}
    assert m["factuality"]["reasons"] == {"dpo_same_as_chosen": m["factuality"]["calls"] - 1}
    assert m["missing_escalation"]["eligible_rows"] == 1


def test_rewrites_that_pass_their_check_are_kept_as_candidates_with_a_reason_and_the_fallback_fills():
    gates = _gates()
    gates["faithfulness"] = Gate("faithfulness", "never-present")  # the verifier keeps every factual rewrite
    log: list[str] = []
    result = _build(_params(), _teacher(lambda a: a.replace(".", ", maybe."), log=log), gates=gates)
    fact = [c for c in result.candidates.to_pylist() if c["category"] == "factuality"]
    assert fact and all(c["reason"] == "dpo_check_not_failed" and not c["kept"] for c in fact)
    assert all(c["check_detail"].startswith("faithfulness keeps it") for c in fact)
    # round 2 asked again for the two missing pairs, then the budget (6 calls) is what it is: 2 + 2 calls here
    assert [c["round"] for c in fact] == [1, 1, 2, 2]
    assert log.count("dpo-round2") > 0
    pairs = result.pairs.to_pylist()
    fb = [p for p in pairs if p["category"] == "factuality"]
    assert [p["category_source"] for p in fb] == ["templated"]  # the one templated factuality pair there is
    assert result.metrics["factuality"]["pairs"] == {"teacher": 0, "templated": 1}
    assert result.metrics["factuality"]["failed_check_share"] == 0.0


def test_off_topic_unfluent_same_and_failed_calls_each_have_their_reason():
    def rewrite(a):
        return {"Refunds are issued within 14 days.": "zzz totally unrelated words here",
                "Yes. Go to Settings and click Export.": "Yes. Go to Settings and click Export."}.get(a, a + " zzz")
    result = _build(_params(categories={"tone": _params().categories["tone"]}, min_similarity=0.3),
                    _teacher(rewrite))
    reasons = {c["parent_id"]: c["reason"] for c in result.candidates.to_pylist() if c["sample_index"] == 0}
    assert reasons == {"r1": "dpo_off_topic", "r3": "dpo_same_as_chosen", "r2": "dpo_not_fluent"}

    def failing(jobs, desc):
        return [GenResult("", "error", 0, 0, 0.0, "transport_timeout: x") for _ in jobs]
    result = _build(_params(categories={"tone": _params().categories["tone"]}), failing)
    assert {c["reason"] for c in result.candidates.to_pylist()} == {"dpo_call_failed"}
    assert result.metrics["tone"]["parsed"] == 0 and result.metrics["tone"]["failed_check_share"] is None


def test_rounds_stop_at_the_call_budget_and_reruns_plan_the_same_calls():
    gates = _gates()
    gates["reward"] = Gate("reward", "never-present")
    params = _params(categories={"tone": _params().categories["tone"]}, max_calls_per_category=3, rounds=5)
    keys: list[list[str]] = []

    def run_calls(jobs, desc):
        keys.append([j.key for j in jobs])
        return _teacher()(jobs, desc)
    result = _build(params, run_calls, gates=gates)
    assert result.metrics["tone"]["calls"] == 3 and sum(map(len, keys)) == 3
    first = [k for ks in keys for k in ks]
    keys.clear()
    _build(params, run_calls, gates=gates)
    assert [k for ks in keys for k in ks] == first  # seeded: the same calls, so a rerun is all cache hits


def test_a_category_may_have_its_own_call_cap():
    gates = _gates()
    gates["reward"] = Gate("reward", "never-present")
    cats = _params().categories
    params = _params(categories={"tone": cats["tone"].model_copy(update={"max_calls": 5}), "factuality":
                                 cats["factuality"]}, max_calls_per_category=2, rounds=5, fallback_templated=False)
    result = _build(params, _teacher(), gates=gates)
    assert result.metrics["tone"]["calls"] == 5 and result.metrics["factuality"]["calls"] <= 2
    assert prefs.call_cap(params, "tone") == 5 and prefs.call_cap(params, "factuality") == 2


def test_reward_margins_per_category():
    class Reward:
        def score(self, prompts, answers):
            return [len(a) for a in answers]
    pairs = _templated(("tone", "tone", "safety"))
    m = prefs.reward_margins(Reward(), pairs)
    assert m["tone"] == {"pairs": 2, "accuracy": 0.0, "mean_margin": -1.0}
    assert prefs.reward_margins(Reward(), pairs.slice(0, 0)) == {}


def test_the_fallback_makes_leak_and_handoff_edits_where_train_reward_has_none():
    def same(a):
        return a  # the teacher never rewrites: every category falls back
    params = _params(categories={k: _params().categories[k] for k in ("safety", "missing_escalation")})
    result = _build(params, _teacher(same), templated=_templated(("tone",)))
    pairs = pairs_schema.CONTRACT.validate(result.pairs, "pairs").to_pylist()
    safety = [p for p in pairs if p["category"] == "safety"]
    assert len(safety) == 2 and all(p["category_source"] == "templated" and p["corruption"] == "pii_leak"
                                    for p in safety)
    assert all("@example.net" in p["rejected"] and p["rejected"].startswith(p["chosen"]) for p in safety)
    esc = [p for p in pairs if p["category"] == "missing_escalation"]
    # one row has a handoff: one edit (the second sample would be the same text, so it is not repeated)
    assert [p["parent_id"] for p in esc] == ["r2"] and not prefs.has_handoff(esc[0]["rejected"])
    assert result.metrics["safety"]["pairs"] == {"teacher": 0, "templated": 2}
