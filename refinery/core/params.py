"""Load one params.yaml section into a frozen, strictly typed object."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from refinery.core.errors import ParamsError


class StageParams(BaseModel):
    """Base of every stage's params: frozen, strict, unknown keys rejected."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")


P = TypeVar("P", bound=StageParams)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, failing with one line that names the file."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_section(path: str | Path, section: str, model: type[P]) -> P:
    """Read ``section`` of a params file into ``model``.

    Args:
        path: the params file (params.yaml).
        section: the section name, which is also the stage name.
        model: the stage's params class.

    Raises:
        ParamsError: one line naming the file, the key and what is wrong.
    """
    data = load_yaml(path)
    if section not in data:
        raise ParamsError(f"{path}: section '{section}' is missing")
    return parse_section(data[section], model, where=f"{path}: {section}")


def read_key(path: str | Path, key: str, default: Any = None) -> Any:
    """Read one dotted key of another stage's section (``inject.unseen_families``), for a stage that shares it.

    dvc.yaml lists the key under the stage's ``params`` so a change reruns it too.
    """
    node: Any = load_yaml(path)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def parse_section(raw: Any, model: type[P], *, where: str) -> P:
    """Validate a raw mapping into ``model``; the error names every bad key, each with its path, in one line."""
    problems = validation_problems(raw, model, where=where)
    if problems:
        raise ParamsError("; ".join(problems))
    return model.model_validate(raw if raw is not None else {})


def validation_problems(raw: Any, model: type[StageParams], *, where: str) -> list[str]:
    """Return one ``<where>.<key path>: <what is wrong>`` per problem in ``raw`` (empty when valid)."""
    try:
        model.model_validate(raw if raw is not None else {})
    except ValidationError as e:
        return [f"{where}.{'.'.join(str(p) for p in err['loc']) or '(section)'}: {err['msg']}" for err in e.errors()]
    return []


def params_hash(params: StageParams) -> str:
    """Return a short, stable hash of a stage's params, stamped on every row it writes."""
    blob = json.dumps(params.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
