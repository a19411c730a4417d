"""End to end: `dvc repro` on a fresh copy of the project, twice, and on a second copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from refinery.generation.teacher import GenerationCache
from tests.ci_project import ci_clone
from tests.ci_project import run as _run
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def lock_outs(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])}


def stage_outs(repo: Path) -> dict[str, dict[str, str]]:
    """Return ``{stage: {out path: md5}}`` from dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {name: {o["path"]: o["md5"] for o in st.get("outs", [])} for name, st in lock["stages"].items()}


# The LoRA fine-tunes and what is computed from them; every stage before them must match to the byte.
AFTER_TRAINING = ("train@", "evaluate", "report")
ARMS = list(yaml.safe_load((ROOT / "params.yaml").read_text())["assemble"]["arms"])


def leftovers(repo: Path) -> list[str]:
    """Refinery's scratch, backups and commit journals anywhere outside hidden folders."""
    found = []
    for folder, dirs, files in os.walk(repo):
        dirs[:] = [d for d in dirs if not d.startswith(".") or d.startswith(".refinery-")]
        found += [str(Path(folder, n).relative_to(repo)) for n in dirs + files if n.startswith(".refinery-")]
    return found


def test_repro_on_two_fresh_clones_is_byte_identical_and_a_rerun_is_a_no_op(ci_project, tmp_path):
    a = ci_project
    # the demo went through provision -> ingest -> split
    split = json.loads((a / "metrics" / "split.json").read_text())
    ingest = json.loads((a / "metrics" / "ingest.json").read_text())
    assert ingest["qa_rows"] > 0 and sum(split["rows"].values()) == ingest["qa_rows"]
    assert sum(split["leakage"].values()) == 0
    for role in ("teacher", "judge", "student", "embedder"):
        prov = json.loads((a / "models" / "base" / role / "PROVENANCE.json").read_text())
        assert prov["files"] and prov["package_version"]
    # a second repro changes nothing
    t0 = time.perf_counter()
    again = _run([sys.executable, "-m", "dvc", "repro"], a)
    print(f"no-op repro: {time.perf_counter() - t0:.1f} s")
    assert "up to date" in again.stdout
    # a second fresh clone gives the same dvc.lock hash for every output of every stage before training
    b = ci_clone(tmp_path / "b")
    _run([sys.executable, "-m", "dvc", "repro"], b)
    lock_a, lock_b = stage_outs(a), stage_outs(b)
    assert lock_a.keys() == lock_b.keys()
    before = [s for s in lock_a if not s.startswith(AFTER_TRAINING)]
    print(f"{'stage':<22} {'outs':>4}  clone a == clone b (dvc.lock md5)")
    for stage in lock_a:
        same = sum(lock_a[stage][k] == lock_b[stage].get(k) for k in lock_a[stage])
        print(f"{stage:<22} {len(lock_a[stage]):>4}  {same}/{len(lock_a[stage])} identical")
    differing = {s: sorted(k for k in lock_a[s] if lock_a[s][k] != lock_b[s].get(k)) for s in before}
    assert not {s: d for s, d in differing.items() if d}, f"outputs before training differ: {differing}"
    # training is deterministic too: the adapters' weights and every training metric are identical; only
    # the git commit each clone records (run identity, in environment.json and the report) differs
    commits = (_run(["git", "rev-parse", "HEAD"], a).stdout.strip(), _run(["git", "rev-parse", "HEAD"], b).stdout.strip())
    for stage in (s for s in lock_a if s.startswith(AFTER_TRAINING)):
        for out, md5 in lock_a[stage].items():
            if md5 != lock_b[stage][out]:
                assert same_but_run_identity(a / out, b / out, commits), f"{stage}: {out} differs beyond the git commit"
    runs = sorted(p.name for p in (a / "metrics" / "train").glob("*.json"))
    assert runs == sorted(f"{arm}-s42.json" for arm in ARMS), runs  # every arm of params.yaml trained
    for run in runs:
        ma = json.loads((a / "metrics" / "train" / run).read_text())
        mb = json.loads((b / "metrics" / "train" / run).read_text())
        assert ma == mb, run
    # the later stages ran and passed: recovery, assembly, validation of every arm, training, evaluation, report
    for arm in ARMS:
        audit = json.loads((a / "reports" / "audit" / f"{arm}.json").read_text())
        assert audit["decision"] == "accept", audit.get("failed_checks")
    recover = json.loads((a / "metrics" / "recover.json").read_text())
    assert recover["adaptive"]["overall"]["rows"] > 0
    for name in ("base", *(f"{arm}-s42" for arm in ARMS)):
        assert json.loads((a / "metrics" / "eval" / f"{name}.json").read_text())
    report = (a / "reports" / "report.md").read_text()
    assert "[FILL]" not in report and "X.XXX" not in report and "## " in report
    assert report.index("## The seed questions") < report.index("## Datasets")  # the answers come first
    assert leftovers(a) == [] and leftovers(b) == []


