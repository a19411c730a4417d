"""Print, per DVC stage, how much code it declares as deps at one or more git revisions.

Usage: python tools/deps_count.py REV [REV ...]     e.g. python tools/deps_count.py 76c7d77 HEAD

For each revision and stage: ``listed`` is the number of code entries in the stage's dvc.yaml ``deps`` (.py files
and folders holding .py files, or the fingerprint file that stands for them), ``modules`` the number of modules
they cover (the .py files under those entries, or the modules listed in the stage's fingerprint file) and
``lines`` those modules' lines of code, neither blank nor a comment (splitting a module adds a module, no line).
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


def _module_file(module: str, files: set[str]) -> str:
    """The file of a dotted module name at a revision (``a.b`` -> ``a/b.py`` or ``a/b/__init__.py``)."""
    base = module.replace(".", "/")
    return f"{base}.py" if f"{base}.py" in files else f"{base}/__init__.py"


def _lines(rev: str, paths: set[str]) -> int:
    """Total lines of code (not blank, not a comment) in ``paths`` at ``rev``."""
    total = 0
    for path in paths:
        text = _git("show", f"{rev}:{path}")
        total += sum(1 for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    return total


def count(rev: str) -> dict[str, tuple[int, int, int]]:
    """Return ``{stage: (code entries listed, modules covered, their lines of code)}`` at ``rev``."""
    stages = yaml.safe_load(_git("show", f"{rev}:dvc.yaml"))["stages"]
    py = [f for f in _files(rev) if f.endswith(".py")]
    py_set = set(py)
    fingerprints = _fingerprint_outs(stages)
    out = {}
    for name, stage in stages.items():
        if name == "fingerprint":
            continue
        listed, modules = 0, set()
        for dep in (str(d).rstrip("/") for d in stage.get("do", stage).get("deps", [])):
            if dep in fingerprints:
                listed += 1
                modules.update(_module_file(m, py_set) for m in json.loads(_git("show", f"{rev}:{dep}"))["modules"])
            elif dep.startswith(CODE_ROOTS):
                covered = {f for f in py if f == dep or f.startswith(dep + "/")}  # a file listed twice counts once
                if covered:
                    listed += 1
                    modules.update(covered)
        out[name] = (listed, len(modules), _lines(rev, modules))
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    counts = {rev: count(rev) for rev in argv}
    names = list(dict.fromkeys(n for c in counts.values() for n in c))
    width = max(len(n) for n in names + ["stage"])
    head = "".join(f" | {rev[:12] + ' listed':>19} | {rev[:12] + ' modules':>20} | {rev[:12] + ' lines':>18}"
                   for rev in argv)
    print(f"{'stage':<{width}}{head}")
    print("-" * width + "".join(f"-|-{'-' * 19}-|-{'-' * 20}-|-{'-' * 18}" for _ in argv))
    for n in names:
        cells = "".join(f" | {c[n][0] if n in c else '-':>19} | {c[n][1] if n in c else '-':>20}"
                        f" | {c[n][2] if n in c else '-':>18}" for c in counts.values())
        print(f"{n:<{width}}{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
