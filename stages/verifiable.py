"""Generate math and code rows from the verifiable seed and keep only those that execution agrees with."""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click
import pyarrow as pa
from pydantic import Field

from refinery.core.params import StageParams, load_section
from refinery.generation.calls import TeacherDtype


class VerifiableParams(StageParams):
    """Knobs of the verifiable stage."""

    seed: int  # base of every per-call sampling seed
    samples: int = Field(ge=1)  # teacher calls per seed item
    max_items: int | None = Field(default=None, ge=1)  # per kind, the first items only (None: all)
    shots: int = Field(ge=1)  # math: seed problems shown per call (the item's own first)
    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    max_new_tokens: dict[str, int]  # per kind: math, code
    timeout_s: float = Field(gt=0)  # wall clock per sandboxed run
    cpu_s: int = Field(ge=1)  # CPU seconds per sandboxed run
    memory_mb: int = Field(ge=64)  # address space per sandboxed run
    workers: int = Field(ge=1)  # sandboxed runs at a time
    batch_size: int = Field(gt=0)
    threads: int = Field(gt=0)
    dtype: TeacherDtype = "auto"


def self_check(gate: Any, items: list[tuple[int, Any]], kind: str, path: Path) -> None:
    """Every seed item must pass its own check (a seed whose answers execution contradicts is bad input)."""
    from refinery.core.errors import InputError

    rows = [{"kind": kind, "expression": getattr(i, "expression", None), "answer": getattr(i, "answer", None),
             "solution": getattr(i, "solution", None), "tests": [], "seed_tests": getattr(i, "tests", [])}
            for _, i in items]
    for (line, _), c in zip(items, gate.checks(rows)):
        if c.reason is not None:
            raise InputError(str(path), f"the seed item fails its own check: {c.reason} ({c.detail})", row=line,
                             field="answer" if kind == "math" else "tests")


def metrics_of(rows: list[dict[str, Any]], isolation: str, items: dict[str, int]) -> dict[str, Any]:
    """Per kind: calls, parsed, kept, the gate's pass rate over parsed rows, reasons."""
    out: dict[str, Any] = {"isolation": isolation, "seed_items": items, "seed_self_check": "passed"}
    for kind in ("math", "code"):
        got = [r for r in rows if r["kind"] == kind]
        parsed = [r for r in got if r["error"] is None and r["parse_error"] is None]
        kept = sum(r["verifiable_keep"] for r in parsed)
        out[kind] = {"calls": len(got), "parsed": len(parsed), "kept": kept,
                     "pass_rate_parsed": round(kept / len(parsed), 4) if parsed else None,
                     "reasons": dict(sorted(Counter(r["verifiable_reason"] for r in parsed
                                                    if not r["verifiable_keep"]).items())),
                     "parse_errors": dict(sorted(Counter(r["parse_error"] or "call_error" for r in got
                                                         if r not in parsed).items()))}
    return out


@click.command("verifiable")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="Params file; this stage reads its verifiable section.")
@click.option("--seed", "seed_dir", required=True,
              help="Folder with math.jsonl (question, expression, answer) and code.jsonl (entry_point, task, "
                   "solution, tests).")
@click.option("--models", "models_dir", required=True, help="Provisioned models folder: the teacher role.")
@click.option("--prompts", "prompts_dir", required=True,
              help="Folder of prompt templates (verifiable_math.txt, verifiable_code.txt).")
@click.option("--cache", "cache_file", required=True, help="Teacher result cache (SQLite, shared with generate).")
@click.option("--out", "out_file", required=True,
              help="Writes every generated row with the verifiable gate's verdict here (Parquet).")
@click.option("--metrics", "metrics_file", required=True, help="Writes per-kind counts and pass rates (JSON).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def cli(params_file, seed_dir, models_dir, prompts_dir, cache_file, out_file, metrics_file, quiet) -> None:
    """Generate math and code rows from the verifiable seed; keep those execution agrees with."""
    from refinery.core.io import atomic_outputs
    from refinery.generation import calls as generation
    from refinery.generation.prompts import load_template
    from refinery.generation.teacher import GenerationCache, run_jobs
    from refinery.verify.check import CodeItem, MathItem, VerifiableGate, load_items
    from refinery.verify.generate import plan_calls, to_rows
    from refinery.verify.sandbox import Limits, isolation
    from schemas import verifiable as verifiable_schema

    t0 = time.perf_counter()
    params = load_section(params_file, "verifiable", VerifiableParams)
    seed = Path(seed_dir)
    math_items = load_items(seed / "math.jsonl", MathItem)
    code_items = load_items(seed / "code.jsonl", CodeItem)
    gate = VerifiableGate(Limits(timeout_s=params.timeout_s, cpu_s=params.cpu_s, memory_mb=params.memory_mb),
                          workers=params.workers)
    self_check(gate, math_items, "math", seed / "math.jsonl")
    self_check(gate, code_items, "code", seed / "code.jsonl")
    math_items, code_items = [i for _, i in math_items], [i for _, i in code_items]
    if params.max_items is not None:
        math_items, code_items = math_items[:params.max_items], code_items[:params.max_items]
    templates = {n: load_template(Path(prompts_dir) / f"{n}.txt") for n in ("verifiable_math", "verifiable_code")}
    teacher_id, backend = generation.teacher_backend(str(Path(models_dir).resolve()), params.batch_size,
                                                     params.threads, params.dtype)
    calls = plan_calls(math_items, code_items, templates, samples=params.samples, shots=params.shots,
                       seed=params.seed, temperature=params.temperature, top_p=params.top_p,
                       max_new_tokens=params.max_new_tokens, teacher_id=teacher_id)
    cache = GenerationCache(cache_file)
    try:
        results, stats = run_jobs([c.job for c in calls], backend, cache, batch_size=params.batch_size,
                                  desc="verifiable", quiet=quiet)
    finally:
        cache.close()
    rows = to_rows(calls, results, teacher_id)
    judged = [r for r in rows if r["error"] is None and r["parse_error"] is None]
    for r, c in zip(judged, gate.checks(judged)):
        r.update(verifiable_keep=c.reason is None, verifiable_reason=c.reason, verifiable_detail=c.detail,
                 value=c.value)
    for r in rows:
        if r not in judged:  # not judged: the call failed or did not parse (kept, with that reason)
            r.update(verifiable_keep=False, verifiable_reason=r["parse_error"] or "call_error",
                     verifiable_detail=r["error"], value=None)
    table = verifiable_schema.CONTRACT.validate(pa.Table.from_pylist(rows, schema=verifiable_schema.ARROW),
                                                "verifiable rows")
    metrics = metrics_of(rows, isolation(), {"math": len(math_items), "code": len(code_items)})
    with atomic_outputs() as outputs:
        outputs.parquet(table, out_file, verifiable_schema.ARROW)
        outputs.json(metrics, metrics_file)
    m, c = metrics["math"], metrics["code"]
    click.echo(f"verifiable: math {m['kept']}/{m['parsed']} parsed kept ({m['calls']} calls), code "
               f"{c['kept']}/{c['parsed']} parsed kept ({c['calls']} calls); {stats.calls} model calls, "
               f"{stats.cache_hits} cached; sandbox {metrics['isolation']}; {time.perf_counter() - t0:.0f} s "
               f"-> {out_file}", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
