"""A fresh copy of the project with the tiny ``ci`` profile, after a full ``dvc repro``: shared by the end-to-end
tests and the Ray engine's stage test (one repro per session: the largest share of the suite's time)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a command in ``cwd`` offline, with this venv first on PATH; fail the test with its output tail."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def fresh_clone(dest: Path) -> Path:
    """Copy what git would clone (tracked + untracked, not ignored) into a new git repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "clone"]):
        run(cmd, dest)
    return dest


def ci_clone(dest: Path) -> Path:
    """A fresh clone with the tiny `ci` profile applied (as `make repro PROFILE=ci` does)."""
    fresh_clone(dest)
    run([sys.executable, "-m", "refinery.cli", "profile", "apply", "ci"], dest)
    return dest
