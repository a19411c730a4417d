"""Recover stage: diagnosis codes, targeted regeneration re-gated by every gate, no laundering, budgets, cache."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from refinery.generation import calls as generation
from refinery.recovery import loop as rec
from refinery.models.backends.fake import FakeBackend
from refinery.core.errors import RefineryError
from refinery.gates.base import Verdicts
from refinery.gates.dedup import DedupGate
from refinery.gates.run import run_gates
from refinery.generation.prompts import load_template
from refinery.generation.strategies import GENERATION_STRATEGIES
from schemas import recovered as recovered_schema
from schemas.gated import GATES, INJECTED_ARROW, SYNTHETIC_ARROW
from schemas.injected import INJECTION_FIELDS
from stages.recover import Margins, RecoverParams, check_params, recover, report_table
from tests.conftest import ROOT
from tests.gates.conftest import rows as synthetic_rows

TEXT = "Refunds are issued within 14 days. Contact billing to start one."
EVIDENCE = (0, 34)  # "Refunds are issued within 14 days."
DOCS = pa.table({"doc_id": ["d1", "d2"], "text": [TEXT, "Old refunds took 30 days."], "stale": [False, True]})
TRAIN = pa.table({"row_id": ["qa_" + "1" * 16], "doc_id": ["d1"], "question": ["How long do refunds take?"],
                  "answer": ["Within 14 days."], "evidence": ["Refunds are issued within 14 days."]})
BOUNDS = rec.Bounds(min_support=0.5, min_reward=0.5, max_perplexity=100.0, min_perplexity=1.5, max_cosine=0.85,
                    max_ngram_overlap=0.3, max_jaccard=0.55,
                    margins={"faithfulness": 0.05, "reward": 0.05, "overlap_embedding": 0.02, "overlap_ngram": 0.05,
                             "dedup": 0.05, "perplexity": 0.2})
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


def planted(answer: str, kind: str, detail: str, fails: dict) -> pa.Table:
    t = gated([("How long do refunds take?", answer)], [fails], row_id=["inj_" + "a" * 16], strategy=[None],
              gen_params=[None], origin=["injected"])
    for f, v in zip(INJECTION_FIELDS, (kind, "qa_" + "1" * 16, "answer", detail)):
        t = t.append_column(f, pa.array([v], f.type))
    return t.select(INJECTED_ARROW.names).cast(INJECTED_ARROW)


def no_planted() -> pa.Table:
    return INJECTED_ARROW.empty_table()


class Marker:
    """A gate double: rejects rows whose answer holds ``<gate>`` with the gate's usual reason code."""

    codes = {"rules": "rules_too_short", "dedup": "dedup_near", "overlap_ngram": "overlap_ngram",
             "overlap_embedding": "overlap_embedding", "faithfulness": "faithfulness_unsupported",
             "reward": "reward_low", "perplexity": "perplexity_too_high"}

    def __init__(self, name):
        self.name = name

    def apply(self, rows):
        keep = [f"<{self.name}>" not in (a or "") and a is not None for a in rows.column("answer").to_pylist()]
        score = {"faithfulness": 0.1, "reward": 0.1}.get(self.name, 0.0)
        return Verdicts(keep, [0.9 if k else score for k in keep], [None if k else self.codes[self.name] for k in keep])


def params(**kw) -> RecoverParams:
    base = dict(seed=1, budget=10, injected_budget=10, max_attempts=2, naive_baseline=True, min_confidence=0.5,
                order="round_robin",
                margins=Margins(faithfulness=0.05, reward=0.05, overlap_embedding=0.02, overlap_ngram=0.05, dedup=0.05,
                                perplexity=0.2),
                temperatures={a: 0.3 for a in rec.ACTIONS}, top_p=0.95, max_new_tokens={"answer": 24, "qa": 32},
                naive_temperature=0.7, naive_max_new_tokens={"answer": 24, "question": 24, "qa": 32}, naive_shots=0,
                batch_size=4, threads=1)
    return RecoverParams(**{**base, **kw})


def templates():
    return {n: load_template(ROOT / "prompts" / f"{n}.txt") for n in rec.TEMPLATES + GENERATION_STRATEGIES}


