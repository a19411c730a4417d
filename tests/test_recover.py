"""Recover stage: diagnosis codes, targeted regeneration re-gated by every gate, no laundering, budgets, cache."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from refinery.core.errors import RefineryError
from refinery.gates.base import Verdicts
from refinery.gates.dedup import DedupGate
from refinery.gates.faithfulness import FaithfulnessGate
from refinery.gates.registry import BY_NAME, REASONS, UnknownReasonError
from refinery.generation.critique import load_constitution
from refinery.generation.prompts import load_template
from refinery.generation.strategies import GENERATION_STRATEGIES
from refinery.models.backends.fake import FakeBackend
from refinery.planted.truth import injected_error_present
from refinery.recovery.actions import ACTIONS, TEMPLATES, next_action
from refinery.recovery.diagnose import Bounds, Diagnosis, diagnose, salvage_question
from refinery.recovery.loop import priority
from refinery.recovery.metrics import report_table
from refinery.recovery.run import RecoverParams, check_constitution, check_params, recover
from schemas import recovered as recovered_schema
from schemas.gated import GATES, INJECTED_ARROW, SYNTHETIC_ARROW
from schemas.injected import INJECTION_FIELDS
from schemas.thresholds import validate as valid_thresholds
from tests.conftest import ROOT
from tests.gates.conftest import rows as synthetic_rows

TEXT = "Refunds are issued within 14 days. Contact billing to start one."
EVIDENCE = (0, 34)  # "Refunds are issued within 14 days."
DOCS = pa.table({"doc_id": ["d1", "d2"], "text": [TEXT, "Old refunds took 30 days."], "stale": [False, True]})
TRAIN = pa.table({"row_id": ["qa_" + "1" * 16], "doc_id": ["d1"], "question": ["How long do refunds take?"],
                  "answer": ["Within 14 days."], "evidence": ["Refunds are issued within 14 days."]})


def _thresholds() -> dict:
    """Every bound the gates judge with, as the gate stage writes them to thresholds.json: the project's gate params
    with the calibrated bounds set (support 0.5, reward 0.5, perplexity at most 100)."""
    import yaml

    from refinery.gates.base import GateContext
    from refinery.gates.run import GateParams, calibrate

    gate = yaml.safe_load((ROOT / "params.yaml").read_text())["gate"]
    gate["faithfulness"]["min_support"], gate["reward"]["min_reward"] = 0.5, 0.5
    gate["perplexity"]["max_perplexity"] = 100.0
    return valid_thresholds(calibrate(GateParams.model_validate(gate), GateContext(TRAIN, DOCS)), "test thresholds")


THRESHOLDS = _thresholds()
MARGINS = {"faithfulness": 0.05, "reward": 0.05, "overlap_embedding": 0.02, "overlap_ngram": 0.05, "dedup": 0.05,
           "perplexity": 0.2}
BOUNDS = Bounds.from_thresholds(THRESHOLDS, MARGINS)
GOOD = "Refunds are issued within 14 days of the request."


def gated(pairs, fails: list[dict[str, tuple[float | None, str]]], **columns) -> pa.Table:
    """Rejected rows: synthetic rows on d1's evidence with per-gate (score, reason) failures."""
    n = len(pairs)
    base = synthetic_rows(pairs, **{"row_id": [f"syn_{i:016x}" for i in range(n)],
                                    "parent_ids": [[TRAIN.column("row_id")[0].as_py()]] * n,
                                    "evidence_start": [EVIDENCE[0]] * n, "evidence_end": [EVIDENCE[1]] * n,
                                    "strategy": ["answer_augmentation"] * n,
                                    "gen_params": [json.dumps({"max_new_tokens": 16, "temperature": 0.7,
                                                               "top_p": 0.95, "stop": ["\n"]})] * n,
                                    "evidence": [TEXT[EVIDENCE[0]:EVIDENCE[1]]] * n, **columns})
    for g in GATES:
        base = base.append_column(f"{g}_keep", pa.array([g not in f for f in fails], pa.bool_()))
        ok = 0.1 if g in ("dedup", "overlap_ngram", "overlap_embedding") else 0.9  # a passing score
        base = base.append_column(f"{g}_score", pa.array([f.get(g, (ok, None))[0] for f in fails], pa.float64()))
        base = base.append_column(f"{g}_reason", pa.array([f.get(g, (None, None))[1] for f in fails], pa.string()))
    base = base.append_column("gate_keep", pa.array([not f for f in fails], pa.bool_()))
    base = base.append_column("gate_reasons", pa.array([[f[g][1] for g in GATES if g in f] for f in fails],
                                                       pa.list_(pa.string())))
    return base.cast(SYNTHETIC_ARROW)


def planted(answer: str, kind: str, detail: str, fails: dict, row_id: str = "inj_" + "a" * 16) -> pa.Table:
    t = gated([("How long do refunds take?", answer)], [fails], row_id=[row_id], strategy=[None],
              gen_params=[None], origin=["injected"])
    for f, v in zip(INJECTION_FIELDS, (kind, "qa_" + "1" * 16, "answer", detail)):
        t = t.append_column(f, pa.array([v], f.type))
    return t.select(INJECTED_ARROW.names).cast(INJECTED_ARROW)


def no_planted() -> pa.Table:
    return INJECTED_ARROW.empty_table()


class Marker:
    """A gate double: rejects rows whose answer holds ``<gate>`` with the gate's usual reason code.

    The code is the registry's: the reason whose score can be marginal (a bound the gate has), else its first.
    """

    def __init__(self, name):
        spec = BY_NAME[name]
        self.name, self.code = name, next(iter(spec.margins), next(iter(spec.reasons)))

    def apply(self, rows):
        keep = [f"<{self.name}>" not in (a or "") and a is not None for a in rows.column("answer").to_pylist()]
        score = {"faithfulness": 0.1, "reward": 0.1}.get(self.name, 0.0)
        return Verdicts(keep, [0.9 if k else score for k in keep], [None if k else self.code for k in keep])


