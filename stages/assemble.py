"""Assemble the experiment's datasets, one per arm, each a recipe over row sources declared in params.yaml.

An arm (``assemble.arms``) names the row sources it draws from: every human train row (the anchor; generation brief
"accumulate, never replace"), and synthetic sources: ``accepted`` (rows every gate kept), ``recovered`` (rows the
recover stage rescued), ``generated`` (every parsed generated row before any gate) and ``contaminated`` (the
AI-rewritten human rows). Governance brief ("cap synthetic influence"): an arm's synthetic rows can be capped at a share
of the dataset, rare intents and document categories are topped up from synthetic rows first (never beyond the cap), and
per-row sampling weights keep the synthetic share of the total weight under its own bound. An arm can also take exactly
as many synthetic rows as another arm holds (``synthetic_rows_of``), so two arms differ only in where their synthetic
rows come from.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from refinery.training.arms import ArmRecipe, check_arms
from refinery.core.errors import InputError
from refinery.inspect.decisions import Decision, read_decisions
from refinery.gates.dedup import DedupParams
from refinery.core.params import StageParams, load_section
from schemas import datasets as datasets_schema
from schemas.provenance import PROVENANCE_NAMES

ROW_COLUMNS = PROVENANCE_NAMES + ("question", "answer", "intent", "evidence")  # read from every input, by name


class WeightParams(StageParams):
    """Sampling weight of a row by its source (relative; the trainer normalises)."""

    human: float = Field(gt=0)
    accepted: float = Field(gt=0)
    recovered: float = Field(gt=0)
    generated: float = Field(default=0.5, gt=0)
    contaminated: float = Field(gt=0)


class CardParams(StageParams):
    """The Hugging Face dataset card written beside the datasets (README.md)."""

    license: str = "other"  # a Hugging Face license id (the seed's licence decides it)
    pretty_name: str = "refinery curated QA"
    language: list[str] = Field(default_factory=lambda: ["en"])
    description: str = "Synthetic QA rows generated from a human seed, gated, recovered and assembled per arm."


class AssembleParams(StageParams):
    """Knobs of the assemble stage."""

    seed: int  # order in which synthetic rows are drawn under the cap
    weights: WeightParams
    dedup: DedupParams  # exact + MinHash removal of synthetic rows duplicating the human anchor or each other
    arms: dict[str, ArmRecipe]  # arm name -> recipe; data/06_datasets/<arm>.parquet each
    card: CardParams = Field(default_factory=CardParams)

    @model_validator(mode="after")
    def _check_arms(self) -> AssembleParams:
        check_arms(self.arms)
        return self


@dataclass(frozen=True)
class AssembleResult:
    """The three datasets, their SFT chat records, the DPO records and the counts metrics."""

    tables: dict[str, pa.Table]
    sft: Mapping[str, list[dict[str, Any]]]  # per arm, built when read (:class:`SftRecords`)
    dpo: list[dict[str, Any]]
    metrics: dict[str, Any]
    decisions: pa.Table | None = None  # one row per review decision and what it did (None: no decisions file)


Regate = Callable[[pa.Table], tuple[list[bool], list[list[str]]]]  # synthetic rows -> (kept, reasons) per row

DECISIONS_ARROW = pa.schema([
    pa.field("reviewed_row_id", pa.string(), nullable=False),  # the row the reviewer judged
    pa.field("verdict", pa.string(), nullable=False),  # accept | reject | fix
    pa.field("action", pa.string(), nullable=False),  # kept | removed | replaced | replacement_rejected | not_found
    pa.field("replacement_row_id", pa.string(), nullable=True),  # the corrected row (fix)
    pa.field("sources", pa.list_(pa.string()), nullable=False),  # the sources the reviewed row was found in
    pa.field("gate_reasons", pa.list_(pa.string()), nullable=False),  # why the gates refused the corrected row
    pa.field("record", pa.string(), nullable=False),  # decisions file and record number
])


def corrected_row_id(row_id: str, answer: str) -> str:
    """Content-derived id of a reviewer's corrected row (``rev_`` + 16 hex of the original id and the answer)."""
    import hashlib

    return "rev_" + hashlib.sha256(f"{row_id}\0{answer}".encode()).hexdigest()[:16]


def _replace(table: pa.Table, values: dict[str, Any]) -> pa.Table:
    for name, value in values.items():
        i = table.schema.get_field_index(name)
        if i >= 0:
            table = table.set_column(i, table.schema.field(name), pa.array([value] * table.num_rows,
                                                                           table.schema.field(name).type))
    return table