def responder(by_template: dict[str, str], default: str = "no idea <faithfulness>"):
    """Answer by which template rendered the prompt (its first words)."""
    firsts = {name: load_template(ROOT / "prompts" / f"{name}.txt").body.split("\n")[0]
              for name in rec.TEMPLATES + GENERATION_STRATEGIES}

    def respond(req):
        for name, first in firsts.items():
            if req.prompt.startswith(first) and name in by_template:
                return " " + by_template[name]
        return " " + default
    return respond


def run(tmp_path, rejected, backend, *, accepted=None, planted_rows=None, gates=None, **kw):
    cache = tmp_path / "teacher.sqlite"
    gates = gates or {g: Marker(g) for g in GATES}

    def execute(planned, actions):
        table, _, _ = generation.execute(planned, backend, cache, DOCS, batch_size=4, origin="recovered",
                                         teacher_id="fake@1", phash="p", code_version="c", desc="t", quiet=True)
        parents = {r["row_id"]: r for r in rejected.to_pylist() + (planted_rows or no_planted()).to_pylist()}
        return rec.stamp(table, planned, parents, actions, "p", "c")

    def regate(cands, pool):
        pool_gate = DedupGate(pool, max_jaccard=0.55) if pool.num_rows else None
        return run_gates(cands, {**gates, "dedup": rec.PooledDedup(gates["dedup"], pool_gate)})

    accepted = accepted if accepted is not None else SYNTHETIC_ARROW.empty_table()
    return recover(rejected, accepted, planted_rows if planted_rows is not None else no_planted(), TRAIN, DOCS,
                   params=params(**kw), bounds=BOUNDS, templates=templates(), teacher_id="fake@1", execute=execute,
                   regate=regate)


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
    d = rec.diagnose(one(fails, **columns), BOUNDS, docs, min_confidence=0.5)
    assert (d.mode, d.recoverable) == (mode, recoverable)
    assert 0 <= d.confidence <= 1 and d.detail


def test_given_a_stale_source_document_then_the_detail_says_so():
    docs = {d["doc_id"]: d for d in DOCS.to_pylist()}
    d = rec.diagnose(one({"reward": (0.1, "reward_low")}, doc_id=["d2"]), BOUNDS, docs, 0.5)
    assert (d.mode, d.detail) == ("unrecoverable", "source_document_stale")


def test_low_quality_grounds_first_and_a_chain_from_params_can_rewrite_its_weakest_dimension():
    docs = {d["doc_id"]: d for d in DOCS.to_pylist()}
    length = rec.diagnose(one({"rules": (1.0, "rules_too_short")}), BOUNDS, docs, 0.5)
    fluency = rec.diagnose(one({"perplexity": (900.0, "perplexity_too_high")}), BOUNDS, docs, 0.5)
    # by default: a strict-grounding answer, then a new question (the rewrites passed 3 of 28 first attempts)
    assert [rec.next_action(length, tried) for tried in ([], ["strict_grounding"])] == \
        ["strict_grounding", "regenerate_question"]
    # a chain from params replaces the built-in one for its mode; 'rewrite_weakest' resolves per diagnosis
    chains = {"low_quality": ["rewrite_weakest", "strict_grounding"]}
    assert [rec.next_action(d, [], chains=chains) for d in (length, fluency)] == ["rewrite_length", "rewrite_fluency"]
    assert rec.next_action(length, ["rewrite_length"], chains=chains) == "strict_grounding"


def test_a_truncated_row_gets_a_new_question_first():
    truncated = rec.Diagnosis("truncated", 0.9, "rules_truncated", True)
    assert [rec.next_action(truncated, tried) for tried in ([], ["regenerate_question"])] == \
        ["regenerate_question", "strict_grounding"]
    assert rec.next_action(truncated, [], chains={"truncated": ["fix_length"]}) == "fix_length"