def params(**kw) -> RecoverParams:
    base = dict(seed=1, budget=10, injected_budget=10, max_attempts=2, naive_baseline=True, min_confidence=0.5,
                order="round_robin",
                margins=dict(MARGINS), temperatures={a: 0.3 for a in ACTIONS}, top_p=0.95, max_new_tokens={"answer": 24, "qa": 32},
                naive_temperature=0.7, naive_max_new_tokens={"answer": 24, "question": 24, "qa": 32}, naive_shots=0,
                batch_size=4, threads=1)
    return RecoverParams(**{**base, **kw})


def templates():
    return {n: load_template(ROOT / "prompts" / f"{n}.txt") for n in TEMPLATES + GENERATION_STRATEGIES}


def responder(by_template: dict[str, str], default: str = "no idea <faithfulness>"):
    """Answer by which template rendered the prompt (its first words)."""
    firsts = {name: load_template(ROOT / "prompts" / f"{name}.txt").body.split("\n")[0]
              for name in TEMPLATES + GENERATION_STRATEGIES}

    def respond(req):
        for name, first in firsts.items():
            if req.prompt.startswith(first) and name in by_template:
                return " " + by_template[name]
        return " " + default
    return respond


CONSTITUTION = load_constitution(ROOT / "prompts" / "constitution.txt")


def run(tmp_path, rejected, backend, *, accepted=None, planted_rows=None, gates=None, **kw):
    """Recover through the stage's own wiring (teacher calls through a cache, re-gating with ``gates``)."""
    gates = gates or {g: Marker(g) for g in GATES}
    accepted = accepted if accepted is not None else SYNTHETIC_ARROW.empty_table()
    return recover(rejected, accepted, planted_rows if planted_rows is not None else no_planted(), TRAIN, DOCS,
                   params=params(**kw), thresholds=THRESHOLDS, gates=gates, gate_mode="full", templates=templates(),
                   teacher_id="fake@1", backend=backend, cache_file=tmp_path / "teacher.sqlite", gate_cache=None,
                   phash="p", code_version="c", constitution=CONSTITUTION)


# ---- diagnosis: one reason code per failure mode ----

def one(fails, **columns):
    return gated([("How long do refunds take?", "It takes a while to get them.")], [fails], **columns).to_pylist()[0]


@pytest.mark.parametrize("fails, columns, mode, recoverable", [
    ({"faithfulness": (0.1, "faithfulness_unsupported")}, {}, "ungrounded", True),
    ({"faithfulness": (0.47, "faithfulness_unsupported")}, {}, "threshold_marginal", True),
    ({"reward": (0.1, "reward_low")}, {}, "low_quality", True),
    ({"rules": (1.0, "rules_parse_error")}, {"parse_error": ["parse_missing_answer"]}, "malformed", True),
    ({"rules": (1.0, "rules_truncated")}, {"finish_reason": ["length"]}, "truncated", True),
    ({"rules": (1.0, "rules_refusal")}, {}, "refusal", True),
    ({"dedup": (0.7, "dedup_near")}, {}, "duplicate", True),
    ({"overlap_embedding": (0.95, "overlap_embedding")}, {}, "too_close_to_seed", True),
    ({"dedup": (0.9, "dedup_near_seed"), "overlap_ngram": (0.8, "overlap_ngram")}, {}, "too_close_to_seed", False),
    ({"faithfulness": (0.1, "faithfulness_unsupported")},
     {"strategy": ["new_question"], "question": ["What is the capital of France?"]}, "question_defect", True),
    ({"faithfulness": (0.1, "faithfulness_unsupported")}, {"doc_id": ["d2"]}, "unrecoverable", False),
])
def test_given_gate_verdicts_when_diagnosed_then_the_failure_mode_and_recoverability_follow(fails, columns, mode,
                                                                                              recoverable):
    docs = {d["doc_id"]: d for d in DOCS.to_pylist()}
    d = diagnose(one(fails, **columns), BOUNDS, docs, min_confidence=0.5)
    assert (d.mode, d.recoverable) == (mode, recoverable)
    assert 0 <= d.confidence <= 1 and d.detail


def test_given_a_stale_source_document_then_the_detail_says_so():
    docs = {d["doc_id"]: d for d in DOCS.to_pylist()}
    d = diagnose(one({"reward": (0.1, "reward_low")}, doc_id=["d2"]), BOUNDS, docs, 0.5)
    assert (d.mode, d.detail) == ("unrecoverable", "source_document_stale")


# Each reason code of the gates that existed before the registry, alone and unscored on an answer-augmentation row
# with its evidence: the mode and detail recovery gave it then (a regression table).
REASON_TABLE = [
    ("rules_transport_error", "malformed", "rules_transport_error", True),
    ("rules_parse_error", "malformed", "rules_parse_error", True),
    ("rules_empty", "malformed", "rules_empty", True),
    ("rules_truncated", "truncated", "rules_truncated", True),
    ("rules_refusal", "refusal", "rules_refusal", True),
    ("rules_meta_talk", "malformed", "rules_meta_talk", True),
    ("rules_too_short", "low_quality", "weakest:length", True),
    ("rules_too_long", "low_quality", "weakest:length", True),
    ("rules_language", "malformed", "rules_language", True),
    ("rules_answer_repeats_question", "low_quality", "weakest:length", True),
    ("dedup_exact_seed", "too_close_to_seed", "near_copy_of_seed:seed_question:dedup_exact_seed", False),
    ("dedup_exact", "duplicate", "dedup_exact", True),
    ("dedup_near_seed", "too_close_to_seed", "near_copy_of_seed:seed_question:dedup_near_seed", False),
    ("dedup_near", "duplicate", "dedup_near", True),
    ("dedup_exact_accepted", "duplicate", "dedup_exact_accepted", True),
    ("dedup_near_accepted", "duplicate", "dedup_near_accepted", True),
    ("overlap_ngram", "too_close_to_seed", "seed_question:overlap_ngram", True),
    ("overlap_embedding", "too_close_to_seed", "seed_question:overlap_embedding", True),
    ("overlap_embedding_error", "unrecoverable", "unknown:overlap_embedding_error", False),
    ("faithfulness_unsupported", "ungrounded", "faithfulness_unscored", True),
    ("faithfulness_no_evidence", "ungrounded", "faithfulness_unscored", True),
    ("faithfulness_no_answer", "ungrounded", "faithfulness_unscored", True),
    ("faithfulness_error", "ungrounded", "faithfulness_unscored", True),
    ("reward_low", "low_quality", "weakest:helpfulness(reward:nan)", True),
    ("reward_no_answer", "low_quality", "weakest:helpfulness(reward:nan)", True),
    ("reward_error", "low_quality", "weakest:helpfulness(reward:nan)", True),
    ("perplexity_too_high", "low_quality", "weakest:fluency", True),
    ("perplexity_too_low", "low_quality", "weakest:fluency", True),
    ("perplexity_no_answer", "low_quality", "weakest:fluency", True),
    ("perplexity_error", "low_quality", "weakest:fluency", True),
]


