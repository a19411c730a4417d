"""Audit the gates with a judge model: a seeded sample of accepted AND rejected rows, scored by a strict rubric.

"Sample a share of the data and have a stronger model score it." The ``audit_judge`` role (provision) scores each
sampled row with ``prompts/audit_judge.txt``: the judge's P(" yes") against P(" no") after the rubric, from the
model's log-likelihoods (never parsed from generated text). Agreement with the gates goes to the metrics: the
confusion table and Cohen's kappa over all gates, per gate family (heuristic, model) and per gate that rejected a
sampled row. Each sampled row, both verdicts and whether they agree go to ``judge_audit.parquet``; the review page
lists the disagreements. With the embedded default the audit judge is the same 135M model as the teacher: a weak
audit, and the metrics say so (``same_model_as_teacher``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow as pa
from pydantic import Field

from refinery.core.errors import RefineryError
from refinery.core.io import read_parquet
from refinery.core.params import StageParams, load_section
from refinery.gates.registry import family as gate_family
from schemas import judge_audit as audit_schema

FAMILIES = ("heuristic", "model")


class AuditJudgeParams(StageParams):
    """Knobs of the judge audit."""

    share: float = Field(ge=0, le=1)  # share of the accepted rows, and of the rejected rows, that the judge scores
    min_rows: int = Field(ge=0)  # but at least this many of each (or all there are)
    seed: int  # the sample's RNG seed
    threshold: float = Field(gt=0, lt=1)  # judge P(yes) at or above this: the judge keeps the row
    window_chars: int = Field(ge=0)  # passage shown: this many characters around the evidence; 0 = whole document
    template: str  # the rubric prompt (a versioned template)
    batch_size: int = Field(ge=1)  # prompts per forward pass (in-process judge)
    threads: int = Field(ge=1)  # torch CPU threads (in-process judge)


def sample(accepted: pa.Table, rejected: pa.Table, *, share: float, min_rows: int, seed: int) -> pa.Table:
    """Take ``max(min_rows, share × n)`` rows of each table (all if fewer), seeded, in file order.

    Returns the rows of both, with a ``status`` column (accepted / rejected).
    """
    rng = np.random.default_rng(seed)
    parts = []
    for status, t in (("accepted", accepted), ("rejected", rejected)):
        k = min(t.num_rows, max(min_rows, int(round(share * t.num_rows))))
        idx = np.sort(rng.permutation(t.num_rows)[:k])
        part = t.take(pa.array(idx, pa.int64()))
        parts.append(part.append_column("status", pa.array([status] * k, pa.string())))
    return pa.concat_tables(parts, promote_options="permissive")


def family_keep(rows: pa.Table, family: str) -> list[bool | None]:
    """Per row: no gate of the family rejected it; None where one of its gates did not judge the row (cascade)."""
    gates = [g for g in gate_family(family) if f"{g}_keep" in rows.column_names]
    keeps = [rows.column(f"{g}_keep").to_pylist() for g in gates]
    out: list[bool | None] = []
    for i in range(rows.num_rows):
        col = [k[i] for k in keeps]
        out.append(None if any(v is None for v in col) else all(col))
    return out


def agreement(gates_keep: Sequence[bool | None], judge_keep: Sequence[bool | None]) -> dict[str, Any]:
    """Confusion table, agreement rate and Cohen's kappa over the rows where both gave a verdict.

    Kappa is None where it is undefined (one side gave a single verdict to every row).
    """
    pairs = [(g, j) for g, j in zip(gates_keep, judge_keep) if g is not None and j is not None]
    n = len(pairs)
    table = {"gates_keep_judge_keep": sum(g and j for g, j in pairs),
             "gates_keep_judge_reject": sum(g and not j for g, j in pairs),
             "gates_reject_judge_keep": sum((not g) and j for g, j in pairs),
             "gates_reject_judge_reject": sum((not g) and (not j) for g, j in pairs)}
    agree = table["gates_keep_judge_keep"] + table["gates_reject_judge_reject"]
    po = agree / n if n else None
    kappa = None
    if n:
        pg, pj = sum(g for g, _ in pairs) / n, sum(j for _, j in pairs) / n
        pe = pg * pj + (1 - pg) * (1 - pj)
        kappa = round((po - pe) / (1 - pe), 4) if pe < 1 else None
    return {"rows": n, "confusion": table, "agreement": round(po, 4) if po is not None else None,
            "kappa": None if kappa is None else kappa + 0.0}  # + 0.0: no "-0.0"


def ranking_auc(gates_keep: Sequence[bool | None], p_yes: Sequence[float | None]) -> float | None:
    """How well the judge's P(yes) ranks the rows the gates kept above those they rejected (ROC AUC; 0.5 = chance).

    Threshold-free: a judge whose probabilities are all low (uncalibrated) can still order rows as the gates do.
    None where one side has no row.
    """
    pairs = [(g, p) for g, p in zip(gates_keep, p_yes) if g is not None and p is not None]
    if len({g for g, _ in pairs}) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return round(float(roc_auc_score([g for g, _ in pairs], [p for _, p in pairs])), 4)


def judge_rows(backend: Any, template: Any, rows: pa.Table, documents: dict[str, str], window_chars: int,
               log=lambda s: None) -> list[float | None]:
    """P(yes) / (P(yes) + P(no)) per row under the rubric; None where the row has no question or answer."""
    import math

    from refinery.training.lora import passage_window

    prompts, idx = [], []
    for i, r in enumerate(rows.select(["doc_id", "question", "answer", "evidence", "evidence_start",
                                       "evidence_end"]).to_pylist()):
        if not r["question"] or not r["answer"]:
            continue
        passage = passage_window(documents.get(r["doc_id"], ""), r["evidence"], r["evidence_start"],
                                 r["evidence_end"], window_chars)
        prompts.append(template.render({"passage": passage, "question": r["question"], "answer": r["answer"]}))
        idx.append(i)
    out: list[float | None] = [None] * rows.num_rows
    if prompts:
        log(f"audit_judge: scoring {len(prompts)} rows")
        yes = backend.loglikelihood(prompts, [" yes"] * len(prompts))
        no = backend.loglikelihood(prompts, [" no"] * len(prompts))
        for i, (ly, _), (ln, _) in zip(idx, yes, no):
            if math.isfinite(ly) and math.isfinite(ln):
                m = max(ly, ln)
                out[i] = round(math.exp(ly - m) / (math.exp(ly - m) + math.exp(ln - m)), 6)
    return out


def audit(rows: pa.Table, p_yes: Sequence[float | None], *, threshold: float, judge_id: str,
          template_ref: str) -> tuple[pa.Table, dict[str, Any]]:
    """Build the audit table and its agreement metrics from the sampled rows and the judge's scores."""
    gate_keep = rows.column("gate_keep").to_pylist()
    judge_keep = [None if p is None else p >= threshold for p in p_yes]
    fam = {f: family_keep(rows, f) for f in FAMILIES}
    table = pa.table({
        "row_id": rows.column("row_id"), "status": rows.column("status"), "gate_keep": gate_keep,
        "gate_reasons": rows.column("gate_reasons"), "heuristic_keep": fam["heuristic"], "model_keep": fam["model"],
        "judge_p_yes": pa.array(p_yes, pa.float64()), "judge_keep": pa.array(judge_keep, pa.bool_()),
        "agree": pa.array([None if j is None else j == g for g, j in zip(gate_keep, judge_keep)], pa.bool_()),
        "judge": [judge_id] * rows.num_rows, "prompt_template": [template_ref] * rows.num_rows,
    }, schema=audit_schema.ARROW)
    per_gate = {}
    for g in sorted({c.removesuffix("_keep") for c in rows.column_names if c.endswith("_keep") and c != "gate_keep"}):
        keep = rows.column(f"{g}_keep").to_pylist()
        if any(k is False for k in keep):  # a gate that rejected no sampled row has nothing to agree on
            per_gate[g] = agreement(keep, judge_keep)
    status = rows.column("status").to_pylist()
    rate = {s: (round(float(np.mean([j for j, st in zip(judge_keep, status) if st == s and j is not None])), 4)
                if any(st == s and j is not None for j, st in zip(judge_keep, status)) else None)
            for s in ("accepted", "rejected")}
    metrics = {"judge": judge_id, "prompt_template": template_ref, "threshold": threshold,
               "sampled": {s: status.count(s) for s in ("accepted", "rejected")},
               "unjudgeable": sum(p is None for p in p_yes),
               "judge_keep_rate": rate,
               "judge_p_yes_mean": {s: (round(float(np.mean([p for p, st in zip(p_yes, status) if st == s
                                                             and p is not None])), 4)
                                        if any(st == s and p is not None for p, st in zip(p_yes, status)) else None)
                                    for s in ("accepted", "rejected")},
               "overall": {**agreement(gate_keep, judge_keep), "auc": ranking_auc(gate_keep, p_yes)},
               "families": {f: {**agreement(fam[f], judge_keep), "auc": ranking_auc(fam[f], p_yes)}
                            for f in FAMILIES},
               "gates": per_gate}
    return table, metrics