@pytest.mark.parametrize("chains, message", [
    ({"sideways": ["resample"]}, "recover.chains.sideways: not a recoverable failure mode"),
    ({"low_quality": ["polish"]}, "recover.chains.low_quality: unknown action polish"),
    ({"truncated": []}, "recover.chains.truncated: empty chain"),
])
def test_a_chain_naming_an_unknown_mode_or_action_fails_at_stage_start(chains, message):
    with pytest.raises(RefineryError, match=message):
        check_params(params(chains=chains))


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
    by_question = rec.diagnose(one(fails), BOUNDS, {"d1": {"text": TEXT, "stale": False}}, 0.5)
    by_answer = rec.diagnose(one(fails, strategy=["new_question"]), BOUNDS, {"d1": {"text": TEXT, "stale": False}},
                             0.5)
    # then the first regenerates the question, the second rewords its answer first
    assert by_question.detail == "seed_question:overlap_embedding"
    assert [rec.next_action(by_question, []), rec.next_action(by_question, ["regenerate_question"])] == \
        ["regenerate_question", "diversify"]
    assert rec.next_action(by_answer, []) == "diversify"


def test_a_row_whose_question_is_the_defect_keeps_getting_new_questions_whatever_its_candidate_failed_by():
    docs = {"d1": {"text": TEXT, "stale": False}}
    by_question = rec.diagnose(one({"overlap_embedding": (0.95, "overlap_embedding")}), BOUNDS, docs, 0.5)
    # given failed candidates whose own diagnoses would pick an answer-only action (which keeps the question)
    malformed = rec.Diagnosis("malformed", 0.95, "rules_parse_error", True)
    ungrounded = rec.Diagnosis("ungrounded", 0.8, "faithfulness_score:0.100", True)
    tried = ["regenerate_question"]
    assert [rec.next_action(d, tried) for d in (malformed, ungrounded)] == ["fix_format", "strict_grounding"]
    # then a row close to the seed through its seed question, or with a defective question, gets a new question
    defect = rec.Diagnosis("question_defect", 0.8, "question_support:0.00", True)
    for row in (by_question, defect):
        assert [rec.next_action(d, tried, row) for d in (malformed, ungrounded)] == ["regenerate_question"] * 2
    # while any other row follows its candidate's diagnosis
    other = rec.Diagnosis("ungrounded", 0.8, "faithfulness_score:0.100", True)
    assert rec.next_action(malformed, ["strict_grounding"], other) == "fix_format"


def test_salvage_question_keeps_the_usable_half_of_a_malformed_row():
    seed = {"question": "How long do refunds take?"}
    assert rec.salvage_question({"question": "Why?", "strategy": "new_question"}, None) == "Why?"
    assert rec.salvage_question({"question": None, "strategy": "answer_augmentation"}, seed) == seed["question"]
    raw = " What did she bake for the party ?\nPossible answer:\nA:"
    assert rec.salvage_question({"question": None, "strategy": "new_question", "raw_output": raw}, None) == \
        "What did she bake for the party ?"
    assert rec.salvage_question({"question": None, "strategy": "new_question", "raw_output": " Sure!"}, None) is None


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


def test_given_a_planted_number_error_a_candidate_without_it_counts_as_recovered(tmp_path):
    row = planted("Refunds take 21 days.", "number_change", "'14' -> '21'",
                  {"faithfulness": (0.1, "faithfulness_unsupported")})
    out = run(tmp_path, SYNTHETIC_ARROW.empty_table(), FakeBackend(responder=responder({"recover_grounded": GOOD})),
              planted_rows=row)
    d = out.injected.to_pylist()[0]
    assert d["outcome"] == "recovered" and d["error_survives"] is False
    inj = out.metrics["injected"]["adaptive"]
    assert inj["recovered_error_removed"] == 1 and inj["errors_surviving_into_recovered"] == 0
    assert inj["recall_after"] == 1.0


def test_recall_after_recovery_falls_when_a_laundering_candidate_gets_through_the_gates(tmp_path):
    # given the same planted row recovered once by a teacher that removes the error, once by one that keeps it
    row = planted("Refunds take 21 days.", "number_change", "'14' -> '21'",
                  {"faithfulness": (0.1, "faithfulness_unsupported")})
    figures = {}
    for name, answer in (("fixes", GOOD), ("launders", "Refunds are issued within 21 days.")):
        out = run(tmp_path / name, SYNTHETIC_ARROW.empty_table(),
                  FakeBackend(responder=responder({"recover_grounded": answer})), planted_rows=row,
                  naive_baseline=False)
        figures[name] = out.metrics["injected"]["adaptive"]
    # then recall before recovery is the same, and after it the laundered error is no longer caught
    assert figures["fixes"]["recall_before"] == figures["launders"]["recall_before"] == 1.0
    assert figures["fixes"]["recall_after"] == 1.0 and figures["launders"]["recall_after"] == 0.0
    assert figures["launders"]["errors_surviving_into_recovered"] == 1


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
    assert rec.injected_error_present(row, "q?", candidate) is present


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