@pytest.mark.parametrize("code, mode, detail, recoverable", REASON_TABLE)
def test_each_reason_code_keeps_the_diagnosis_it_had(code, mode, detail, recoverable):
    from refinery.gates.registry import GATE_OF

    d = diagnose(one({GATE_OF[code]: (None, code)}), BOUNDS, {"d1": {"text": TEXT, "stale": False}}, 0.5)
    assert (d.mode, d.detail, d.recoverable) == (mode, detail, recoverable)


@pytest.mark.parametrize("code", sorted(REASONS))
def test_every_declared_reason_code_is_diagnosed_as_the_failure_mode_its_registry_entry_names(code):
    from refinery.gates.registry import GATE_OF

    d = diagnose(one({GATE_OF[code]: (None, code)}), BOUNDS, {"d1": {"text": TEXT, "stale": False}}, 0.5)
    assert d.mode == REASONS[code].mode


def test_an_unknown_reason_code_is_an_error_naming_the_row_never_a_silent_unrecoverable():
    row = one({"reward": (0.1, "reward_low")})
    row["gate_reasons"] = ["reward_low", "reward_too_kind"]
    with pytest.raises(UnknownReasonError, match="row syn_0000000000000000: reason code 'reward_too_kind'"):
        diagnose(row, BOUNDS, {"d1": {"text": TEXT, "stale": False}}, 0.5)


@pytest.mark.parametrize("margins, message", [
    ({**MARGINS, "rules": 0.1}, "margins.rules: not a gate with a margin"),
    ({k: v for k, v in MARGINS.items() if k != "reward"}, "margins.reward: missing"),
    ({**MARGINS, "dedup": -0.1}, "margins.dedup: must be >= 0"),
])
def test_margins_name_exactly_the_gates_whose_scores_can_be_marginal(margins, message):
    with pytest.raises(ValueError, match=message):
        params(margins=margins)


def test_low_quality_grounds_first_and_a_chain_from_params_can_rewrite_its_weakest_dimension():
    docs = {d["doc_id"]: d for d in DOCS.to_pylist()}
    length = diagnose(one({"rules": (1.0, "rules_too_short")}), BOUNDS, docs, 0.5)
    fluency = diagnose(one({"perplexity": (900.0, "perplexity_too_high")}), BOUNDS, docs, 0.5)
    # by default: a strict-grounding answer, then a new question (a small teacher rewrites poorly)
    assert [next_action(length, tried) for tried in ([], ["strict_grounding"])] == \
        ["strict_grounding", "regenerate_question"]
    # a chain from params replaces the built-in one for its mode; 'rewrite_weakest' resolves per diagnosis
    chains = {"low_quality": ["rewrite_weakest", "strict_grounding"]}
    assert [next_action(d, [], chains=chains) for d in (length, fluency)] == ["rewrite_length", "rewrite_fluency"]
    assert next_action(length, ["rewrite_length"], chains=chains) == "strict_grounding"


def test_a_truncated_row_gets_a_new_question_first():
    truncated = Diagnosis("truncated", 0.9, "rules_truncated", True)
    assert [next_action(truncated, tried) for tried in ([], ["regenerate_question"])] == \
        ["regenerate_question", "strict_grounding"]
    assert next_action(truncated, [], chains={"truncated": ["fix_length"]}) == "fix_length"


@pytest.mark.parametrize("chains, message", [
    ({"sideways": ["resample"]}, "recover.chains.sideways: not a recoverable failure mode"),
    ({"low_quality": ["polish"]}, "recover.chains.low_quality: unknown action polish"),
    ({"truncated": []}, "recover.chains.truncated: empty chain"),
])
def test_a_chain_naming_an_unknown_mode_or_action_fails_at_stage_start(chains, message):
    with pytest.raises(RefineryError, match=message):
        check_params(params(chains=chains))


@pytest.mark.parametrize("kw, message", [
    ({"chains": {"duplicate": ["revise_by_rule"]}},
     "recover.chains.duplicate: revise_by_rule needs the rule this mode breaks"),
    ({"revise_rules": {"sideways": 1}}, "recover.revise_rules.sideways: not a recoverable failure mode"),
    ({"revise_rules": {"ungrounded": 0}}, "recover.revise_rules.ungrounded: rule numbers start at 1"),
])
def test_revise_by_rule_needs_a_rule_for_every_mode_whose_chain_names_it(kw, message):
    with pytest.raises(RefineryError, match=message):
        check_params(params(**kw))


def test_a_revise_rule_beyond_the_constitution_fails_at_stage_start():
    with pytest.raises(RefineryError, match=r"recover.revise_rules.low_quality: rule 9, but the constitution "
                                            r"\(constitution@\w+\) has 7 rules"):
        check_constitution(params(revise_rules={"low_quality": 9}), CONSTITUTION)


