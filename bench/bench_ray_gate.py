"""Print the gate stage's wall time on the local engine and on Ray with 2 local workers, and check equal outputs.

Usage:
    python bench/bench_ray_gate.py --build /tmp/refinery-ci     # once: a ci-profile clone with gate's inputs
    python bench/bench_ray_gate.py --project /tmp/refinery-ci [--rows 2000] [--workers 2] [--repeats 1]

``--build DIR`` copies this checkout (what git would clone, uncommitted edits included) to DIR, applies the ``ci`` profile and runs
``dvc repro`` of everything the gate stage reads (provision, ingest, split, generate, inject, train_verifier,
train_reward): minutes. Then each run executes the gate stage's own ``cmd`` from DIR's dvc.yaml, as DVC would, in
a fresh process with its own empty gate cache and output folders under DIR/.bench-ray/, once with
``engine.kind: local`` and once with ``engine.kind: ray`` (a local cluster of ``--workers`` workers started by the stage itself, its start-up part
of the figure; each worker reserves one CPU and runs its models with ``gate.threads`` torch threads, as the
local engine does, since scores move in their last bits with the thread count). ``--rows N`` gates N generated rows
instead of the profile's own (the profile's rows, repeated with a numbered suffix on question and answer, so every
gate has N different rows to judge). The local engine runs with the profile's ``gate.threads``. The stage runs
DIR's own code (``PYTHONPATH=DIR``): rebuild DIR after changing the code, or copy the changed files into it.

With ``--fixed-cost`` each repeat also runs the Ray engine's fixed cost alone: a cluster started as the stage starts
it, ``--workers`` actors that each load the gate models once (as the stage's workers do), the cluster stopped. Ray
pays that cost whatever it gates, on top of the work the local engine does; so, with the machine's busy CPU seconds
measured around each run (every process counted, Ray's daemons too: measure on an otherwise idle machine), the
figure ``(local CPU + fixed CPU) / cores`` is a wall time a Ray run cannot beat here, however well it overlaps its
work (assuming the gating itself costs a worker the CPU it costs the stage's own process).

Prints both wall times, their ratio (target: Ray within 1.3x of local) and whether every output file is equal
byte for byte (accepted, rejected, injected Parquet and thresholds.json; the metrics files too). With
``--reference dvc`` only the Ray run is made, and its outputs are compared with the project's own gate outputs
(``data/04_gated``, ``metrics/gate*.json``, made by ``dvc repro`` with the local engine; no ratio then). With
``--check`` it exits 1 when any output differs, naming the first differing cell (tests/test_engine_ray.py runs
it that way, ``--reference dvc``, on the ci project the end-to-end tests reproduce). Figures are printed, never
asserted.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import yaml

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = ("provision", "ingest", "split", "generate", "inject", "train_verifier", "train_reward")
OUTPUTS = ("accepted.parquet", "rejected.parquet", "injected.parquet", "thresholds.json")


def _env(project: Path) -> dict[str, str]:
    """The stage's environment: the project's own code first (the driver's and every Ray worker's)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(project),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "REFINERY_PROGRESS_S": os.environ.get("REFINERY_PROGRESS_S", "60")}


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(cwd), capture_output=True, text=True)
    if proc.returncode != 0:
        raise click.ClickException(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def build(dest: Path) -> None:
    """Copy this checkout to ``dest``, apply the ci profile and produce every input of the gate stage."""
    if dest.exists():
        raise click.ClickException(f"{dest} exists: remove it or pass it as --project")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=b@b", "-c", "user.name=bench", "commit", "-qm", "bench clone"],
                [sys.executable, "-m", "refinery.cli", "profile", "apply", "ci"],
                ["dvc", "repro", *UPSTREAM]):
        click.echo(f"build: {' '.join(cmd)}", err=True)
        _run(cmd, dest)


