"""dvc.yaml must list, as each stage's deps, every project module its code imports: else `dvc repro` keeps a
stale output after the code that made it changed (the gate once kept a combiner fitted by old features)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("refinery", "stages", "schemas")
# Plumbing that does not shape any output's content: error types, atomic writes and their scratch, params loading,
# progress lines, provenance stamps.
PLUMBING = {"refinery/core/errors.py", "refinery/core/io.py", "refinery/core/scratch.py", "refinery/core/params.py", "refinery/core/progress.py",
            "refinery/core/provenance.py", "refinery/core/codehash.py"}


def _imports(path: Path) -> set[str]:
    """Project modules imported anywhere in ``path`` (top level and inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in PACKAGES:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] in PACKAGES)
    return found


def _file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def code_closure(start: Path) -> set[str]:
    """Relative paths of every project module reachable by imports from ``start`` (itself included)."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(f for f in map(_file, _imports(path)) if f is not None and f not in seen)
    return {p.relative_to(ROOT).as_posix() for p in seen}


def test_every_stage_depends_on_the_code_it_runs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    problems = []
    for name, stage in stages.items():
        body = stage.get("do", stage)
        command = re.match(r"refinery ([a-z-]+)", " ".join(body["cmd"].split()))
        assert command, f"stage {name}: its cmd does not run a refinery command"
        module = ROOT / "stages" / f"{command.group(1).replace('-', '_')}.py"
        deps = [str(d).rstrip("/") for d in body.get("deps", [])]
        covered = lambda f: any(f == d or f.startswith(d + "/") for d in deps)  # noqa: E731
        missing = sorted(f for f in code_closure(module) - PLUMBING
                         if not f.endswith("__init__.py") and not covered(f))
        if missing:
            problems.append(f"{name}: {', '.join(missing)}")
    assert problems == [], "dvc.yaml deps miss code the stage imports:\n" + "\n".join(problems)


def test_the_closure_follows_imports_inside_functions():
    # the stages import heavy modules lazily, inside functions: those count
    closure = code_closure(ROOT / "stages" / "train_verifier.py")
    assert "refinery/models/grounding.py" in closure and "refinery/models/verifier.py" in closure
