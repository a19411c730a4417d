"""Generation: budget-aware mix, strict parsing, provenance, the content-addressed resumable cache."""

from __future__ import annotations

import json

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from refinery.generation import strategies as strat
from refinery.models.backends.base import GenRequest, GenResult
from refinery.models.backends.fake import FakeBackend
from refinery.core.errors import RefineryError
from refinery.generation.calls import load_templates, to_rows
from refinery.generation.prompts import load_template
from refinery.generation.teacher import GenerationCache, Job, cache_key, run_jobs
from stages.generate import GenerateParams, TokenBudget, plan
from tests.conftest import ROOT
from tests.test_split import seed_tables

PROMPTS = ROOT / "prompts"


def params(**kw) -> GenerateParams:
    base = dict(seed=1, budget=12, strategy_mix=None, temperature=0.7, top_p=0.95, shots=1,
                max_new_tokens=TokenBudget(answer=16, question=16, qa=24), batch_size=4, threads=1, skip_stale=True,
                window_sentences=1, max_failure_share=0.5)
    return GenerateParams(**{**base, **kw})


@pytest.fixture
def tables(tmp_path):
    from stages.split import SplitParams, split

    documents, qa = seed_tables(tmp_path)
    train = split(documents, qa, SplitParams(seed=1, fractions={"train": 1.0, "val": 0.0, "test": 0.0}))
    return documents, train.tables["train"]


def templates():
    return load_templates(PROMPTS, list(strat.GENERATION_STRATEGIES))


# ---- budget-aware mix ----

def test_low_budget_ratio_is_mostly_answer_augmentation_and_high_is_mostly_new_questions():
    low_ratio, low = strat.choose_mix(50, 100)
    high_ratio, high = strat.choose_mix(1000, 100)
    assert low_ratio == 0.5 and max(low, key=low.get) == "answer_augmentation"
    assert high_ratio == 10 and max(high, key=high.get) == "new_question"


def test_allocation_sums_to_the_budget():
    counts = strat.allocate(7, {"a": 0.5, "b": 0.3, "c": 0.2})
    assert sum(counts.values()) == 7 and counts == {"a": 4, "b": 2, "c": 1}


# ---- parsing: strict field markers, never invented fields ----

@pytest.mark.parametrize("text, expected", [
    (" How long is the trial?\nAnswer: It lasts 14 days.", ("How long is the trial?", "It lasts 14 days.", None)),
    (" Why was the man bleeding? He fell.", (None, None, "parse_missing_answer")),
    ("Why w\nas the man bleeding?\nAnswer: yes", (None, None, "parse_multiline_question")),
    (" \nAnswer: It lasts.", (None, None, "parse_empty_question")),
    (" What is it?\nAnswer:   ", (None, None, "parse_empty_answer")),
    (" What is it?\nAnswer: A thing. Question: another?", (None, None, "parse_extra_fields")),
])
def test_qa_output_parsing(text, expected):
    assert strat.parse_output(strat.STRATEGIES["new_question"], text) == expected


def test_a_peer_tools_failure_mode_is_rejected_not_split_on_letters():
    # a peer tool split "Why was the man bleeding?" on the letter 'a' into question "Why w" / answer "s the man..."
    q, a, err = strat.parse_output(strat.STRATEGIES["evol_depth"], "Why was the man bleeding?")
    assert (q, a, err) == (None, None, "parse_missing_answer")


def test_single_field_outputs():
    assert strat.parse_output(strat.STRATEGIES["answer_augmentation"], " Answer: Within 30 days.") == \
        (None, "Within 30 days.", None)
    assert strat.parse_output(strat.STRATEGIES["question_rephrasing"], "  ") == (None, None, "parse_empty_question")


# ---- templates ----

def test_template_with_unknown_placeholder_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("Answer {question} from {pasage}\n")
    with pytest.raises(RefineryError, match=r"bad.txt: unknown placeholder \{pasage\}"):
        load_template(bad)


def test_template_version_is_its_content_hash(tmp_path):
    t = tmp_path / "t.txt"
    t.write_text("Q: {question}\n")
    v1 = load_template(t).ref
    t.write_text("Question: {question}\n")
    assert load_template(t).ref != v1 and v1.startswith("t@")


