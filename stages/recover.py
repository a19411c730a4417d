"""Recover rejected rows: diagnose each failure, regenerate it with a targeted action, re-gate; naive baseline."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from refinery.recovery.run import RecoverParams, check_params

__all__ = ["RecoverParams", "cli"]


@click.command("recover")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="Params file (its recover section; the gate section names the models and the gate mode).")
@click.option("--rejected", "rejected_file", required=True, help="Rejected generated rows (gated Parquet).")
@click.option("--accepted", "accepted_file", required=True,
              help="Accepted generated rows (gated Parquet): a recovered row must not duplicate them.")
@click.option("--injected", "injected_file", required=True,
              help="Gated planted rows (Parquet): the rejected ones are recovered to measure laundering.")
@click.option("--thresholds", "thresholds_file", required=True,
              help="The gate stage's thresholds.json: every bound the gates judged with; candidates are re-gated "
                   "with exactly these.")
@click.option("--train", "train_file", required=True,
              help="Human train rows (Parquet): parents, few-shot examples, the seed of dedup and overlap.")
@click.option("--documents", "documents_file", required=True,
              help="ingest's documents.parquet: one row per source document (doc_id, text, updated_at, stale).")
@click.option("--models", "models_dir", required=True,
              help="Provisioned base models folder (teacher, judge, embedder).")
@click.option("--verifier", "verifier_dir", required=True, help="Trained verifier folder (re-gating).")
@click.option("--reward", "reward_dir", required=True, help="Trained reward model folder (re-gating).")
@click.option("--prompts", "prompts_dir", required=True, help="Prompt templates folder (recover_* and strategies).")
@click.option("--cache", "cache_file", required=True, help="Teacher result cache (SQLite, kept across runs).")
@click.option("--gate-cache", "gate_cache", required=True, help="The gates' signature and embedding cache.")
@click.option("--out", "out_dir", required=True,
              help="Output folder: recovered, baseline, unrecoverable, diagnosed, injected and attempts Parquet.")
@click.option("--metrics", "metrics_file", required=True, help="Recovery counts per mode, method and action (JSON).")
@click.option("--table", "table_file", required=True, help="The adaptive-vs-naive table for the report (Markdown).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def cli(params_file, rejected_file, accepted_file, injected_file, thresholds_file, train_file, documents_file,
        models_dir, verifier_dir, reward_dir, prompts_dir, cache_file, gate_cache, out_dir, metrics_file, table_file,
        quiet) -> None:
    """Diagnose rejected rows, recover them with targeted actions and a naive baseline, re-gate every candidate."""
    import time

    from refinery.core.io import read_json, read_parquet
    from refinery.core.params import load_section, params_hash
    from refinery.core.provenance import code_version
    from refinery.gates.base import GateContext
    from refinery.gates.run import GateParams, build_gates, load_models
    from refinery.generation import calls as generation
    from refinery.generation.critique import load_constitution
    from refinery.generation.prompts import load_template
    from refinery.generation.strategies import GENERATION_STRATEGIES
    from refinery.recovery import actions, run
    from schemas import documents as documents_schema
    from schemas import gated as gated_schema
    from schemas import split as split_schema
    from schemas import thresholds as thresholds_schema

    t0 = time.perf_counter()
    params = load_section(params_file, "recover", RecoverParams)
    gate_params = load_section(params_file, "gate", GateParams)
    check_params(params)
    constitution = load_constitution(Path(prompts_dir) / "constitution.txt")  # the rules revise_by_rule states
    run.check_constitution(params, constitution)
    rejected = gated_schema.CONTRACT.validate(read_parquet(rejected_file), rejected_file)
    accepted = gated_schema.CONTRACT.validate(read_parquet(accepted_file), accepted_file)
    planted = gated_schema.INJECTED_CONTRACT.validate(read_parquet(injected_file), injected_file)
    thresholds = thresholds_schema.validate(read_json(thresholds_file), thresholds_file)
    train = split_schema.CONTRACT.validate(read_parquet(train_file), train_file)
    documents = documents_schema.CONTRACT.validate(read_parquet(documents_file), documents_file)
    templates = {n: load_template(Path(prompts_dir) / f"{n}.txt")
                 for n in actions.TEMPLATES + GENERATION_STRATEGIES}
    teacher_id, backend = generation.teacher_backend(models_dir, params.batch_size, params.threads, params.dtype)
    nothing = (rejected.num_rows == 0 or params.budget == 0) and \
        (params.injected_budget == 0 or all(planted.column("gate_keep").to_pylist()))
    cache = Path(gate_cache)
    gates = {}
    if not nothing:  # the models score candidates, so they are loaded only when some row may be attempted
        models = load_models(gate_params, models_dir, verifier_dir, reward_dir, cache)
        gates = build_gates(thresholds, GateContext(train, documents, models, cache))
    phash = params_hash(params)
    version = code_version(sys.modules[__name__])
    result = run.recover(rejected, accepted, planted, train, documents, params=params, thresholds=thresholds,
                         gates=gates, gate_mode=gate_params.mode, templates=templates, teacher_id=teacher_id,
                         backend=backend, cache_file=cache_file, gate_cache=cache, phash=phash, code_version=version,
                         quiet=quiet, constitution=constitution)
    result.write(out_dir, metrics_file, table_file)
    out, m = Path(out_dir), result.metrics
    a, n, st = m["adaptive"]["overall"], (m["naive"] or {}).get("overall"), result.teacher
    click.echo(f"recover: {m['rejected']} rejected, {m['recoverable']} diagnosed recoverable; adaptive "
               f"recovered {a['recovered']}/{a['attempted']} attempted with {a['calls']} calls"
               + (f", naive {n['recovered']}/{n['attempted']} with {n['calls']} calls" if n else ", naive off")
               + (" (budget 0: nothing attempted)" if params.budget == 0 else "")
               + f"; {st['calls']} model calls ({st['errors']} failed, retried on rerun), {st['cache_hits']} "
               f"cached, teacher {st['seconds']:.0f} s, "
               f"total {time.perf_counter() - t0:.0f} s -> {out}", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