def same_but_run_identity(x: Path, y: Path, commits: tuple[str, str]) -> bool:
    """Compare two outputs (files or folders) with each clone's own git commit (``commits``) blanked out."""
    if x.is_dir():
        files_x = sorted(p.relative_to(x) for p in x.rglob("*") if p.is_file())
        files_y = sorted(p.relative_to(y) for p in y.rglob("*") if p.is_file())
        return files_x == files_y and all(same_but_run_identity(x / r, y / r, commits) for r in files_x)
    bx, by = x.read_bytes(), y.read_bytes()
    if bx == by:
        return True
    return bx.replace(commits[0].encode(), b"_") == by.replace(commits[1].encode(), b"_")


# ---- kill -9 in the middle of a long stage: the rerun resumes without cleanup and gives the same outputs ----

def _kill_when(repo: Path, stage: str, ready, timeout_s: float = 300) -> float:
    """Start `dvc repro -f -s STAGE`, SIGKILL its whole process group as soon as ``ready()`` holds."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "-f", "-s", stage], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.perf_counter()
    try:
        while not ready():
            assert proc.poll() is None, f"{stage} finished before it could be killed"
            assert time.perf_counter() - t0 < timeout_s, f"{stage}: kill condition not reached"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
    return time.perf_counter() - t0


def _scratch_under(folder: Path):
    return lambda: any(p.name.startswith(".refinery-tmp-") for p in folder.rglob(".refinery-tmp-*"))


def _after(seconds: float):
    start: list[float] = []

    def ready() -> bool:
        start.append(time.perf_counter()) if not start else None
        return time.perf_counter() - start[0] >= seconds
    return ready


def test_kill_9_during_teacher_training_and_gate_stages_resumes_to_the_same_outputs(ci_project):
    a = ci_project
    recorded = stage_outs(a)
    cache = a / ".refinery" / "cache" / "teacher.sqlite"
    gen = json.loads((a / "metrics" / "generate.json").read_text())
    # every teacher call of the stage: one per row (the mix, each evol round), plus the critiques and revisions
    chain_calls = gen["critique_revise"]["teacher_calls"] if gen.get("critique_revise") else {}
    generated = gen["rows"] + chain_calls.get("critique", 0) + chain_calls.get("revise", 0)
    for f in cache.parent.glob("teacher.sqlite*"):
        f.unlink()  # a cold cache, so generate really calls the teacher
    cases = [
        ("generate", lambda: GenerationCache.committed(cache) > 0),  # killed after its first batch was committed
        ("train_reward", _scratch_under(a / "models")),  # killed while its new model folder is written
        ("gate", _after(20.0)),  # killed while its model gates score rows
    ]
    for stage, ready in cases:
        waited = _kill_when(a, stage, ready)
        print(f"{stage}: killed after {waited:.1f} s; left: {leftovers(a)}")
        # forced, as a first run that never finished would be: a plain `dvc repro` would only check the outputs
        # of the complete first run out of the DVC cache, and nothing would resume
        _run([sys.executable, "-m", "dvc", "repro", "-f", "-s", stage], a)
        assert stage_outs(a)[stage] == recorded[stage], f"{stage}: outputs after resume differ from the first run"
        assert leftovers(a) == [], f"{stage}: scratch left after the rerun"
        if stage == "generate":
            log = json.loads((cache.parent / "runs" / "generate.json").read_text())
            assert log["cache_hits"] > 0 and log["calls"] + log["cache_hits"] == generated, log
    status = _run([sys.executable, "-m", "dvc", "status"], a)
    assert "up to date" in status.stdout, status.stdout