def apply_decisions(raw: Mapping[str, pa.Table], sources: dict[str, pa.Table], decisions: Sequence[Decision],
                    regate: Regate | None) -> tuple[dict[str, pa.Table], pa.Table, dict[str, Any]]:
    """Apply human review decisions to the synthetic sources before any arm draws from them.

    ``reject`` removes the row from every source; ``fix`` removes it and adds a corrected row (the reviewer's answer,
    ``rev_`` id, ``parent_ids`` = the reviewed row, ``recovery_action`` ``human_review``) to each source it was in,
    once every gate has judged the corrected row (a corrected answer is a new answer); a corrected row the gates
    refuse is left out with its reasons. ``accept`` changes nothing. Every decision is a row of the returned table.

    Args:
        raw: the parsed source tables as read (synthetic contract columns), by source name.
        sources: the same rows in the datasets shape (:func:`rows_of`), by source name.
        decisions: what reviewers decided (:func:`refinery.inspect.decisions.read_decisions`).
        regate: judges synthetic-contract rows with every gate; needed when some decision is ``fix``.

    Returns:
        (the sources with decisions applied, the decisions table, counts for the metrics).
    """
    from schemas import synthetic as synthetic_schema

    where: dict[str, list[str]] = {}
    for name, table in sources.items():
        for rid in set(table.column("row_id").to_pylist()) & {d.row_id for d in decisions}:
            where.setdefault(rid, []).append(name)
    fixes = [d for d in decisions if d.verdict == "fix" and d.row_id in where]
    corrected: dict[str, tuple[str, pa.Table]] = {}  # reviewed id -> (corrected id, synthetic-contract row)
    for d in fixes:
        table = raw[where[d.row_id][0]]
        row = table.filter(pc.equal(table.column("row_id"), d.row_id)).slice(0, 1)
        new_id = corrected_row_id(d.row_id, d.corrected_answer or "")
        row = _replace(row.select(list(synthetic_schema.ARROW.names)).cast(synthetic_schema.ARROW),
                       {"row_id": new_id, "answer": d.corrected_answer, "parent_ids": [d.row_id],
                        "recovery_action": "human_review"})
        corrected[d.row_id] = (new_id, row)
    verdicts: dict[str, tuple[bool, list[str]]] = {}
    if corrected:
        if regate is None:
            raise InputError("review decisions", "a 'fix' decision needs the gates to judge the corrected answer "
                                                 "(pass --thresholds, --models, --verifier and --reward)")
        rows = pa.concat_tables([t for _, t in corrected.values()])
        kept, reasons = regate(rows)
        verdicts = {rid: (bool(k), list(r)) for rid, k, r in zip(rows.column("row_id").to_pylist(), kept, reasons)}
    removed = {d.row_id for d in decisions if d.verdict in ("reject", "fix")}
    out: dict[str, pa.Table] = {}
    for name, table in sources.items():
        keep = pc.invert(pc.is_in(table.column("row_id"), value_set=pa.array(sorted(removed), pa.string())))
        parts = [table.filter(keep)]
        for d in fixes:
            new_id, _ = corrected[d.row_id]
            if name in where[d.row_id] and verdicts[new_id][0]:
                original = table.filter(pc.equal(table.column("row_id"), d.row_id)).slice(0, 1)
                parts.append(_replace(original, {"row_id": new_id, "answer": d.corrected_answer,
                                                 "parent_ids": [d.row_id], "recovery_action": "human_review"}))
        out[name] = pa.concat_tables(parts)
    log = []
    for d in decisions:
        new_id, reasons = None, []
        if d.row_id not in where:
            action = "not_found"
        elif d.verdict == "accept":
            action = "kept"
        elif d.verdict == "reject":
            action = "removed"
        else:
            new_id = corrected[d.row_id][0]
            ok, reasons = verdicts[new_id]
            action = "replaced" if ok else "replacement_rejected"
        log.append({"reviewed_row_id": d.row_id, "verdict": d.verdict, "action": action,
                    "replacement_row_id": new_id, "sources": where.get(d.row_id, []), "gate_reasons": reasons,
                    "record": d.where})
    table = pa.Table.from_pylist(log, DECISIONS_ARROW)
    counts = Counter(r["action"] for r in log)
    return out, table, {"decisions": len(log), **{a: counts.get(a, 0) for a in
                                                  ("kept", "removed", "replaced", "replacement_rejected",
                                                   "not_found")}}