def test_critique_revise_as_a_recovery_action_states_the_rule_the_gates_found_broken(tmp_path):
    # the gates' diagnosis (ungrounded) is the critique: the revise call states constitution rule 1
    rejected = gated([("How long do refunds take?", "Refunds take 3 months <faithfulness>")],
                     [{"faithfulness": (0.1, "faithfulness_unsupported")}])
    backend = FakeBackend(responder=responder({"revise": GOOD}))
    out = run(tmp_path, rejected, backend, chains={"ungrounded": ["revise_by_rule", "strict_grounding"]},
              naive_baseline=False)
    r = recovered_schema.CONTRACT.validate(out.recovered, "recovered").to_pylist()[0]
    assert (r["recovery_action"], r["diagnosis"], r["answer"]) == ("revise_by_rule", "ungrounded", GOOD)
    assert r["gate_keep"] and r["parent_ids"] == [rejected.column("row_id")[0].as_py()]  # re-gated like any answer
    revise = [c for c in backend.calls if c.prompt.startswith("Rewrite the answer so that it follows the rule.")]
    assert len(revise) == 1
    assert f"Rule: {CONSTITUTION.rule(1)}\n" in revise[0].prompt  # the rule, the draft and its passage
    assert "Answer: Refunds take 3 months <faithfulness>\n" in revise[0].prompt
    assert "Passage: Refunds are issued within 14 days.\n" in revise[0].prompt
    assert out.metrics["revise_rules"]["rules"]["ungrounded"] == CONSTITUTION.rule(1)
    # a revision the gates still reject is diagnosed again and the chain goes on (a fresh grounded answer)
    backend = FakeBackend(responder=responder({"revise": "Still 3 months <faithfulness>", "recover_grounded": GOOD}))
    out = run(tmp_path / "again", rejected, backend, chains={"ungrounded": ["revise_by_rule", "strict_grounding"]},
              naive_baseline=False)
    d = out.diagnosed.to_pylist()[0]
    assert d["outcome"] == "recovered" and d["actions"] == ["revise_by_rule", "strict_grounding"]


# ---- targeted regeneration, re-gated by every gate ----

def test_given_an_ungrounded_row_when_recovered_then_the_strict_grounding_candidate_passed_every_gate(tmp_path):
    rejected = gated([("How long do refunds take?", "Refunds take 3 months <faithfulness>")],
                     [{"faithfulness": (0.1, "faithfulness_unsupported")}])
    backend = FakeBackend(responder=responder({"recover_grounded": GOOD}))
    out = run(tmp_path, rejected, backend)
    rows = recovered_schema.CONTRACT.validate(out.recovered, "recovered").to_pylist()
    assert len(rows) == 1
    r = rows[0]
    assert r["origin"] == "recovered" and r["parent_ids"] == [rejected.column("row_id")[0].as_py()]
    assert (r["attempt"], r["recovery_action"], r["diagnosis"], r["recovery_method"]) == \
        (1, "strict_grounding", "ungrounded", "adaptive")
    assert r["answer"] == GOOD and r["gate_keep"] and all(r[f"{g}_keep"] for g in GATES)
    assert r["strategy"] == "answer_augmentation" and r["recovery_calls"] == 1 and r["recovery_tokens"] > 0
    # the naive baseline resampled the original prompt and got another unsupported answer
    assert out.baseline.num_rows == 0
    diag = out.diagnosed.to_pylist()[0]
    assert (diag["outcome"], diag["naive_outcome"], diag["recovered_row_id"]) == ("recovered", "failed", r["row_id"])
    assert diag["diagnosis"] == "ungrounded" and out.unrecoverable.num_rows == 0  # original kept, with diagnosis
    m = out.metrics
    assert m["adaptive"]["overall"]["recovered"] == 1 and m["naive"]["overall"]["recovered"] == 0
    assert m["naive"]["overall"]["calls"] == 2  # same budget, both attempts spent


def reward_fails_first(tmp_path):
    """An ungrounded row whose strict-grounding candidate fails the reward gate and whose rewrite passes
    (low_quality's chain from params: rewrite the weakest dimension first)."""
    rejected = gated([("How long do refunds take?", "Three months <faithfulness>")],
                     [{"faithfulness": (0.1, "faithfulness_unsupported")}])
    backend = FakeBackend(responder=responder({"recover_grounded": "Within 14 days <reward>",
                                               "recover_rewrite_helpfulness": GOOD}))
    return run(tmp_path, rejected, backend, chains={"low_quality": ["rewrite_weakest", "strict_grounding"]})


def test_a_candidate_that_fixes_the_rejecting_gate_but_fails_another_is_not_recovered_and_is_rediagnosed(tmp_path):
    # strict grounding fixes support but the reward gate rejects it; the next action targets the reward failure
    out = reward_fails_first(tmp_path)
    diag = out.diagnosed.to_pylist()[0]
    assert diag["actions"] == ["strict_grounding", "rewrite_helpfulness"]
    r = out.recovered.to_pylist()[0]
    assert (r["attempt"], r["recovery_action"], r["recovery_calls"]) == (2, "rewrite_helpfulness", 2)
    assert r["reward_keep"] and r["faithfulness_keep"]


def test_every_candidate_is_kept_in_the_attempts_output_with_its_gate_reasons(tmp_path):
    # given a row whose first candidate fails the reward gate and whose second passes
    out = reward_fails_first(tmp_path)
    tried = recovered_schema.ATTEMPT_CONTRACT.validate(out.attempts, "attempts").to_pylist()
    adaptive = [r for r in tried if r["recovery_method"] == "adaptive"]
    # then the rejected candidate is an output with its reason, not dropped, and the recovered one is counted
    assert [(r["recovery_action"], r["gate_reasons"], r["counted"]) for r in adaptive] == [
        ("strict_grounding", ["reward_low"], False), ("rewrite_helpfulness", [], True)]
    assert adaptive[1]["row_id"] == out.recovered.column("row_id")[0].as_py()
    naive = [r for r in tried if r["recovery_method"] == "naive"]
    assert len(naive) == out.metrics["naive"]["overall"]["calls"] == 2
    assert {r["row_set"] for r in tried} == {"generated"} and {r["diagnosis"] for r in tried} == {"ungrounded"}
    # and the per-action metrics count them
    per_action = out.metrics["adaptive"]["per_action"]
    assert per_action["strict_grounding"] == {"calls": 1, "recovered": 0, "success": 0.0,
                                              "top_reasons": {"reward_low": 1}}
    assert per_action["rewrite_helpfulness"]["recovered"] == 1
    assert "| adaptive | strict_grounding | 1 | 0 | 0.00 | reward_low 1 |" in report_table(out.metrics)


def test_a_row_close_to_the_seed_through_its_seed_question_gets_a_new_question_first():
    fails = {"overlap_embedding": (0.95, "overlap_embedding")}
    # given an answer-augmentation row (it answers its seed row's question) and a new_question row, both too close
    by_question = diagnose(one(fails), BOUNDS, {"d1": {"text": TEXT, "stale": False}}, 0.5)
    by_answer = diagnose(one(fails, strategy=["new_question"]), BOUNDS, {"d1": {"text": TEXT, "stale": False}},
                             0.5)
    # then the first regenerates the question, the second rewords its answer first
    assert by_question.detail == "seed_question:overlap_embedding"
    assert [next_action(by_question, []), next_action(by_question, ["regenerate_question"])] == \
        ["regenerate_question", "diversify"]
    assert next_action(by_answer, []) == "diversify"


