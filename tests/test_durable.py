"""Durable outputs: all-old or all-new commits, a full disk, file system errors in one line, stale scratch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refinery.core.errors import RefineryError
from refinery.core.io import atomic_outputs
from refinery.core.scratch import BACKUP_PREFIX, JOURNAL_PREFIX, SCRATCH_PREFIX, clean_stale
from tests.conftest import ROOT, TINY_DOCS, TINY_QA, params_for, write_jsonl

SCHEMA = pa.schema([("x", pa.int64())])


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.startswith((SCRATCH_PREFIX, BACKUP_PREFIX, JOURNAL_PREFIX)))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write(root: Path, value: int) -> None:
    with atomic_outputs(root) as out:
        out.parquet(pa.table({"x": [value]}), root / "data" / "a.parquet", SCHEMA)
        out.json({"v": value}, root / "metrics" / "a.json")
        (out.folder(root / "models" / "m") / "w.bin").write_bytes(bytes([value]) * 10)


def _state(root: Path) -> tuple:
    return (pq.read_table(root / "data" / "a.parquet").column("x").to_pylist(),
            json.loads((root / "metrics" / "a.json").read_text()), (root / "models" / "m" / "w.bin").read_bytes())


def test_a_commit_replaces_every_output_and_leaves_no_scratch(tmp_path):
    _write(tmp_path, 1)
    _write(tmp_path, 2)
    assert _state(tmp_path) == ([2], {"v": 2}, bytes([2]) * 10)
    assert _leftovers(tmp_path) == []


def test_a_failing_stage_leaves_the_old_outputs_and_no_new_folders(tmp_path):
    _write(tmp_path, 1)
    with pytest.raises(ValueError), atomic_outputs(tmp_path) as out:
        out.parquet(pa.table({"x": [9]}), tmp_path / "data" / "a.parquet", SCHEMA)
        out.json({}, tmp_path / "new" / "deep" / "b.json")
        raise ValueError("the stage failed after writing")
    assert _state(tmp_path) == ([1], {"v": 1}, bytes([1]) * 10)
    assert _leftovers(tmp_path) == [] and not (tmp_path / "new").exists()


def test_a_rename_failing_midway_through_a_commit_rolls_every_output_back(tmp_path, monkeypatch):
    _write(tmp_path, 1)
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 4:  # old a.parquet aside, new in place, old a.json aside, then the new a.json fails
            raise OSError(28, "No space left on device", str(src))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(RefineryError, match=r"metrics/a.json: no space left on the device.*\[ENOSPC\]"):
        _write(tmp_path, 2)
    monkeypatch.setattr(os, "replace", real)
    assert _state(tmp_path) == ([1], {"v": 1}, bytes([1]) * 10)
    assert _leftovers(tmp_path) == []


def test_an_output_that_does_not_read_back_is_never_put_in_place(tmp_path):
    _write(tmp_path, 1)
    with pytest.raises(RefineryError, match="data/a.parquet: the new output is not readable Parquet"):
        with atomic_outputs(tmp_path) as out:
            out.path(tmp_path / "data" / "a.parquet").write_bytes(b"PAR1 truncated")
    assert _state(tmp_path)[0] == [1] and _leftovers(tmp_path) == []


def test_a_commit_killed_between_its_renames_is_rolled_back_by_the_next_command(tmp_path):
    # given outputs from run 1, and run 2 killed after renaming one old output aside and one new one in
    _write(tmp_path, 1)
    pid = _dead_pid()
    a, m = tmp_path / "data" / "a.parquet", tmp_path / "metrics" / "a.json"
    tok = f"{pid}-abcdef"
    moves = []
    for final, new in ((a, None), (m, b'{"v": 2}')):
        tmp, backup = final.parent / f"{SCRATCH_PREFIX}{tok}-000-{final.name}", \
            final.parent / f"{BACKUP_PREFIX}{tok}-{final.name}"
        moves.append({"tmp": str(tmp), "final": str(final), "backup": str(backup)})
        if new is None:
            pq.write_table(pa.table({"x": [2]}), tmp)
            os.replace(final, backup)
            os.replace(tmp, final)  # the new a.parquet is in place
        else:
            tmp.write_bytes(new)  # the new a.json never made it
    (tmp_path / f"{JOURNAL_PREFIX}{tok}.json").write_text(json.dumps({"pid": pid, "moves": moves}))
    # when the next refinery command starts
    done = clean_stale(tmp_path)
    # then every output is the old one again, and nothing of run 2 is left
    assert any("restored" in d for d in done)
    assert _state(tmp_path) == ([1], {"v": 1}, bytes([1]) * 10)
    assert _leftovers(tmp_path) == []


def test_stale_scratch_of_dead_runs_is_removed_but_a_live_runs_is_kept(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    (tmp_path / "models").mkdir()
    stale = tmp_path / "models" / f"{SCRATCH_PREFIX}{dead}-aa-000-verifier"
    stale.mkdir()
    (stale / "weights.bin").write_bytes(b"x" * 100)
    legacy = tmp_path / f"{SCRATCH_PREFIX}k2j3h4l5"  # the folder name older versions used, at the repo root
    legacy.mkdir()
    mine = tmp_path / "models" / f"{SCRATCH_PREFIX}{live}-bb-000-reward"
    mine.mkdir()
    hidden = tmp_path / ".git" / f"{SCRATCH_PREFIX}{dead}-cc-000-x"  # hidden folders are not searched
    hidden.mkdir(parents=True)
    other = tmp_path / "models" / "refinery-tmp-not-ours"
    other.write_text("user data")
    clean_stale(tmp_path)
    assert not stale.exists() and not legacy.exists()
    assert mine.exists() and hidden.exists() and other.exists()


def test_the_cli_removes_stale_scratch_before_any_command(tmp_path):
    stale = tmp_path / "data" / f"{SCRATCH_PREFIX}{_dead_pid()}-aa-000-synthetic.parquet"
    stale.parent.mkdir()
    stale.write_bytes(b"partial")
    proc = subprocess.run([sys.executable, "-m", "refinery.cli", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and not stale.exists()
    assert "left by a killed run" in proc.stderr


# ---- a real full disk: a small tmpfs under each kind of stage output ----

def _tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"this machine forbids mounts ({proc.stderr.strip()})")


def _fill(path: Path, leave: int) -> None:
    """Fill the file system holding ``path`` until only ``leave`` bytes are free."""
    free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
    with open(path / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


def _refinery(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refinery.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "filler"}


@pytest.fixture
def disk(tmp_path):
    mnt = tmp_path / "disk"
    _tmpfs(mnt, "4m")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _seed_project(tmp: Path) -> Path:
    seed = tmp / "seed"
    write_jsonl(seed / "documents.jsonl", TINY_DOCS)
    write_jsonl(seed / "qa.jsonl", TINY_QA * 1)
    return params_for(tmp, ingest={"input": str(seed), "format": "refinery", "max_field_chars": 10_000},
                      split={"seed": 1, "fractions": {"train": 0.6, "val": 0.2, "test": 0.2}})


@pytest.mark.parametrize("kind", ["parquet", "metrics", "folder"])
def test_a_full_disk_under_an_output_fails_in_one_line_and_keeps_the_previous_output(tmp_path, disk, kind):
    # given a project whose ingest output (Parquet tables), metrics file or a review folder lies on a small disk
    params = _seed_project(tmp_path)
    out_dir = disk / "01_seed" if kind == "parquet" else tmp_path / "01_seed"
    metrics = disk / "ingest.json" if kind == "metrics" else tmp_path / "ingest.json"
    args = ["ingest", "--params", str(params), "--input", str(tmp_path / "seed"), "--out", str(out_dir),
            "--metrics", str(metrics)]
    if kind == "folder":
        target = disk / "review"
        first = _refinery(["review", *REVIEW_ARGS(tmp_path, target)], tmp_path)
    else:
        target = out_dir if kind == "parquet" else metrics
        first = _refinery(args, tmp_path)
    assert first.returncode == 0, first.stderr
    before = _snapshot(disk)
    assert before
    # when the disk is full (a few KB left) and the stage runs again
    _fill(disk, 2048)
    again = _refinery(["review", *REVIEW_ARGS(tmp_path, target)] if kind == "folder" else args, tmp_path)
    # then it exits 2 with one line naming the output and the cause
    lines = again.stderr.strip().splitlines()
    assert again.returncode == 2, again.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no space left" in lines[0], lines
    assert str(target) in lines[0] or str(disk) in lines[0]
    assert "Traceback" not in again.stderr
    # and the previous output is unchanged and readable, and no scratch is left
    assert _snapshot(disk) == before
    for p in disk.rglob("*.parquet"):
        pq.read_table(p)
    assert _leftovers(disk) == []


def REVIEW_ARGS(tmp: Path, out: Path) -> list[str]:  # noqa: N802 - reads like the args it returns
    from tests.test_trace import build_lineage

    if not (tmp / "data" / "04_gated" / "accepted.parquet").exists():
        build_lineage(tmp)
        params_for(tmp, review={"seed": 1, "rare_max_share": 0.1, "rare_share": 1.0, "other_share": 1.0})
    rows = ["data/04_gated/accepted.parquet", "data/04_gated/rejected.parquet"]
    args = [a for r in rows for a in ("--rows", str(tmp / r))]
    return [*args, "--seeds", str(tmp / "data/02_split/train.parquet"), "--documents",
            str(tmp / "data/01_seed/documents.parquet"), "--params", str(tmp / "params.yaml"), "--out", str(out),
            "--metrics", str(tmp / "review.json")]


# ---- other file system errors: one line, exit 2, nothing partial ----

def test_a_read_only_file_system_under_the_output_is_one_line_and_keeps_the_old_output(tmp_path, disk):
    params = _seed_project(tmp_path)
    args = ["ingest", "--params", str(params), "--input", str(tmp_path / "seed"), "--out", str(disk / "01_seed"),
            "--metrics", str(tmp_path / "m.json")]
    assert _refinery(args, tmp_path).returncode == 0
    before = _snapshot(disk)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    proc = _refinery(args, tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "read-only file system" in lines[0], proc.stderr
    assert str(disk / "01_seed") in lines[0]
    assert _snapshot(disk) == before


def test_an_immutable_output_folder_is_one_line_and_nothing_is_written(tmp_path):
    params = _seed_project(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "documents.parquet").write_bytes(b"old")
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here (needs root and an ext4/xfs-like file system)")
    try:
        proc = _refinery(["ingest", "--params", str(params), "--input", str(tmp_path / "seed"), "--out", str(out),
                          "--metrics", str(tmp_path / "m.json")], tmp_path)
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert str(out) in lines[0] and "[EPERM]" in lines[0] or "[EACCES]" in lines[0], lines
    assert sorted(p.name for p in out.iterdir()) == ["documents.parquet"]
    assert not (tmp_path / "m.json").exists()


def test_a_symlink_loop_as_input_is_named_as_such(tmp_path):
    params = _seed_project(tmp_path)
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop")
    proc = _refinery(["ingest", "--params", str(params), "--input", str(loop), "--out", str(tmp_path / "o"),
                      "--metrics", str(tmp_path / "m.json")], tmp_path)
    assert proc.returncode == 2 and "symlink loop" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_killed_but_unreaped_process_counts_as_gone():
    from refinery.core.scratch import _pid_alive

    # given a child that has exited but was not waited for (a zombie, as an orphaned stage is for a while)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    for _ in range(200):
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.01)
    try:
        # then its scratch may be removed, while a live process's may not
        assert not _pid_alive(proc.pid) and _pid_alive(os.getpid())
    finally:
        proc.wait()