# ---- plan and rows ----

def test_plan_uses_the_budget_and_records_the_mix(tables):
    documents, train = tables
    planned, metrics = plan(train, documents, templates(), params(budget=12), "fake@1")
    assert len(planned) == 12 and sum(metrics["calls_planned"].values()) == 12
    assert metrics["mix_source"] == "budget_ratio" and metrics["skipped_stale_rows"] == 1  # d1 is stale
    assert all(p.parent["doc_id"] != "d1" for p in planned)
    assert len({p.job.key for p in planned}) == 12  # every call is distinct


def test_strategy_mix_param_overrides(tables):
    documents, train = tables
    planned, metrics = plan(train, documents, templates(), params(budget=6, strategy_mix={"new_question": 1.0}),
                            "fake@1")
    assert {p.strategy for p in planned} == {"new_question"} and metrics["mix_source"] == "param"


def test_empty_train_split_is_a_clear_error(tables):
    documents, train = tables
    with pytest.raises(RefineryError, match="train split is empty"):
        plan(train.slice(0, 0), documents, templates(), params(), "fake@1")


def test_seed_row_without_document_is_a_clear_error(tables):
    documents, train = tables
    docs = documents.filter(pa.compute.not_equal(documents.column("doc_id"), "d3"))
    with pytest.raises(RefineryError, match="has no document 'd3'"):
        plan(train, docs, templates(), params(), "fake@1")


def test_rows_carry_provenance_and_evidence_and_keep_failures(tables):
    documents, train = tables
    planned, _ = plan(train, documents, templates(), params(budget=8, strategy_mix={"new_question": 1.0}), "fake@1")
    results = [GenResult(" What plan is needed?\nAnswer: The Pro plan.", "stop", 10, 8, 0.1)] * 7 + \
              [GenResult("", "error", 0, 0, 0.0, "transport_timeout: read timed out")]
    table = to_rows(planned, results, documents, origin="synthetic", teacher_id="fake@1", phash="p", code_version="c")
    rows = table.to_pylist()
    texts = dict(zip(documents.column("doc_id").to_pylist(), documents.column("text").to_pylist()))
    for r, p in zip(rows, planned):
        assert r["parent_ids"] == [p.parent["row_id"]] and r["teacher"] == "fake@1"
        assert r["prompt_template"].startswith("new_question@")
        assert texts[r["doc_id"]][r["evidence_start"]:r["evidence_end"]] == r["evidence"]
    assert rows[0]["question"] == "What plan is needed?" and rows[0]["parse_error"] is None
    assert rows[-1]["error"].startswith("transport_timeout") and rows[-1]["question"] is None
    assert "latency_s" not in table.column_names  # wall-clock stays out of DVC-tracked tables


def test_answer_first_takes_its_answer_verbatim_from_a_sentence_no_seed_evidence_uses(tables):
    documents, train = tables
    planned, _ = plan(train, documents, templates(), params(budget=6, strategy_mix={"answer_first": 1.0}), "fake@1")
    results = [GenResult(" What do I need to know about this?", "stop", 10, 8, 0.1)] * len(planned)
    rows = to_rows(planned, results, documents, origin="synthetic", teacher_id="fake@1", phash="p",
                   code_version="c").to_pylist()
    texts = dict(zip(documents.column("doc_id").to_pylist(), documents.column("text").to_pylist()))
    seed_spans = {(r["doc_id"], r["evidence_start"], r["evidence_end"]) for r in train.to_pylist()}
    for r, p in zip(rows, planned):
        assert r["strategy"] == "answer_first" and r["question"] == "What do I need to know about this?"
        assert r["answer"] == r["evidence"] == texts[r["doc_id"]][r["evidence_start"]:r["evidence_end"]]
        assert r["answer"] in p.job.request.prompt and r["parent_ids"] == [p.parent["row_id"]]
    fresh = [r for r in rows if (r["doc_id"], r["evidence_start"], r["evidence_end"]) not in seed_spans]
    assert fresh, "answer_first prefers sentences that no seed row uses as evidence"


