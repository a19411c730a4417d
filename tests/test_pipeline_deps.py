"""Each stage's code reaches DVC as its fingerprint: the AST hashes of the modules it can import.

dvc.yaml lists ``fingerprints/<stage>.json`` as each stage's code dependency instead of .py files, so `dvc repro`
reruns a stage when code it imports changes (else it keeps a stale output, as the gate once kept a combiner fitted
by old features) and only then: a comment or docstring edit rewrites the same fingerprint bytes and reruns nothing.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from refinery.core import codehash
from refinery.core.codehash import PACKAGES, PLUMBING, closure, fingerprint, module_file, module_hash, stage_names

ROOT = Path(__file__).resolve().parents[1]
FIX = "run `refinery fingerprint --out {dir}` (or `dvc repro fingerprint`) and commit {dir}/"


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _fingerprint_dir() -> str:
    cmd = " ".join(_stages()["fingerprint"]["cmd"].split())
    found = re.search(r"--out (\S+)", cmd)
    assert found, f"the fingerprint stage's cmd names no --out folder: {cmd}"
    return found.group(1)


def _module_of(name: str, stage: dict) -> str:
    command = re.match(r"refinery ([a-z-]+)", " ".join(stage["cmd"].split()))
    assert command, f"stage {name}: its cmd does not run a refinery command"
    return command.group(1).replace("-", "_")


def _is_code(dep: str) -> bool:
    """A .py file, or a folder holding .py files (its code would be hashed as bytes, comments included)."""
    path = ROOT / dep.split("#")[0].strip().rstrip("/")
    if path.suffix == ".py":
        return True
    return path.is_dir() and any(p.suffix == ".py" for p in path.rglob("*.py"))


# ---- dvc.yaml: code reaches DVC only through fingerprints ----
def test_every_stage_depends_on_its_own_fingerprint_and_on_no_source_file():
    folder = _fingerprint_dir()
    problems = []
    for name, stage in _stages().items():
        if name == "fingerprint":
            continue
        body = stage.get("do", stage)
        deps = [str(d) for d in body.get("deps", [])]
        own = f"{folder}/{_module_of(name, body)}.json"
        if own not in deps:
            problems.append(f"{name}: does not depend on {own}")
        code = [d for d in deps if _is_code(d)]
        if code:
            problems.append(f"{name}: lists code as deps ({', '.join(code)}); its fingerprint covers it")
    assert problems == [], "\n".join(problems)


def test_the_fingerprint_stage_reads_every_code_folder_and_writes_one_uncached_file_per_stage():
    stage = _stages()["fingerprint"]
    folder = _fingerprint_dir()
    assert set(PACKAGES) <= {str(d).rstrip("/") for d in stage["deps"]}
    outs = {next(iter(o)) if isinstance(o, dict) else o: (o[next(iter(o))] if isinstance(o, dict) else {})
            for o in stage["outs"]}
    assert set(outs) == {f"{folder}/{s}.json" for s in stage_names(ROOT)}
    assert all(flags.get("cache") is False for flags in outs.values()), "fingerprints are committed to git, not cached"


# ---- the committed fingerprints ----
def test_the_committed_fingerprints_are_current():
    folder = ROOT / _fingerprint_dir()
    fix = FIX.format(dir=_fingerprint_dir())
    on_disk = sorted(p.stem for p in folder.glob("*.json"))
    assert on_disk == stage_names(ROOT), f"{folder}: {on_disk} are not the stage modules {stage_names(ROOT)}: {fix}"
    stale = [s for s in stage_names(ROOT)
             if json.loads((folder / f"{s}.json").read_text(encoding="utf-8")) != fingerprint(s, ROOT)]
    assert stale == [], f"stale fingerprints (code changed since they were written): {', '.join(stale)}: {fix}"


@pytest.mark.parametrize("stage", stage_names(ROOT))
def test_a_fingerprint_lists_every_project_module_the_stage_loads_and_no_plumbing(stage):
    # given a fresh interpreter that imports the stage module (its top-level imports run)
    code = (f"import sys, stages.{stage}; print('\\n'.join(m for m in sys.modules "
            f"if m.split('.')[0] in {PACKAGES!r}))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                                check=True).stdout.split())
    # then every loaded module with code is in the fingerprint, unless it is plumbing
    listed = set(json.loads((ROOT / _fingerprint_dir() / f"{stage}.json").read_text())["modules"])
    expected = {m for m in loaded - PLUMBING if module_hash(module_file(m, ROOT)) is not None}
    assert expected - listed == set(), f"{stage}: loaded but not fingerprinted"
    # and the fingerprint is the static closure (which also follows imports inside functions) minus plumbing
    assert listed <= closure(f"stages.{stage}", ROOT) - PLUMBING
    assert f"stages.{stage}" in listed


def test_the_closure_follows_imports_inside_functions():
    # the stages import heavy modules lazily, inside functions: those count
    found = closure("stages.train_verifier", ROOT)
    assert {"refinery.models.grounding.scorer", "refinery.models.verifier"} <= found


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_a_package_run_on_the_way_counts_with_what_it_imports_on_import_only(tmp_path):
    # given a package whose __init__ imports a module whose function imports another module lazily
    root = _write(tmp_path, {
        "refinery/__init__.py": '"""Top."""\n',
        "refinery/pkg/__init__.py": "from refinery.pkg.used import f\n",
        "refinery/pkg/used.py": "def f():\n    from refinery.pkg.lazy import g\n    return g()\n",
        "refinery/pkg/lazy.py": "def g():\n    return 1\n",
        "refinery/pkg/leaf.py": "X = 1\n",
        "stages/__init__.py": "",
        "stages/a.py": "def run():\n    from refinery.pkg.leaf import X\n    return X\n",
        "stages/b.py": "from refinery.pkg import used\n",
    })
    # when a stage imports only a module of the package, Python runs the package's import-time code: its
    # import of `used` counts, but `used`'s functions never run, so `lazy` does not
    assert closure("stages.a", root) == {"stages", "stages.a", "refinery", "refinery.pkg", "refinery.pkg.leaf",
                                         "refinery.pkg.used"}
    # when a stage imports `used` by name, any of its functions may run: `lazy` counts
    assert "refinery.pkg.lazy" in closure("stages.b", root)


def test_plumbing_is_followed_but_not_fingerprinted():
    assert "refinery.core.provenance" in closure("stages.ingest", ROOT)
    assert not PLUMBING & set(fingerprint("ingest", ROOT)["modules"])


# ---- what changes a hash ----
MODULE = textwrap.dedent('''\
    """A module."""

    LIMIT = 3


    def keep(text: str) -> bool:
        """Keep short texts."""
        return len(text.split()) <= LIMIT
    ''')


def test_comments_docstrings_and_formatting_leave_the_hash_unchanged(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(MODULE)
    before = module_hash(path)
    path.write_text(textwrap.dedent('''\
        """Another docstring, longer,
        over two lines."""
        # a comment

        LIMIT = (3)  # words


        def keep(text: str) -> bool:
            """Keep texts of at most LIMIT words."""
            # split on white space
            return (len(text.split())
                    <= LIMIT)
        '''))
    assert module_hash(path) == before


@pytest.mark.parametrize("edit", [("LIMIT = 3", "LIMIT = 4"), ("<=", "<"), ("text.split()", "text.split(' ')"),
                                  ("-> bool", "-> int")])
def test_a_one_token_code_change_changes_the_hash(tmp_path, edit):
    path = tmp_path / "m.py"
    path.write_text(MODULE)
    before = module_hash(path)
    path.write_text(MODULE.replace(*edit))
    assert module_hash(path) != before


def test_a_module_with_only_a_docstring_has_no_code(tmp_path):
    path = tmp_path / "__init__.py"
    path.write_text('"""A package."""\n')
    assert module_hash(path) is None


def _copy_project(dest: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_a_stage_fingerprint_changes_with_code_it_imports_and_only_with_it(tmp_path):
    # given a copy of the project's code
    root = _copy_project(tmp_path)
    before = {s: fingerprint(s, root)["hash"] for s in ("train", "report")}
    assert before == {s: fingerprint(s, ROOT)["hash"] for s in before}  # no absolute path in a hash
    lora = root / "refinery" / "training" / "lora.py"
    source = lora.read_text(encoding="utf-8")
    # when a comment and a docstring are edited in a module train imports
    tree = ast.parse(source)
    first_def = next(n for n in tree.body if isinstance(n, ast.FunctionDef))
    lines = source.splitlines(keepends=True)
    doc = first_def.body[0]
    lines[doc.lineno - 1] = lines[doc.lineno - 1].replace('"""', '"""Edited. ', 1)
    lora.write_text("# an added comment\n" + "".join(lines), encoding="utf-8")
    assert lora.read_text(encoding="utf-8") != source
    # then no fingerprint changes
    assert {s: fingerprint(s, root)["hash"] for s in before} == before
    # when one constant changes
    assert "IGNORE = -100" in source
    lora.write_text(source.replace("IGNORE = -100", "IGNORE = -101"), encoding="utf-8")
    # then train's fingerprint changes and report's (which does not import it) does not
    after = {s: fingerprint(s, root)["hash"] for s in before}
    assert after["train"] != before["train"] and after["report"] == before["report"]


def test_code_version_is_the_version_plus_the_stage_fingerprint():
    from refinery import __version__
    from refinery.core.provenance import code_version
    import stages.ingest

    expected = f"{__version__}+{fingerprint('ingest', ROOT)['hash'][:10]}"
    assert code_version(stages.ingest) == expected
    assert code_version("stages.ingest") == expected


# ---- layering ----
def test_no_module_imports_a_stage():
    # stages and blocks never import a stage (refinery/cli.py and refinery/inspect/check.py name stage modules as
    # strings, imported on use); bench/ imports blocks too
    found = []
    for folder in ("refinery", "stages", "schemas", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name in codehash.imported_modules(ast.parse(path.read_text(encoding="utf-8"))):
                if name.split(".")[0] == "stages":
                    found.append(f"{path.relative_to(ROOT)}: {name}")
    assert found == []


# ---- DVC: a comment edit reruns no stage ----
@pytest.mark.slow
def test_dvc_reruns_nothing_downstream_after_a_comment_edit(tmp_path):
    # given a DVC project with a copy of the code, the fingerprint stage and a stage depending on ingest's fingerprint
    root = _copy_project(tmp_path)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "fingerprint": {"cmd": f"{sys.executable} -m stages.fingerprint --out fp", "deps": list(PACKAGES),
                        "outs": [{f"fp/{s}.json": {"cache": False}} for s in stage_names(root)]},
        "downstream": {"cmd": f"{sys.executable} -c \"open('out.txt', 'w').write('x')\"",
                       "deps": ["fp/ingest.json"], "outs": ["out.txt"]},
    }}))
    (root / ".dvcignore").write_text("__pycache__/\n")

    def dvc(*args: str) -> str:
        run = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr
        return run.stdout + run.stderr

    dvc("init", "--no-scm", "-q")
    dvc("repro")
    assert "up to date" in dvc("status")
    adapters = root / "refinery" / "seed" / "adapters.py"  # imported by the ingest stage
    source = adapters.read_text(encoding="utf-8")
    # when a comment is added to a module the stage imports
    adapters.write_text(source + "\n# a comment only\n", encoding="utf-8")
    status = dvc("status")
    out = dvc("repro")
    # then only the fingerprint stage runs; it rewrites the same bytes and the downstream stage is skipped
    assert "fingerprint" in status and "downstream" not in status
    assert "Running stage 'fingerprint'" in out and "Stage 'downstream' didn't change, skipping" in out
    assert "up to date" in dvc("status")
    # when the code changes
    adapters.write_text(source + "\nPROBE = 1\n", encoding="utf-8")
    out = dvc("repro")
    # then the downstream stage runs again
    assert "Running stage 'downstream'" in out
