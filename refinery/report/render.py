"""Render the report's Markdown from loaded metrics, tracing every printed number to its file, and check it."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from refinery.report.stats import METRICS, MODELS, NOT_MEASURABLE, NOT_RUN, verdict

LABEL = {"base": "Base (untuned)", "human": "A: human", "contaminated": "B: contaminated", "curated": "C: curated",
         "synthetic_only": "synthetic only", "unfiltered": "unfiltered", "no_recovery": "no recovery"}
# Numbers the report's fixed prose contains (ROUGE-1/2, the 95% of Wilson intervals, the 80% power of the
# minimum detectable differences, "excludes 0"); every other number
# is traced to a file. "004": reports written before the experiment brief was called by its name said "seed 004";
# drop it once the committed reports/report.md has been rewritten by the report stage.
STATIC_NUMBERS = frozenset({"1", "2", "004", "95", "80", "0"})
PLACEHOLDER = re.compile(r"\[FILL[^\]]*\]|\bX\.X+\b|\bTODO\b|\bTBD\b|\{\{?[^}\n]*\}\}?|<[A-Z_]+>")
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w])")


@dataclass
class Values:
    """Format numbers from loaded JSON documents, recording where each printed number came from.

    Every number the report prints goes through :meth:`num`, so ``trace`` lists (text, file, key, fmt) for
    each; a test re-reads every entry from its file. Missing files or keys print ``not run``.
    """

    docs: dict[str, Any]
    trace: list[dict[str, Any]] = field(default_factory=list)
    texts: list[dict[str, Any]] = field(default_factory=list)
    write: Callable[[str], None] | None = None  # where a section writes its lines (set by render)

    def get(self, file: str, key: str) -> Any:
        """Return the value at a dotted key of a loaded file, or None."""
        return lookup(self.docs.get(file), key)

    def num(self, file: str, key: str, fmt: str = "f3") -> str:
        """Return the formatted value (``f3``, ``f4``, ``int``, ``pct1``, ``str``) and record its source."""
        value = self.get(file, key)
        if value is None:
            return NOT_RUN
        text = fmt_value(value, fmt)
        self.trace.append({"text": text, "file": file, "key": key, "fmt": fmt})
        return text

    def quote(self, file: str, row_id: str, column: str, value: str) -> str:
        """Record a verbatim text cell quoted from a table (row_id, column) and return it, inline-safe."""
        self.texts.append({"file": file, "row_id": row_id, "column": column, "text": value})
        return value.replace("\n", " ").replace("|", "\\|")


def lookup(doc: Any, key: str) -> Any:
    """Follow a dotted key through nested dicts (``a.b.c``); None when any step is missing."""
    for part in key.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return None
        doc = doc[part]
    return doc


def fmt_value(value: Any, fmt: str) -> str:
    """Format a metrics value the way the report prints it."""
    if fmt == "str" or isinstance(value, str):
        return str(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if fmt == "int":
        return f"{int(value):d}"
    if fmt == "pct1":
        return f"{100 * float(value):.1f}%"
    if fmt == "f4":
        return f"{float(value):.4f}"
    return f"{float(value):.3f}"


def recovery_modes(recover: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """Return (failure mode, adaptive key, naive key) rows of the recover metrics, overall last; [] when absent.

    Reads ``adaptive/naive.per_mode.<mode>`` and ``.overall`` (the recover stage's metrics); empty when the
    stage did not run or ran without its naive baseline.
    """
    if not isinstance(recover, dict) or not isinstance(recover.get("adaptive"), dict) \
            or not isinstance(recover.get("naive"), dict):
        return []
    modes = sorted(set(recover["adaptive"].get("per_mode") or {}) | set(recover["naive"].get("per_mode") or {}))
    rows = [(m, f"adaptive.per_mode.{m}", f"naive.per_mode.{m}") for m in modes]
    return rows + [("overall", "adaptive.overall", "naive.overall")] if "overall" in recover["adaptive"] else rows


def table(header: list[str], rows: list[list[str]]) -> str:
    """Render a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def seed_questions(v: Values, S: str, plots_rel: str, gi: str) -> None:
    """The report's first section: each seed question with its interval, or "not measurable at this size"."""
    w = v.write
    ex = "experiment"
    w("## The seed questions\n")
    if v.get(S, f"{ex}.questions") is None:
        w(f"Arm comparisons: {NOT_RUN}.\n")
        return
    w(f"Token F1 on the human test split, each arm averaged over its training seeds. A difference (a − b) comes "
      f"with a {v.num(S, f'{ex}.ci', 'pct1')} interval from a paired bootstrap over test items and seeds "
      f"({v.num(S, f'{ex}.bootstrap', 'int')} resamples); it is called only when the interval excludes 0. The "
      f"minimum detectable difference is what this test size and these seeds tell apart at 80% power.\n")
    rows = []
    for qid in v.get(S, f"{ex}.questions"):
        q = f"{ex}.questions.{qid}"
        text = v.get(S, f"{q}.question")
        if v.get(S, f"{q}.diff") is None:
            rows.append([text, NOT_RUN, NOT_RUN, NOT_RUN])
            continue
        a, b, verdict_ = v.get(S, f"{q}.a"), v.get(S, f"{q}.b"), v.get(S, f"{q}.verdict")
        answer = {"a > b": f"**yes: {a} > {b}**", "a < b": f"**no: {a} < {b}**"}.get(verdict_, verdict_)
        rows.append([text, f"{v.num(S, f'{q}.diff', 'f3')} [{v.num(S, f'{q}.low', 'f3')}, "
                           f"{v.num(S, f'{q}.high', 'f3')}]", v.num(S, f"{q}.mde", "f3"), answer])
    fam = "gate_families.planted"
    if v.get(S, f"{fam}.judged_by_both"):
        jac = v.get(S, f"{fam}.jaccard")
        rows.append(["Do the two gate families (rules, dedup, overlap vs faithfulness, reward, perplexity) reject "
                     "different rows? (planted rows, every verdict)",
                     f"{v.num(S, f'{fam}.heuristic_only', 'int')} caught by the heuristic gates only, "
                     f"{v.num(S, f'{fam}.model_only', 'int')} by the model gates only, "
                     f"{v.num(S, f'{fam}.rejected_both', 'int')} by both, of "
                     f"{v.num(S, f'{fam}.judged_by_both', 'int')}",
                     "–", ("mostly different rows" if jac is not None and jac < 0.5 else "mostly the same rows")
                     + (f" (Jaccard {v.num(S, f'{fam}.jaccard', 'f3')})" if jac is not None else "")])
    fm = "faithfulness_modes.by_judge"
    for j in v.get(gi, fm) or []:
        d = f"{fm}.{j}.differences.grounded_minus_ungrounded"
        if v.get(gi, f"{d}.mean") is None:
            continue
        rows.append([f"Does provenance help the `{j}` judge (planted factual recall, grounded − ungrounded, equal "
                     f"false-rejection rate)?",
                     f"{v.num(gi, f'{d}.mean', 'f3')} [{v.num(gi, f'{d}.low', 'f3')}, {v.num(gi, f'{d}.high', 'f3')}]",
                     "–", {"supported": "**yes**", "rejected (the opposite holds)": "**no: ungrounded is better**"}.get(
                         verdict(v.get(gi, d)), NOT_MEASURABLE)])
    w(table(["question", "difference [interval]", "minimum detectable", "answer"], rows))
    w("")
    arms = v.get(S, f"{ex}.arms") or {}
    arm_rows = []
    for arm in arms:
        k = f"{ex}.arms.{arm}"
        sd = v.num(S, f"{k}.sd", "f3") if v.get(S, f"{k}.sd") is not None else "–"
        arm_rows.append([LABEL.get(arm, arm), v.num(S, f"{k}.mean", "f3"), sd,
                         ", ".join(v.num(S, f"{k}.f1_per_seed.{sd}", "f3") for sd in arms[arm]["f1_per_seed"]),
                         str(len(arms[arm]["seeds"])) if arm != "base" else "untuned",
                         v.num(S, f"datasets.{arm}.rows", "int") if v.get(S, f"datasets.{arm}.rows") is not None
                         else "–",
                         v.num(S, f"datasets.{arm}.synthetic_share", "pct1")
                         if v.get(S, f"datasets.{arm}.synthetic_share") is not None else "–",
                         f"{v.num(S, f'{k}.val_loss_initial', 'f3')} → {v.num(S, f'{k}.val_loss_best', 'f3')}"
                         if v.get(S, f"{k}.val_loss_best") is not None else "–"])
    w(table(["arm", "F1 mean", "sd over seeds", "F1 per seed", "seeds", "train rows", "non-human share",
             "human val loss: initial → best (mean)"], arm_rows))
    nf = f"{ex}.noise_floor"
    if v.get(S, f"{nf}.sd") is None:
        w(f"\nNoise floor: **unmeasured** here ({v.num(S, f'{nf}.note', 'str')}); the minimum detectable "
          f"differences above hold the test-item noise only. `make repro PROFILE=scarce` trains every arm with "
          f"several seeds.\n")
    else:
        w(f"\nNoise floor (between-seed sd of an arm's mean F1, pooled over "
          f"{v.num(S, f'{nf}.arms', 'int')} arms): **{v.num(S, f'{nf}.sd', 'f3')}**; test items per arm: "
          f"{v.num(S, f'{ex}.arms.human.items', 'int')}.\n")
    w(f"![arms]({plots_rel}/report_arms.png)\n")


def _count(v: Values, file: str, key: str) -> str:
    """A traced count, or "none" where the metrics file has no entry (a class nothing was added to)."""
    return v.num(file, key, "int") if v.get(file, key) is not None else "none"


def coverage_section(v: Values, cov: str, val: str, asm: str) -> None:
    """Seed coverage before generation (coverage stage) and the gaps each dataset's synthetic rows closed (validate)."""
    w = v.write
    w("## Seed coverage: before → after\n")
    if v.get(cov, "seed_rows") is None:
        w(f"Coverage audit: {NOT_RUN}.\n")
        return
    w(f"Before generation (`reports/coverage.md`): {v.num(cov, 'seed_rows', 'int')} seed train rows in "
      f"{v.num(cov, 'clusters', 'int')} clusters (smallest holds {v.num(cov, 'smallest_cluster_share', 'pct1')} of "
      f"the rows); rare intents (under {v.num(cov, 'rare_share', 'pct1')}): "
      f"{', '.join(f'`{x}`' for x in v.get(cov, 'rare_intents') or []) or 'none'}; "
      f"{v.num(cov, 'passages_uncovered', 'int')} of {v.num(cov, 'passages', 'int')} passage windows of the train "
      f"documents have no seed question (passage coverage {v.num(cov, 'passage_coverage', 'pct1')}).\n")
    rare = v.get(cov, "rare_intents") or []
    topped = [a for a in ("curated", "no_recovery", "unfiltered") if v.get(asm, f"{a}.topped_up") is not None]
    if rare and topped:
        w("Rare intents: seed rows, and the synthetic rows each arm took to reach `rare_intent_min` (of them, rows "
          "generated for the intent by `rare_intent`, `generate.rare_expansion`):\n")
        w(table(["intent", "seed rows"] + [f"`{a}` topped up (targeted)" for a in topped],
                [[f"`{x}`", v.num(cov, f"intents.{x}", "int")]
                 + [f"{_count(v, asm, f'{a}.topped_up.{x}')} ({_count(v, asm, f'{a}.topped_up_targeted.{x}')})"
                    for a in topped] for x in rare]))
        w("")
    arms = sorted(v.get(val, "coverage_gaps") or {})
    if not arms:
        w(f"Gaps closed per dataset: {NOT_RUN}.\n")
        return
    g = "coverage_gaps"
    w(table(["dataset", "synthetic rows", "uncovered passages closed", "still open",
             "passage coverage before → after", "seed clusters reached by synthetic rows"],
            [[f"`{a}`", v.num(val, f"{g}.{a}.synthetic_rows", "int"), v.num(val, f"{g}.{a}.closed", "int"),
              v.num(val, f"{g}.{a}.still_open", "int"),
              f"{v.num(val, f'{g}.{a}.passage_coverage_before', 'pct1')} → "
              f"{v.num(val, f'{g}.{a}.passage_coverage_after', 'pct1')}",
              f"{v.num(val, f'{g}.{a}.clusters_reached_by_synthetic', 'int')} of {v.num(cov, 'clusters', 'int')}"
              if v.get(val, f"{g}.{a}.clusters_reached_by_synthetic") is not None else "–"] for a in arms]))
    w("")


def _verifiable_key(reason: str) -> str:
    return "reasons" if reason.startswith("verifiable_") else "parse_errors"


def verifiable_section(v: Values, ver: str) -> None:
    """Math and code rows checked by execution (verifiable stage): counts, pass rates, reasons per kind."""
    w = v.write
    w("## Verifiable data: math and code checked by running them\n")
    if v.get(ver, "math.calls") is None:
        w(f"Verifiable stage: {NOT_RUN}.\n")
        return
    w(f"From `data/00_seed_verifiable/` ({v.num(ver, 'seed_items.math', 'int')} word problems, "
      f"{v.num(ver, 'seed_items.code', 'int')} Python tasks; every seed item passes its own check) the teacher wrote "
      f"new problems with the expression that computes them, and solutions with an assert of their own. A row is "
      f"kept only when the sandbox (isolation: `{v.num(ver, 'isolation', 'str')}`) agrees: the expression gives the "
      f"stated answer, the function passes its own and the seed's asserts.\n")
    rows = []
    for kind in ("math", "code"):
        reasons = {**(v.get(ver, f"{kind}.parse_errors") or {}), **(v.get(ver, f"{kind}.reasons") or {})}
        rows.append([kind, v.num(ver, f"{kind}.calls", "int"), v.num(ver, f"{kind}.parsed", "int"),
                     v.num(ver, f"{kind}.kept", "int"),
                     v.num(ver, f"{kind}.pass_rate_parsed", "pct1")
                     if v.get(ver, f"{kind}.pass_rate_parsed") is not None else "–",
                     ", ".join(f"`{r}` {v.num(ver, f'{kind}.{_verifiable_key(r)}.{r}', 'int')}"
                               for r in sorted(reasons)) or "none"])
    w(table(["kind", "teacher calls", "parsed", "kept (execution agrees)", "pass rate of parsed", "rejected by"],
            rows))
    w("")


DPO_CATEGORIES = ("factuality", "constraint_following", "safety", "tone", "missing_escalation")


def dpo_section(v: Values, dpo: str) -> None:
    """DPO pairs (dpo stage): teacher rewrites per category, the share that failed their check, the reward margins."""
    w = v.write
    w("## DPO pairs: realistic rejected answers\n")
    if v.get(dpo, "pairs") is None:
        w(f"DPO stage: {NOT_RUN}.\n")
        return
    w(f"The teacher rewrote chosen answers with a category instruction (`params.yaml: dpo.categories`); a rewrite "
      f"became a rejected answer only where it stayed on topic and fluent and failed the check of its category. "
      f"{v.num(dpo, 'pairs', 'int')} pairs: {v.num(dpo, 'pairs_by_source.teacher', 'int')} teacher-written, "
      f"{v.num(dpo, 'pairs_by_source.templated', 'int')} templated rule edits as the fallback "
      f"(`data/05_dpo/pairs.parquet`; every rewrite and why it was not kept: `data/05_dpo/candidates.parquet`). "
      f"Reward head pairwise accuracy (mean margin): on the templated edits it trained on, on every usable rewrite "
      f"before its category check, and on the rewrites kept.\n")
    cats = [c for c in DPO_CATEGORIES if v.get(dpo, f"categories.{c}") is not None]
    r = "reward_margin"

    def margin(kind: str, c: str) -> str:
        if v.get(dpo, f"{r}.{kind}.{c}") is None:
            return "–"
        return (f"{v.num(dpo, f'{r}.{kind}.{c}.accuracy', 'f3')} ({v.num(dpo, f'{r}.{kind}.{c}.mean_margin', 'f3')}, "
                f"n={v.num(dpo, f'{r}.{kind}.{c}.pairs', 'int')})")

    rows = []
    for c in cats:
        k = f"categories.{c}"
        rows.append([f"`{c}`", f"`{v.num(dpo, f'{k}.check', 'str')}`", v.num(dpo, f"{k}.calls", "int"),
                     v.num(dpo, f"{k}.parsed", "int"),
                     v.num(dpo, f"{k}.failed_check_share", "pct1")
                     if v.get(dpo, f"{k}.failed_check_share") is not None else "–",
                     v.num(dpo, f"{k}.pairs.teacher", "int"), v.num(dpo, f"{k}.pairs.templated", "int"),
                     margin("templated", c), margin("teacher_candidates", c), margin("teacher_pairs", c)])
    w(table(["category", "check", "teacher calls", "parsed", "failed their check", "teacher pairs",
             "templated fallback", "reward: templated", "reward: rewrites", "reward: kept rewrites"], rows))
    w("")


def render(v: Values, *, summary_file: str, metrics_dir: str, plots_rel: str,
           preds_files: dict[str, str], preds: dict[str, pa.Table], runs: dict[str, str] | None = None) -> str:
    """Render report.md from loaded metrics (``v.docs``) and the derived summary (``summary_file``).

    ``runs`` maps each model (base, each arm) to the run whose files the per-model sections read
    (``<arm>-s<first seed>``); the first section reads every seed from the summary.
    """
    runs = runs or {m: m for m in MODELS}
    models = ["base"] + [m for m in runs if m != "base"]

    def M(name: str) -> str:  # a metrics file path; eval_<model> / train_<model> name that model's run
        for prefix in ("eval", "train"):
            if name.startswith(prefix + "_") and name[len(prefix) + 1:] in runs:
                return f"{metrics_dir}/{prefix}/{runs[name[len(prefix) + 1:]]}.json"
        return f"{metrics_dir}/{name}.json"

    S = summary_file
    out: list[str] = []
    w = out.append
    w("# refinery experiment report\n")
    w("Human seed QA data is turned into curated synthetic post-training data. LoRA adapters of the same student are "
      "trained on each arm's dataset (`assemble.arms`): A (human rows only), B (AI-contaminated rows), C (human + "
      "curated synthetic rows), and the arms that isolate what curation is worth; each is compared with the "
      "untuned student on the same human test split, as in the experiment brief (`docs/sources.md`). Every number "
      "below is read from a metrics file; a section whose stage did not run says so.\n")
    v.write = w
    seed_questions(v, S, plots_rel, M("gate_injection"))

    w("## Datasets\n")
    rows = []
    for m in models[1:]:
        k = f"datasets.{m}"
        if v.get(S, k) is None:
            rows.append([LABEL.get(m, m)] + [NOT_RUN] * 5)
            continue
        rows.append([LABEL.get(m, m), v.num(S, f"{k}.rows", "int"), v.num(S, f"{k}.avg_question_words", "f3"),
                     v.num(S, f"{k}.avg_answer_words", "f3"), v.num(S, f"{k}.unique_questions", "int"),
                     v.num(S, f"{k}.synthetic_share", "pct1")])
    w(table(["dataset", "rows", "avg question words", "avg answer words", "unique questions", "non-human share"],
            rows))
    if v.get(S, "validation") is None:
        w(f"\nData validation: {NOT_RUN}.")
    else:
        w(f"\nData validation (`refinery validate`, one audit file per arm): decision "
          f"**{v.num(S, 'validation.decision', 'str')}**, {v.num(S, 'validation.failed_checks', 'int')} failed checks "
          f"over {v.num(S, 'validation.arms_validated', 'int')} arms.")
    rd = "review_decisions"
    if v.get(M("assemble"), rd) is not None:
        a = M("assemble")
        w(f"\nHuman review decisions read back (`reviews/decisions.json`): {v.num(a, f'{rd}.decisions', 'int')}; "
          f"kept {v.num(a, f'{rd}.kept', 'int')}, removed from every arm {v.num(a, f'{rd}.removed', 'int')}, "
          f"replaced by the reviewer's answer after every gate passed it {v.num(a, f'{rd}.replaced', 'int')}, "
          f"correction refused by a gate {v.num(a, f'{rd}.replacement_rejected', 'int')}, row not found "
          f"{v.num(a, f'{rd}.not_found', 'int')} (`data/06_datasets/review_decisions.parquet`).")
    split = M("split")
    w(f"\nEvaluation data: the human val split ({v.num(split, 'rows.val', 'int')} rows, LoRA model selection) and "
      f"the human test split ({v.num(split, 'rows.test', 'int')} rows, every score below), disjoint by document "
      f"from train (shared documents: {v.num(split, 'leakage.shared_documents', 'int')}).\n")

    coverage_section(v, M("coverage"), M("validate"), M("assemble"))
    verifiable_section(v, M("verifiable"))
    dpo_section(v, M("dpo"))

    w("## Filter effectiveness\n")
    g = M("gate")
    if v.get(g, "total") is None:
        w(f"Gate stage: {NOT_RUN}.\n")
    else:
        w(f"Generated rows (attempts): **{v.num(g, 'total', 'int')}**; passed every gate: "
          f"**{v.num(g, 'kept', 'int')}**; rejected: **{v.num(g, 'rejected', 'int')}** "
          f"(pass rate {v.num(S, 'gate_pass_rate', 'pct1')}).\n")
        reasons = sorted(k for k in (v.get(g, "reasons_all") or {}))
        w(table(["reason", "rows (first reason)", "rows (any reason)"],
                [[f"`{r}`", v.num(g, f"dropped_{r}", "int") if v.get(g, f"dropped_{r}") is not None else "–",
                  v.num(g, f"reasons_all.{r}", "int")] for r in reasons]))
        strategies = sorted(v.get(g, "per_strategy") or {})
        if strategies:
            w("\nPer generation strategy (faithfulness pass rate: of the parsed rows that gate judged; answer-first "
              "rows take their answer verbatim from a document sentence, and `rules_answer_not_in_source` checks it "
              "stayed so):\n")
            ps = "per_strategy"
            w(table(["strategy", "rows", "parsed", "passed every gate", "pass rate", "faithfulness pass rate",
                     "answer in source"],
                    [[f"`{x}`", v.num(g, f"{ps}.{x}.rows", "int"), v.num(g, f"{ps}.{x}.parsed", "int"),
                      v.num(g, f"{ps}.{x}.kept", "int"), v.num(g, f"{ps}.{x}.kept_share", "pct1"),
                      v.num(g, f"{ps}.{x}.faithfulness_pass_rate", "pct1"),
                      v.num(g, f"{ps}.{x}.contained", "int") if v.get(g, f"{ps}.{x}.contained") is not None
                      else "–"] for x in strategies]))
        w("")

    w("## Gate overlap\n")
    gates = v.get(g, "overlap.gates") or []
    if not gates:
        w(f"Gate overlap: {NOT_RUN}.\n")
    else:
        gi = M("gate_injection")
        w(table(["gate", "rejected", "rejected by this gate only", "planted factual errors caught", "clean rows "
                 "rejected (FRR)"],
                [[f"`{x}`", v.num(g, f"overlap.rejected.{x}", "int"), v.num(g, f"overlap.only.{x}", "int"),
                  v.num(gi, f"cascade_and_gates.gates.{x}.recall_factual", "pct1"),
                  v.num(gi, f"cascade_and_gates.gates.{x}.false_rejection_rate", "pct1")] for x in gates]))
        w(f"\nAll gates together (cascade) catch {v.num(gi, 'cascade_and_gates.cascade.recall_factual', 'pct1')} of "
          f"the planted factual errors at a false-rejection rate of "
          f"{v.num(gi, 'cascade_and_gates.cascade.false_rejection_rate', 'pct1')} on clean rows. Jaccard overlap of "
          f"the rejected sets:\n")
        w(table(["gate"] + [f"`{x}`" for x in gates],
                [[f"`{x}`"] + [v.num(g, f"overlap.jaccard.{x}.{y}", "f3") for y in gates] for x in gates]))
        w(f"\n![gate overlap]({plots_rel}/report_gate_overlap.png)\n")

    w("## Judge audit of the gates\n")
    ja = M("audit_judge")
    if v.get(ja, "overall.rows") is None:
        w(f"Judge audit: {NOT_RUN}.\n")
    else:
        weak = ", the same model as the teacher: a weak audit" if v.get(ja, "same_model_as_teacher") else ""
        w(f"The audit judge (`{v.num(ja, 'judge', 'str')}`{weak}) scored a seeded sample of "
          f"{v.num(ja, 'sampled.accepted', 'int')} accepted and {v.num(ja, 'sampled.rejected', 'int')} rejected "
          f"rows ({v.num(ja, 'unjudgeable', 'int')} without a question or answer to judge) with a strict rubric (`{v.num(ja, 'prompt_template', 'str')}`; it keeps a row at P(yes) ≥ "
          f"{v.num(ja, 'threshold', 'f3')}). It kept {v.num(ja, 'judge_keep_rate.accepted', 'pct1')} of the accepted "
          f"and {v.num(ja, 'judge_keep_rate.rejected', 'pct1')} of the rejected rows (mean P(yes) "
          f"{v.num(ja, 'judge_p_yes_mean.accepted', 'f3')} on accepted, {v.num(ja, 'judge_p_yes_mean.rejected', 'f3')} "
          f"on rejected rows). Agreement with the gates, where both gave a verdict (kappa: Cohen's, chance-corrected; "
          f"AUC: how well P(yes) ranks the rows the gates kept above those they rejected, whatever the threshold; "
          f"a half is chance; – where undefined):\n")
        groups = [("overall", "all gates")] + [(f"families.{f}", f"{f} gates") for f in ("heuristic", "model")] + \
            [(f"gates.{x}", f"`{x}`") for x in sorted(v.get(ja, "gates") or {})]

        def cell(key: str, fmt: str) -> str:
            return v.num(ja, key, fmt) if v.get(ja, key) is not None else "–"

        w(table(["gates", "rows", "both keep", "gates keep, judge rejects", "gates reject, judge keeps", "both reject",
                 "agreement", "kappa", "AUC"],
                [[label, cell(f"{k}.rows", "int")]
                 + [cell(f"{k}.confusion.{c}", "int") for c in ("gates_keep_judge_keep", "gates_keep_judge_reject",
                                                                 "gates_reject_judge_keep",
                                                                 "gates_reject_judge_reject")]
                 + [cell(f"{k}.agreement", "pct1"), cell(f"{k}.kappa", "f3"), cell(f"{k}.auc", "f3")]
                 for k, label in groups]))
        w("\nEach sampled row with both verdicts: `data/04_audit/judge_audit.parquet`; the review page marks the rows "
          "where the judge disagrees with the gates.\n")

    gi = M("gate_injection")
    cg = "cascade_and_gates"
    if v.get(gi, f"{cg}.cascade.families") is not None:
        w("## Gates on error kinds they never trained on\n")
        w(f"The verifier and the reward head train on corruptions of the seen families only; the planted errors of "
          f"the unseen ones ({', '.join(v.get(gi, f'{cg}.unseen_kinds') or []) or 'none'}) measure whether a gate "
          f"learned faithfulness or the corruption generator. Clean controls and planted rows come from "
          f"`val_control`, disjoint from the `val_calibration` rows every threshold is fitted on. Recall with its 95% "
          f"Wilson interval:\n")

        def fam(where: str, which: str) -> str:
            k = f"{cg}.{where}.families.{which}"
            if not v.get(gi, f"{k}.planted"):
                return "–"
            return (f"{v.num(gi, f'{k}.recall', 'f3')} [{v.num(gi, f'{k}.ci95.low', 'f3')}, "
                    f"{v.num(gi, f'{k}.ci95.high', 'f3')}] of {v.num(gi, f'{k}.planted', 'int')}")

        w(table(["gate", "seen families", "unseen families"],
                [[f"`{x}`", fam(f"gates.{x}", "seen"), fam(f"gates.{x}", "unseen")] for x in ("faithfulness", "reward")]
                + [["all gates", fam("cascade", "seen"), fam("cascade", "unseen")]]))
        w("")
    fm = "faithfulness_modes.by_judge"
    if v.get(gi, fm):
        w("## Does provenance help?\n")
        w("Recall on the planted factual errors at an equal false-rejection rate on the clean controls, when the judge "
          "sees the exact source passage (grounded), a passage retrieved after the fact (retrieved), or none "
          "(ungrounded); differences with a paired bootstrap interval over the planted rows:\n")
        rows_ = []
        for j in v.get(gi, fm):
            cells = [f"{v.num(gi, f'{fm}.{j}.modes.{m}.recall_factual', 'f3')} "
                     f"[{v.num(gi, f'{fm}.{j}.modes.{m}.recall_ci95.low', 'f3')}, "
                     f"{v.num(gi, f'{fm}.{j}.modes.{m}.recall_ci95.high', 'f3')}]" for m in ("grounded", "retrieved",
                                                                                         "ungrounded")]
            for other in ("retrieved", "ungrounded"):
                d = f"{fm}.{j}.differences.grounded_minus_{other}"
                cells.append(f"{v.num(gi, f'{d}.mean', 'f3')} [{v.num(gi, f'{d}.low', 'f3')}, "
                             f"{v.num(gi, f'{d}.high', 'f3')}]: {verdict(v.get(gi, d))}")
            rows_.append([f"`{j}`"] + cells)
        w(table(["judge", "grounded", "retrieved", "ungrounded", "grounded - retrieved", "grounded - ungrounded"],
                rows_))
        w("")

    w("## Recovery: adaptive vs naive\n")
    rc = M("recover")
    modes = recovery_modes(v.docs.get(rc))
    if not modes:
        w(f"Recovery stage: {NOT_RUN} (no `{rc}` with `adaptive` and `naive` results).\n")
    else:
        cols = ("attempted", "recovered", "recovery_rate")
        w(table(["failure mode"] + [f"{arm} {c.replace('_', ' ')}" for arm in ("adaptive", "naive") for c in cols],
                [[f"`{mode}`"] + [v.num(rc, f"{key}.{c}", "f3" if c == "recovery_rate" else "int")
                                  if v.get(rc, f"{key}.{c}") is not None else "–"
                                  for key in (a, b) for c in cols] for mode, a, b in modes]))
        w(f"\nAt equal budget ({v.num(rc, 'budget', 'int')} teacher calls each), adaptive recovery recovered "
          f"{v.num(rc, 'adaptive.overall.recovered', 'int')} rows and naive resampling "
          f"{v.num(rc, 'naive.overall.recovered', 'int')}.\n")
        w(f"![recovery]({plots_rel}/report_recovery.png)\n")

    w("## Main results (human test split)\n")
    rows = []
    for m in models:
        e = M(f"eval_{m}")
        if v.get(e, "f1") is None:
            rows.append([LABEL.get(m, m)] + [NOT_RUN] * (len(METRICS) + 1))
            continue
        t = M(f"train_{m}")
        rows.append([LABEL.get(m, m)] + [v.num(e, k, "f3") for k, _ in METRICS]
                    + [v.num(t, "val_loss_best", "f3") if m != "base" else "–"])
    w("One training seed per arm (the first of `train.seeds`); the first section averages every seed.\n")
    w(table(["model"] + [h for _, h in METRICS] + ["best val loss"], rows))
    w(f"\nFactual accuracy counts test items whose reference facts (numbers, names) all appear in their passage "
      f"({v.num(M('eval_human'), 'factual_items', 'int')} items); a prediction is right when it states them all and "
      f"invents no number. BERTScore uses `{v.num(M('eval_human'), 'bertscore.model', 'str')}` (layer "
      f"{v.num(M('eval_human'), 'bertscore.num_layers', 'int')}, no baseline rescaling).\n")
    w(f"![F1]({plots_rel}/report_f1.png)\n\n![all metrics]({plots_rel}/report_metrics.png)\n")

    w("## Gap analysis\n")
    if v.get(S, "gap.metrics") is None:
        w(f"Gap analysis: {NOT_RUN} (needs the evaluations of A, B and C).\n")
    else:
        lost, share = v.get(S, "gap.metrics.f1.lost"), v.get(S, "gap.metrics.f1.recovered_share")
        if lost is not None and lost > 0 and share is not None:
            w(f"**C recovers {v.num(S, 'gap.metrics.f1.recovered_share', 'pct1')} of the F1 lost by contamination** "
              f"(A − B = {v.num(S, 'gap.metrics.f1.lost', 'f3')}, C − B = "
              f"{v.num(S, 'gap.metrics.f1.recovered', 'f3')}); a negative share means C scored below B.\n")
        else:
            w(f"Contamination cost no F1 on this test split (A − B = {v.num(S, 'gap.metrics.f1.lost', 'f3')}), so "
              f"there was nothing to recover; C − B = {v.num(S, 'gap.metrics.f1.recovered', 'f3')}.\n")
        w(table(["metric", "lost by contamination (A − B)", "won back (C − B)", "share recovered"],
                [[h, v.num(S, f"gap.metrics.{k}.lost", "f3"), v.num(S, f"gap.metrics.{k}.recovered", "f3"),
                  v.num(S, f"gap.metrics.{k}.recovered_share", "pct1")
                  if v.get(S, f"gap.metrics.{k}.recovered_share") is not None else "undefined (A ≤ B)"]
                 for k, h in METRICS if v.get(S, f"gap.metrics.{k}") is not None]))
        w(f"\n![gap]({plots_rel}/report_gap.png)\n")

    w("## Sample predictions\n")
    titles = {"all_right": "All three adapters right", "b_wrong_c_right": "B wrong, C right",
              "all_wrong": "All three wrong"}
    if not v.get(S, "samples"):
        w(f"Sample predictions: {NOT_RUN} (needs the evaluations of A, B and C).\n")
    for case, title in titles.items():
        if not v.get(S, "samples"):
            break
        rid = v.get(S, f"samples.{case}")
        w(f"**{title}**" + (f" (a prediction is right at token F1 ≥ {v.num(S, 'right_f1', 'f3')})"
                            if case == "all_right" else "") + "\n")
        if rid is None or "human" not in preds:
            w("No test item in this case.\n")
            continue
        ref = preds["human"].filter(pc.equal(preds["human"].column("row_id"), rid)).to_pylist()[0]
        f = preds_files["human"]
        w(f"- Question: {v.quote(f, rid, 'question', ref['question'])}")
        w(f"- Reference: {v.quote(f, rid, 'reference', ref['reference'])}")
        for m in MODELS:
            if m not in preds:
                continue
            row = preds[m].filter(pc.equal(preds[m].column("row_id"), rid)).to_pylist()[0]
            w(f"- {LABEL[m]}: {v.quote(preds_files[m], rid, 'prediction', row['prediction']) or '(empty)'}")
        w("")

    w("## Hypotheses\n")
    hyp = [("H1", "Training on AI-contaminated data (B) lowers F1 against training on human data (A).",
            "verdicts.h1"),
           ("H2", "The curated set (C) beats the contaminated set (B) on F1.", "verdicts.h2"),
           ("H3", "Fine-tuning on human data (A) beats the untuned student on F1.", "verdicts.h3"),
           ("H4", "The gate cascade catches planted factual errors at least as often as required.", "verdicts.h4"),
           ("H5", "Adaptive recovery recovers more rejected rows than naive resampling at equal budget.",
            "verdicts.h5")]
    rows = []
    for h, text, key in hyp:
        diff_key = {"H1": "gap.f1_diff.human_minus_contaminated", "H2": "gap.f1_diff.curated_minus_contaminated",
                    "H3": "gap.f1_diff.human_minus_base"}.get(h)
        if diff_key and v.get(S, f"{diff_key}.mean") is not None:
            ev = (f"Δ F1 {v.num(S, f'{diff_key}.mean', 'f3')}, {v.num(S, 'ci', 'pct1')} CI "
                  f"[{v.num(S, f'{diff_key}.low', 'f3')}, {v.num(S, f'{diff_key}.high', 'f3')}]")
        elif h == "H5" and v.get(M("recover"), "naive.overall.recovery_rate") is not None:
            ev = (f"recovered {v.num(M('recover'), 'adaptive.overall.recovered', 'int')} adaptive vs "
                  f"{v.num(M('recover'), 'naive.overall.recovered', 'int')} naive (recovery rate "
                  f"{v.num(M('recover'), 'adaptive.overall.recovery_rate', 'f3')} vs "
                  f"{v.num(M('recover'), 'naive.overall.recovery_rate', 'f3')}; one-sided exact binomial p "
                  f"{v.num(S, 'h5_p', 'f3')})")
        elif h == "H4" and v.get(S, "h4_recall") is not None:
            ev = (f"recall {v.num(S, 'h4_recall', 'pct1')} vs required {v.num(S, 'min_factual_recall', 'pct1')}")
        else:
            ev = NOT_RUN
        rows.append([h, text, ev, v.num(S, key, "str") if v.get(S, key) else NOT_RUN])
    w(table(["", "hypothesis", "evidence", "verdict"], rows))
    w("")

    w("## Limitations\n")
    w(f"- The test split has {v.num(split, 'rows.test', 'int')} rows: intervals are wide, and a verdict of "
      f"\"not supported\" often means \"not measurable at this size\".")
    w(f"- Each adapter trained for {v.num(M('train_human'), 'steps', 'int')} optimizer steps on a "
      f"{v.num(M('train_human'), 'architecture', 'str')} student (effective batch "
      f"{v.num(M('train_human'), 'effective_batch', 'int')}), a CPU budget; longer runs may change the ranking.")
    w("- Factual accuracy is lexical: paraphrased facts count as missing, so it under-credits fluent answers.")
    w("- BERTScore uses a small sentence encoder without baseline rescaling: compare models with each other, not "
      "with published BERTScore values.")
    w("- The contaminated set comes from the same small teacher as the synthetic rows, so B and C share its "
      "failure modes.\n")

    w("## Reproducibility\n")
    env = "environment"
    w("```")
    w(f"git commit:      {v.num(S, f'{env}.git_commit', 'str') if v.get(S, f'{env}.git_commit') else NOT_RUN}")
    w(f"student:         {v.num(S, f'{env}.student', 'str') if v.get(S, f'{env}.student') else NOT_RUN}")
    for d in ("python", "torch", "transformers", "peft"):
        w(f"{d + ':':<16} {v.num(S, f'{env}.versions.{d}', 'str') if v.get(S, f'{env}.versions.{d}') else NOT_RUN}")
    w(f"train seed:      {v.num(S, f'{env}.seeds.train', 'int')}")
    w(f"train config:    {v.num(S, f'{env}.config_hash', 'str') if v.get(S, f'{env}.config_hash') else NOT_RUN}")
    w(f"hardware:        {v.num(S, f'{env}.hardware', 'str') if v.get(S, f'{env}.hardware') else NOT_RUN}")
    w("reproduce:       dvc repro   (or: make repro PROFILE=<name>; then dvc metrics show)")
    w("```")
    return "\n".join(out) + "\n"


def check_report(markdown: str, trace: dict[str, Any], read: Callable[[str], Any],
                 read_table: Callable[[str], pa.Table]) -> list[str]:
    """Return every problem that makes a report untrustworthy (empty list: none).

    Problems: a placeholder (``[FILL]``, ``X.XXX``, ``TODO``, ``{...}``) remains; a number in the text is
    neither traced nor part of the fixed prose; a traced number no longer matches its file; a quoted text
    does not match its table cell (skipped where ``read_table`` returns None: that table is not present).
    """
    problems: list[str] = []
    text = markdown
    for q in trace["quotes"]:
        table = read_table(q["file"])  # None: the table is not here (a DVC output not pulled): quote not checked
        cell = None if table is None else \
            [r[q["column"]] for r in table.select(["row_id", q["column"]]).to_pylist() if r["row_id"] == q["row_id"]]
        if cell is not None and cell != [q["text"]]:
            problems.append(f"quote from {q['file']} row {q['row_id']} {q['column']} does not match")
        text = text.replace(q["text"].replace("\n", " ").replace("|", "\\|"), " ")
    problems += [f"placeholder {m.group(0)!r}" for m in PLACEHOLDER.finditer(text)]
    traced = set()
    cache: dict[str, Any] = {}
    for t in trace["numbers"]:
        if t["file"] not in cache:
            cache[t["file"]] = read(t["file"])
        value = lookup(cache[t["file"]], t["key"])
        if value is None or fmt_value(value, t["fmt"]) != t["text"]:
            problems.append(f"{t['file']}:{t['key']} is {value!r}, the report says {t['text']!r}")
        traced.update(NUMBER.findall(t["text"]))
    for n in NUMBER.findall(text):
        if n not in traced and n not in STATIC_NUMBERS:
            problems.append(f"number {n} is not traced to a metrics file")
    return problems