def test_every_strategy_is_allowed_by_the_synthetic_contract_and_its_rows_validate(tables):
    from schemas import synthetic as synthetic_schema

    assert set(synthetic_schema.STRATEGIES) == set(strat.STRATEGIES)
    documents, train = tables
    from stages.generate import RareExpansion

    mix = {name: 1.0 for name in strat.MIX_STRATEGIES}
    rx = RareExpansion(min_rows=99, factor=0.5, tones=["plain"])
    planned, _ = plan(train, documents, templates(), params(budget=14, strategy_mix=mix, rare_expansion=rx), "fake@1")
    results = [GenResult(" A question?\nAnswer: An answer.", "stop", 1, 1, 0.1)] * len(planned)
    table = to_rows(planned, results, documents, origin="synthetic", teacher_id="fake@1", phash="p", code_version="c")
    synthetic_schema.CONTRACT.validate(table, "generated rows")
    assert set(table.column("strategy").to_pylist()) == set(strat.GENERATION_STRATEGIES)


def test_coverage_allocation_takes_parents_from_every_cluster_smallest_first(tables):
    documents, train = tables
    eligible = [r for r in train.to_pylist() if r["doc_id"] != "d1"]  # d1 is stale
    small = eligible[0]["row_id"]
    cluster_of = {r["row_id"]: 0 if r["row_id"] == small else 1 for r in eligible}
    p = params(budget=2, strategy_mix={"answer_augmentation": 1.0}, allocation="coverage")
    planned, metrics = plan(train, documents, templates(), p, "fake@1", cluster_of)
    # two calls: the one-row cluster first, then the large one (a random order could give both to the large cluster)
    assert [cluster_of[x.parent["row_id"]] for x in planned] == [0, 1]
    assert metrics["allocation"] == "coverage" and metrics["calls_per_seed_cluster"] == {"0": 1, "1": 1}
    with pytest.raises(RefineryError, match="no coverage audit"):
        plan(train, documents, templates(), p, "fake@1")


def test_coverage_allocation_spreads_new_questions_over_the_passages_no_seed_row_covers(tables):
    import pyarrow.compute as pc

    from stages.generate import _windows

    documents, train = tables
    # d2 gets four more sentences no seed row quotes: five one-sentence passages uncovered, five calls on d2
    texts = dict(zip(documents.column("doc_id").to_pylist(), documents.column("text").to_pylist()))
    texts["d2"] += " Extra fact one is here. Extra fact two is here. Extra fact three is here. Extra fact four."
    documents = documents.set_column(documents.column_names.index("text"), "text",
                                     pa.array([texts[d] for d in documents.column("doc_id").to_pylist()]))
    train = train.filter(pc.equal(train.column("doc_id"), "d2"))
    seed = [(r["evidence_start"], r["evidence_end"]) for r in train.to_pylist()]
    gaps = [w for w in _windows(texts["d2"], 1) if not any(w[0] < e and b < w[1] for b, e in seed)]
    p = params(budget=len(gaps), strategy_mix={"new_question": 1.0}, allocation="coverage", window_sentences=1)
    planned, metrics = plan(train, documents, templates(), p, "fake@1",
                            {r: 0 for r in train.column("row_id").to_pylist()})
    # every call gets a passage no seed row covers, and no passage twice while another is still untaken
    assert len(gaps) == 5 and sorted(x.span for x in planned) == sorted(gaps)
    assert metrics["uncovered_passage_calls"] == {"new_question": 5}
    p = params(budget=len(gaps) + 2, strategy_mix={"new_question": 1.0}, allocation="coverage", window_sentences=1)
    planned, _ = plan(train, documents, templates(), p, "fake@1", {r: 0 for r in train.column("row_id").to_pylist()})
    assert set(x.span for x in planned) == set(gaps)  # then the gaps again
    p = params(budget=3 * len(gaps), strategy_mix={"new_question": 1.0}, allocation="coverage", window_sentences=1)
    planned, metrics = plan(train, documents, templates(), p, "fake@1",
                            {r: 0 for r in train.column("row_id").to_pylist()})
    assert len(planned) == 15 and metrics["uncovered_passage_calls"] == {"new_question": 5}