def test_a_row_whose_question_is_the_defect_keeps_getting_new_questions_whatever_its_candidate_failed_by():
    docs = {"d1": {"text": TEXT, "stale": False}}
    by_question = diagnose(one({"overlap_embedding": (0.95, "overlap_embedding")}), BOUNDS, docs, 0.5)
    # given failed candidates whose own diagnoses would pick an answer-only action (which keeps the question)
    malformed = Diagnosis("malformed", 0.95, "rules_parse_error", True)
    ungrounded = Diagnosis("ungrounded", 0.8, "faithfulness_score:0.100", True)
    tried = ["regenerate_question"]
    assert [next_action(d, tried) for d in (malformed, ungrounded)] == ["fix_format", "strict_grounding"]
    # then a row close to the seed through its seed question, or with a defective question, gets a new question
    defect = Diagnosis("question_defect", 0.8, "question_support:0.00", True)
    for row in (by_question, defect):
        assert [next_action(d, tried, row) for d in (malformed, ungrounded)] == ["regenerate_question"] * 2
    # while any other row follows its candidate's diagnosis
    other = Diagnosis("ungrounded", 0.8, "faithfulness_score:0.100", True)
    assert next_action(malformed, ["strict_grounding"], other) == "fix_format"


def test_salvage_question_keeps_the_usable_half_of_a_malformed_row():
    seed = {"question": "How long do refunds take?"}
    assert salvage_question({"question": "Why?", "strategy": "new_question"}, None) == "Why?"
    assert salvage_question({"question": None, "strategy": "answer_augmentation"}, seed) == seed["question"]
    raw = " What did she bake for the party ?\nPossible answer:\nA:"
    assert salvage_question({"question": None, "strategy": "new_question", "raw_output": raw}, None) == \
        "What did she bake for the party ?"
    assert salvage_question({"question": None, "strategy": "new_question", "raw_output": " Sure!"}, None) is None


def test_given_a_malformed_row_with_a_usable_question_then_fix_format_answers_only_that_question(tmp_path):
    # given a new_question row whose call wrote a question and no "Answer:" line
    rejected = gated([("placeholder", None)], [{"rules": (1.0, "rules_parse_error")}], strategy=["new_question"],
                     question=[None], raw_output=[" How long do refunds take ?"],
                     parse_error=["parse_missing_answer"])
    # when recovered, with a teacher that answers the grounded prompt well and writes nonsense for the qa prompt
    out = run(tmp_path, rejected, FakeBackend(responder=responder({"recover_grounded": GOOD,
                                                                  "recover_format": "no idea <faithfulness>"})))
    # then the first action keeps the question and regenerates only the answer
    r = out.recovered.to_pylist()[0]
    assert (r["recovery_action"], r["attempt"]) == ("fix_format", 1)
    assert (r["question"], r["answer"]) == ("How long do refunds take ?", GOOD)
    assert r["prompt_template"].startswith("recover_grounded@")


def test_a_candidate_that_duplicates_an_accepted_row_is_rejected_by_dedup(tmp_path):
    rejected = gated([("How long do refunds take?", "Three months <faithfulness>")],
                     [{"faithfulness": (0.1, "faithfulness_unsupported")}])
    accepted = gated([("How long do refunds take?", GOOD)], [{}], row_id=["syn_" + "f" * 16])
    gates = {g: Marker(g) for g in GATES}
    gates["dedup"] = DedupGate(TRAIN, max_jaccard=0.55)
    out = run(tmp_path, rejected, FakeBackend(responder=responder({"recover_grounded": GOOD})), accepted=accepted,
              gates=gates, max_attempts=1)
    assert out.recovered.num_rows == 0
    assert out.diagnosed.to_pylist()[0]["failure_reasons"] == ["dedup_exact_accepted"]


# ---- planted errors: the gates alone decide; ground truth only measures what they let through ----

def test_given_a_planted_number_error_a_candidate_that_keeps_it_and_passes_the_gates_is_counted_as_let_through(
        tmp_path):
    row = planted("Refunds take 21 days.", "number_change", "'14' -> '21'",
                  {"faithfulness": (0.1, "faithfulness_unsupported")})
    backend = FakeBackend(responder=responder({"recover_grounded": "Refunds are issued within 21 days."},
                                              default="Refunds take 21 days, as stated."))
    out = run(tmp_path, SYNTHETIC_ARROW.empty_table(), backend, planted_rows=row)
    d = recovered_schema.DIAGNOSED_INJECTED_CONTRACT.validate(out.injected, "planted").to_pylist()[0]
    # the gates passed the candidate, so recovery took it (no ground-truth refusal) ...
    assert d["recovered_row_id"] is not None and d["attempts"] == 1
    # ... and the measurement says it still holds the planted error
    assert d["outcome"] == "laundered" and d["error_survives"] is True
    assert d["naive_outcome"] == "laundered"
    inj = out.metrics["injected"]["adaptive"]
    assert inj["errors_surviving_into_recovered"] == 1 and inj["recovered_error_removed"] == 0
    assert inj["recall_before"] == 1.0 and inj["recall_after"] == 0.0
    assert out.recovered.num_rows == 0  # planted rows never enter the datasets
    tried = out.attempts.to_pylist()
    assert tried and all(r["row_set"] == "planted" and r["gate_keep"] and r["counted"] for r in tried)


class NumbersInEvidence:
    """A verifier double: a claim is supported when every number in it is in the passage (a judge that checks)."""

    def score(self, passages, claims):
        import re

        return np.array([float(all(n in p for n in re.findall(r"\d+", c))) for p, c in zip(passages, claims)])


class Credulous:
    """A verifier double that supports every claim (a judge that lets planted errors through)."""

    def score(self, passages, claims):
        return np.ones(len(claims))


LAUNDERS = "Refunds are issued within 21 days."  # the planted wrong number, in a fluent answer


