"""Identify a stage's code by what it does: its import closure and a hash of each module's normalised AST.

A module's hash is taken over ``ast.dump(..., include_attributes=False)`` of its syntax tree with every
docstring removed, so comments, docstrings, blank lines and formatting change nothing while any change to the
code does. A stage's fingerprint is the hash of the modules it can import (its closure, minus plumbing that does
not shape what it writes). ``refinery fingerprint`` writes one fingerprint file per stage for DVC to depend on,
and :func:`refinery.core.provenance.code_version` stamps the same hash on every row, so rows and reruns change
together.

Names are dotted module names relative to the project root, sorted, so fingerprints agree across machines and
clones (one Python minor version: ``ast.dump`` may differ between versions).
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from refinery.core.errors import RefineryError

PACKAGES = ("refinery", "stages", "schemas")  # the project's top-level packages
STAGES_PACKAGE = "stages"  # one module per DVC stage
# Plumbing that does not shape any output's content: error types, atomic writes and their scratch, params loading,
# progress lines, provenance stamps and this fingerprint. It is followed (its imports count) but not listed.
PLUMBING = frozenset({
    "refinery.core.errors", "refinery.core.io", "refinery.core.scratch", "refinery.core.params",
    "refinery.core.progress", "refinery.core.provenance", "refinery.core.codehash",
})
NOT_STAGES = frozenset({"fingerprint"})  # modules under stages/ that are no DVC stage's code of their own


def project_root() -> Path:
    """Return the folder holding the ``refinery``, ``stages`` and ``schemas`` packages."""
    return Path(__file__).resolve().parents[2]


def module_file(module: str, root: Path) -> Path | None:
    """Return the file of the project module ``module`` (a dotted name) under ``root``, or None."""
    base = root.joinpath(*module.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def module_name(path: Path, root: Path) -> str:
    """Return the dotted name of the project file ``path`` (a package's ``__init__.py`` names the package)."""
    parts = list(Path(path).resolve().relative_to(root.resolve()).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _parse(path: Path) -> ast.Module:
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError) as e:
        raise RefineryError(f"{path}: cannot be parsed as Python ({e})") from None


def _run_on_import(tree: ast.AST) -> Iterator[ast.AST]:
    """Yield the nodes Python runs when it imports the module: all but function bodies (class bodies run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo.extend(c for c in ast.iter_child_nodes(node)
                    if not isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def imported_modules(tree: ast.AST, *, on_import_only: bool = False) -> set[str]:
    """Return the project names imported in ``tree``: anywhere (inside functions too), or only where Python runs
    them on import (``on_import_only``).

    ``from a.b import c`` yields ``a.b`` and ``a.b.c`` (``c`` may be a module); names that are no module are
    dropped by :func:`closure`. Relative imports are not used in this project and are not followed.
    """
    found: set[str] = set()
    for node in (_run_on_import(tree) if on_import_only else ast.walk(tree)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in PACKAGES:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] in PACKAGES)
    return found


RESOLVES = "__resolves__"  # a module-level name: the module whose ``"pkg.module:Name"`` strings this one imports


def dotted_references(tree: ast.AST) -> set[str]:
    """Return the project modules named by ``"pkg.module:Name"`` string constants anywhere in ``tree``."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.count(":") == 1:
            module, _, attr = node.value.partition(":")
            parts = module.split(".")
            if parts[0] in PACKAGES and attr.isidentifier() and all(p.isidentifier() for p in parts):
                found.add(module)
    return found


def resolved_modules(tree: ast.Module) -> list[str]:
    """Return the modules named by this module's ``__resolves__`` declaration (a string or a tuple of strings).

    A module that imports classes by the dotted paths another module declares (the gate registry names each
    gate's class as ``"refinery.gates.pii:PiiGate"``, and ``refinery.gates.run`` imports them) says so with
    ``__resolves__ = "refinery.gates.registry"``: those classes' modules then count as its imports, as if it had
    imported them by name, and only for it (the schema reads the registry's names without its gates' code).
    """
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == RESOLVES for t in node.targets):
            value = node.value
            items = value.elts if isinstance(value, (ast.Tuple, ast.List)) else [value]
            if not all(isinstance(v, ast.Constant) and isinstance(v.value, str) for v in items):
                raise RefineryError(f"{RESOLVES} must be a module name or a tuple of module names")
            return [v.value for v in items]
    return []