def enlarge(src: Path, dest: Path, rows: int) -> Path:
    """Write ``rows`` generated rows: the profile's rows repeated, each copy with a numbered suffix."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from refinery.core.text import stable_id

    table = pq.read_table(src)
    reps = -(-rows // table.num_rows)
    parts = []
    for k in range(reps):
        part = table
        if k:
            for col in ("question", "answer"):
                i = part.schema.get_field_index(col)
                part = part.set_column(i, part.schema.field(i), pa.array(
                    [None if v is None else f"{v} (variant {k})" for v in part.column(col).to_pylist()], pa.string()))
            for col, prefix in (("row_id", "syn"), ("cache_key", "k")):
                i = part.schema.get_field_index(col)
                part = part.set_column(i, part.schema.field(i), pa.array(
                    [stable_id(prefix, str(k), v) for v in part.column(col).to_pylist()], pa.string()))
        parts.append(part)
    out = pa.concat_tables(parts).slice(0, rows)
    pq.write_table(out, dest)
    return dest


def gate_command(project: Path, params: Path, run: Path, synthetic: Path | None) -> list[str]:
    """The gate stage's cmd from ``project``'s dvc.yaml, writing under ``run`` (outputs, metrics, plots, cache)."""
    cmd = shlex.split(yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["gate"]["cmd"])
    swap = {"--params": str(params), "--out": str(run / "out"), "--metrics": str(run / "gate.json"),
            "--injection-metrics": str(run / "gate_injection.json"), "--plots": str(run / "plots"),
            "--cache": str(run / "cache")}
    if synthetic is not None:
        swap["--synthetic"] = str(synthetic)
    return [c if i == 0 or cmd[i - 1] not in swap else swap[cmd[i - 1]] for i, c in enumerate(cmd)]


def params_for(project: Path, run: Path, kind: str, workers: int) -> Path:
    """Write the project's params with ``engine.kind`` set (and the Ray workers), for one run."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["engine"] = {**params["engine"], "kind": kind, "address": None, "workers": workers,
                        "cpus_per_worker": 1}
    path = run / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def busy_cpu_s() -> float | None:
    """Return the machine's busy CPU seconds so far, every process counted (Ray's daemons and workers are no
    children of the stage): Linux's /proc/stat, None elsewhere. Meaningful only on an otherwise idle machine."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def timed(cmd: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float, float | None]:
    """Run ``cmd``; return the process, its wall seconds and the machine's busy CPU seconds meanwhile."""
    c0, t0 = busy_cpu_s(), time.perf_counter()
    proc = _run(cmd, cwd)
    seconds, c1 = time.perf_counter() - t0, busy_cpu_s()
    return proc, seconds, None if c0 is None or c1 is None else c1 - c0


def time_gate(project: Path, run: Path, kind: str, workers: int, synthetic: Path | None) -> tuple[float, float | None]:
    """Run the gate stage once in a fresh process with an empty cache; return its wall and busy CPU seconds."""
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    cmd = gate_command(project, params_for(project, run, kind, workers), run, synthetic)
    proc, seconds, cpu = timed(cmd, project)
    (run / "stderr.log").write_text(proc.stderr)
    return seconds, cpu


class _LoadModels:
    """A Ray Data actor that loads what a model-gate worker of the stage loads (judge, verifier, reward model,
    embedder, with the stage's threads), then passes its rows through: the Ray engine's fixed cost, no gating."""

    def __init__(self, loader: object):
        models = loader()
        for name in ("judge", "verifier", "reward"):
            getattr(models, name)
        models.embedder.embed(["a text to load the embedder"])

    def __call__(self, batch: object) -> object:
        return batch


