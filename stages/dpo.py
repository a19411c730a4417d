"""Build the DPO pairs: teacher-written rejected answers per category, checked; templated edits only as a fallback."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from refinery.training.preferences import DpoParams, check_params

__all__ = ["DpoParams", "cli"]


@click.command("dpo")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="Params file (its dpo section; the gate section names the models the checks load).")
@click.option("--train", "train_file", required=True, help="Human train rows (Parquet): chosen answers.")
@click.option("--accepted", "accepted_file", required=True,
              help="Gate-accepted generated rows (Parquet): chosen answers too where dpo.sources names them.")
@click.option("--templated", "templated_file", required=True,
              help="train_reward's templated preference pairs (Parquet): the fallback, and the 'before' margins.")
@click.option("--thresholds", "thresholds_file", required=True,
              help="The gate stage's thresholds.json: the rewrites are checked with exactly these bounds.")
@click.option("--documents", "documents_file", required=True, help="ingest's documents.parquet: the passages the PII and faithfulness checks read.")
@click.option("--models", "models_dir", required=True, help="Provisioned base models folder (teacher, judge, embedder).")
@click.option("--verifier", "verifier_dir", required=True, help="Trained verifier folder (the factuality check).")
@click.option("--reward", "reward_dir", required=True, help="Trained reward model folder (the tone check, margins).")
@click.option("--prompts", "prompts_dir", required=True, help="Prompt templates folder (dpo_rejected.txt).")
@click.option("--cache", "cache_file", required=True, help="Teacher result cache (SQLite, kept across runs).")
@click.option("--gate-cache", "gate_cache", required=True, help="The gates' signature and embedding cache.")
@click.option("--out", "out_dir", required=True,
              help="Output folder: pairs.parquet (the DPO pairs) and candidates.parquet (every rewrite, its reason).")
@click.option("--metrics", "metrics_file", required=True,
              help="Per category: calls, checks failed, pairs by source; reward margins before/after (JSON).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def cli(params_file, train_file, accepted_file, templated_file, thresholds_file, documents_file, models_dir,
        verifier_dir, reward_dir, prompts_dir, cache_file, gate_cache, out_dir, metrics_file, quiet) -> None:
    """Have the teacher write realistic rejected answers per category; keep those that fail their category's check."""
    import pyarrow.compute as pc

    from refinery.core.io import atomic_outputs, read_json, read_parquet
    from refinery.core.params import load_section, params_hash
    from refinery.core.provenance import code_version
    from refinery.gates.base import GateContext
    from refinery.gates.run import GateParams, build_gates, load_models
    from refinery.generation import calls as generation
    from refinery.generation.prompts import load_template
    from refinery.generation.teacher import GenerationCache, RunStats, run_jobs
    from refinery.training import preferences as prefs
    from schemas import documents as documents_schema
    from schemas import gated as gated_schema
    from schemas import preference_pairs as pairs_schema
    from schemas import split as split_schema
    from schemas import thresholds as thresholds_schema

    t0 = time.perf_counter()
    params = load_section(params_file, "dpo", DpoParams)
    gate_params = load_section(params_file, "gate", GateParams)
    check_params(params)
    train = split_schema.CONTRACT.validate(read_parquet(train_file), train_file)
    accepted = gated_schema.CONTRACT.validate(read_parquet(accepted_file), accepted_file)
    templated = pairs_schema.CONTRACT.validate(read_parquet(templated_file), templated_file)
    thresholds = thresholds_schema.validate(read_json(thresholds_file), thresholds_file)
    documents = documents_schema.CONTRACT.validate(read_parquet(documents_file), documents_file)
    template = load_template(Path(prompts_dir) / "dpo_rejected.txt")
    teacher_id, backend = generation.teacher_backend(models_dir, params.batch_size, params.threads, params.dtype)
    cache_dir = Path(gate_cache)
    models = load_models(gate_params, models_dir, verifier_dir, reward_dir, cache_dir)
    gates = build_gates(thresholds, GateContext(train, documents, models, cache_dir))
    checks = prefs.Checks(gates, models.embedder, params.min_similarity)
    cache = GenerationCache(cache_file)
    stats = []

    def run_calls(jobs, desc):
        results, st = run_jobs(jobs, backend, cache, batch_size=params.batch_size, desc=desc, quiet=quiet)
        stats.append(st)
        return results

    try:
        result = prefs.build(prefs.chosen_rows(train, accepted, params.sources), templated, params, template,
                             teacher_id, run_calls, checks, phash=params_hash(params),
                             code_version=code_version(sys.modules[__name__]), schema=pairs_schema.ARROW)
    finally:
        cache.close()
    build_seconds = time.perf_counter() - t0  # calls and checks
    pairs = pairs_schema.CONTRACT.validate(result.pairs, "dpo pairs")
    pairs_schema.check_dataset(pairs, "dpo pairs")
    cands = result.candidates
    teacher_pairs = pairs.filter(pc.equal(pairs.column("category_source"), "teacher"))
    reward = models.reward
    metrics = {
        "teacher": teacher_id, "template": template.ref, "categories": result.metrics,
        "pairs": pairs.num_rows,
        "pairs_by_source": {s: sum(v == s for v in pairs.column("category_source").to_pylist())
                            for s in pairs_schema.CATEGORY_SOURCES},
        "candidates": cands.num_rows,
        # the reward head's pairwise accuracy and mean margin per category: 'templated' on train_reward's rule
        # edits (its own training pairs: the easy distinctions), 'teacher_candidates' on every usable rewrite
        # before its category check, 'teacher_pairs' on the rewrites kept (the tone check is this head's gate)
        "reward_margin": {"templated": prefs.reward_margins(reward, templated),
                          "teacher_candidates": prefs.reward_margins(reward, prefs.usable(cands)),
                          "teacher_pairs": prefs.reward_margins(reward, teacher_pairs)},
    }
    out = Path(out_dir)
    with atomic_outputs() as outputs:
        outputs.parquet(pairs, out / "pairs.parquet", pairs_schema.ARROW)
        outputs.parquet(cands, out / "candidates.parquet", prefs.CANDIDATES)
        outputs.json(metrics, Path(metrics_file))
    total = RunStats()
    for st in stats:
        total = total.merged(st)
    generation.write_run_log(Path(cache_file).parent / "runs" / "dpo.json",
                             {"stage": "dpo", "teacher": teacher_id, "seconds": round(build_seconds, 2),
                              "rounds": len(stats), **total.summary()})
    calls, hits = total.calls, total.cache_hits
    per = ", ".join(f"{c} {m['pairs']['teacher']}+{m['pairs']['templated']}" for c, m in result.metrics.items())
    click.echo(f"dpo: {pairs.num_rows} pairs (teacher+templated: {per}); {cands.num_rows} rewrites, {calls} model "
               f"calls, {hits} cached, {build_seconds:.0f} s -> {out}", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