def test_rare_expansion_spends_factor_times_the_lacking_rows_with_an_intent_aware_prompt(tables):
    from collections import Counter

    from stages.generate import RareExpansion

    documents, train = tables
    eligible = [r for r in train.to_pylist() if r["doc_id"] != "d1"]  # d1 is stale
    counts = Counter(r["intent"] for r in eligible)
    rx = RareExpansion(min_rows=max(counts.values()), factor=2, tones=["terse", "chatty"],
                       definitions={i: f"The {i} intent." for i in counts})
    planned, metrics = plan(train, documents, templates(), params(budget=0, rare_expansion=rx), "fake@1")
    want = {i: 2 * (rx.min_rows - n) for i, n in counts.items() if n < rx.min_rows}
    assert want and Counter(p.parent["intent"] for p in planned) == want
    assert metrics["rare_expansion"]["class_source"] == "intent"
    assert {c: v["calls"] for c, v in metrics["rare_expansion"]["classes"].items()} == want
    texts = dict(zip(documents.column("doc_id").to_pylist(), documents.column("text").to_pylist()))
    for p in planned:
        prompt = p.job.request.prompt
        intent = p.parent["intent"]
        assert p.strategy == "rare_intent" and f'intent "{intent}"' in prompt and f"The {intent} intent." in prompt
        assert "Tone of the question: terse" in prompt or "Tone of the question: chatty" in prompt
        passage = texts[p.parent["doc_id"]][p.span[0]:p.span[1]]
        assert p.parent["evidence"] in passage and f"Passage: {passage}\nQuestion:" in prompt
    rows = to_rows(planned, [GenResult(" A rare question?\nAnswer: A rare answer.", "stop", 1, 1, 0.1)] * len(planned),
                   documents, origin="synthetic", teacher_id="fake@1", phash="p", code_version="c").to_pylist()
    assert all(r["intent"] == p.parent["intent"] and r["strategy"] == "rare_intent" for r, p in zip(rows, planned))


def test_rare_classes_fall_back_to_question_types_without_intents():
    from refinery.generation.rare import coarse_type, rare_classes

    assert [coarse_type(q) for q in ("Why did she leave?", "In which year?", "Whose car is it?", "Is it?")] == \
        ["wh_why", "wh_which", "wh_who", "wh_other"]
    rows = [{"intent": None, "question": q} for q in ["Why now?"] * 3 + ["Who is he?"]]
    assert rare_classes(rows, min_rows=3, factor=5) == {"wh_who": {"seed_rows": 1, "lacking": 2, "calls": 10}}


def critique_drafts(tables, n: int):
    """n critique_revise drafts ("Draft answer number i."), the params, the constitution and both templates."""
    from refinery.generation.critique import load_constitution

    documents, train = tables
    p = params(budget=n, strategy_mix={"critique_revise": 1.0})
    planned, _ = plan(train, documents, templates(), p, "fake@1")
    drafts = to_rows(planned, [GenResult(f" Draft answer number {i}.", "stop", 1, 1, 0.1) for i in range(n)],
                     documents, origin="synthetic", teacher_id="fake@1", phash="p", code_version="c")
    constitution = load_constitution(PROMPTS / "constitution.txt")
    return drafts, p, constitution, load_template(PROMPTS / "critique.txt"), load_template(PROMPTS / "revise.txt")


