"""Split seed QA into train/val/test by document group, stratified by intent, with zero leakage."""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from refinery.core.errors import RefineryError
from refinery.core.params import StageParams, load_section
from refinery.core.text import match_key
from schemas import documents as documents_schema
from schemas import seed_qa as qa_schema
from schemas import split as split_schema
from schemas.split import SPLITS

UNUSED = "unused"  # pseudo split of the rows split.rows leaves out (counted in metrics, in no output)


class SplitParams(StageParams):
    """Knobs of the split stage."""

    seed: int
    fractions: dict[str, float]  # share of QA rows per split; keys train, val, test; sum 1
    stratify_by: str | None = "intent"  # QA column to balance across splits; null to balance sizes only
    stratify_weight: float = Field(default=1.0, ge=0)  # weight of class balance against size balance
    control_share: float = Field(default=0.5, ge=0, lt=1)  # share of val rows (whole groups) kept as controls
    rows: dict[str, int] | None = None  # target rows per split instead of fractions; the rest is left unused

    @model_validator(mode="after")
    def _check_rows(self) -> SplitParams:
        if self.rows is not None and (set(self.rows) != set(SPLITS) or any(v < 0 for v in self.rows.values())):
            raise ValueError(f"rows needs exactly the keys {', '.join(SPLITS)}, each >= 0")
        return self

    def targets(self, total: int) -> dict[str, float]:
        """Share of ``total`` QA rows per split, plus ``unused`` (rows no split takes) when ``rows`` is set."""
        if self.rows is None:
            return dict(self.fractions)
        want = sum(self.rows.values())
        if want > total:
            raise RefineryError(f"split.rows asks for {want} rows ({self.rows}) but the seed has {total} QA rows")
        shares = {s: n / max(total, 1) for s, n in self.rows.items()}
        return {**shares, UNUSED: max(0.0, 1 - sum(shares.values()))}

    @model_validator(mode="after")
    def _check_fractions(self) -> SplitParams:
        if set(self.fractions) != set(SPLITS):
            raise ValueError(f"fractions needs exactly the keys {', '.join(SPLITS)}")
        if any(v < 0 for v in self.fractions.values()) or abs(sum(self.fractions.values()) - 1) > 1e-6:
            raise ValueError("fractions must be >= 0 and sum to 1")
        return self


@dataclass(frozen=True)
class SplitResult:
    """One table per split, the counts metrics, and the groups used."""

    tables: dict[str, pa.Table]
    parts: dict[str, pa.Table]  # val_calibration and val_control: val cut in two by group, disjoint
    metrics: dict[str, Any]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # deterministic root


def leakage_groups(documents: pa.Table, qa: pa.Table) -> list[str]:
    """Return a group key per QA row such that rows that could leak into each other share a group.

    Joined into one group: rows of the same document; documents linked by ``supersedes`` (old and new
    versions of one page); documents with identical text; rows whose normalised question is the same
    (so no question, and hence no question+answer pair, can sit in two splits).
    """
    uf = _UnionFind()
    doc_ids = documents.column("doc_id").to_pylist()
    for doc_id, old, chash in zip(doc_ids, documents.column("supersedes").to_pylist(),
                                  documents.column("content_hash").to_pylist()):
        uf.union(f"d:{doc_id}", f"h:{chash}")
        if old is not None:
            uf.union(f"d:{doc_id}", f"d:{old}")
    for doc_id, question in zip(qa.column("doc_id").to_pylist(), qa.column("question").to_pylist()):
        uf.union(f"d:{doc_id}", f"q:{match_key(question)}")
    return [uf.find(f"d:{d}") for d in qa.column("doc_id").to_pylist()]


def assign_groups(groups: list[str], classes: list[str | None], fractions: dict[str, float], seed: int,
                  stratify_weight: float) -> dict[str, str]:
    """Assign each group to a split, greedily, in a seeded random order.

    Each group goes where it most reduces the squared relative error of split sizes and of per-class
    counts against their targets. A random order (rather than largest first) keeps multi-question
    groups spread over every split, so val and test look like train.

    Returns:
        ``{group: split}``.
    """
    rng = np.random.default_rng(seed)
    size = Counter(groups)
    by_group: dict[str, Counter] = defaultdict(Counter)
    for g, c in zip(groups, classes):
        by_group[g][c] += 1
    total = len(groups)
    class_total = Counter(classes)
    order = [g for _, g in sorted(zip(rng.permutation(len(size)), sorted(size)))]
    names = list(fractions)
    count = {s: 0 for s in names}
    class_count = {s: Counter() for s in names}
    assignment: dict[str, str] = {}
    n_classes = max(len(class_total), 1)
    for g in order:
        best, best_cost = None, None
        for s in names:
            if fractions[s] == 0:
                continue
            cost = 0.0
            for t in names:
                n = count[t] + (size[g] if t == s else 0)
                cost += ((n - fractions[t] * total) / total) ** 2
                for c, k in by_group[g].items():
                    m = class_count[t][c] + (k if t == s else 0)
                    cost += stratify_weight / n_classes * ((m - fractions[t] * class_total[c]) / class_total[c]) ** 2
            if best_cost is None or cost < best_cost - 1e-12:
                best, best_cost = s, cost
        assignment[g] = best
        count[best] += size[g]
        class_count[best].update(by_group[g])
    return assignment


def check_leakage(tables: dict[str, pa.Table]) -> dict[str, int]:
    """Count documents, normalised questions and question+answer pairs found in more than one split."""
    seen: dict[str, dict[str, set]] = {k: defaultdict(set) for k in ("documents", "questions", "qa_pairs")}
    for name, t in tables.items():
        for d, q, a in zip(t.column("doc_id").to_pylist(), t.column("question").to_pylist(),
                           t.column("answer").to_pylist()):
            seen["documents"][d].add(name)
            seen["questions"][match_key(q)].add(name)
            seen["qa_pairs"][match_key(q) + "\x1f" + match_key(a)].add(name)
    return {f"shared_{k}": sum(len(v) > 1 for v in m.values()) for k, m in seen.items()}


