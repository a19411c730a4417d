"""Write the experiment report (reports/report.md + PNG plots) with every number read from a metrics file."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pyarrow as pa
from pydantic import Field

from refinery.core.params import StageParams, load_section
from refinery.report.plots import PLOT_DATA, write_plot_data, write_plots
from refinery.report.render import STATIC_NUMBERS, Values, lookup, render
from refinery.report.stats import (MODELS, audit_decision, dataset_stats, experiment_summary, gap_analysis,
                                   gate_families, pick_samples, recovery_p_value, recovery_verdict, verdict)


class ReportParams(StageParams):
    """Knobs of the report stage."""

    right_f1: float = Field(gt=0, le=1)  # a prediction counts as right when its token F1 is at least this
    bootstrap: int = Field(ge=100)  # paired bootstrap resamples for confidence intervals of F1 differences
    ci: float = Field(gt=0, lt=1)  # confidence level of those intervals
    seed: int  # bootstrap RNG seed
    min_factual_recall: float = Field(ge=0, le=1)  # H4 holds when the gates catch at least this share of planted
    # factual errors


@dataclass(frozen=True)
class ReportResult:
    """The report text, the derived summary (metrics/report.json) and the trace of every printed number."""

    markdown: str
    summary: dict[str, Any]
    trace: dict[str, Any]


def report_core(docs: dict[str, Any], datasets: dict[str, pa.Table], preds: dict[str, pa.Table],
                environment: dict[str, Any] | None, params: ReportParams, *, metrics_dir: str, summary_file: str,
                preds_files: dict[str, str], plots_rel: str, audit: dict[str, Any] | None = None,
                runs: dict[str, str] | None = None, experiment: dict[str, Any] | None = None,
                families: dict[str, Any] | None = None) -> ReportResult:
    """Derive the summary numbers and render the report.

    Args:
        docs: path -> parsed JSON of every metrics file that exists (missing ones are simply absent).
        datasets: name -> assembled dataset table (absent when not built).
        preds: model -> predictions table (absent when not evaluated).
        environment: one adapter's environment.json (versions, hardware, commit), or None.
        params: the stage params.
        metrics_dir: the folder the metrics file paths in ``docs`` start with.
        summary_file: the path the summary is written to (the report traces derived numbers to it).
        preds_files: model -> predictions file path (sample quotes are traced to them).
        plots_rel: plots folder relative to the report.
        audit: the validate decision over every arm (``decision``, ``failed_checks``), or None when not run.
        runs: model -> the run (file stem) its per-model sections read (default: the model's own name).
        experiment: :func:`refinery.report.stats.analyse` over every arm and seed, or None.
        families: :func:`refinery.report.stats.gate_families`, or None.

    Returns:
        The markdown, the summary and the trace.
    """
    runs = runs or {m: m for m in MODELS}
    evals = {m: docs[f"{metrics_dir}/eval/{r}.json"] for m, r in runs.items() if f"{metrics_dir}/eval/{r}.json" in docs}
    gate = docs.get(f"{metrics_dir}/gate.json") or {}
    gi = docs.get(f"{metrics_dir}/gate_injection.json") or {}
    summary: dict[str, Any] = {
        "datasets": {m: dataset_stats(t) for m, t in datasets.items()},
        "gate_pass_rate": round(gate["kept"] / gate["total"], 4) if gate.get("total") else None,
        "gap": gap_analysis(evals, preds, n=params.bootstrap, ci=params.ci, seed=params.seed),
        "samples": pick_samples(preds, params.right_f1),
        "right_f1": params.right_f1,
        "ci": params.ci,
        "min_factual_recall": params.min_factual_recall,
        "h4_recall": lookup(gi, "cascade_and_gates.cascade.recall_factual"),
    }
    rec = docs.get(f"{metrics_dir}/recover.json")
    rec_a, rec_n = lookup(rec, "adaptive.overall.recovered"), lookup(rec, "naive.overall.recovered")
    if rec_a is not None and rec_n is not None:
        summary["h5_p"] = round(recovery_p_value(int(rec_a), int(rec_n)), 4)
    if audit is not None:
        summary["validation"] = audit
    if experiment is not None:
        summary["experiment"] = experiment
    if families is not None:
        summary["gate_families"] = families
    diffs = summary["gap"].get("f1_diff", {})
    summary["verdicts"] = {
        "h1": verdict(diffs["human_minus_contaminated"]) if "human_minus_contaminated" in diffs else None,
        "h2": verdict(diffs["curated_minus_contaminated"]) if "curated_minus_contaminated" in diffs else None,
        "h3": verdict(diffs["human_minus_base"]) if "human_minus_base" in diffs else None,
        "h4": (("supported" if summary["h4_recall"] >= params.min_factual_recall else "not supported")
               if summary["h4_recall"] is not None else None),
        "h5": recovery_verdict(rec_a, rec_n, 1 - params.ci),
    }
    if environment:
        hw = environment.get("hardware") or {}
        summary["environment"] = {
            "git_commit": environment.get("git_commit"), "student": environment.get("student"),
            "versions": environment.get("versions"), "seeds": environment.get("seeds"),
            "config_hash": environment.get("config_hash"),
            "hardware": f"{hw.get('machine')}, {hw.get('cpu_count')} CPUs, {hw.get('torch_threads')} torch threads, "
                        f"device {hw.get('device')}"}
    v = Values({**docs, summary_file: summary})
    md = render(v, summary_file=summary_file, metrics_dir=metrics_dir, plots_rel=plots_rel, preds_files=preds_files,
                preds=preds, runs=runs)
    return ReportResult(md, summary, {"numbers": v.trace, "quotes": v.texts, "static_numbers": sorted(STATIC_NUMBERS)})


@click.command("report")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="Params file; this stage reads its report section, assemble.arms and train.seeds.")
@click.option("--metrics-dir", required=True,
              help="Folder of the stages' metrics files: reads split, assemble, gate, gate_injection and recover "
                   ".json, train/<run>.json and eval/<run>.json (a stage not run is reported as such).")
@click.option("--predictions-dir", required=True,
              help="Evaluate's predictions folder: reads base.parquet and <arm>-s<seed>.parquet.")
@click.option("--datasets-dir", required=True,
              help="Assemble's output folder: reads <arm>.parquet (one row per training example).")
@click.option("--adapters-dir", required=True,
              help="Train's adapters folder: reads <run>/environment.json for the reproducibility block.")
@click.option("--audit", "audit_dir", required=True, help="Validate's audit folder: reads <arm>.json.")
@click.option("--gated", "gated_dir", required=True,
              help="Gate's output folder: reads accepted, rejected and injected.parquet for the gate-family "
                   "overlap.")
@click.option("--out", "out_file", required=True, help="Writes the report here (Markdown).")
@click.option("--summary", "summary_file", required=True,
              help="Writes the report's headline figures here (JSON, a DVC metric).")
@click.option("--trace", "trace_file", required=True,
              help="Writes where each number and quote of the report comes from here (JSON).")
@click.option("--plots", "plots_dir", required=True,
              help="Writes the report's figures, report_{f1,arms,metrics,gap,gate_overlap,recovery}.png, and the "
                   "numbers of four of them, report_{arms,f1,gap,recovery}.csv (DVC plots), here.")
def cli(params_file: str, metrics_dir: str, predictions_dir: str, datasets_dir: str, adapters_dir: str,
        audit_dir: str, gated_dir: str, out_file: str, summary_file: str, trace_file: str, plots_dir: str) -> None:
    """Write reports/report.md and its plots from the metrics files; missing stages are reported as not run."""
    import os

    from refinery.training.arms import BASE, load_arms, run_name
    from refinery.core.io import atomic_outputs, read_json, read_parquet
    from refinery.core.params import read_key

    params = load_section(params_file, "report", ReportParams)
    arms = list(load_arms(params_file))
    seeds = list(read_key(params_file, "train.seeds") or [read_key(params_file, "train.seed")])
    runs = {BASE: BASE, **{a: run_name(a, seeds[0]) for a in arms}}
    names = ["split", "coverage", "assemble", "validate", "gate", "gate_injection", "audit_judge", "recover",
             "verifiable", "dpo"] + \
        [f"{kind}/{run_name(a, s)}" for kind in ("train", "eval") for a in arms for s in seeds] + ["eval/base"]
    docs = {f"{metrics_dir}/{n}.json": read_json(f"{metrics_dir}/{n}.json") for n in names
            if Path(f"{metrics_dir}/{n}.json").is_file()}
    audits = {a: read_json(f"{audit_dir}/{a}.json") for a in arms if Path(f"{audit_dir}/{a}.json").is_file()}
    datasets = {m: read_parquet(f"{datasets_dir}/{m}.parquet") for m in arms
                if Path(f"{datasets_dir}/{m}.parquet").is_file()}
    preds_files = {m: f"{predictions_dir}/{r}.parquet" for m, r in runs.items()}
    preds = {m: read_parquet(p) for m, p in preds_files.items() if Path(p).is_file()}
    arm_tables = {} if BASE not in preds else \
        {a: {s: read_parquet(f) for s in seeds if Path(f := f"{predictions_dir}/{run_name(a, s)}.parquet").is_file()}
         for a in arms}
    train = {a: [docs[f] for s in seeds if (f := f"{metrics_dir}/train/{run_name(a, s)}.json") in docs] for a in arms}
    gated = {k: f"{gated_dir}/{k}.parquet" for k in ("accepted", "rejected", "injected")}
    families = None
    if all(Path(p).is_file() for p in gated.values()):
        t = {k: read_parquet(p) for k, p in gated.items()}
        generated = pa.concat_tables([t["accepted"], t["rejected"]], promote_options="permissive")
        families = gate_families({"generated": generated, "planted": t["injected"]})
    env = next((read_json(f"{adapters_dir}/{runs[m]}/environment.json") for m in arms
                if Path(f"{adapters_dir}/{runs[m]}/environment.json").is_file()), None)
    plots_rel = os.path.relpath(plots_dir, Path(out_file).parent)
    result = report_core(docs, datasets, preds, env, params, metrics_dir=metrics_dir, summary_file=summary_file,
                         preds_files=preds_files, plots_rel=plots_rel, audit=audit_decision(audits, arms), runs=runs,
                         experiment=experiment_summary(preds.get(BASE), arm_tables, train, n=params.bootstrap,
                                                       ci=params.ci, seed=params.seed, declared=arms),
                         families=families)
    with atomic_outputs() as outputs:
        outputs.text(result.markdown, out_file)
        outputs.json(result.summary, summary_file)
        outputs.json(result.trace, trace_file)
        plot_paths = {k: outputs.path(Path(plots_dir) / f"report_{k}.png")
                      for k in ("f1", "arms", "metrics", "gap", "gate_overlap", "recovery")}
        write_plots(docs, result.summary, metrics_dir, plot_paths, runs)
        write_plot_data(docs, result.summary, metrics_dir,
                        {k: outputs.path(Path(plots_dir) / f"report_{k}.csv") for k in PLOT_DATA}, runs)
    missing = [n for n in names if f"{metrics_dir}/{n}.json" not in docs]
    click.echo(f"report: {out_file} ({len(result.trace['numbers'])} numbers traced"
               + (f"; not run: {', '.join(missing)}" if missing else "") + ")", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
