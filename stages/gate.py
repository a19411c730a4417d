"""Run every quality gate on every generated row (and on planted errors), keeping all verdicts and reasons."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import pyarrow.compute as pc

from refinery.core.params import load_section, read_key
from refinery.gates.base import GateContext
from refinery.engine.base import engine_of
from refinery.gates.run import (GateParams, GateRecipe, GateRequest, build_gates, calibrate, compare_modes,
                                gate_tables, judged_rows, load_models, model_factory, reason_counts, run_gates,
                                run_gates_by_kind, strategy_pass_rates)
from refinery.planted.corruptions import unseen_kinds
from schemas.gated import GATES


@click.command("gate")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="Params file (its gate and engine sections; and inject.unseen_families).")
@click.option("--synthetic", "synthetic_file", required=True, help="Generated rows to gate (Parquet).")
@click.option("--injected", "injected_file", required=True,
              help="Rows with planted errors (Parquet): gated to measure recall and false rejections.")
@click.option("--train", "train_file", required=True,
              help="Human train rows: the seed that dedup and overlap compare against (Parquet).")
@click.option("--val", "val_file", required=True,
              help="Human rows that calibrate the bounds params leave null (Parquet).")
@click.option("--documents", "documents_file", required=True,
              help="ingest's documents.parquet: one row per source document (doc_id, text, updated_at, stale).")
@click.option("--models", "models_dir", required=True, help="Provisioned base models folder (judge, embedder).")
@click.option("--verifier", "verifier_dir", required=True, help="Trained verifier folder (judge: verifier, trained).")
@click.option("--reward", "reward_dir", required=True, help="Trained reward model folder (model: trained).")
@click.option("--cache", "cache_dir", required=True,
              help="Signature and embedding cache (threshold changes recompute nothing).")
@click.option("--out", "out_dir", required=True,
              help="Output folder: accepted, rejected and injected Parquet, and thresholds.json (every bound used).")
@click.option("--metrics", "metrics_file", required=True, help="Counts per reason and gate (JSON).")
@click.option("--injection-metrics", "injection_file", required=True,
              help="Recall and false rejections on the planted errors (JSON).")
@click.option("--plots", "plots_dir", required=True, help="Folder for the gate-overlap plots.")
def cli(params_file, synthetic_file, injected_file, train_file, val_file, documents_file, models_dir, verifier_dir,
        reward_dir, cache_dir, out_dir, metrics_file, injection_file, plots_dir) -> None:
    """Run every gate on generated rows and on planted errors; write accepted, rejected, thresholds and metrics."""
    import time

    from refinery.core.io import atomic_outputs, read_parquet
    from refinery.planted.measure import evaluate_injection, gate_overlap, plot_overlap
    from schemas import documents as documents_schema
    from schemas import gated as gated_schema
    from schemas import injected as injected_schema
    from schemas import split as split_schema
    from schemas import synthetic as synthetic_schema
    from schemas import thresholds as thresholds_schema

    t0 = time.perf_counter()
    params = load_section(params_file, "gate", GateParams)
    engine = engine_of(params_file)  # a local or Ray cluster starts on first use only
    unseen = unseen_kinds(read_key(params_file, "inject.unseen_families", []), params_file)
    synthetic = synthetic_schema.CONTRACT.validate(read_parquet(synthetic_file), synthetic_file)
    injected = injected_schema.CONTRACT.validate(read_parquet(injected_file), injected_file)
    train = split_schema.CONTRACT.validate(read_parquet(train_file), train_file)
    val = split_schema.CONTRACT.validate(read_parquet(val_file), val_file)
    documents = documents_schema.CONTRACT.validate(read_parquet(documents_file), documents_file)
    cache = Path(cache_dir).resolve()
    # absolute paths: a Ray worker loads the same models from wherever it runs
    models = load_models(params, str(Path(models_dir).resolve()), str(Path(verifier_dir).resolve()),
                         str(Path(reward_dir).resolve()), cache, frozen_cache=True)
    ctx = GateContext(train, documents, models, cache, calib=val)
    thresholds = thresholds_schema.validate(calibrate(params, ctx), "calibrated thresholds")
    gates = build_gates(thresholds, ctx)
    recipe = GateRecipe(thresholds, train, documents, model_factory(models), str(cache))
    # planted rows get every verdict in either mode, so recall, overlap and who-caught-what keep their meaning;
    # they are judged kind by kind, so a variant is never deduplicated against its twin from the same source
    requests = [GateRequest(synthetic, params.mode), GateRequest(injected, "full", by="injection_kind")]

    def judges_by_mode() -> dict:  # reads the planted rows' kinds and text only: it needs no verdict
        return compare_modes(injected, gates, documents, models, params.faithfulness.target_false_rejection) \
            if params.faithfulness.compare_modes else {}

    with engine:
        if engine.name == "local":
            gated, planted = gate_tables(requests, gates, engine=engine, recipe=recipe)
            modes = judges_by_mode()
        else:  # the workers gate while this process measures the judges' evidence modes
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(gate_tables, requests, gates, engine=engine, recipe=recipe)
                modes = judges_by_mode()
                gated, planted = pending.result()
    gated = gated_schema.CONTRACT.validate(gated, "gated synthetic rows")
    planted = gated_schema.INJECTED_CONTRACT.validate(planted, "gated injected rows")
    keep = gated.column("gate_keep")
    accepted, rejected = gated.filter(keep), gated.filter(pc.invert(keep))
    judged = judged_rows(gated)
    metrics = {**reason_counts(gated), "thresholds": thresholds_schema.review_copy(thresholds), "mode": params.mode,
               "rows_judged": judged, "rows_not_judged": {g: gated.num_rows - n for g, n in judged.items()},
               # which gates reject the same generated rows needs every verdict: full mode only
               "overlap": gate_overlap(gated, list(GATES)) if params.mode == "full" else None,
               "per_strategy": strategy_pass_rates(gated)}
    injection = {"cascade_and_gates": evaluate_injection(planted, list(GATES), unseen),
                 "overlap": gate_overlap(planted, list(GATES)),
                 "faithfulness_modes": modes}
    out = Path(out_dir)
    with atomic_outputs() as outputs:
        outputs.parquet(accepted, out / "accepted.parquet", gated_schema.SYNTHETIC_ARROW)
        outputs.parquet(rejected, out / "rejected.parquet", gated_schema.SYNTHETIC_ARROW)
        outputs.parquet(planted, out / "injected.parquet", gated_schema.INJECTED_ARROW)
        outputs.json(thresholds, out / "thresholds.json")
        outputs.json(metrics, metrics_file)
        outputs.json(injection, injection_file)
        # (cascade mode has no overlap of generated rows: the plot then shows the planted rows', as the next one)
        plot_overlap(metrics["overlap"] or injection["overlap"], outputs.path(Path(plots_dir) / "gate_overlap.png"))
        plot_overlap(injection["overlap"], outputs.path(Path(plots_dir) / "gate_overlap_injected.png"))
    cascade = injection["cascade_and_gates"]
    click.echo(f"gate: {metrics['kept']}/{metrics['total']} accepted; planted errors: cascade recall "
               f"{_fmt(cascade, 'cascade', 'recall_factual')} on factual kinds, false rejection "
               f"{_fmt(cascade, 'cascade', 'false_rejection_rate')} ({time.perf_counter() - t0:.0f} s) -> {out}",
               err=True)


def _fmt(d: dict, *keys: str) -> str:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return "n/a"
        d = d[k]
    return f"{d:.3f}" if isinstance(d, float) else str(d)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