def val_parts(val: pa.Table, groups: list[str], control_share: float, seed: int) -> dict[str, pa.Table]:
    """Cut the val split in two by leakage group: rows that calibrate thresholds, and controls that measure them.

    Every threshold the project calibrates (the verifier's, the reward and perplexity bounds) is fitted on
    ``val_calibration``; the clean controls and planted errors that measure the gates come from
    ``val_control``. No document (nor a document it supersedes) is in both, so a false-rejection rate
    measured on the controls does not hold by construction.

    Args:
        val: the val split.
        groups: each val row's leakage group.
        control_share: the share of val rows to put in the control part (whole groups, in a seeded order;
            at least one group on each side when there are two or more).
        seed: the order in which groups are drawn.
    """
    unique = sorted(set(groups))
    order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    size = Counter(groups)
    control: set[str] = set()
    for g in order:
        if len(unique) - len(control) <= 1 or sum(size[c] for c in control) >= control_share * len(groups):
            break
        control.add(g)
    is_control = pa.array([g in control for g in groups], pa.bool_())
    return {"val_calibration": val.filter(pc.invert(is_control)), "val_control": val.filter(is_control)}


def split(documents: pa.Table, qa: pa.Table, params: SplitParams) -> SplitResult:
    """Split seed QA rows into train, val and test.

    Args:
        documents: rows of the documents contract.
        qa: rows of the seed_qa contract.
        params: fractions, seed and stratification column.

    Returns:
        Tables of the split contract (input row order kept within each split) and the counts metrics.

    Raises:
        RefineryError: a stratification column that does not exist, or leakage (never expected).
    """
    if params.stratify_by is not None and params.stratify_by not in qa.column_names:
        raise RefineryError(f"split.stratify_by: no column '{params.stratify_by}' in the seed QA table")
    groups = leakage_groups(documents, qa)
    classes = qa.column(params.stratify_by).to_pylist() if params.stratify_by else [None] * qa.num_rows
    assignment = assign_groups(groups, classes, params.targets(qa.num_rows), params.seed, params.stratify_weight)
    labels = [assignment[g] for g in groups]
    labelled = qa.append_column(pa.field("split", pa.string(), nullable=False), pa.array(labels, pa.string()))
    tables = {s: labelled.filter(pc.equal(labelled.column("split"), s)) for s in SPLITS}
    leakage = check_leakage(tables)
    if any(leakage.values()):
        raise RefineryError(f"split: leakage across splits despite grouping ({leakage}); please report this bug")
    per_class = {s: dict(sorted(Counter(x for x, lab in zip(classes, labels) if lab == s and x).items()))
                 for s in SPLITS}
    parts = val_parts(tables["val"], [g for g, lab in zip(groups, labels) if lab == "val"], params.control_share,
                      params.seed)
    metrics = {
        "rows": {s: tables[s].num_rows for s in SPLITS},
        "unused_rows": labels.count(UNUSED),  # split.rows: seed rows no split takes
        "share": {s: round(tables[s].num_rows / max(qa.num_rows, 1), 4) for s in SPLITS},
        "documents": {s: len(set(tables[s].column("doc_id").to_pylist())) for s in SPLITS},
        "groups": {s: len({g for g, lab in zip(groups, labels) if lab == s}) for s in SPLITS},
        "leakage": leakage,
        "classes_per_split": per_class if params.stratify_by else {},
        "classes_missing_from_train": sorted({c for c in classes if c} - set(per_class["train"])),
        "val_parts": {name: {"rows": t.num_rows, "documents": len(set(t.column("doc_id").to_pylist()))}
                      for name, t in parts.items()},
    }
    return SplitResult(tables, parts, metrics)


@click.command("split")
@click.option("--in", "in_dir", required=True,
              help="Ingest's output folder: reads documents.parquet and qa.parquet from it.")
@click.option("--out", "out_dir", required=True,
              help="Writes train, val and test.parquet (one row per human QA pair, split by document group) and "
                   "val's two disjoint parts, val_calibration and val_control.parquet, here.")
@click.option("--metrics", "metrics_file", required=True,
              help="Writes rows per split, per val part and the leakage counts here (JSON).")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="Params file; this stage reads its split section.")
def cli(in_dir: str, out_dir: str, metrics_file: str, params_file: str) -> None:
    """Split seed QA into train/val/test by document group, without leakage."""
    from refinery.core.io import atomic_outputs, read_parquet

    params = load_section(params_file, "split", SplitParams)
    src = Path(in_dir)
    documents = documents_schema.CONTRACT.validate(read_parquet(src / "documents.parquet"),
                                                   str(src / "documents.parquet"))
    qa = qa_schema.CONTRACT.validate(read_parquet(src / "qa.parquet"), str(src / "qa.parquet"))
    result = split(documents, qa, params)
    out = Path(out_dir)
    with atomic_outputs() as outputs:
        for name, table in {**result.tables, **result.parts}.items():
            path = out / f"{name}.parquet"
            outputs.parquet(split_schema.CONTRACT.validate(table, str(path)), path, split_schema.ARROW)
        outputs.json(result.metrics, metrics_file)
    rows = result.metrics["rows"]
    click.echo(f"split: train {rows['train']}, val {rows['val']}, test {rows['test']} rows; leakage "
               f"{sum(result.metrics['leakage'].values())} -> {out}", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