def measure_fixed_cost(project: Path, workers: int) -> None:
    """In this process: start the Ray engine as the stage would, have ``workers`` actors load the gate models
    once each, stop the cluster (what the Ray engine costs whatever the rows; run by --fixed-cost in a child)."""
    import tempfile

    import pyarrow as pa

    from refinery.core.params import load_section
    from refinery.engine.params import EngineParams
    from refinery.engine.raydata import RayEngine
    from refinery.gates.run import GateParams, ModelLoader

    params = load_section(project / "params.yaml", "gate", GateParams)
    with tempfile.TemporaryDirectory() as cache:
        loader = ModelLoader(params, str(project / "models" / "base"), str(project / "models" / "verifier"),
                             str(project / "models" / "reward"), cache)
        engine = RayEngine(EngineParams(kind="ray", workers=workers, cpus_per_worker=1, block_rows=256), quiet=True)
        with engine:
            ray = engine.connect()
            ds = ray.data.from_arrow([pa.table({"x": [i]}) for i in range(workers)]).map_batches(
                _LoadModels, fn_constructor_args=(loader,), batch_size=None, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)
            rows = sum(b.num_rows for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    if rows != workers:
        raise click.ClickException(f"fixed cost: {rows} of {workers} rows came back")


def first_difference(a: Path, b: Path) -> str | None:
    """Return where two output files first differ (a cell for Parquet), or None when their bytes are equal."""
    if a.read_bytes() == b.read_bytes():
        return None
    if a.suffix != ".parquet":
        return f"{a.name}: contents differ"
    import pyarrow.parquet as pq

    x, y = pq.read_table(a), pq.read_table(b)
    if x.schema != y.schema or x.num_rows != y.num_rows:
        return f"{a.name}: schema or row count differs ({x.num_rows} vs {y.num_rows} rows)"
    for name in x.column_names:
        for i, (p, q) in enumerate(zip(x.column(name).to_pylist(), y.column(name).to_pylist())):
            if p != q and not (p != p and q != q):  # NaN equals NaN here
                return f"{a.name}: row {i} column {name}: {p!r} != {q!r}"
    return f"{a.name}: equal values, different bytes"


@click.command()
@click.option("--project", type=click.Path(path_type=Path), help="A ci-profile clone with the gate stage's inputs.")
@click.option("--build", "build_dir", type=click.Path(path_type=Path), help="Make such a clone here first.")
@click.option("--rows", type=int, default=None, help="Gate this many generated rows (default: the profile's own).")
@click.option("--workers", type=int, default=2, show_default=True, help="Ray workers (local cluster).")
@click.option("--repeats", type=int, default=1, show_default=True, help="Runs per engine; the fastest is printed.")
@click.option("--reference", type=click.Choice(["local", "dvc"]), default="local", show_default=True,
              help="What Ray's outputs are compared with: a local run here, or the project's own dvc outputs.")
@click.option("--check", is_flag=True, help="Exit 1 when the two engines' outputs differ.")
@click.option("--fixed-cost", is_flag=True,
              help="Also measure the Ray engine's fixed cost (start, one model load per worker, stop) and print a "
                   "lower bound on Ray's wall time on this machine's cores, given the local run's CPU.")
@click.option("--fixed-cost-child", is_flag=True, hidden=True)
def main(project: Path | None, build_dir: Path | None, rows: int | None, workers: int, repeats: int,
         reference: str, check: bool, fixed_cost: bool, fixed_cost_child: bool) -> None:
    if fixed_cost_child:
        if project is None:
            raise click.UsageError("--fixed-cost-child needs --project")
        measure_fixed_cost(project.resolve(), workers)
        return
    if build_dir is not None:
        build(build_dir.resolve())
        project = project or build_dir
    if project is None:
        raise click.UsageError("give --project (a ci-profile clone with gate's inputs) or --build DIR")
    project = project.resolve()
    work = project / ".bench-ray"
    work.mkdir(exist_ok=True)
    synthetic = None
    if rows is not None:
        synthetic = enlarge(project / "data" / "03_generated" / "synthetic.parquet", work / "synthetic.parquet", rows)
    if reference == "dvc" and rows is not None:
        raise click.UsageError("--reference dvc compares with the project's own rows: leave out --rows")
    kinds = ("local", "ray") if reference == "local" else ("ray",)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    cpus: dict[str, list[float | None]] = {k: [] for k in kinds}
    fixed: list[tuple[float, float | None]] = []
    for r in range(repeats):
        for kind in kinds:  # alternated, so both see the same background load on average
            seconds, cpu = time_gate(project, work / kind, kind, workers, synthetic)
            times[kind].append(seconds)
            cpus[kind].append(cpu)
            click.echo(f"run {r + 1}/{repeats} {kind}: {seconds:.1f} s, machine busy {_cpu(cpu)} CPU s", err=True)
        if fixed_cost:
            _, seconds, cpu = timed([sys.executable, str(Path(__file__).resolve()), "--project", str(project),
                                     "--workers", str(workers), "--fixed-cost-child"], project)
            fixed.append((seconds, cpu))
            click.echo(f"run {r + 1}/{repeats} Ray fixed cost: {seconds:.1f} s, machine busy {_cpu(cpu)} CPU s",
                       err=True)
    if reference == "local":
        ref_out = work / "local" / "out"
        ref_metrics = {f: work / "local" / f for f in ("gate.json", "gate_injection.json")}
    else:
        ref_out = project / "data" / "04_gated"
        ref_metrics = {f: project / "metrics" / f for f in ("gate.json", "gate_injection.json")}
    diffs = [d for f in OUTPUTS if (d := first_difference(ref_out / f, work / "ray" / "out" / f))]
    diffs += [d for f, path in ref_metrics.items() if (d := first_difference(path, work / "ray" / f))]
    local, ray = min(times.get("local") or [float("nan")]), min(times["ray"])
    bound = None
    local_cpu = [c for c in cpus.get("local", []) if c is not None]
    fixed_cpu = [c for _, c in fixed if c is not None]
    if local_cpu and fixed_cpu:  # the local run's CPU plus Ray's fixed CPU, spread perfectly over every core
        bound = (min(local_cpu) + min(fixed_cpu)) / (os.cpu_count() or 1)
    import pyarrow.parquet as pq

    n = pq.read_metadata(synthetic or project / "data" / "03_generated" / "synthetic.parquet").num_rows
    planted = pq.read_metadata(project / "data" / "03_generated" / "injected.parquet").num_rows
    block_rows = yaml.safe_load((project / "params.yaml").read_text())["engine"]["block_rows"]
    if bound:
        click.echo(f"Ray's bound on {os.cpu_count()} cores: {bound:.1f} s = {bound / local:.2f}x local (the local "
                   f"run's CPU plus Ray's fixed cost, every core busy all the time)")
    click.echo(json.dumps({"generated_rows": n, "planted_rows": planted, "block_rows": block_rows,
                           "ray_workers": workers, "local_s": round(local, 1) if local == local else None,
                           "ray_s": round(ray, 1), "ray_over_local": round(ray / local, 3) if local == local else None,
                           "local_busy_cpu_s": _round(cpus.get("local")), "ray_busy_cpu_s": _round(cpus["ray"]),
                           "ray_fixed_s": _round([t for t, _ in fixed]), "ray_fixed_busy_cpu_s": _round(fixed_cpu),
                           "cores": os.cpu_count(), "ray_bound_s": round(bound, 1) if bound else None,
                           "ray_bound_over_local": round(bound / local, 3) if bound and local == local else None,
                           "reference": reference, "outputs_equal": not diffs}))
    against = "the local run" if reference == "local" else "the project's dvc outputs"
    click.echo(f"gate stage: local {local:.1f} s, Ray ({workers} workers) {ray:.1f} s: ratio {ray / local:.2f} "
               f"(target <= 1.3); outputs {'equal byte for byte' if not diffs else 'DIFFER: ' + diffs[0]} "
               f"(against {against})")
    if check and diffs:
        sys.exit(1)


def _cpu(cpu: float | None) -> str:
    return "n/a" if cpu is None else f"{cpu:.0f}"


def _round(values: list[float | None] | None) -> float | None:
    """The smallest value (the run least disturbed), rounded; None when there is none."""
    values = [v for v in values or [] if v is not None]
    return round(min(values), 1) if values else None


if __name__ == "__main__":
    main()
