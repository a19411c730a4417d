"""Print, per DVC stage, how much code it declares as deps at one or more git revisions.

Usage: python tools/deps_count.py REV [REV ...]     e.g. python tools/deps_count.py 76c7d77 HEAD

For each revision and stage: ``listed`` is the number of code entries in the stage's dvc.yaml ``deps`` (.py files
and folders holding .py files, or the fingerprint file that stands for them), and ``modules`` the number of
modules they cover: the .py files under those entries, or the modules listed in the stage's fingerprint file.
Revisions are read with git (`git show`, `git ls-tree`); the working tree is not read.
"""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

CODE_ROOTS = ("refinery/", "stages/", "schemas/")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def _files(rev: str) -> list[str]:
    return _git("ls-tree", "-r", "--name-only", rev).splitlines()


def _fingerprint_outs(stages: dict) -> set[str]:
    stage = stages.get("fingerprint") or {}
    return {next(iter(o)) if isinstance(o, dict) else str(o) for o in stage.get("outs", [])}


def count(rev: str) -> dict[str, tuple[int, int]]:
    """Return ``{stage: (code entries listed, modules covered)}`` at ``rev``."""
    stages = yaml.safe_load(_git("show", f"{rev}:dvc.yaml"))["stages"]
    py = [f for f in _files(rev) if f.endswith(".py")]
    fingerprints = _fingerprint_outs(stages)
    out = {}
    for name, stage in stages.items():
        if name == "fingerprint":
            continue
        listed, modules = 0, set()
        for dep in (str(d).rstrip("/") for d in stage.get("do", stage).get("deps", [])):
            if dep in fingerprints:
                listed += 1
                modules.update(json.loads(_git("show", f"{rev}:{dep}"))["modules"])
            elif dep.startswith(CODE_ROOTS):
                covered = {f for f in py if f == dep or f.startswith(dep + "/")}  # a file listed twice counts once
                if covered:
                    listed += 1
                    modules.update(covered)
        out[name] = (listed, len(modules))
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    counts = {rev: count(rev) for rev in argv}
    names = list(dict.fromkeys(n for c in counts.values() for n in c))
    width = max(len(n) for n in names + ["stage"])
    head = "".join(f" | {rev[:12] + ' listed':>19} | {rev[:12] + ' modules':>20}" for rev in argv)
    print(f"{'stage':<{width}}{head}")
    print("-" * width + "".join(f"-|-{'-' * 19}-|-{'-' * 20}" for _ in argv))
    for n in names:
        cells = "".join(f" | {c[n][0] if n in c else '-':>19} | {c[n][1] if n in c else '-':>20}"
                        for c in counts.values())
        print(f"{n:<{width}}{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
