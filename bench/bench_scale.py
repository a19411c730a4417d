"""Run N generated rows through generate -> gate -> recover -> assemble -> validate; print each stage's scaling.

Usage:
    python bench/bench_scale.py --rows 10000 100000            # the #22 scale benchmark (minutes)
    python bench/bench_scale.py --rows 2000 --model-sample 0   # smoke mode (tests/test_bench_scale.py)
    python bench/bench_scale.py --rows 10000 100000 --engine ray   # the same on the Ray engine (2 local workers)
    options: [--concurrency 256] [--latency-s 0] [--model-sample 200] [--gate-mode full|cascade]
             [--recover-share 0.1] [--seed 0] [--engine local|ray] [--profile] [--keep DIR]

For each size N it builds inputs at scale, deterministic by ``--seed`` (``bench/scale_data.py``: ~N/4 human train
rows on ~N/40 documents, val and test splits on other documents, AI-contaminated rows and DPO pairs), starts a mock
OpenAI-compatible teacher (``bench/bench_http_teacher.py``'s server, answering in each strategy's format with
planted failures, latency ``--latency-s``), provisions it as the teacher role (an endpoint spec with
``concurrency``), and runs each stage's real core in a fresh subprocess:

- generate: the ``refinery generate`` command (plan, the HTTP window through the SQLite cache, strict parsing,
  contract, Parquet); then ``generate (cached)``: the same command again, every call from the cache: the stage's
  cost beyond the teacher;
- gate: the gate stage's core (``calibrate`` -> ``build_gates`` -> ``run_gates`` -> contract -> accepted/rejected
  Parquet, thresholds.json, metrics) with the non-model gates on every row. The model gates are stand-ins there
  (deterministic by question and answer, 3% rejected each, so recovery sees their reasons) and cost nothing;
  ``gate models`` times the real ones (MiniLM embedder, SmolLM2 judge, MiniLM-based verifier and reward heads:
  untrained heads of the trained ones' architecture, so the time per row is theirs) on ``--model-sample`` rows and
  prints their cost extrapolated to N rows at the measured rate;
- recover: the recover stage's core (``refinery.recovery.run.recover``: diagnosis of every rejected row, both
  methods within a budget of ``--recover-share`` x rejected rows x max_attempts calls each through the mock
  teacher, every candidate re-gated with the same gates; planted rows left out: a fixed ~200, not scaled); then
  ``recover (cached)``: the same again, every teacher call from the cache: the stage's cost beyond the teacher;
- assemble, validate: the ``refinery assemble`` and ``refinery validate --warn-only`` commands (diversity by
  hashed n-grams: no model).

Per stage it prints rows, wall seconds (the stage's work, imports excluded), rows/s, client CPU seconds, peak RSS
of the stage's process (its own high-water mark, ``VmHWM``) and the part above its RSS after imports (``VmRSS``;
before 2026-12-08 both came from ``getrusage``, whose figure in a child starts at this benchmark's RSS when it
forked: at 100,000 rows that floored them at about 360 MiB); then, between the smallest and the largest
size, the ratio of time and of RSS per stage, and the #22 targets (every non-model stage >= 2,000 rows/s at
100,000 rows, peak RSS < 6 GB). ``--profile`` writes a cProfile of each stage (``<keep>/<rows>/<stage>.prof``)
and prints its top functions. Figures are printed, never asserted. The 2 cores are shared by the server, the
stage and whatever else runs: take figures from a quiet machine, and compare ratios within one run.

``--engine ray`` sets ``engine.kind: ray`` (``engine.workers`` workers on a local cluster each stage starts, as
``dvc repro`` does without an ``engine.address``): generate answers its teacher batches in Ray actors, the gate
stage's row-by-row gates run as Ray Data units (the stand-ins built on the workers from :class:`StandInRecipe`,
which Ray ships by value from this script, so the workers need not import bench/), validate runs its per-row
checks in Ray tasks; recover, assemble and the model-gate sample stay in the stage's process (recover has no Ray
path). On Ray, a stage's wall time holds the cluster's start, and its CPU seconds and RSS are the stage
process's only, not its workers'. ``bench/bench_ray_gate.py [--rows N]`` compares the two engines on the real
gate stage, with the real model gates.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STAGES = ("generate", "generate_cached", "gate", "gate_models", "recover", "recover_cached", "assemble",
          "validate")
MODEL_STAGES = ("gate_models",)  # measured on a sample and extrapolated; every other stage is held to the targets
TARGET_ROWS_PER_S = 2000
TARGET_RSS_GB = 6.0
STAND_IN_SHARE = 0.03  # share of rows each stand-in model gate rejects
# The generate and recover commands leave their HTTP teacher's aiohttp session to interpreter exit, where aiohttp
# prints one warning line per pooled connection: dropped from the stages' output here.
NOISE = ("Unclosed client session", "client_session: <aiohttp", "Unclosed connector", "connections: ['deque",
         "connector: <aiohttp")


# ------------------------------------------------------------------------------------------------------------------
# the parent: inputs, server, one subprocess per stage, the tables
# ------------------------------------------------------------------------------------------------------------------

def bench_params(rows: int, gate_mode: str, engine: str = "local") -> dict[str, Any]:
    """The project's params.yaml with the benchmark's settings: budget = rows, bounds set (no model calibrates),
    the engine named."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    # every call from the mix (no rare-class calls beyond it), parents in seeded order (no coverage audit to read)
    params["generate"].update(budget=rows, allocation="plain", rare_expansion=None)
    gate = params["gate"]
    gate["mode"] = gate_mode
    gate["faithfulness"].update(min_support=0.5, compare_modes=False)  # calibrated values of a real run stand here
    gate["reward"]["min_reward"] = 0.0
    gate["perplexity"]["max_perplexity"] = 100.0
    params["recover"]["injected_budget"] = 0
    params["validate"]["diversity"]["embedder"] = "hashing"
    params["engine"]["kind"] = engine
    return params


