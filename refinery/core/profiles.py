"""Apply a named params profile (profiles/<name>.yaml) onto params.yaml, keeping its comments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from refinery.core.errors import ParamsError
from refinery.core.params import load_yaml


def merge(base: Any, override: dict[str, Any], where: str = "") -> None:
    """Deep-merge ``override`` into the mapping ``base`` in place; unknown sections or keys are errors."""
    for key, value in override.items():
        path = f"{where}.{key}" if where else key
        if key not in base:
            raise ParamsError(f"profile sets '{path}', which params.yaml does not have")
        if isinstance(value, dict) and isinstance(base[key], dict):
            merge(base[key], value, path)
        else:
            base[key] = value


def apply_profile(params_file: str | Path, profile_file: str | Path) -> list[str]:
    """Rewrite ``params_file`` with the profile's values (ruamel round-trip keeps comments and order).

    Returns:
        The dotted keys that were set.
    """
    from ruamel.yaml import YAML

    override = load_yaml(profile_file)
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    params_file = Path(params_file)
    data = yaml.load(params_file.read_text(encoding="utf-8"))
    merge(data, override)
    with params_file.open("w", encoding="utf-8") as f:
        yaml.dump(data, f)
    return sorted(_keys(override))


def _keys(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


@click.group("profile")
def cli() -> None:
    """Apply named params profiles (profiles/<name>.yaml): demo (default), ci, cosmosqa."""


@cli.command("apply")
@click.argument("name")
@click.option("--params", "params_file", default="params.yaml", show_default=True)
@click.option("--profiles", "profiles_dir", default="profiles", show_default=True)
def apply_cmd(name: str, params_file: str, profiles_dir: str) -> None:
    """Write profile NAME's values into params.yaml (see `git diff params.yaml`)."""
    path = Path(profiles_dir) / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in Path(profiles_dir).glob("*.yaml"))) or "none"
        raise ParamsError(f"{path}: no such profile (known: {known})")
    keys = apply_profile(params_file, path)
    click.echo(f"profile {name}: set {', '.join(keys)} in {params_file}", err=True)
