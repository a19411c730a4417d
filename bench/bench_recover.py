"""Run the recover stage at a budget that attempts every recoverable row, and print the #5 target figures.

Usage: python bench/bench_recover.py [--params params.yaml] [--max-attempts 3] [--keep DIR]

The pipeline's own recover stage spends ``recover.budget`` calls per method (the demo: 32, to stay quick), so
its recovery rate is a share of the rows that budget reaches. This benchmark runs the same stage
(``stages/recover.py``, every gate re-applied to every candidate) with the recover stage's ``cmd`` from dvc.yaml
(its inputs: the gate outputs of the last ``dvc repro`` in this working tree; its outputs: a temp folder), with
the budget set to ``max_attempts`` calls for every rejected row, so every row
diagnosed recoverable is attempted by both methods. It prints, for adaptive recovery and naive resampling at
that equal budget: rows recovered of those diagnosed recoverable, extra teacher calls per recovered row, the
adaptive / naive ratio, and injected errors that survived into recovered rows; then each target of #5 with
"met" or "NOT met". Figures are printed, never asserted.

Targets (#5): adaptive recovers >= 1.5x as many rows as naive resampling at equal call budget; recovery rate
>= 70% of rows diagnosed recoverable at <= 2.5 extra teacher calls per recovered row; zero injected errors
survive into recovered rows.

Teacher calls go through the project's cache (the recover stage's ``--cache``), so a rerun on unchanged
inputs makes no model call. For CosmosQA, run it in a checkout where ``make repro PROFILE=cosmosqa`` ran.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from refinery.core import dag  # noqa: E402


def bench_args(stage: str, params_file: Path, out: Path) -> list[str]:
    """The options of a stage's cmd in dvc.yaml, with ``params_file`` as its params and every path the stage
    writes (its outs, metrics and plots) moved into ``out`` under its own name: the project's outputs stay as they
    are."""
    words = dag.command(stage)[2:]  # after "refinery <stage>"
    written = set(dag.written(stage))
    return [str(params_file) if i and words[i - 1] == "--params" else str(out / Path(w).name) if w in written else w
            for i, w in enumerate(words)]



@click.command()
@click.option("--params", "params_file", default="params.yaml", show_default=True)
@click.option("--max-attempts", type=int, default=None, help="Calls per row (default: recover.max_attempts).")
@click.option("--keep", "keep_dir", default=None, help="Write the stage's outputs here instead of a temp folder.")
def main(params_file: str, max_attempts: int | None, keep_dir: str | None) -> None:
    params = yaml.safe_load(Path(params_file).read_text(encoding="utf-8"))
    rejected = Path(dag.option("recover", "--rejected"))
    if not rejected.exists():
        sys.exit(f"{rejected}: not found; run `dvc repro gate` (or `make repro`) first")
    rows = pq.read_metadata(rejected).num_rows
    attempts = max_attempts or int(params["recover"]["max_attempts"])
    params["recover"].update(budget=attempts * rows, max_attempts=attempts)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(keep_dir) if keep_dir else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        bench_params = out / "params.yaml"
        bench_params.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "stages" / "recover.py"), *bench_args("recover", bench_params, out),
                        "--quiet"], check=True)
        wall = time.perf_counter() - t0
        m = json.loads((out / Path(dag.option("recover", "--metrics")).name).read_text(encoding="utf-8"))
    a, n = m["adaptive"]["overall"], m["naive"]["overall"]
    print(f"recover at full budget: {rows} rejected rows, {m['recoverable']} diagnosed recoverable, "
          f"{attempts} attempts per row, budget {m['budget']} calls per method, {wall:.0f} s")
    for name, o in (("adaptive", a), ("naive", n)):
        print(f"  {name:8s} recovered {o['recovered']}/{o['recoverable']} ({o['recovery_rate_of_recoverable']:.1%}) "
              f"with {o['calls']} calls: {o['calls_per_recovered']} calls per recovered row; "
              f"yield {o['yield_before']:.2f} -> {o['yield_after']:.2f}")
    for mode, pm in sorted(m["adaptive"]["per_mode"].items()):
        nm = m["naive"]["per_mode"].get(mode, {})
        print(f"    {mode:20s} adaptive {pm.get('recovered', 0)}/{pm.get('attempted', 0)}, "
              f"naive {nm.get('recovered', 0)}/{nm.get('attempted', 0)}")
    inj = m.get("injected") or {}
    survived = {k: (inj.get(k) or {}).get("errors_surviving_into_recovered") for k in ("adaptive", "naive")}
    ratio = a["recovered"] / n["recovered"] if n["recovered"] else float("inf")
    rate, calls = a["recovery_rate_of_recoverable"], a["calls_per_recovered"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print(f"target adaptive >= 1.5x naive: {ratio:.2f}x -> {verdict(ratio >= 1.5)}")
    print(f"target >= 70% of recoverable at <= 2.5 calls per recovered row: {rate:.1%} at {calls} -> "
          f"{verdict(rate >= 0.70 and calls is not None and calls <= 2.5)}")
    print(f"target zero injected errors surviving (planted rows, budget {inj.get('budget')}): adaptive "
          f"{survived['adaptive']}, naive {survived['naive']} -> {verdict(not any(survived.values()))}")


if __name__ == "__main__":
    main()