def test_critique_revise_revises_drafts_that_break_a_rule_and_fails_closed_on_an_unparseable_critique(tables):
    from stages.generate import critique_revise

    documents, train = tables
    drafts, p, constitution, critic, reviser = critique_drafts(tables, 3)
    verdicts = {"Draft answer number 0.": "3", "Draft answer number 1.": "0", "Draft answer number 2.": "it is fine"}

    def run_calls(jobs, desc):
        assert all(constitution.text in j.request.prompt for j in jobs)
        return [GenResult(next(v for k, v in verdicts.items() if f"Answer: {k}" in j.request.prompt), "stop", 1, 1, 0.1)
                for j in jobs]

    def execute(more, desc):
        assert [m.template_ref for m in more] == [reviser.ref] and constitution.rule(3) in more[0].job.request.prompt
        return to_rows(more, [GenResult(" A revised answer in two sentences. It follows the rule.", "stop", 1, 1, 0.1)],
                       documents, origin="synthetic", teacher_id="fake@1", phash="p", code_version="c")

    out, chains, metrics = critique_revise(drafts, train, templates(), critic, reviser, constitution, p, "fake@1",
                                           run_calls, execute)
    by_outcome = {c["outcome"]: c for c in chains.to_pylist()}
    assert set(by_outcome) == {"revised", "no_rule_broken", "critique_unparseable"}
    rows = {r["row_id"]: r for r in out.to_pylist()}
    revised = rows[by_outcome["revised"]["row_id"]]
    assert revised["answer"] == "A revised answer in two sentences. It follows the rule."
    assert revised["prompt_template"] == reviser.ref and by_outcome["revised"]["rule"] == 3
    assert by_outcome["revised"]["draft"] == "Draft answer number 0." and revised["parent_ids"] == \
        [by_outcome["revised"]["parent_id"]]
    assert rows[by_outcome["no_rule_broken"]["row_id"]]["answer"] == "Draft answer number 1."
    assert rows[by_outcome["critique_unparseable"]["row_id"]]["parse_error"] == "critique_unparseable"
    assert out.num_rows == 3 and metrics["teacher_calls"] == {"draft": 3, "critique": 3, "revise": 1}
    assert metrics["constitution"] == constitution.ref


def test_a_failed_critique_call_fails_the_draft_closed_and_a_failed_revision_keeps_its_error(tables):
    from stages.generate import critique_revise

    documents, train = tables
    drafts, p, constitution, critic, reviser = critique_drafts(tables, 2)

    def run_calls(jobs, desc):  # draft 0's critique names rule 2; draft 1's critique call fails
        return [GenResult("2", "stop", 1, 1, 0.1) if "Answer: Draft answer number 0." in j.request.prompt
                else GenResult("", "error", 1, 0, 0.1, error="transport_timeout: read timed out") for j in jobs]

    def execute(more, desc):  # the revision call fails too
        return to_rows(more, [GenResult("", "error", 1, 0, 0.1, error="transport_timeout: read timed out")],
                       documents, origin="synthetic", teacher_id="fake@1", phash="p", code_version="c")

    out, chains, metrics = critique_revise(drafts, train, templates(), critic, reviser, constitution, p, "fake@1",
                                           run_calls, execute)
    by_outcome = {c["outcome"]: c for c in chains.to_pylist()}
    assert set(by_outcome) == {"critique_failed", "revise_failed"}
    rows = {r["row_id"]: r for r in out.to_pylist()}
    # the draft whose critique failed is kept with that reason (never passed on unchecked)
    failed = rows[by_outcome["critique_failed"]["row_id"]]
    assert failed["parse_error"] == "critique_failed" and failed["answer"] == "Draft answer number 1."
    # the revision that failed is the row (not the draft), with the call's error, so the gates reject it
    revision = rows[by_outcome["revise_failed"]["row_id"]]
    assert revision["error"] is not None and revision["error"].startswith("transport_timeout")
    assert by_outcome["revise_failed"]["rule"] == 2 and by_outcome["revise_failed"]["revision"] is None
    assert metrics["outcomes"] == {"critique_failed": 1, "revise_failed": 1}


@pytest.mark.parametrize("text, rule", [("3", 3), (" Rule 2.", 2), ("0 - none", 0), ("The answer breaks rule 3", None),
                                        ("9", None), ("", None), ("yes", None)])
def test_critique_is_parsed_strictly(text, rule):
    from refinery.generation.critique import parse_critique

    assert parse_critique(text, 7) == rule


def test_a_constitution_out_of_order_is_a_clear_error(tmp_path):
    from refinery.generation.critique import load_constitution

    (tmp_path / "c.txt").write_text("1. Be right.\n3. Be kind.\n")
    with pytest.raises(RefineryError, match="line 2: expected rule 2"):
        load_constitution(tmp_path / "c.txt")