@pytest.mark.parametrize("teacher_answer, judge, outcome", [
    (GOOD, Credulous, "recovered"),  # the teacher removed the error: nothing to let through
    (LAUNDERS, NumbersInEvidence, "failed"),  # the teacher kept it and the faithfulness gate caught it again
    (LAUNDERS, Credulous, "laundered"),  # the teacher kept it and the gate let it through
])
def test_recall_after_recovery_falls_by_every_planted_error_the_gates_let_back_in(tmp_path, teacher_answer, judge,
                                                                                    outcome):
    # given two planted number errors the gates caught ('14' -> '21' days), recovered by a teacher whose grounded
    # answer and resample are ``teacher_answer``, re-gated by the real faithfulness gate judging with ``judge``
    rows = pa.concat_tables([planted("Refunds take 21 days.", "number_change", "'14' -> '21'",
                                     {"faithfulness": (0.1, "faithfulness_unsupported")}, row_id=f"inj_{c * 16}")
                             for c in "ab"])
    gates = {**{g: Marker(g) for g in GATES},
             "faithfulness": FaithfulnessGate(judge(), DOCS, mode="grounded", min_support=0.5)}
    backend = FakeBackend(responder=responder({"recover_grounded": teacher_answer}, default=teacher_answer))
    # when recovered through the stage's wiring
    out = run(tmp_path, SYNTHETIC_ARROW.empty_table(), backend, planted_rows=rows, gates=gates)
    # then each row's outcome follows the gates alone, and ground truth counts what they let through
    planted_out = recovered_schema.DIAGNOSED_INJECTED_CONTRACT.validate(out.injected, "planted").to_pylist()
    assert [r["outcome"] for r in planted_out] == [outcome] * 2
    let_through = sum(bool(r["error_survives"]) for r in planted_out)
    inj = out.metrics["injected"]["adaptive"]
    assert inj["errors_surviving_into_recovered"] == let_through == (2 if outcome == "laundered" else 0)
    assert inj["recall_before"] == 1.0
    assert inj["recall_after"] == (inj["rejected_by_gates"] - let_through) / inj["planted_errors"]
    assert inj["recall_after"] == (0.0 if outcome == "laundered" else 1.0)
    assert inj["recovered_error_removed"] == (2 if outcome == "recovered" else 0)
    assert out.recovered.num_rows == 0  # planted rows never enter the datasets


@pytest.mark.parametrize("kind, detail, planted_answer, candidate, present", [
    ("number_change", "'14' -> '21'", "Within 21 days.", "Within 14 days.", False),
    ("negation_flip", "'Yes' -> 'No'", "No, you can.", "no, refunds are not possible.", True),
    ("unsupported_claim", "corpus sentence: 'Exports larger than 2 GB are split into parts.'",
     "Within 14 days. Exports larger than 2 GB are split into parts.", "Exports larger than 2 GB are split.", True),
    ("truncation", "kept 3 of 8 words", "Refunds are issued", "Refunds are issued", True),
    ("entity_swap", "'billing' -> 'sales'", "Contact sales.", "Contact billing to start one.", False),
])
def test_injected_error_check_reads_the_ground_truth(kind, detail, planted_answer, candidate, present):
    row = {"injection_kind": kind, "injection_detail": detail, "injection_field": "answer", "answer": planted_answer,
           "question": "q?", "evidence": "Refunds are issued within 14 days. Contact billing to start one."}
    assert injected_error_present(row, "q?", candidate) is present


# ---- bad input and budgets ----

def test_empty_rejected_set_gives_empty_outputs_and_makes_no_call(tmp_path):
    backend = FakeBackend()
    out = run(tmp_path, SYNTHETIC_ARROW.empty_table(), backend)
    assert out.recovered.num_rows == out.diagnosed.num_rows == out.unrecoverable.num_rows == 0
    assert backend.calls == [] and out.metrics["adaptive"]["overall"]["attempted"] == 0
    recovered_schema.CONTRACT.validate(out.recovered, "recovered")


def test_budget_zero_attempts_nothing_and_says_so(tmp_path):
    rejected = gated([("How long do refunds take?", "Three months <faithfulness>")],
                     [{"faithfulness": (0.1, "faithfulness_unsupported")}])
    backend = FakeBackend()
    out = run(tmp_path, rejected, backend, budget=0)
    assert backend.calls == [] and out.metrics["note"] == "budget is 0: nothing attempted"
    d = out.unrecoverable.to_pylist()[0]
    assert (d["outcome"], d["naive_outcome"], d["diagnosis"]) == ("budget_exhausted", "budget_exhausted", "ungrounded")


def test_unrecoverable_rows_are_not_attempted_but_kept_with_their_diagnosis(tmp_path):
    rejected = gated([("How long do refunds take?", "x <faithfulness>")], [{"faithfulness": (0.1,
                                                                            "faithfulness_unsupported")}],
                     doc_id=["d2"])
    backend = FakeBackend()
    out = run(tmp_path, rejected, backend)
    d = recovered_schema.DIAGNOSED_CONTRACT.validate(out.unrecoverable, "u").to_pylist()[0]
    assert (d["diagnosis"], d["outcome"], d["attempts"]) == ("unrecoverable", "not_attempted", 0)
    assert backend.calls == []


def test_the_global_budget_is_shared_and_the_naive_baseline_gets_the_same(tmp_path):
    rejected = gated([(f"How long do refunds take, case {i}?", f"Months {i} <faithfulness>") for i in range(4)],
                     [{"faithfulness": (0.1, "faithfulness_unsupported")}] * 4)
    out = run(tmp_path, rejected, FakeBackend(responder=responder({})), budget=5, max_attempts=2)
    a, n = out.metrics["adaptive"]["overall"], out.metrics["naive"]["overall"]
    assert a["calls"] == n["calls"] == 5 and a["attempted"] == n["attempted"] == 3
    assert a["budget_exhausted"] == 1


def test_naive_baseline_can_be_switched_off(tmp_path):
    rejected = gated([("How long do refunds take?", "x <faithfulness>")],
                     [{"faithfulness": (0.1, "faithfulness_unsupported")}])
    out = run(tmp_path, rejected, FakeBackend(responder=responder({"recover_grounded": GOOD})), naive_baseline=False)
    assert out.metrics["naive"] is None and out.diagnosed.to_pylist()[0]["naive_outcome"] == "off"