def test_cli_with_an_empty_rejected_set_writes_empty_outputs_and_exits_0(tmp_path, monkeypatch):
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from stages.recover import cli
    from tests.conftest import params_for

    needed = [ROOT / "data/02_split/train.parquet", ROOT / "data/02_split/val.parquet",
              ROOT / "data/01_seed/documents.parquet", ROOT / "models/base/teacher"]
    if not all(p.exists() for p in needed):
        pytest.skip("needs the demo's split, documents and provisioned models (dvc repro)")
    section = dict(seed=1, budget=10, injected_budget=10, max_attempts=2, naive_baseline=True, min_confidence=0.5,
                   order="round_robin",
                   margins=dict(faithfulness=0.05, reward=0.05, overlap_embedding=0.02, overlap_ngram=0.05,
                                dedup=0.05, perplexity=0.2), temperatures={a: 0.3 for a in rec.ACTIONS}, top_p=0.95,
                   max_new_tokens={"answer": 24, "qa": 32}, naive_temperature=0.7,
                   naive_max_new_tokens={"answer": 24, "question": 24, "qa": 32}, naive_shots=0, batch_size=4,
                   threads=1)
    import yaml

    params = yaml.safe_load(params_for(tmp_path).read_text())
    params["recover"] = section
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for name, schema in (("rejected", SYNTHETIC_ARROW), ("accepted", SYNTHETIC_ARROW), ("injected", INJECTED_ARROW)):
        pq.write_table(schema.empty_table(), tmp_path / f"{name}.parquet")
    (tmp_path / "gate.json").write_text(json.dumps({"thresholds": {}}))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, [
        "--params", "params.yaml", "--rejected", "rejected.parquet", "--accepted", "accepted.parquet",
        "--injected", "injected.parquet", "--train", str(needed[0]), "--val", str(needed[1]),
        "--documents", str(needed[2]), "--models", str(ROOT / "models/base"), "--prompts", str(ROOT / "prompts"),
        "--cache", "teacher.sqlite", "--gate-cache", "gate", "--gate-metrics", "gate.json", "--out", "out",
        "--metrics", "recover.json", "--table", "recover.md", "--quiet"])
    assert result.exit_code == 0, result.output
    for name in ("recovered", "baseline", "unrecoverable", "diagnosed", "injected", "attempts"):
        assert pq.read_table(tmp_path / "out" / f"{name}.parquet").num_rows == 0
    assert json.loads((tmp_path / "recover.json").read_text())["adaptive"]["overall"]["attempted"] == 0


def test_a_marginal_row_is_first_resampled_from_its_own_prompt_at_its_own_temperature(tmp_path):
    # given a row rejected just under the faithfulness bound, and a teacher whose answers keep failing
    rejected = gated([("How long do refunds take?", "About two weeks <faithfulness>")],
                     [{"faithfulness": (0.47, "faithfulness_unsupported")}])
    backend = FakeBackend(responder=responder({"answer_augmentation": "About two weeks <faithfulness>"}))
    run(tmp_path, rejected, backend, temperatures={**{a: 0.3 for a in rec.ACTIONS}, "reanswer_low_temp": 0.2},
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
    diags = [rec.Diagnosis("too_close_to_seed", 0.9, "", True), rec.Diagnosis("threshold_marginal", 0.6, "", True),
             rec.Diagnosis("too_close_to_seed", 0.7, "", True), rec.Diagnosis("threshold_marginal", 0.8, "", True),
             rec.Diagnosis("ungrounded", 0.7, "", True)]
    assert rec.priority(diags, interleave=False).tolist() == [3, 1, 4, 0, 2]
    # round 1: the most confident row of each mode (in MODE_RANK order), round 2: the next ones
    assert rec.priority(diags, interleave=True).tolist() == [3, 4, 0, 1, 2]
    # a row that will not be attempted takes no turn, however confident its diagnosis
    diags[0] = rec.Diagnosis("too_close_to_seed", 0.99, "", False)
    assert rec.priority(diags, interleave=True).tolist() == [3, 4, 2, 1, 0]