def test_answer_spans_are_fact_sentences_uncovered_first():
    from stages.generate import answer_spans

    text = ("Hi. Exports larger than 2 GB are delivered in several parts. Refunds take 5 business days to arrive. "
            "What now?")
    spans = answer_spans(text, covered=[(4, 60)])
    assert [text[a:b] for a, b in spans] == ["Refunds take 5 business days to arrive.",
                                             "Exports larger than 2 GB are delivered in several parts."]


def test_evol_rounds_rewrite_the_previous_rounds_rows_and_link_them(tables):
    from stages.generate import plan_round

    documents, train = tables
    p = params(budget=6, strategy_mix={"evol_depth": 0.5, "evol_denoise": 0.5}, evol_rounds=2)
    planned, metrics = plan(train, documents, templates(), p, "fake@1")
    assert metrics["calls_per_round"] == [{"evol_denoise": 2, "evol_depth": 2}, {"evol_denoise": 1, "evol_depth": 1}]
    assert len(planned) == 4
    first = to_rows(planned, [GenResult(" Harder question?\nAnswer: A harder answer.", "stop", 1, 1, 0.1)] * 4,
                    documents, origin="synthetic", teacher_id="fake@1", phash="p", code_version="c")
    more, fallback = plan_round(first, metrics["calls_per_round"][1], train, templates(), p, "fake@1", 2)
    more = list(more)
    assert fallback == 0 and {m.strategy for m in more} == {"evol_depth", "evol_denoise"}
    second = to_rows(more, [GenResult(" Cleaner question?\nAnswer: A clean answer.", "stop", 1, 1, 0.1)] * 2,
                     documents, origin="synthetic", teacher_id="fake@1", phash="p", code_version="c").to_pylist()
    by_id = {r["row_id"]: r for r in first.to_pylist()}
    for r in second:
        seed_id, parent_id = r["parent_ids"]
        parent = by_id[parent_id]
        assert parent["parent_ids"] == [seed_id]  # [seed row, the row this round rewrote]
        assert (r["doc_id"], r["evidence_start"], r["evidence_end"]) == \
            (parent["doc_id"], parent["evidence_start"], parent["evidence_end"])
    # a round with nothing parsed before it starts again from seed rows, and says how often
    failed = to_rows(planned, [GenResult("no answer line", "stop", 1, 1, 0.1)] * 4, documents, origin="synthetic",
                     teacher_id="fake@1", phash="p", code_version="c")
    assert plan_round(failed, metrics["calls_per_round"][1], train, templates(), p, "fake@1", 2)[1] == 2


def test_failure_counters_use_one_vocabulary_overall_and_per_strategy(tables):
    from refinery.generation.calls import outcome_metrics

    documents, train = tables
    planned, _ = plan(train, documents, templates(), params(budget=4, strategy_mix={"new_question": 1.0}), "fake@1")
    results = [GenResult(" What plan?\nAnswer: Pro.", "stop", 10, 8, 0.1), GenResult("no answer line", "stop", 1, 1, 0.1),
               GenResult("", "error", 0, 0, 0.0, "malformed_response: <html>"),
               GenResult("", "error", 0, 0, 0.0, "transport_timeout: read timed out")]
    m = outcome_metrics(to_rows(planned, results, documents, origin="synthetic", teacher_id="fake@1", phash="p",
                                code_version="c"))
    assert (m["rows"], m["parsed"], m["call_errors"], m["parse_errors"], m["failure_share"]) == (4, 1, 2, 1, 0.75)
    assert m["call_errors_by_reason"] == {"malformed_response": 1, "transport_timeout": 1}
    assert m["per_strategy"]["new_question"] == {"rows": 4, "parsed": 1, "call_errors": 2, "parse_errors": 1,
                                                 "failure_share": 0.75}


# ---- cache: zero calls on rerun, resume after a kill ----

def _jobs(n: int) -> list[Job]:
    reqs = [GenRequest(prompt=f"prompt {i}", max_new_tokens=4, temperature=0.7, seed=i) for i in range(n)]
    return [Job(r, cache_key("fake@1", "t@1", r, 0)) for r in reqs]