def test_a_rerun_is_answered_from_the_cache_and_a_failed_call_is_retried(tmp_path):
    rejected = gated([(f"How long do refunds take, case {i}?", f"Months {i} <faithfulness>") for i in range(3)],
                     [{"faithfulness": (0.1, "faithfulness_unsupported")}] * 3)
    flaky = FakeBackend(responder=responder({"recover_grounded": GOOD}), fail_every=2)
    first = run(tmp_path, rejected, flaky)
    made = len(flaky.calls)
    again = FakeBackend(responder=responder({"recover_grounded": GOOD}))
    second = run(tmp_path, rejected, again)
    assert 0 < len(again.calls) < made  # only the calls that failed are made again
    third_backend = FakeBackend(responder=responder({"recover_grounded": GOOD}))
    third = run(tmp_path, rejected, third_backend)
    assert third_backend.calls == []
    assert third.recovered.column("row_id").to_pylist() == second.recovered.column("row_id").to_pylist()
    assert first.metrics["adaptive"]["overall"]["calls"] >= 3


def _cli_project(tmp, thresholds: dict) -> list[str]:
    """Write a project for the recover command: an endpoint teacher nothing listens to (so a model call would fail),
    the tiny train split and documents, empty gated outputs and ``thresholds`` as thresholds.json."""
    import pyarrow.parquet as pq

    from tests.test_generate import _endpoint_project

    _endpoint_project(tmp, "http://127.0.0.1:9/v1")
    for name, schema in (("rejected", SYNTHETIC_ARROW), ("accepted", SYNTHETIC_ARROW), ("injected", INJECTED_ARROW)):
        pq.write_table(schema.empty_table(), tmp / f"{name}.parquet")
    (tmp / "thresholds.json").write_text(json.dumps(thresholds))
    return ["recover", "--params", "params.yaml", "--rejected", "rejected.parquet", "--accepted", "accepted.parquet",
            "--injected", "injected.parquet", "--thresholds", "thresholds.json", "--train", "train.parquet",
            "--documents", "documents.parquet", "--models", "base", "--verifier", "verifier", "--reward", "reward",
            "--prompts", str(ROOT / "prompts"), "--cache", "teacher.sqlite", "--gate-cache", "gate", "--out", "out",
            "--metrics", "recover.json", "--table", "recover.md", "--quiet"]


def test_cli_with_an_empty_rejected_set_writes_empty_outputs_loads_no_model_and_exits_0(in_tmp):
    import pyarrow.parquet as pq

    from refinery.cli import main

    # given nothing to recover (no rejected row, no rejected planted row) and no model folders at all
    argv = _cli_project(in_tmp, THRESHOLDS)
    # when the command runs
    assert main(argv) == 0
    # then every output is written, empty, and the metrics hold the gate stage's thresholds for review
    for name in ("recovered", "baseline", "unrecoverable", "diagnosed", "injected", "attempts"):
        assert pq.read_table(in_tmp / "out" / f"{name}.parquet").num_rows == 0
    metrics = json.loads((in_tmp / "recover.json").read_text())
    assert metrics["adaptive"]["overall"]["attempted"] == 0
    assert metrics["thresholds"]["reward"] == {"min_reward": 0.5} and metrics["thresholds"] == THRESHOLDS


def test_cli_with_a_thresholds_file_missing_a_bound_fails_in_one_line_naming_the_file_and_key(in_tmp, capsys):
    from refinery.cli import main

    # given a thresholds.json whose reward entry lost its bound (written by an older gate stage, or edited)
    broken = {**THRESHOLDS, "reward": {}}
    argv = _cli_project(in_tmp, broken)
    capsys.readouterr()
    # when the command runs, then it stops before any work with one line naming the file and the key
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "thresholds.json" in err[0] and "reward.min_reward" in err[0]
    assert not (in_tmp / "out").exists()


def test_cli_paths_are_required_and_every_option_is_explained():
    from click.testing import CliRunner

    from stages.recover import cli

    # every option says what it is in --help, and a data path has no default (dvc.yaml passes each one)
    assert all(o.help for o in cli.params if o.name != "help")
    paths = [o for o in cli.params if o.name not in ("params_file", "quiet", "help")]
    assert paths and all(o.required and o.to_info_dict()["default"] is None for o in paths)
    result = CliRunner().invoke(cli, ["--params", "params.yaml"])
    assert result.exit_code == 2 and "Missing option" in result.output


def test_a_marginal_row_is_first_resampled_from_its_own_prompt_at_its_own_temperature(tmp_path):
    # given a row rejected just under the faithfulness bound, and a teacher whose answers keep failing
    rejected = gated([("How long do refunds take?", "About two weeks <faithfulness>")],
                     [{"faithfulness": (0.47, "faithfulness_unsupported")}])
    backend = FakeBackend(responder=responder({"answer_augmentation": "About two weeks <faithfulness>"}))
    run(tmp_path, rejected, backend, temperatures={**{a: 0.3 for a in ACTIONS}, "reanswer_low_temp": 0.2},
        naive_baseline=False)
    # then adaptive first draws again at the row's own temperature (0.7); the second action follows the
    # failed candidate's own diagnosis
    assert [c.temperature for c in backend.calls][:1] == [0.7] and len(backend.calls) == 2
    # when the fresh draw passes, it is recovered by the 'resample' action from the row's own template
    backend = FakeBackend(responder=responder({"answer_augmentation": GOOD}))
    (tmp_path / "again").mkdir()
    out = run(tmp_path / "again", rejected, backend, naive_baseline=True)
    r = out.recovered.to_pylist()[0]
    assert (r["diagnosis"], r["recovery_action"]) == ("threshold_marginal", "resample")
    assert r["prompt_template"].startswith("answer_augmentation@")
    # and it is the naive baseline's call (same prompt, temperature and seed): one cached result serves both
    assert len({(c.prompt, c.temperature, c.seed) for c in backend.calls}) == 1