@click.command("audit-judge")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="Params file; this stage reads its audit_judge section.")
@click.option("--gated", "gated_dir", required=True,
              help="The gate stage's folder (accepted.parquet, rejected.parquet).")
@click.option("--documents", "documents_file", required=True,
              help="The ingest stage's documents file (documents.parquet): the passages shown to the judge.")
@click.option("--models", "models_dir", required=True, help="The provision stage's folder (role audit_judge).")
@click.option("--out", "out_dir", required=True, help="Writes judge_audit.parquet into this folder.")
@click.option("--metrics", "metrics_file", required=True,
              help="Writes the agreement of judge and gates (confusion, kappa; overall, per family, per gate) here.")
def cli(params_file: str, gated_dir: str, documents_file: str, models_dir: str, out_dir: str,
        metrics_file: str) -> None:
    """Score a seeded sample of accepted and rejected rows with the audit judge; agreement with the gates."""
    from refinery.core.io import atomic_outputs
    from refinery.generation.prompts import load_template
    from refinery.models.backends.factory import make_backend
    from refinery.models.resolve import backend_spec, load_target
    from refinery.training.student import read_documents

    params = load_section(params_file, "audit_judge", AuditJudgeParams)
    tables = {k: read_parquet(str(Path(gated_dir) / f"{k}.parquet")) for k in ("accepted", "rejected")}
    rows = sample(tables["accepted"], tables["rejected"], share=params.share, min_rows=params.min_rows,
                  seed=params.seed)
    if rows.num_rows == 0:
        raise RefineryError(f"audit_judge: {gated_dir} holds no accepted or rejected row to audit")
    template = load_template(params.template)
    target = load_target(models_dir, "audit_judge")
    teacher = load_target(models_dir, "teacher")
    backend = make_backend(backend_spec(target, batch_size=params.batch_size, threads=params.threads))
    try:
        p_yes = judge_rows(backend, template, rows, read_documents(documents_file), params.window_chars,
                           log=lambda s: click.echo(s, err=True))
    finally:
        close = getattr(backend, "close", None)
        if close:
            close()
    table, metrics = audit(rows, p_yes, threshold=params.threshold, judge_id=target["id"],
                           template_ref=template.ref)
    metrics["same_model_as_teacher"] = target["id"] == teacher["id"]
    table = audit_schema.CONTRACT.validate(table, str(Path(out_dir) / "judge_audit.parquet"))
    with atomic_outputs() as outputs:
        outputs.parquet(table, Path(out_dir) / "judge_audit.parquet", audit_schema.ARROW)
        outputs.json(metrics, metrics_file)
    o = metrics["overall"]
    click.echo(f"audit_judge: {rows.num_rows} rows ({metrics['sampled']['accepted']} accepted, "
               f"{metrics['sampled']['rejected']} rejected), agreement {o['agreement']}, kappa {o['kappa']}", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