def rows_of(table: pa.Table, source: str, weight: float, where: str) -> pa.Table:
    """Select the dataset columns of an input table by name, adding ``weight`` and ``source``.

    Raises:
        InputError: a needed column is missing.
    """
    missing = [c for c in ROW_COLUMNS if c not in table.column_names]
    if missing:
        raise InputError(where, f"missing column(s) {', '.join(missing)} (needed by assemble)", field=missing[0])
    out = table.select(list(ROW_COLUMNS))
    out = out.append_column("weight", pa.array(np.full(out.num_rows, weight), pa.float64()))
    out = out.append_column("source", pa.array([source] * out.num_rows, pa.string()))
    return out.cast(datasets_schema.ARROW)


def _parsed(table: pa.Table) -> pa.Table:
    """Rows whose question and answer are both present and non-blank."""
    if table.num_rows == 0:
        return table
    ok = pc.and_(pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(table.column("question"))), 0), False),
                 pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(table.column("answer"))), 0), False))
    return table.filter(ok)


TARGETED_STRATEGIES = ("rare_intent",)  # strategies that write rows of a chosen rare class


def _top_up(labels: list, human_labels: list, target: int, order: np.ndarray, taken: np.ndarray,
            chosen: list[int], cap: int) -> tuple[dict[str, int], dict[str, int]]:
    """Add pool rows of each label with fewer than ``target`` rows (rarest first) until it reaches ``target``.

    Returns:
        (rows added per label, rows still missing per label).
    """
    have = Counter({x: 0 for x in labels if x is not None})  # a class only synthetic rows cover counts 0
    have.update(x for x in human_labels if x is not None)
    have.update(labels[i] for i in chosen if labels[i] is not None)
    rare = sorted((c, x) for x, c in have.items() if c < target)
    added: dict[str, int] = {}
    for count, label in rare:  # rarest first: when the cap binds, the scarcest class is served first
        need = target - count
        for i in order:
            if need <= 0 or len(chosen) >= cap:
                break
            if not taken[i] and labels[i] == label:
                chosen.append(int(i))
                taken[i] = True
                need -= 1
                added[label] = added.get(label, 0) + 1
    short = {x: target - c - added.get(x, 0) for c, x in rare if c + added.get(x, 0) < target}
    return dict(sorted(added.items())), dict(sorted(short.items()))


def synthetic_cap(arm: ArmRecipe, human_rows: int, pool_rows: int, rows_of: int | None = None) -> int:
    """Synthetic rows the arm may take: the share cap against its human rows, the pool, and ``synthetic_rows_of``."""
    cap = pool_rows
    if arm.max_synthetic_share is not None:
        share = arm.max_synthetic_share
        cap = min(cap, int(np.floor(share / (1 - share) * human_rows + 1e-9)))
    if rows_of is not None:
        cap = min(cap, rows_of)
    return cap