def test_priority_round_robin_reaches_every_mode_and_by_mode_keeps_mode_blocks():
    diags = [Diagnosis("too_close_to_seed", 0.9, "", True), Diagnosis("threshold_marginal", 0.6, "", True),
             Diagnosis("too_close_to_seed", 0.7, "", True), Diagnosis("threshold_marginal", 0.8, "", True),
             Diagnosis("ungrounded", 0.7, "", True)]
    assert priority(diags, interleave=False).tolist() == [3, 1, 4, 0, 2]
    # round 1: the most confident row of each mode (in MODE_RANK order), round 2: the next ones
    assert priority(diags, interleave=True).tolist() == [3, 4, 0, 1, 2]
    # a row that will not be attempted takes no turn, however confident its diagnosis
    diags[0] = Diagnosis("too_close_to_seed", 0.99, "", False)
    assert priority(diags, interleave=True).tolist() == [3, 4, 2, 1, 0]


# ---- the gate stage writes thresholds.json, the recover stage judges with exactly it ----

def test_recover_regates_with_the_bounds_the_gate_stage_wrote_and_never_calibrates(in_tmp, monkeypatch):
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    import refinery.gates.run as gate_run
    import refinery.generation.calls as calls
    import stages.gate as gate_stage
    from schemas.injected import ARROW as INJECTED
    from stages.recover import cli as recover_cli
    from tests.conftest import params_for
    from tests.test_gate_stage import Counting
    from stages.split import SplitParams, split
    from tests.test_split import seed_tables

    # given the tiny seed split, generated rows (one invents an e-mail address, one is too short) and planted rows
    documents, qa = seed_tables(in_tmp)
    train = split(documents, qa, SplitParams(seed=1, fractions={"train": 1.0, "val": 0.0, "test": 0.0}))
    train = train.tables["train"]
    pq.write_table(train, "train.parquet")
    pq.write_table(documents, "documents.parquet")
    stale = {d["doc_id"] for d in documents.to_pylist() if d["stale"]}
    doc = next(r for r in train.to_pylist() if r["doc_id"] not in stale)
    pairs = [("How long do refunds take for a normal order?", "Refunds are issued within fourteen days of it."),
             ("Who do I write to about a refund that is late?", "Write to jane.doe@gmail.com and she will help."),
             ("Refunds?", "Soon.")]
    common = dict(doc_id=[doc["doc_id"]] * 3, evidence_start=[doc["evidence_start"]] * 3,
                  evidence_end=[doc["evidence_end"]] * 3, parent_ids=[[doc["row_id"]]] * 3,
                  strategy=["new_question"] * 3, row_id=[f"syn_{i:016x}" for i in range(3)])
    pq.write_table(synthetic_rows(pairs, **common), "synthetic.parquet")
    inj = synthetic_rows([pairs[0], (pairs[0][0], "Refunds are issued within 41 days of it.")],
                         **{**{k: v[:2] for k, v in common.items()}, "origin": ["injected"] * 2,
                            "row_id": ["inj_" + "0" * 16, "inj_" + "1" * 16]})
    for f, v in zip(INJECTION_FIELDS, (["clean", "number_change"], [doc["row_id"]] * 2, ["answer"] * 2,
                                       [None, "'fourteen' -> '41'"])):
        inj = inj.append_column(f, pa.array(v, f.type))
    pq.write_table(inj.cast(INJECTED), "injected.parquet")
    params_for(in_tmp, recover={"budget": 4, "injected_budget": 0, "naive_baseline": False})
    doubles = Counting()
    monkeypatch.setattr(gate_stage, "load_models", lambda *a, **k: doubles.models())
    monkeypatch.setattr(gate_run, "load_models", lambda *a, **k: doubles.models())
    # when the gate stage runs (its null bounds calibrated on the human rows)
    gated = CliRunner().invoke(gate_stage.cli, [
        "--params", "params.yaml", "--synthetic", "synthetic.parquet", "--injected", "injected.parquet",
        "--train", "train.parquet", "--val", "train.parquet", "--documents", "documents.parquet", "--models", "base",
        "--verifier", "verifier", "--reward", "reward", "--cache", "cache", "--out", "gated", "--metrics", "gate.json",
        "--injection-metrics", "gate_injection.json", "--plots", "plots"])
    assert gated.exit_code == 0, gated.output
    written = json.loads((in_tmp / "gated" / "thresholds.json").read_text())
    reasons = {r["row_id"]: r["gate_reasons"] for r in pq.read_table("gated/rejected.parquet").to_pylist()}
    # and then the recover stage runs, where calibrating anything would fail
    monkeypatch.setattr(gate_run, "calibrate", lambda *a, **k: pytest.fail("recover calibrated a threshold"))
    monkeypatch.setattr(calls, "teacher_backend", lambda *a, **k: ("fake@1", FakeBackend(
        responder=lambda req: " Refunds are issued within 14 days of the request.")))
    built = {}
    real_build = gate_run.build_gates
    monkeypatch.setattr(gate_run, "build_gates", lambda t, ctx: built.setdefault("gates", real_build(t, ctx)))
    recovered = CliRunner().invoke(recover_cli, [
        "--params", "params.yaml", "--rejected", "gated/rejected.parquet", "--accepted", "gated/accepted.parquet",
        "--injected", "gated/injected.parquet", "--thresholds", "gated/thresholds.json", "--train", "train.parquet",
        "--documents", "documents.parquet", "--models", "base", "--verifier", "verifier", "--reward", "reward",
        "--prompts", str(ROOT / "prompts"), "--cache", "teacher.sqlite", "--gate-cache", "cache", "--out", "out",
        "--metrics", "recover.json", "--table", "recover.md", "--quiet"])
    assert recovered.exit_code == 0, recovered.output
    # then its gates hold the written bounds to the last bit, and both stages report the same copy of them
    gates = built["gates"]
    assert gates["reward"].min_reward == written["reward"]["min_reward"]
    assert gates["perplexity"].max_perplexity == written["perplexity"]["max_perplexity"]
    assert gates["faithfulness"].min_support == written["faithfulness"]["min_support"] == doubles.threshold
    assert json.loads((in_tmp / "recover.json").read_text())["thresholds"] == \
        json.loads((in_tmp / "gate.json").read_text())["thresholds"]
    attempts = pq.read_table("out/attempts.parquet")
    assert attempts.num_rows > 0 and all(f"{g}_keep" in attempts.column_names for g in GATES)  # every gate re-gated
