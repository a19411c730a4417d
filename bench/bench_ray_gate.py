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


def time_gate(project: Path, run: Path, kind: str, workers: int, synthetic: Path | None) -> float:
    """Run the gate stage once in a fresh process with an empty cache; return its wall seconds."""
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    cmd = gate_command(project, params_for(project, run, kind, workers), run, synthetic)
    t0 = time.perf_counter()
    proc = _run(cmd, project)
    seconds = time.perf_counter() - t0
    (run / "stderr.log").write_text(proc.stderr)
    return seconds


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
def main(project: Path | None, build_dir: Path | None, rows: int | None, workers: int, repeats: int,
         reference: str, check: bool) -> None:
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
    for r in range(repeats):
        for kind in kinds:  # alternated, so both see the same background load on average
            times[kind].append(time_gate(project, work / kind, kind, workers, synthetic))
            click.echo(f"run {r + 1}/{repeats} {kind}: {times[kind][-1]:.1f} s", err=True)
    if reference == "local":
        ref_out = work / "local" / "out"
        ref_metrics = {f: work / "local" / f for f in ("gate.json", "gate_injection.json")}
    else:
        ref_out = project / "data" / "04_gated"
        ref_metrics = {f: project / "metrics" / f for f in ("gate.json", "gate_injection.json")}
    diffs = [d for f in OUTPUTS if (d := first_difference(ref_out / f, work / "ray" / "out" / f))]
    diffs += [d for f, path in ref_metrics.items() if (d := first_difference(path, work / "ray" / f))]
    local, ray = min(times.get("local") or [float("nan")]), min(times["ray"])
    import pyarrow.parquet as pq

    n = pq.read_metadata(synthetic or project / "data" / "03_generated" / "synthetic.parquet").num_rows
    planted = pq.read_metadata(project / "data" / "03_generated" / "injected.parquet").num_rows
    block_rows = yaml.safe_load((project / "params.yaml").read_text())["engine"]["block_rows"]
    click.echo(json.dumps({"generated_rows": n, "planted_rows": planted, "block_rows": block_rows,
                           "ray_workers": workers, "local_s": round(local, 1) if local == local else None,
                           "ray_s": round(ray, 1), "ray_over_local": round(ray / local, 3) if local == local else None,
                           "reference": reference, "outputs_equal": not diffs}))
    against = "the local run" if reference == "local" else "the project's dvc outputs"
    click.echo(f"gate stage: local {local:.1f} s, Ray ({workers} workers) {ray:.1f} s: ratio {ray / local:.2f} "
               f"(target <= 1.3); outputs {'equal byte for byte' if not diffs else 'DIFFER: ' + diffs[0]} "
               f"(against {against})")
    if check and diffs:
        sys.exit(1)


if __name__ == "__main__":
    main()
