"""Answer what dvc.yaml declares (a stage's outs, an option's value in its cmd), for tools that are not stages.

dvc.yaml is the one place a data path lives (CONVENTIONS 1). Stages receive every path from their ``cmd``; user
tools (``refinery check``, ``doctor``, ``diff``, the benchmarks) that need a stage's path by default read it
here instead of writing it a second time.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Callable

from refinery.core.errors import RefineryError

DVC_YAML = "dvc.yaml"


def _file(root: str | Path) -> Path:
    return Path(root) / DVC_YAML


def load(root: str | Path = ".", *, needed_for: str = "") -> dict[str, dict[str, Any]]:
    """Return dvc.yaml's stages, ``{name: body}`` (a ``foreach`` stage's body is its ``do``).

    Args:
        root: the folder holding dvc.yaml (the project root).
        needed_for: what the caller reads from it, named in the error when the file is absent (e.g. "--base").

    Raises:
        RefineryError: dvc.yaml is absent, not YAML, or declares no stages.
    """
    import yaml

    path = _file(root)
    why = f" (the default of {needed_for} is read from it: run in the project root or pass {needed_for})" \
        if needed_for else " (run in the project root)"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RefineryError(f"{path}: not found{why}") from None
    except yaml.YAMLError as e:
        raise RefineryError(f"{path}: not valid YAML: {e}") from None
    stages = (data or {}).get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, dict) or not stages:
        raise RefineryError(f"{path}: declares no stages")
    return {name: (body.get("do", body) if isinstance(body, dict) else {}) for name, body in stages.items()}


def stage(name: str, root: str | Path = ".", *, needed_for: str = "") -> dict[str, Any]:
    """Return one stage's body; a clear error when dvc.yaml has no such stage."""
    stages = load(root, needed_for=needed_for)
    if name not in stages:
        raise RefineryError(f"{_file(root)}: no stage '{name}' (stages: {', '.join(stages)})")
    return stages[name]


def paths(body: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    """Return the paths a stage body lists under ``keys`` (e.g. ``("outs", "metrics")``), as written."""
    return [next(iter(o)) if isinstance(o, dict) else str(o) for key in keys for o in body.get(key) or []]


def outs(name: str, root: str | Path = ".", *, needed_for: str = "") -> list[str]:
    """Return the paths a stage declares under ``outs`` (``${...}`` templates left as written)."""
    return paths(stage(name, root, needed_for=needed_for), ("outs",))


def written(name: str, root: str | Path = ".", *, needed_for: str = "") -> list[str]:
    """Return every path a stage writes: its ``outs``, ``metrics`` and ``plots``."""
    return paths(stage(name, root, needed_for=needed_for), ("outs", "metrics", "plots"))


def command(name: str, root: str | Path = ".", *, needed_for: str = "") -> list[str]:
    """Return a stage's ``cmd`` split into words, as the shell would (folded lines joined)."""
    cmd = stage(name, root, needed_for=needed_for).get("cmd")
    if isinstance(cmd, list):  # DVC allows a list of commands; refinery stages run one
        cmd = " && ".join(cmd)
    if not isinstance(cmd, str):
        raise RefineryError(f"{_file(root)}: stage '{name}' has no cmd")
    return shlex.split(cmd)


def option(name: str, flag: str, root: str | Path = ".", *, needed_for: str = "") -> str:
    """Return the value a stage's ``cmd`` passes to ``flag`` (``--out x`` or ``--out=x``).

    Raises:
        RefineryError: dvc.yaml is absent, the stage or the option is missing, the option is given more than
            once, or its value is templated (``${...}``: resolved by DVC per run, not a single path).
    """
    words = command(name, root, needed_for=needed_for)
    values = [words[i + 1] for i, w in enumerate(words[:-1]) if w == flag] + \
        [w.split("=", 1)[1] for w in words if w.startswith(flag + "=")]
    where = f"{_file(root)}: stage '{name}'"
    if not values:
        raise RefineryError(f"{where}: its cmd passes no {flag}")
    if len(values) > 1:
        raise RefineryError(f"{where}: its cmd passes {flag} {len(values)} times; expected one")
    if "${" in values[0]:
        raise RefineryError(f"{where}: {flag} {values[0]} is templated (resolved per run by DVC)"
                            + (f": pass {needed_for}" if needed_for else ""))
    return values[0]


def default(name: str, flag: str, *, needed_for: str, root: str | Path = ".") -> Callable[[], str]:
    """Return a click ``default=`` that reads ``flag`` from stage ``name``'s cmd in dvc.yaml when called.

    Pair it with ``show_default=f"{name} {flag} in dvc.yaml"`` so ``--help`` names where the value comes from
    without reading the file.
    """
    return lambda: option(name, flag, root, needed_for=needed_for)