def select_synthetic(pool: pa.Table, human: pa.Table, arm: ArmRecipe, seed: int, cap: int,
                     categories: dict[str, str] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Choose which synthetic rows join the human anchor: rare intents, then rare categories, then the rest.

    Governance brief, scenario 2: classes the human rows cover thinly are topped up from synthetic rows first, never
    beyond the cap; the remaining room is filled in a seeded random order.

    Args:
        pool: deduplicated synthetic rows (dataset columns).
        human: the arm's human rows (the rare-class counts start from them; empty for a synthetic-only arm).
        arm: the rare-class targets.
        seed: the draw order.
        cap: synthetic rows to take at most.
        categories: doc_id -> document category (None: no category top-up).

    Returns:
        (indices into ``pool`` in selection order, counts: cap, topped-up rows per class, rows left out).
    """
    order = np.random.default_rng(seed).permutation(pool.num_rows)
    taken = np.zeros(pool.num_rows, bool)
    chosen: list[int] = []
    # rows generated for a rare intent on purpose (generate.rare_expansion) top it up before rows that only inherited
    # the intent from their seed row
    targeted = np.asarray([s in TARGETED_STRATEGIES for s in pool.column("strategy").to_pylist()], bool) \
        if "strategy" in pool.column_names else np.zeros(pool.num_rows, bool)
    intent_order = np.concatenate([order[targeted[order]], order[~targeted[order]]])
    topped, short = _top_up(pool.column("intent").to_pylist(), human.column("intent").to_pylist(),
                            arm.rare_intent_min, intent_order, taken, chosen, cap)
    targeted_topped = dict(sorted(Counter(pool.column("intent")[i].as_py() for i in chosen if targeted[i]).items()))
    cat_topped, cat_short = {}, {}
    if categories is not None:
        cat = lambda t: [categories.get(d) for d in t.column("doc_id").to_pylist()]  # noqa: E731
        cat_topped, cat_short = _top_up(cat(pool), cat(human), arm.rare_category_min, order, taken, chosen, cap)
    for i in order:
        if len(chosen) >= cap:
            break
        if not taken[i]:
            chosen.append(int(i))
            taken[i] = True
    return np.asarray(chosen, np.int64), {"cap": cap, "topped_up": topped, "topped_up_targeted": targeted_topped,
                                          "rare_intents_short": short,
                                          "topped_up_categories": cat_topped, "rare_categories_short": cat_short,
                                          "dropped_cap": int(pool.num_rows - len(chosen))}


def cap_weights(table: pa.Table, max_share: float) -> tuple[pa.Table, float]:
    """Scale synthetic rows' weights down so their share of the total weight is at most ``max_share``.

    Returns:
        (the table with adjusted ``weight``, the scale factor applied to synthetic rows; 1.0 when none was needed).
    """
    w = table.column("weight").to_numpy().copy()
    syn = np.asarray(pc.not_equal(table.column("source"), "human").to_numpy(zero_copy_only=False), bool)
    w_h, w_s = w[~syn].sum(), w[syn].sum()
    if w_s == 0 or w_s / (w_h + w_s) <= max_share:
        return table, 1.0
    factor = max_share * w_h / ((1 - max_share) * w_s)
    w[syn] *= factor
    i = table.schema.get_field_index("weight")
    return table.set_column(i, table.schema.field("weight"), pa.array(w, pa.float64())), float(factor)


def iter_sft_records(table: pa.Table, passages: dict[str, str], window_chars: int, where: str,
                     batch_rows: int = 4096) -> Iterator[dict]:
    """Yield one chat record per row: ``{"messages": [...], "weight": w, "row_id": id}`` (refinery.training.sft shape).

    The messages are built by the same function training and evaluation use (:func:`refinery.training.lora.messages_for`,
    the passage cut to ``train.window_chars`` around the row's evidence), so an exported row is what the adapter
    was trained on. Rows become Python objects ``batch_rows`` at a time, so a caller that writes each record as it
    comes holds one batch, not the table's records.
    """
    from refinery.training.lora import messages_for

    cols = ["row_id", "doc_id", "question", "answer", "weight", "evidence", "evidence_start", "evidence_end"]
    i = 0
    for batch in table.select(cols).to_batches(max_chunksize=batch_rows):
        for row in batch.to_pylist():
            i += 1
            if row["doc_id"] not in passages:
                raise InputError(where, f"document {row['doc_id']!r} not in the documents table", row=i,
                                 field="doc_id")
            yield {"messages": messages_for(row, passages, window_chars, with_answer=True), "weight": row["weight"],
                   "row_id": row["row_id"]}


def sft_records(table: pa.Table, passages: dict[str, str], window_chars: int, where: str) -> list[dict]:
    """Every row's chat record (:func:`iter_sft_records`), as a list."""
    return list(iter_sft_records(table, passages, window_chars, where))


class SftRecords(Mapping):
    """Each arm's SFT chat records (:func:`sft_records`), built when an arm is read and not kept.

    The stage writes one arm's export at a time, so it holds one arm's records, not every arm's (at 100,000
    generated rows, the records of all arms are a few times the size of the tables they come from).

    Args:
        tables: the arms' datasets.
        passages: doc_id -> document text; every row's document is in it (checked by :func:`check_documents`).
        window_chars: the passage window (``train.window_chars``).
    """

    def __init__(self, tables: Mapping[str, pa.Table], passages: dict[str, str], window_chars: int):
        self._tables, self._passages, self._window = tables, passages, window_chars

    def __getitem__(self, arm: str) -> list[dict[str, Any]]:
        return sft_records(self._tables[arm], self._passages, self._window, f"{arm} dataset")

    def lines(self, arm: str) -> Iterator[str]:
        """The arm's records as JSON lines, built one batch of rows at a time (what the stage writes)."""
        return jsonl_lines(iter_sft_records(self._tables[arm], self._passages, self._window, f"{arm} dataset"))

    def __iter__(self) -> Iterator[str]:
        return iter(self._tables)

    def __len__(self) -> int:
        return len(self._tables)


def check_documents(tables: Mapping[str, pa.Table], passages: dict[str, str]) -> None:
    """Fail as :func:`sft_records` would, before anything is written: the first row whose document is unknown.

    Raises:
        InputError: naming the arm's dataset, the row and ``doc_id``.
    """
    known = pa.array(list(passages), pa.string())
    for arm, table in tables.items():
        found = pc.is_in(table.column("doc_id"), value_set=known).to_numpy(zero_copy_only=False)
        if not found.all():
            i = int(np.flatnonzero(~found)[0])
            raise InputError(f"{arm} dataset", f"document {table.column('doc_id')[i].as_py()!r} not in the documents "
                                               f"table", row=i + 1, field="doc_id")


def dpo_records(pairs: pa.Table, passages: dict[str, str], window_chars: int, parents: pa.Table) -> list[dict]:
    """Return DPO records in the conversational preference shape (TRL): prompt messages, chosen, rejected.

    The prompt is built as training builds it (:func:`refinery.training.lora.messages_for`): the passage window
    around the evidence of the pair's parent row (``parent_id`` in ``parents``: seed or accepted rows), else the
    document's head.
    """
    from refinery.training.lora import messages_for

    spans = {r["row_id"]: r for r in parents.select(["row_id", "evidence", "evidence_start", "evidence_end"])
             .to_pylist()}
    out = []
    for i, p in enumerate(pairs.to_pylist()):
        if p["doc_id"] not in passages:
            raise InputError("preference pairs", f"document {p['doc_id']!r} not in the documents table", row=i + 1,
                             field="doc_id")
        parent = spans.get(p["parent_id"], {})
        row = {"row_id": p["pair_id"], "doc_id": p["doc_id"], "question": p["prompt"], "answer": None,
               **{k: parent.get(k) for k in ("evidence", "evidence_start", "evidence_end")}}
        out.append({"prompt": messages_for(row, passages, window_chars, with_answer=False),
                    "chosen": [{"role": "assistant", "content": p["chosen"].strip()}],
                    "rejected": [{"role": "assistant", "content": p["rejected"].strip()}],
                    "category": p["category"], "category_source": p["category_source"], "pair_id": p["pair_id"]})
    return out


def assemble(train: pa.Table, contaminated: pa.Table, accepted: pa.Table, recovered: pa.Table | None,
             documents: pa.Table, pairs: pa.Table, params: AssembleParams,
             generated: pa.Table | None = None, window_chars: int = 0, decisions: Sequence[Decision] | None = None,
             regate: Regate | None = None) -> AssembleResult:
    """Build every arm's dataset and its trainer exports.

    Args:
        train: the human train split (the non-shrinking anchor).
        contaminated: the AI-contaminated comparison rows (same grain as train).
        accepted: synthetic rows every gate kept.
        recovered: rows the recover stage rescued (gated columns + recovery columns), or None (none recovered).
        documents: source passages for the SFT export.
        pairs: DPO preference pairs from train_reward.
        params: the arms' recipes, weights, dedup bounds.
        generated: every generated row before any gate (synthetic contract), or None.
        window_chars: the passage window of the SFT export (``train.window_chars``: what training sees).
        decisions: human review decisions to apply (:func:`apply_decisions`); None: no decisions file.
        regate: judges reviewer-corrected rows with every gate (needed when a decision is ``fix``).

    Returns:
        Tables of the datasets contract (one per arm, in params order), SFT and DPO records, counts metrics.
        Inputs are not modified.

    Raises:
        InputError: an arm draws from a source that was not given.
    """
    from refinery.gates.dedup import DedupGate

    w = params.weights
    human = rows_of(train, "human", w.human, "train split")
    if recovered is None:  # the recover stage did not run: no row was recovered
        recovered = accepted.slice(0, 0)
    inputs = {"accepted": (accepted, "accepted rows"), "recovered": (recovered, "recovered rows"),
              "generated": (generated, "generated rows"), "contaminated": (contaminated, "contaminated set")}
    sources: dict[str, pa.Table] = {}
    raw: dict[str, pa.Table] = {}
    unparsed: dict[str, int] = {}
    for name, (table, where) in inputs.items():
        if table is None:
            continue
        raw[name] = _parsed(table)
        sources[name] = rows_of(raw[name], name, getattr(w, name), where)
        unparsed[name] = table.num_rows - raw[name].num_rows
    decision_table, review = None, None
    if decisions is not None:
        sources, decision_table, review = apply_decisions(raw, sources, decisions, regate)
    passages = dict(zip(documents.column("doc_id").to_pylist(), documents.column("text").to_pylist()))
    categories = dict(zip(documents.column("doc_id").to_pylist(), documents.column("category").to_pylist()))
    tables: dict[str, pa.Table] = {}
    metrics: dict[str, Any] = {}
    synthetic_rows: dict[str, int] = {}
    dedup: DedupGate | None = None  # one gate for every arm: it keeps the signatures it computed (in memory)
    for arm_name, arm in params.arms.items():
        missing = [x for x in arm.sources if x not in sources]
        if missing:
            raise InputError(f"assemble.arms.{arm_name}", f"draws from {', '.join(missing)}, which was not given "
                                                          f"(pass --{missing[0]})")
        pool = pa.concat_tables([sources[x] for x in arm.sources]) if arm.sources else datasets_schema.ARROW.empty_table()
        # one row per row_id (a recovered row keeps the id of no accepted row, but guard anyway), first source first
        seen: set[str] = set()
        first = [i for i, r in enumerate(pool.column("row_id").to_pylist()) if not (r in seen or seen.add(r))]
        dropped_same_id = pool.num_rows - len(first)
        pool = pool.take(pa.array(first, pa.int64()))
        dropped_dup: Counter = Counter()
        if arm.dedup and pool.num_rows:
            if dedup is None:
                dedup = DedupGate(human, max_jaccard=params.dedup.max_jaccard, num_perm=params.dedup.num_perm,
                                  shingle=params.dedup.shingle)
            verdicts = dedup.apply(pool)
            dropped_dup.update(r for r in verdicts.reason if r is not None)
            pool = pool.filter(pa.array(verdicts.keep, pa.bool_()))
        anchor = human if arm.human else datasets_schema.ARROW.empty_table()
        rows_of_other = synthetic_rows[arm.synthetic_rows_of] if arm.synthetic_rows_of else None
        cap = synthetic_cap(arm, anchor.num_rows, pool.num_rows, rows_of_other)
        chosen, sel = select_synthetic(pool, anchor, arm, params.seed, cap, categories)
        synthetic = pool.take(pa.array(chosen, pa.int64()))
        synthetic = synthetic.take(pc.sort_indices(synthetic, [("row_id", "ascending")]))
        table = pa.concat_tables([anchor, synthetic])
        factor = 1.0
        if arm.max_synthetic_weight_share is not None:
            table, factor = cap_weights(table, arm.max_synthetic_weight_share)
        tables[arm_name] = table
        synthetic_rows[arm_name] = synthetic.num_rows
        src = Counter(table.column("source").to_pylist())
        weights = table.column("weight").to_numpy()
        syn_mask = np.asarray([x != "human" for x in table.column("source").to_pylist()], bool)
        metrics[arm_name] = {
            "rows": table.num_rows, "human": src.get("human", 0),
            **{x: src.get(x, 0) for x in arm.sources},
            "synthetic": synthetic.num_rows,
            "synthetic_share": round(float(syn_mask.mean()) if len(syn_mask) else 0.0, 4),
            "synthetic_weight_share": round(float(weights[syn_mask].sum() / weights.sum()) if weights.sum() else 0.0,
                                            4),
            "synthetic_weight_factor": round(factor, 6),
            "candidates": {**{x: sources[x].num_rows for x in arm.sources},
                           "dropped_unparsed": sum(unparsed[x] for x in arm.sources)},
            "candidates_after_dedup": pool.num_rows,
            "dropped_same_row_id": dropped_same_id,
            **{f"dropped_{k}": v for k, v in sorted(dropped_dup.items())},
            **({"synthetic_rows_of": arm.synthetic_rows_of} if arm.synthetic_rows_of else {}),
            **sel,
        }
    check_documents(tables, passages)
    sft = SftRecords(tables, passages, window_chars)
    span_cols = ["row_id", "evidence", "evidence_start", "evidence_end"]
    spans = train.select(span_cols)
    parents = pa.concat_tables([spans, accepted.select(span_cols).cast(spans.schema)])
    dpo = dpo_records(pairs, passages, window_chars, parents)  # chosen rows: human train, or accepted (dpo.sources)
    metrics["dpo_pairs"] = len(dpo)
    if review is not None:
        metrics["review_decisions"] = review
    return AssembleResult(tables, sft, dpo, {"arms": list(params.arms), **metrics}, decision_table)


def jsonl(records: list[dict]) -> str:
    """Serialise records as UTF-8 JSON lines (stable key order as built)."""
    return "".join(jsonl_lines(records))


def jsonl_lines(records: Iterable[dict]) -> Iterator[str]:
    """Each record as one UTF-8 JSON line (stable key order as built), as it comes."""
    return (json.dumps(r, ensure_ascii=False) + "\n" for r in records)


@click.command("assemble")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="Params file; this stage reads its assemble section and train.window_chars.")
@click.option("--train", "train_file", required=True,
              help="Human train split (split's train.parquet): one row per seed QA pair; "
                   "the human anchor of every arm.")
@click.option("--contaminated", "contaminated_file", required=True,
              help="Contaminate's output (Parquet): one row per AI-contaminated sample; the rows of arms drawing "
                   "from 'contaminated'.")
@click.option("--accepted", "accepted_file", required=True,
              help="Gate's accepted.parquet: one row per generated row that passed every gate.")
@click.option("--recovered", "recovered_file", default=None,
              help="Recover's recovered.parquet: one row per recovered row; leave out to assemble without "
                   "recovery.")
@click.option("--generated", "generated_file", default=None,
              help="Generate's output, every generated row before any gate (one row per teacher sample); needed "
                   "by arms drawing from 'generated'.")
@click.option("--documents", "documents_file", required=True,
              help="Source documents (ingest's documents.parquet): one row per document; "
                   "the passages written into the SFT exports.")
@click.option("--pairs", "pairs_file", required=True,
              help="Train_reward's DPO preference pairs (Parquet): one row per (prompt, chosen, rejected); "
                   "exported as dpo.jsonl.")
@click.option("--decisions", "decisions_file", default=None,
              help="Human review decisions (a Label Studio JSON export or Argilla records; '[]' for none): one "
                   "record per reviewed row; rejected rows leave every arm, corrected answers replace theirs once "
                   "every gate has judged them. Leave out to assemble without review.")
@click.option("--thresholds", "thresholds_file", default=None,
              help="Gate's thresholds.json: the bounds that judge reviewer-corrected answers (with --models, "
                   "--verifier, --reward, --gate-cache; loaded only when a decision is 'fix').")
@click.option("--models", "models_dir", default=None, help="Provisioned base models folder (re-gating corrections).")
@click.option("--verifier", "verifier_dir", default=None, help="Trained verifier folder (re-gating corrections).")
@click.option("--reward", "reward_dir", default=None, help="Trained reward model folder (re-gating corrections).")
@click.option("--gate-cache", "gate_cache", default=None, help="The gates' signature and embedding cache.")
@click.option("--out", "out_dir", required=True,
              help="Writes <arm>.parquet (one row per training example, with provenance) and <arm>.sft.jsonl for "
                   "every arm of assemble.arms, dpo.jsonl (TRL) and dpo.sharegpt.jsonl (LLaMA-Factory), the dataset "
                   "card README.md (one Hugging Face config per file), LLaMA-Factory's dataset_info.json and, with "
                   "--decisions, review_decisions.parquet (one row per decision and what it did), here.")
@click.option("--metrics", "metrics_file", required=True,
              help="Writes the rows per arm and source, and the DPO pair count, here (JSON).")
def cli(params_file, train_file, contaminated_file, accepted_file, recovered_file, generated_file, documents_file,
        pairs_file, decisions_file, thresholds_file, models_dir, verifier_dir, reward_dir, gate_cache, out_dir,
        metrics_file) -> None:
    """Assemble one dataset per arm (params.yaml: assemble.arms) with SFT and DPO exports."""
    from refinery.core.io import atomic_outputs, read_parquet
    from refinery.training import publish
    from schemas import documents as documents_schema
    from schemas import gated as gated_schema
    from schemas import preference_pairs as pairs_schema
    from schemas import split as split_schema
    from schemas import synthetic as synthetic_schema

    params = load_section(params_file, "assemble", AssembleParams)
    train = split_schema.CONTRACT.validate(read_parquet(train_file), train_file)
    contaminated = synthetic_schema.CONTRACT.validate(read_parquet(contaminated_file), contaminated_file)
    accepted = gated_schema.CONTRACT.validate(read_parquet(accepted_file), accepted_file)
    recovered = read_parquet(recovered_file) if recovered_file else None
    generated = synthetic_schema.CONTRACT.validate(read_parquet(generated_file), generated_file) \
        if generated_file else None
    documents = documents_schema.CONTRACT.validate(read_parquet(documents_file), documents_file)
    pairs = pairs_schema.CONTRACT.validate(read_parquet(pairs_file), pairs_file)
    from refinery.core.params import read_key

    window = read_key(params_file, "train.window_chars", 0)
    decisions = read_decisions(decisions_file) if decisions_file else None
    regate = None
    if decisions and any(d.verdict == "fix" for d in decisions):
        missing = [o for o, v in (("--thresholds", thresholds_file), ("--models", models_dir),
                                  ("--verifier", verifier_dir), ("--reward", reward_dir),
                                  ("--gate-cache", gate_cache)) if not v]
        if missing:
            raise click.UsageError(f"{decisions_file}: a 'fix' decision is re-gated: pass {', '.join(missing)}")
        regate = _regate(params_file, thresholds_file, train, documents, models_dir, verifier_dir, reward_dir,
                         gate_cache)
    result = assemble(train, contaminated, accepted, recovered, documents, pairs, params, generated, int(window),
                      decisions, regate)
    out = Path(out_dir)
    with atomic_outputs() as outputs:
        for kind in result.tables:
            path = out / f"{kind}.parquet"
            table = datasets_schema.CONTRACT.validate(result.tables[kind], str(path))
            outputs.parquet(table, path, datasets_schema.ARROW)
            outputs.lines(result.sft.lines(kind), out / f"{kind}.sft.jsonl")
        outputs.text(jsonl(result.dpo), out / "dpo.jsonl")
        outputs.text(jsonl(publish.dpo_sharegpt(result.dpo)), out / publish.DPO_SHAREGPT_FILE)
        arm_metrics = {arm: result.metrics[arm] for arm in result.tables}
        card = params.card
        outputs.text(publish.dataset_card(arm_metrics, len(result.dpo), license_id=card.license,
                                          pretty_name=card.pretty_name, language=card.language,
                                          description=card.description), out / publish.CARD_FILE)
        outputs.json(publish.llamafactory_info(list(result.tables), dpo=bool(result.dpo)),
                     out / publish.LLAMAFACTORY_FILE)
        if result.decisions is not None:
            outputs.parquet(result.decisions, out / "review_decisions.parquet", DECISIONS_ARROW)
        outputs.json(result.metrics, metrics_file)
    arms = ", ".join(f"{k} {result.metrics[k]['rows']} ({result.metrics[k]['synthetic']} synthetic)"
                     for k in result.tables)
    review = result.metrics.get("review_decisions")
    said = (f"; review decisions: {review['decisions']} ({review['removed']} removed, {review['replaced']} replaced, "
            f"{review['replacement_rejected']} corrections refused by the gates, {review['not_found']} not found)"
            if review else "")
    click.echo(f"assemble: {arms}; {result.metrics['dpo_pairs']} DPO pairs{said} -> {out}", err=True)


def _regate(params_file: str, thresholds_file: str, train: pa.Table, documents: pa.Table, models_dir: str,
            verifier_dir: str, reward_dir: str, gate_cache: str) -> Regate:
    """Build the gate stage's gates from its thresholds.json (as recover does): they judge corrected rows."""
    from refinery.core.io import read_json
    from refinery.gates.base import GateContext
    from refinery.gates.run import GateParams, build_gates, load_models, run_gates
    from schemas import thresholds as thresholds_schema

    gate_params = load_section(params_file, "gate", GateParams)
    thresholds = thresholds_schema.validate(read_json(thresholds_file), thresholds_file)
    cache = Path(gate_cache)
    models = load_models(gate_params, models_dir, verifier_dir, reward_dir, cache)
    gates = build_gates(thresholds, GateContext(train, documents, models, cache))

    def regate(rows: pa.Table) -> tuple[list[bool], list[list[str]]]:
        gated = run_gates(rows, gates, "full")
        return gated.column("gate_keep").to_pylist(), gated.column("gate_reasons").to_pylist()

    return regate


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