def test_rerun_with_the_same_inputs_makes_zero_model_calls(tmp_path):
    cache = GenerationCache(tmp_path / "c.sqlite")
    backend = FakeBackend()
    first, s1 = run_jobs(_jobs(10), backend, cache, batch_size=3, quiet=True)
    again, s2 = run_jobs(_jobs(10), backend, cache, batch_size=3, quiet=True)
    assert s1.calls == 10 and s2.calls == 0 and s2.cache_hits == 10 and first == again
    assert len(backend.calls) == 10


def test_cache_key_changes_with_model_template_prompt_params_and_sample_index():
    r = GenRequest(prompt="p", max_new_tokens=4, temperature=0.7, seed=1)
    base = cache_key("m@1", "t@1", r, 0)
    variants = [cache_key("m@2", "t@1", r, 0), cache_key("m@1", "t@2", r, 0), cache_key("m@1", "t@1", r, 1),
                cache_key("m@1", "t@1", GenRequest(prompt="q", max_new_tokens=4, temperature=0.7, seed=1), 0),
                cache_key("m@1", "t@1", GenRequest(prompt="p", max_new_tokens=4, temperature=0.8, seed=1), 0),
                cache_key("m@1", "t@1", GenRequest(prompt="p", max_new_tokens=4, temperature=0.7, seed=2), 0)]
    assert len({base, *variants}) == 7


def test_failed_calls_are_not_cached_and_are_retried(tmp_path):
    cache = GenerationCache(tmp_path / "c.sqlite")
    jobs = _jobs(4)
    flaky = FakeBackend(fail={"prompt 2": "transport_timeout: injected"})
    out, stats = run_jobs(jobs, flaky, cache, batch_size=2, quiet=True)
    assert stats.errors == 1 and not out[2].ok
    out2, stats2 = run_jobs(jobs, FakeBackend(), cache, batch_size=2, quiet=True)
    assert stats2.calls == 1 and out2[2].ok


KILL_SCRIPT = """
import os, sys, time
sys.path.insert(0, {root!r})
from refinery.models.backends.fake import FakeBackend
from refinery.generation.teacher import GenerationCache, run_jobs
from tests.test_generate import _jobs

class Dying(FakeBackend):
    def generate(self, requests):
        out = super().generate(requests)
        if len(self.calls) >= {die_after}:
            os.kill(os.getpid(), 9)  # kill -9 right after the 3rd batch is generated, before it is committed
        return out

run_jobs(_jobs(20), Dying(), GenerationCache({cache!r}), batch_size=4, quiet=True)
"""


def test_kill_9_resumes_losing_at_most_the_batch_in_flight(tmp_path):
    cache_file = tmp_path / "c.sqlite"
    # given a run killed with SIGKILL while its 3rd batch (of 5) is in flight
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT.format(root=str(ROOT), die_after=12,
                                                                    cache=str(cache_file))])
    assert proc.returncode == -9
    # then the first two batches survived
    cache = GenerationCache(cache_file)
    assert len(cache) == 8
    # and the rerun makes only the missing calls and gives what an uninterrupted run gives
    backend = FakeBackend()
    resumed, stats = run_jobs(_jobs(20), backend, cache, batch_size=4, quiet=True)
    assert stats.calls == 12 and stats.cache_hits == 8
    clean, _ = run_jobs(_jobs(20), FakeBackend(), GenerationCache(tmp_path / "clean.sqlite"), batch_size=4,
                        quiet=True)
    assert resumed == clean


# ---- the command against OpenAI-compatible endpoints: unreachable, and garbage for every call ----

def _endpoint_project(tmp: Path, url: str) -> Path:
    """Provision a teacher endpoint and write a tiny train split + documents into ``tmp``."""
    import pyarrow.parquet as pq

    from refinery.cli import main
    from stages.split import SplitParams, split
    from tests.conftest import params_for

    (tmp / "m").mkdir()
    (tmp / "m" / "config.json").write_text("{}")
    params = params_for(tmp, provision={"teacher": {"endpoint": url, "model": "tiny"}, "judge": "./m",
                                        "student": "./m", "embedder": "./m"},
                        generate={"budget": 6, "batch_size": 3, "max_failure_share": 0.5, "allocation": "plain",
                                  "rare_expansion": None})
    assert main(["provision", "--params", str(params), "--out", "base", "--metrics", "mp.json"]) == 0
    documents, qa = seed_tables(tmp)
    result = split(documents, qa, SplitParams(seed=1, fractions={"train": 1.0, "val": 0.0, "test": 0.0}))
    pq.write_table(result.tables["train"], tmp / "train.parquet")
    pq.write_table(documents, tmp / "documents.parquet")
    return params