def _packages_of(module: str) -> list[str]:
    """Return the packages Python runs on the way to ``module`` (``a`` and ``a.b`` for ``a.b.c``)."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


_ON_IMPORT, _CALLED = 1, 2  # how much of a module can run: its import-time code only, or any of its functions


def closure(start: str, root: Path | None = None) -> set[str]:
    """Return every project module whose code can run when the module ``start`` runs, ``start`` included.

    A module named by an import statement (anywhere: the stages import heavy modules inside functions) may have
    any of its functions called, so every import in it counts. A package Python runs on the way to a module
    (``refinery/models/backends/__init__.py`` before ``refinery.models.backends.local``) runs only its
    import-time code, so only the imports that code makes count (and so on, at import time); its functions
    run only for a caller that imports it by name, which makes it count whole.
    """
    root = project_root() if root is None else root
    if module_file(start, root) is None:
        raise RefineryError(f"module {start}: no file {start.replace('.', '/')}.py under {root}")
    reach: dict[str, int] = {}
    trees: dict[str, ast.Module] = {}
    todo = [(start, _CALLED)] + [(p, _ON_IMPORT) for p in _packages_of(start)]
    while todo:
        name, how = todo.pop()
        if reach.get(name, 0) >= how or module_file(name, root) is None:
            continue
        reach[name] = how
        if name not in trees:
            trees[name] = _parse(module_file(name, root))
        imported = imported_modules(trees[name], on_import_only=how == _ON_IMPORT)
        for source in resolved_modules(trees[name]):  # classes it imports by another module's dotted paths
            path = module_file(source, root)
            if path is None:
                raise RefineryError(f"module {name}: {RESOLVES} names {source}, which has no file under {root}")
            imported |= dotted_references(_parse(path))
        for module in imported:
            todo.append((module, how))
            todo.extend((p, _ON_IMPORT) for p in _packages_of(module))
    return set(reach)


def _strip_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:]
    return tree


def module_hash(path: Path) -> str | None:
    """Return the sha256 of a module's normalised AST; None for a module with no code (a docstring only)."""
    tree = _strip_docstrings(_parse(path))
    if not tree.body:
        return None
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode("utf-8")).hexdigest()


def combined_hash(modules: dict[str, str]) -> str:
    """Return the sha256 over ``name hash`` lines of the modules, in name order."""
    h = hashlib.sha256()
    for name in sorted(modules):
        h.update(f"{name} {modules[name]}\n".encode())
    return h.hexdigest()


def code_modules(start: str, root: Path | None = None) -> dict[str, str]:
    """Return ``{module: AST hash}`` for the closure of ``start`` minus plumbing and modules with no code."""
    root = project_root() if root is None else root
    out = {}
    for name in sorted(closure(start, root) - PLUMBING):
        digest = module_hash(module_file(name, root))
        if digest is not None:
            out[name] = digest
    return out


def stage_names(root: Path | None = None) -> list[str]:
    """Return the name of every stage module under ``stages/`` (stage name = module name), sorted."""
    root = project_root() if root is None else root
    return sorted(p.stem for p in (root / STAGES_PACKAGE).glob("*.py")
                  if p.stem != "__init__" and p.stem not in NOT_STAGES)


def fingerprint(stage: str, root: Path | None = None) -> dict:
    """Return a stage's fingerprint: its code modules with their AST hashes, and their combined hash.

    Args:
        stage: a stage (module) name under ``stages/``, e.g. ``gate``; or a dotted module name.
        root: the project root (default: the one this package is in).
    """
    module = stage if "." in stage else f"{STAGES_PACKAGE}.{stage}"
    modules = code_modules(module, root)
    return {"stage": stage, "module": module, "modules": modules, "hash": combined_hash(modules)}


def fingerprints(stages: Iterable[str] | None = None, root: Path | None = None) -> dict[str, dict]:
    """Return ``{stage: fingerprint}`` for ``stages`` (default: every stage module)."""
    return {s: fingerprint(s, root) for s in (stage_names(root) if stages is None else stages)}