def provision_teacher(url: str, concurrency: int, models: Path) -> None:
    """Provision the mock server as the teacher role, as ``refinery provision`` records an endpoint spec."""
    from refinery.models.resolve import PROVENANCE_FILE, materialize, parse_spec

    spec = parse_spec("teacher", {"endpoint": url, "model": "mock", "concurrency": concurrency, "timeout_s": 60})
    (models / "teacher").mkdir(parents=True, exist_ok=True)
    record = materialize(spec, models / "weights")
    (models / "teacher" / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def run_child(stage: str, work: Path, args: argparse.Namespace, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one stage in a fresh interpreter; return its result with the process's peak RSS and CPU seconds."""
    result = work / f"{stage}.result.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", stage, "--workdir", str(work),
           "--child-args", json.dumps({**vars(args), **(extra or {})})]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # the stage's own lines, less aiohttp's at-exit warnings (see NOISE)
        if not line.startswith(NOISE):
            sys.stderr.write(line)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result.is_file():
        raise SystemExit(f"bench_scale: stage {stage} at {work.name} rows exited {proc.returncode}")
    out = json.loads(result.read_text(encoding="utf-8"))
    # the child's own high-water mark: its ru_maxrss (wait4) starts at this process's RSS when it forked
    out.update(process_wall_s=wall, peak_rss_mb=out.get("peak_rss_mb") or usage.ru_maxrss / 1024)
    return out


def fmt_row(stage: str, r: dict[str, Any]) -> str:
    rate = r["rows"] / r["wall_s"] if r["wall_s"] > 0 else float("inf")
    if stage in MODEL_STAGES:  # its wall time holds the models' loading: the rate is the sample's, every gate
        rate = 1 / sum(r["seconds_per_row"].values())
    return (f"{stage:<16}{r['rows']:>9,}{r['wall_s']:>9.2f}{rate:>11,.0f}{r['work_cpu_s']:>8.1f}"
            f"{r['rows'] / max(r['work_cpu_s'], 1e-9):>12,.0f}{r['peak_rss_mb']:>10,.0f}"
            f"{r['peak_rss_mb'] - r['base_rss_mb']:>10,.0f}  {r.get('note', '')}")


HEAD = (f"{'stage':<16}{'rows':>9}{'wall s':>9}{'rows/s':>11}{'CPU s':>8}{'rows/CPU s':>12}{'RSS MiB':>10}"
        f"{'work MiB':>10}  note")


def print_scaling(results: dict[int, dict[str, dict[str, Any]]]) -> None:
    """Print time, CPU and RSS ratios between the smallest and the largest size, and the targets at the largest.

    Each rate is held to the target twice: by wall time (what a user waits on a machine of their own) and by the
    stage process's CPU time (what the stage costs; on a shared machine the wall time also holds the other work's).
    """
    sizes = sorted(results)
    lo, hi = sizes[0], sizes[-1]
    print(f"\nscaling {lo:,} -> {hi:,} generated rows ({hi / lo:.1f}x rows): linear work shows time and CPU ratios "
          f"near the rows ratio; a stage that streams shows a work-RSS ratio near 1")
    print(f"{'stage':<16}{'rows x':>7}{'wall x':>7}{'CPU x':>7}{'RSS x':>7}{'work RSS x':>11}{'rows/s':>9}"
          f"{'rows/CPU s':>11}  >= {TARGET_ROWS_PER_S:,} rows/s at {hi:,} rows (wall; CPU)")
    for stage in STAGES:
        if stage not in results[hi] or stage not in results[lo] or stage in MODEL_STAGES:
            continue
        a, b = results[lo][stage], results[hi][stage]
        wa, wb = a["peak_rss_mb"] - a["base_rss_mb"], b["peak_rss_mb"] - b["base_rss_mb"]
        rate, cpu_rate = b["rows"] / b["wall_s"], b["rows"] / max(b["work_cpu_s"], 1e-9)

        def met(x: float) -> str:
            return "met" if x >= TARGET_ROWS_PER_S else "NOT met"

        verdict = f"{met(rate)}; {met(cpu_rate)}"
        if stage == "generate":
            verdict = "teacher-bound (the stage beyond the teacher: generate_cached)"
        elif stage == "recover" and b.get("teacher_s"):
            verdict += f"; {b['teacher_s']:.0f} s of it teacher calls (the stage beyond the teacher: recover_cached)"
        print(f"{stage:<16}{b['rows'] / max(a['rows'], 1):>7.1f}{b['wall_s'] / a['wall_s']:>7.1f}"
              f"{b['work_cpu_s'] / max(a['work_cpu_s'], 1e-9):>7.1f}{b['peak_rss_mb'] / a['peak_rss_mb']:>7.2f}"
              f"{wb / max(wa, 1):>11.2f}{rate:>9,.0f}{cpu_rate:>11,.0f}  {verdict}")
    peak = max(r["peak_rss_mb"] for r in results[hi].values() if "seconds_per_row" not in r) / 1024
    print(f"peak RSS of any non-model stage at {hi:,} rows: {peak:.2f} GiB (target < {TARGET_RSS_GB:g} GB: "
          f"{'met' if peak * 1.073741824 < TARGET_RSS_GB else 'NOT met'})")


def print_profile(path: Path, top: int = 10) -> None:
    import pstats

    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime")
    width = max(len(f"{Path(f).name}:{ln}({fn})") for (f, ln, fn) in list(stats.stats)[:200]) if stats.stats else 40
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
    for (f, ln, fn), (cc, nc, tt, ct, _) in rows:
        print(f"    {tt:8.2f} s self {ct:8.2f} s cum {nc:>10,} calls  {Path(f).name}:{ln}({fn})"[:160])
    del width


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000], help="generated rows per run")
    ap.add_argument("--concurrency", type=int, default=256, help="teacher requests in flight (endpoint spec)")
    ap.add_argument("--latency-s", type=float, default=0.0,
                    help="mean mock latency per request, seconds (lognormal; 0: answers at once)")
    ap.add_argument("--model-sample", type=int, default=200,
                    help="rows each real model gate scores to measure its rate (0: skip the model gates)")
    ap.add_argument("--model-cache", default=str(ROOT / ".refinery" / "bench" / "models"),
                    help="folder for the fp32 SmolLM2 converted once from its GGUF")
    ap.add_argument("--gate-mode", choices=["full", "cascade"], default="full")
    ap.add_argument("--recover-share", type=float, default=0.1,
                    help="recovery budget per method: this share of rejected rows x recover.max_attempts calls")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs")
    ap.add_argument("--engine", choices=["local", "ray"], default="local",
                    help="engine.kind of the generate, gate and validate stages (ray: a local cluster per stage)")
    ap.add_argument("--port", type=int, default=0,
                    help="the mock teacher's port (0: a free one); the teacher's id, and so every cache key and "
                         "generated row_id, holds it: give an earlier run's to reuse its teacher cache with --reuse")
    ap.add_argument("--profile", action="store_true", help="cProfile each stage; print its top functions")
    ap.add_argument("--keep", default=None, help="keep every input and output under this folder")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                    help="run only these stages (with --keep --reuse: on the outputs a previous run left there)")
    ap.add_argument("--reuse", action="store_true", help="with --keep: reuse the inputs and outputs found there")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-args", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, Path(args.workdir), json.loads(args.child_args))
        return
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the mock server (finally below)
    from bench.bench_http_teacher import start_server

    mean = args.latency_s
    scale = mean / 0.40  # the server's lognormal has a mean of 0.40 s at scale 1
    server, url = start_server(scale, "import sys\nsys.path.insert(0, %r)\nfrom bench.scale_data import mock_reply "
                                      "as reply\n" % str(ROOT), args.port)
    keep = Path(args.keep) if args.keep else None
    tmp = tempfile.mkdtemp(prefix="bench-scale-")
    base = keep or Path(tmp)
    results: dict[int, dict[str, dict[str, Any]]] = {}
    rates: dict[str, Any] | None = None
    print(f"scale benchmark: rows {', '.join(f'{n:,}' for n in args.rows)}; mock teacher at {url} (mean latency "
          f"{mean:g} s, concurrency {args.concurrency}); gate mode {args.gate_mode}; {args.engine} engine; "
          f"{os.cpu_count()} CPUs, shared by the server and the stage")
    try:
        for rows in args.rows:
            work = base / str(rows)
            import yaml

            from bench.scale_data import build_inputs

            if args.reuse and keep is not None and (work / "in" / "documents.parquet").is_file():
                print(f"\n== {rows:,} generated rows: inputs and earlier outputs reused from {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
                (work / "in").mkdir(parents=True)
                t0 = time.perf_counter()
                counts = build_inputs(rows, work / "in", args.seed)
                print(f"\n== {rows:,} generated rows: inputs built in {time.perf_counter() - t0:.1f} s "
                      f"({', '.join(f'{k} {v:,}' for k, v in counts.items())})")
            params = bench_params(rows, args.gate_mode, args.engine)
            (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
            provision_teacher(url, args.concurrency, work / "models")
            print(HEAD)
            results[rows] = {}
            for stage in STAGES:
                if stage not in args.stages or \
                        stage == "gate_models" and (args.model_sample <= 0 or rates is not None):
                    continue
                r = run_child(stage, work, args)
                results[rows][stage] = r
                if stage == "gate_models":
                    rates = r
                print(fmt_row(stage, r), flush=True)
                if args.profile and (work / f"{stage}.prof").is_file():
                    print_profile(work / f"{stage}.prof")
            if rates is not None and "gate" in results[rows]:
                print_model_extrapolation(rates, results[rows])
        if len(results) > 1:
            print_scaling(results)
        if keep is not None:
            (keep / "results.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1) + "\n",
                                               encoding="utf-8")
    finally:
        server.terminate()
        server.wait()
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


def print_model_extrapolation(rates: dict[str, Any], res: dict[str, dict[str, Any]]) -> None:
    """Print the model gates' cost at this size, extrapolated from the rates measured on the sample."""
    gate = res["gate"]
    n, survivors = gate["rows"], gate["kept_by_non_model"]
    per_row = rates["seconds_per_row"]
    total_full = sum(per_row.values()) * n
    total_cascade = sum(per_row.values()) * survivors
    parts = ", ".join(f"{g} {s * n / 60:,.1f} min" for g, s in per_row.items())
    seed_s = rates["seed_embed_s_per_row"] * gate["seed_rows"]
    print(f"  model gates, EXTRAPOLATED from {rates['rows']} sampled rows at the measured rates: full mode "
          f"{total_full / 60:,.1f} min for {n:,} rows ({parts}); cascade at most {total_cascade / 60:,.1f} min "
          f"({survivors:,} rows pass the non-model gates); plus {seed_s / 60:,.1f} min embedding the "
          f"{gate['seed_rows']:,} seed rows once")


# ------------------------------------------------------------------------------------------------------------------
# the children: one stage each
# ------------------------------------------------------------------------------------------------------------------

def child(stage: str, work: Path, opts: dict[str, Any]) -> None:
    """Import what the stage needs, note the RSS, run the stage's work (timed, maybe profiled), write its result."""
    runner = RUNNERS[stage]
    runner.prepare()
    base_rss = own_rss_mb("VmRSS")
    prof = None
    if opts.get("profile"):
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0, c0 = time.perf_counter(), time.process_time()
    out = runner.run(work, opts)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if prof is not None:
        prof.disable()
        prof.dump_stats(str(work / f"{stage}.prof"))
    (work / f"{stage}.result.json").write_text(json.dumps({**out, "wall_s": wall, "work_cpu_s": cpu,
                                                            "base_rss_mb": base_rss,
                                                            "peak_rss_mb": own_rss_mb("VmHWM")}),
                                                encoding="utf-8")


def own_rss_mb(field: str) -> float | None:
    """This process's current RSS (``VmRSS``) or its peak since it started (``VmHWM``), in MiB, from
    /proc/self/status; None where there is none. Not ``getrusage``: a child's ``ru_maxrss`` starts at its parent's
    RSS when it forked (kept across exec), so it would floor every figure at this benchmark's own memory."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None if field == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _paths(work: Path) -> dict[str, Path]:
    i = work / "in"
    return {"params": work / "params.yaml", "train": i / "train.parquet", "val": i / "val.parquet",
            "test": i / "test.parquet", "documents": i / "documents.parquet",
            "contaminated": i / "contaminated.parquet",
            "pairs": i / "pairs.parquet", "models": work / "models", "cache": work / "cache" / "teacher.sqlite",
            "gate_cache": work / "cache" / "gate", "synthetic": work / "03" / "synthetic.parquet",
            "gated": work / "04", "recovered": work / "05", "datasets": work / "06", "reports": work / "reports",
            "metrics": work / "metrics"}


class StandInGate:
    """A model gate's stand-in: verdicts by the row's text, a share rejected with the gate's marginal reason.

    By question and answer, not row_id: a row_id hashes the teacher's id, which holds the mock server's port, so
    the same rows get the same verdicts in every run.

    Its scores sit on either side of the gate's bound (thresholds.json), so recovery's diagnosis measures margins
    as it would on real scores. Costs nothing: the real gate's cost is measured on a sample (``gate_models``).
    """

    def __init__(self, name: str, bounds: dict[str, Any], share: float = STAND_IN_SHARE):
        from refinery.gates.registry import BY_NAME

        spec = BY_NAME[name]
        self.name, self.share = name, share
        self.reason = next(r for r in spec.reasons if r in spec.margins)
        m = spec.margins[self.reason]
        self.bound, self.side = float(bounds[m.bound]), m.side
        self.width = abs(self.bound) if m.relative else 0.5

    def apply(self, rows):
        import hashlib

        from refinery.gates.base import Verdicts

        texts = zip(rows.column("question").to_pylist(), rows.column("answer").to_pylist())
        u = [int.from_bytes(hashlib.blake2b(f"{self.name}|{q}|{a}".encode(), digest_size=8).digest(), "big") / 2 ** 64
             for q, a in texts]
        sign = 1.0 if self.side == "min" else -1.0
        score = [self.bound + sign * (x - self.share) * self.width for x in u]
        keep = [x >= self.share for x in u]
        return Verdicts(keep, score, [None if k else self.reason for k in keep])


class Timed:
    """Wrap a gate to add up the seconds its ``apply`` takes."""

    def __init__(self, gate):
        self.gate, self.name, self.seconds = gate, gate.name, 0.0

    def __getattr__(self, name: str):  # the gate's own attributes (recovery shares the dedup gate's store)
        return getattr(self.gate, name)

    def apply(self, rows):
        t0 = time.perf_counter()
        try:
            return self.gate.apply(rows)
        finally:
            self.seconds += time.perf_counter() - t0


def _no_models() -> None:
    """The stand-in recipe's model factory: its model gates load nothing."""
    return None


def _stand_in_recipe():
    """The class of :class:`StandInRecipe`, made on first use (it subclasses refinery's ``GateRecipe``)."""
    from dataclasses import dataclass

    from refinery.gates.registry import BY_NAME
    from refinery.gates.run import GateRecipe

    @dataclass(frozen=True)
    class StandInRecipe(GateRecipe):
        """The gate recipe of the Ray engine's workers: the real non-model gates, :class:`StandInGate` for the
        model gates (as :func:`bench_gates` builds them in the stage's process)."""

        def build(self, names: Any, models: Any = None) -> dict[str, Any]:
            real = super().build([n for n in names if not BY_NAME[n].needs_model])
            return {n: real[n] if n in real else StandInGate(n, self.thresholds[n]) for n in names}

    return StandInRecipe


def bench_gates(thresholds: dict[str, Any], ctx) -> dict[str, Timed]:
    """The gate stage's gates built from thresholds: the real non-model gates, stand-ins for the model gates."""
    from refinery.gates.registry import SPECS

    return {s.name: Timed(StandInGate(s.name, thresholds[s.name]) if s.needs_model
                          else s.gate_class().build(thresholds[s.name], ctx)) for s in SPECS}


class Runner:
    """One stage of the benchmark: ``prepare`` imports (before the RSS baseline), ``run`` does the stage's work.

    Stage modules are named as strings and run through ``refinery.cli`` (as the ``refinery`` command runs them):
    nothing outside ``stages/`` imports a stage (tests/test_pipeline_deps.py).
    """

    imports: tuple[str, ...] = ()

    def prepare(self) -> None:
        import importlib

        for m in self.imports:
            importlib.import_module(m)

    def run(self, work: Path, opts: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


class Generate(Runner):
    imports = ("stages.generate", "pandera.pandas", "pandas", "aiohttp", "refinery.models.backends.http")

    def run(self, work: Path, opts: dict[str, Any]) -> dict[str, Any]:
        import pyarrow.parquet as pq

        from refinery.cli import cli

        p = _paths(work)
        cli.main(["generate", "--params", str(p["params"]), "--train", str(p["train"]),
                  "--documents", str(p["documents"]),
                  "--models", str(p["models"]), "--prompts", str(ROOT / "prompts"), "--cache", str(p["cache"]),
                  "--out", str(p["synthetic"]), "--metrics", str(p["metrics"] / "generate.json"),
                  "--critiques", str(p["synthetic"].with_name("critiques.parquet")), "--quiet"],
                 standalone_mode=False)
        log = json.loads((p["cache"].parent / "runs" / "generate.json").read_text(encoding="utf-8"))
        m = json.loads((p["metrics"] / "generate.json").read_text(encoding="utf-8"))
        rows = pq.read_metadata(p["synthetic"]).num_rows
        return {"rows": rows, "teacher_s": log["seconds"], "calls": log["calls"], "cache_hits": log["cache_hits"],
                "note": f"{log['calls']:,} teacher calls ({log['cache_hits']:,} cached), streamed with the plan and the "
                        f"rows in {log['seconds']:.1f} s; "
                        f"{m['parsed']:,} parsed"}


class GenerateCached(Generate):
    def run(self, work: Path, opts: dict[str, Any]) -> dict[str, Any]:
        import hashlib

        p = _paths(work)
        before = hashlib.sha256(p["synthetic"].read_bytes()).hexdigest()
        out = super().run(work, opts)
        same = hashlib.sha256(p["synthetic"].read_bytes()).hexdigest() == before
        out["note"] = (f"every call from the cache ({out['cache_hits']:,}); output "
                       f"{'byte-identical' if same else 'DIFFERENT'} to the first run")
        return out


class Gate(Runner):
    imports = ("refinery.gates.run", "refinery.gates.rules", "refinery.gates.dedup", "refinery.gates.overlap",
               "refinery.gates.pii", "refinery.planted.measure", "schemas.gated", "pandera.pandas", "pandas",
               "rensa")

    def run(self, work: Path, opts: dict[str, Any]) -> dict[str, Any]:
        import pyarrow.compute as pc

        from refinery.core.io import atomic_outputs, read_parquet
        from refinery.core.params import load_section
        from refinery.engine.base import engine_of
        from refinery.gates.base import GateContext
        from refinery.gates.registry import GATES, SPECS
        from refinery.gates.run import GateParams, calibrate, judged_rows, reason_counts, run_gates
        from refinery.planted.measure import gate_overlap
        from schemas import documents as documents_schema
        from schemas import gated as gated_schema
        from schemas import split as split_schema
        from schemas import synthetic as synthetic_schema
        from schemas import thresholds as thresholds_schema

        p = _paths(work)
        params = load_section(p["params"], "gate", GateParams)
        synthetic = synthetic_schema.CONTRACT.validate(read_parquet(p["synthetic"]), str(p["synthetic"]))
        train = split_schema.CONTRACT.validate(read_parquet(p["train"]), str(p["train"]))
        val = split_schema.CONTRACT.validate(read_parquet(p["val"]), str(p["val"]))
        documents = documents_schema.CONTRACT.validate(read_parquet(p["documents"]), str(p["documents"]))
        ctx = GateContext(train, documents, None, p["gate_cache"], calib=val)
        thresholds = thresholds_schema.validate(calibrate(params, ctx), "calibrated thresholds")
        gates = bench_gates(thresholds, ctx)
        engine = engine_of(p["params"])
        with engine:
            if engine.name == "local":  # one call per gate in this process, as before engines existed
                gated = run_gates(synthetic, gates, params.mode)
            else:  # the row-by-row gates on the engine's workers, built there from the recipe
                recipe = _stand_in_recipe()(thresholds, train, documents, _no_models, str(p["gate_cache"]))
                gated = run_gates(synthetic, gates, params.mode, engine=engine, recipe=recipe)
        gated = gated_schema.CONTRACT.validate(gated, "gated synthetic rows")
        keep = gated.column("gate_keep")
        accepted, rejected = gated.filter(keep), gated.filter(pc.invert(keep))
        judged = judged_rows(gated)
        metrics = {**reason_counts(gated), "thresholds": thresholds_schema.review_copy(thresholds),
                   "mode": params.mode, "rows_judged": judged,
                   "overlap": gate_overlap(gated, list(GATES)) if params.mode == "full" else None}
        with atomic_outputs() as outputs:
            outputs.parquet(accepted, p["gated"] / "accepted.parquet", gated_schema.SYNTHETIC_ARROW)
            outputs.parquet(rejected, p["gated"] / "rejected.parquet", gated_schema.SYNTHETIC_ARROW)
            outputs.json(thresholds, p["gated"] / "thresholds.json")
            outputs.json(metrics, p["metrics"] / "gate.json")
        model = [s.name for s in SPECS if s.needs_model]
        non_model = [s.name for s in SPECS if not s.needs_model]
        kept = gated.column(f"{non_model[0]}_keep").to_numpy(zero_copy_only=False)
        for g in non_model[1:]:
            col = gated.column(f"{g}_keep")
            kept = kept & pc.fill_null(col, False).to_numpy(zero_copy_only=False)
        per_gate = {g: round(t.seconds, 2) for g, t in gates.items()}
        stand_in = sum(gates[g].seconds for g in model)
        seconds = (", ".join(f"{g} {s}" for g, s in per_gate.items() if g not in model)
                   + f" (model gates: stand-ins, {stand_in:.2f} s)") if engine.name == "local" else \
            f"dedup {per_gate['dedup']} (the other gates ran on the Ray workers)"
        return {"rows": gated.num_rows, "accepted": accepted.num_rows, "rejected": rejected.num_rows,
                "kept_by_non_model": int(kept.sum()), "seed_rows": train.num_rows, "gate_seconds": per_gate,
                "stand_in_s": stand_in, "engine": engine.name,
                "note": f"{accepted.num_rows:,} accepted, {rejected.num_rows:,} rejected; seconds per gate {seconds}"}


class GateModels(Runner):
    """Time each real model gate on a sample of generated rows (the rate the gate stage would see per row)."""

    imports = ("torch", "transformers", "refinery.gates.run", "refinery.models.embed", "refinery.models.verifier",
               "refinery.models.reward", "refinery.models.backends.local")

    def prepare(self) -> None:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # loading bars would drown the figures
        super().prepare()
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    def run(self, work: Path, opts: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        from refinery.core.io import read_json, read_parquet
        from refinery.gates.base import GateContext
        from refinery.gates.registry import SPECS
        from refinery.gates.run import Models
        from refinery.models import resolve
        from refinery.models.backends.factory import make_backend
        from refinery.models.embed import Embedder
        from refinery.models.heads import load_base, save_model
        from refinery.models.reward import load_reward
        from refinery.models.verifier import load_verifier

        p = _paths(work)
        params = json.loads(json.dumps(__import__("yaml").safe_load(p["params"].read_text())["gate"]))
        _, minilm, _ = resolve.embedded_source(resolve.parse_spec("embedder", "embedded:all-minilm-l6-v2"))
        smol = Path(opts["model_cache"]) / "smollm2-135m-instruct-fp32"
        if not (smol / "config.json").is_file():
            _, gguf, _ = resolve.embedded_source(resolve.parse_spec("judge", "embedded:smollm2-135m-instruct"))
            part = smol.with_name(smol.name + ".partial")
            shutil.rmtree(part, ignore_errors=True)
            part.mkdir(parents=True)
            resolve.convert_gguf(gguf, part)
            os.replace(part, smol)
        heads = work / "heads"
        for name in ("verifier", "reward"):  # untrained one-logit heads of the trained ones' architecture
            model, tok = load_base(minilm, trainable_layers=0)
            save_model(model, tok, heads / name, label=name)
        bs, threads = params["batch_size"], params["threads"]
        judge = make_backend({"kind": "local", "path": str(smol), "batch_size": bs, "threads": threads})
        embedder = Embedder(str(minilm), cache_dir=None, model_id="bench-minilm")
        models = Models(verifier=load_verifier(heads / "verifier", batch_size=bs, threads=threads),
                        reward=load_reward(heads / "reward", batch_size=bs, threads=threads), judge=judge,
                        embedder=embedder)
        train = read_parquet(p["train"])
        documents = read_parquet(p["documents"])
        thresholds = read_json(p["gated"] / "thresholds.json") if (p["gated"] / "thresholds.json").is_file() else None
        ctx = GateContext(train, documents, models, None)
        synthetic = read_parquet(p["synthetic"])
        parsed = synthetic.filter(pc.and_(pc.is_valid(synthetic.column("question")),
                                          pc.is_valid(synthetic.column("answer"))))
        n = min(int(opts["model_sample"]), parsed.num_rows)
        idx = np.linspace(0, parsed.num_rows - 1, n).astype(np.int64)
        sample = parsed.take(pa.array(idx))
        seconds: dict[str, float] = {}
        seed_s = 0.0
        for s in SPECS:
            if not s.needs_model:
                continue
            gate = s.gate_class().build(thresholds[s.name], ctx)
            if s.name == "overlap_embedding":  # its first call embeds the whole seed once: timed apart
                t0 = time.perf_counter()
                gate.nearest(sample.slice(0, 1))
                seed_s = time.perf_counter() - t0
            gate.apply(sample.slice(0, min(8, n)))  # warm-up: first-call allocations
            t0 = time.perf_counter()
            gate.apply(sample)
            seconds[s.name] = (time.perf_counter() - t0) / max(n, 1)
        note = ", ".join(f"{g} {1 / s:,.1f} rows/s" for g, s in seconds.items())
        return {"rows": n, "seconds_per_row": seconds, "seed_embed_s_per_row": seed_s / max(train.num_rows, 1),
                "note": f"real models on {n} rows: {note}; seed embedding {seed_s:.1f} s for {train.num_rows:,} rows"}


class Recover(Runner):
    imports = ("refinery.recovery.run", "refinery.gates.run", "refinery.gates.rules", "refinery.gates.dedup",
               "refinery.gates.overlap", "refinery.gates.pii", "schemas.recovered", "pandera.pandas", "pandas",
               "aiohttp", "refinery.models.backends.http", "rensa")

    def run(self, work: Path, opts: dict[str, Any]) -> dict[str, Any]:
        from refinery.core.io import read_json, read_parquet
        from refinery.core.params import load_section, params_hash
        from refinery.gates.base import GateContext
        from refinery.gates.run import GateParams
        from refinery.generation import calls as generation
        from refinery.generation.prompts import load_template
        from refinery.generation.strategies import GENERATION_STRATEGIES
        from refinery.recovery import actions, run
        from schemas import documents as documents_schema
        from schemas import gated as gated_schema
        from schemas import split as split_schema
        from schemas import thresholds as thresholds_schema

        p = _paths(work)
        params = load_section(p["params"], "recover", run.RecoverParams)
        gate_params = load_section(p["params"], "gate", GateParams)
        rejected = gated_schema.CONTRACT.validate(read_parquet(p["gated"] / "rejected.parquet"), "rejected")
        accepted = gated_schema.CONTRACT.validate(read_parquet(p["gated"] / "accepted.parquet"), "accepted")
        planted = gated_schema.INJECTED_ARROW.empty_table()  # a fixed ~200 planted rows in a real run: not scaled
        thresholds = thresholds_schema.validate(read_json(p["gated"] / "thresholds.json"), "thresholds.json")
        train = split_schema.CONTRACT.validate(read_parquet(p["train"]), str(p["train"]))
        documents = documents_schema.CONTRACT.validate(read_parquet(p["documents"]), str(p["documents"]))
        budget = int(float(opts["recover_share"]) * rejected.num_rows * params.max_attempts)
        params = params.model_copy(update={"budget": budget})
        run.check_params(params)
        templates = {n: load_template(ROOT / "prompts" / f"{n}.txt")
                     for n in actions.TEMPLATES + GENERATION_STRATEGIES}
        teacher_id, backend = generation.teacher_backend(str(p["models"]), params.batch_size, params.threads,
                                                         params.dtype)
        gates = bench_gates(thresholds, GateContext(train, documents, None, p["gate_cache"]))
        result = run.recover(rejected, accepted, planted, train, documents, params=params, thresholds=thresholds,
                             gates=gates, gate_mode=gate_params.mode, templates=templates, teacher_id=teacher_id,
                             backend=backend, cache_file=p["cache"], gate_cache=p["gate_cache"],
                             phash=params_hash(params), code_version="bench", quiet=True)
        result.write(p["recovered"], p["metrics"] / "recover.json", p["reports"] / "recover.md")
        m = result.metrics
        a, n, st = m["adaptive"]["overall"], (m["naive"] or {}).get("overall") or {}, result.teacher
        regate = sum(g.seconds for g in gates.values())
        return {"rows": rejected.num_rows, "budget": budget, "teacher_s": st["seconds"], "regate_s": regate,
                "calls": st["calls"], "cache_hits": st["cache_hits"],
                "note": f"{m['recoverable']:,} diagnosed recoverable; budget {budget:,} calls per method; adaptive "
                        f"recovered {a['recovered']:,}, naive {n.get('recovered', 0):,}; {st['calls']:,} teacher calls "
                        f"in {st['seconds']:.1f} s; re-gating {regate:.1f} s"}


class RecoverCached(Recover):
    """Recover again on the same inputs: every teacher call comes from the cache the first run filled (the mock
    server's port, and so every cache key, is the same within a run), so this is the stage beyond the teacher."""

    def run(self, work: Path, opts: dict[str, Any]) -> dict[str, Any]:
        import hashlib

        out_dir = _paths(work)["recovered"]

        def digest() -> str:
            return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(out_dir.glob("*.parquet")))).hexdigest()

        before = digest()
        out = super().run(work, opts)
        out["note"] = (f"every call from the cache ({out['cache_hits']:,}, {out['calls']:,} made); outputs "
                       f"{'byte-identical' if digest() == before else 'DIFFERENT'} to the first run; "
                       f"re-gating {out['regate_s']:.1f} s")
        return out


class Assemble(Runner):
    imports = ("stages.assemble", "refinery.gates.dedup", "refinery.training.lora", "pandera.pandas", "pandas",
               "rensa")

    def run(self, work: Path, opts: dict[str, Any]) -> dict[str, Any]:
        import pyarrow.parquet as pq

        from refinery.cli import cli

        p = _paths(work)
        cli.main(["assemble", "--params", str(p["params"]), "--train", str(p["train"]),
                  "--contaminated", str(p["contaminated"]),
                  "--accepted", str(p["gated"] / "accepted.parquet"),
                  "--recovered", str(p["recovered"] / "recovered.parquet"), "--generated", str(p["synthetic"]),
                  "--documents", str(p["documents"]), "--pairs", str(p["pairs"]), "--out", str(p["datasets"]),
                  "--metrics", str(p["metrics"] / "assemble.json")], standalone_mode=False)
        rows_in = sum(pq.read_metadata(f).num_rows for f in (
            p["train"], p["contaminated"], p["gated"] / "accepted.parquet", p["recovered"] / "recovered.parquet",
            p["synthetic"]))
        rows_out = sum(pq.read_metadata(f).num_rows for f in p["datasets"].glob("*.parquet"))
        return {"rows": rows_in, "rows_out": rows_out,
                "note": f"rows read (train, contaminated, accepted, recovered, generated); {rows_out:,} rows written "
                        f"over {len(list(p['datasets'].glob('*.parquet')))} arms"}


class Validate(Runner):
    imports = ("stages.validate", "refinery.validation.expectations", "refinery.validation.diversity",
               "great_expectations", "duckdb", "pandera.pandas", "pandas", "matplotlib.pyplot", "rensa")

    def run(self, work: Path, opts: dict[str, Any]) -> dict[str, Any]:
        import pyarrow.parquet as pq

        from refinery.cli import cli

        p = _paths(work)
        (work / "models").mkdir(exist_ok=True)
        cli.main(["validate", "--params", str(p["params"]), "--datasets", str(p["datasets"]),
                  "--train", str(p["train"]),
                  "--val", str(p["val"]), "--test", str(p["test"]), "--documents", str(p["documents"]),
                  "--models", str(p["models"]), "--cache", str(work / "cache" / "validate"),
                  "--expectations", str(ROOT / "schemas" / "expectations"), "--audit", str(p["reports"] / "audit"),
                  "--data-docs", str(p["reports"] / "data_docs"), "--plots", str(p["reports"] / "plots"),
                  "--metrics", str(p["metrics"] / "validate.json"), "--warn-only"], standalone_mode=False)
        rows = sum(pq.read_metadata(f).num_rows for f in p["datasets"].glob("*.parquet"))
        failed = json.loads((p["metrics"] / "validate.json").read_text(encoding="utf-8"))["failed_checks"]
        return {"rows": rows, "note": f"rows of every arm's dataset; {failed} failed checks (--warn-only)"}


RUNNERS: dict[str, Runner] = {"generate": Generate(), "generate_cached": GenerateCached(), "gate": Gate(),
                              "gate_models": GateModels(), "recover": Recover(), "recover_cached": RecoverCached(),
                              "assemble": Assemble(), "validate": Validate()}


if __name__ == "__main__":
    main()