def _generate(params: Path) -> int:
    from refinery.cli import main

    return main(["generate", "--params", str(params), "--train", "train.parquet", "--documents", "documents.parquet",
                 "--models", "base", "--prompts", str(PROMPTS), "--cache", "cache.sqlite", "--out", "syn.parquet",
                 "--metrics", "mg.json", "--quiet"])


def test_unreachable_endpoint_is_one_line_naming_the_url(in_tmp, capsys):
    from tests.backends.fault_proxy import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    params = _endpoint_project(in_tmp, url)
    capsys.readouterr()
    assert _generate(params) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and url.removesuffix("/v1") in err[0] and "Traceback" not in err[0]
    assert not (in_tmp / "syn.parquet").exists()


def test_endpoint_returning_garbage_keeps_every_row_with_a_reason_and_fails_on_the_share(in_tmp, capsys):
    import http.server
    import threading

    import pyarrow.parquet as pq

    class Garbage(http.server.BaseHTTPRequestHandler):
        def _reply(self):
            body = b"<html>not json</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._reply()

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._reply()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        params = _endpoint_project(in_tmp, f"http://127.0.0.1:{server.server_address[1]}/v1")
        capsys.readouterr()
        rc = _generate(params)
    finally:
        server.shutdown()
    # the stage finished: every row is written with its transport/parse reason, after the bounded retries ...
    rows = pq.read_table(in_tmp / "syn.parquet").to_pylist()
    assert len(rows) == 6 and all(r["error"].startswith("malformed_response") for r in rows)
    assert all("(after 3 attempts)" in r["error"] for r in rows)
    run_log = json.loads(next((in_tmp).rglob("runs/generate.json")).read_text())
    assert run_log["retries"] == {"malformed_response": 12} and run_log["call_errors"] == 6
    # ... and exits non-zero because the failure share (100%) is over generate.max_failure_share
    assert rc == 2
    assert "over generate.max_failure_share" in capsys.readouterr().err


def test_zero_shot_answers_may_open_with_a_newline_but_only_their_first_line_counts():
    s = strat.STRATEGIES["contaminate_answer"]
    assert "\n" not in s.stop  # a leading newline must not end the completion before it starts
    assert strat.parse_output(s, "\n It takes 30 days.\nQuestion: next?") == (None, "It takes 30 days.", None)
    assert strat.parse_output(s, "\n\n") == (None, None, "parse_empty_answer")


def test_teacher_dtype_is_part_of_the_teacher_id(in_tmp):
    from refinery.cli import main
    from refinery.generation.calls import teacher_backend
    from tests.conftest import params_for

    (in_tmp / "m").mkdir()
    (in_tmp / "m" / "config.json").write_text("{}")
    params = params_for(in_tmp, provision={"teacher": "./m", "judge": "./m", "student": "./m", "embedder": "./m"})
    assert main(["provision", "--params", str(params), "--out", "base", "--metrics", "mp.json"]) == 0
    plain, _ = teacher_backend("base", 8, 2, "float32")
    bf16, _ = teacher_backend("base", 8, 2, "bfloat16")
    # Outputs depend on the weights' dtype, so a bfloat16 run never reuses float32 cache entries (nor the reverse).
    assert bf16 == f"{plain}+bfloat16" and "+" not in plain


def test_teacher_dtype_does_not_touch_an_endpoint_id(in_tmp):
    from refinery.generation.calls import teacher_backend

    _endpoint_project(in_tmp, "http://127.0.0.1:9/v1")
    plain, _ = teacher_backend("base", 8, 2, "float32")
    assert teacher_backend("base", 8, 2, "bfloat16")[0] == plain  # the server picks its own precision
