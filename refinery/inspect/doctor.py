"""Check the installation and that every role's model resolves; print fix-it lines for what is missing."""

from __future__ import annotations

import importlib.metadata as md
import platform
import shutil
import sys
from pathlib import Path

import click

from refinery.core import dag

# distribution -> import name (checked by metadata only: nothing heavy is imported)
REQUIRED = ("torch", "transformers", "peft", "sentence-transformers", "dvc", "pandera", "pyarrow", "duckdb",
            "great-expectations", "click", "pydantic", "gguf", "accelerate", "rensa", "tenacity", "httpx", "aiohttp")


def _optional_version(name: str) -> str | None:
    """Return an optional distribution's version, None when it is not installed."""
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def check_packages() -> list[tuple[str, str | None]]:
    """Return ``(distribution, version or None)`` for every required package."""
    out = []
    for name in REQUIRED:
        try:
            out.append((name, md.version(name)))
        except md.PackageNotFoundError:
            out.append((name, None))
    return out


def _in_hf_cache(role: str, spec) -> None:
    """Fail unless the HF id (at its revision) is in the local cache: offline runs cannot download it."""
    from refinery.core.errors import RefineryError

    try:
        from huggingface_hub import snapshot_download

        snapshot_download(spec.ref, revision=spec.revision, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - the hub raises several types for "not cached"
        raise RefineryError(f"role '{role}': {spec.ref} is not in the local Hugging Face cache ({type(e).__name__}); "
                            f"download it while online: huggingface-cli download {spec.ref}") from None


def _endpoint_answers(role: str, spec) -> None:
    """Fail unless the key variable is set and the server answers /v1/models accepting the key."""
    import os

    from refinery.models.backends.base import BackendError
    from refinery.models.backends.http import OpenAICompatBackend
    from refinery.core.errors import RefineryError

    if spec.api_key_env and not os.environ.get(spec.api_key_env):
        raise RefineryError(f"role '{role}': environment variable {spec.api_key_env} (the API key for {spec.ref}) "
                            f"is not set: export it")
    try:
        OpenAICompatBackend(spec.ref, spec.revision, api_key_env=spec.api_key_env, timeout_s=5).close()
    except BackendError as e:
        raise RefineryError(f"role '{role}': {e}: start the server or fix provision.{role}.endpoint") from None


def _served(role: str, spec) -> str:
    """Fail unless the served model's server is installed and its GGUF file resolves; return where it is."""
    from refinery.core.errors import RefineryError
    from refinery.models import resolve
    from refinery.models.backends.llamacpp import INSTALL_HINT, missing_modules

    path, _ = resolve.gguf_source(spec)
    missing = missing_modules()
    if missing:
        raise RefineryError(f"role '{role}': serve: llama.cpp needs llama-cpp-python with its server extra "
                            f"(missing: {', '.join(missing)}): {INSTALL_HINT}")
    settings = dict(spec.serve)
    return f"llama.cpp server x{settings['parallel']} ({settings['threads']} thread(s) each): {path}"


def check_disk(base_dir: str, need_gb: float = 2.0) -> str | None:
    """Return a problem when the folder that will hold the models has less than ``need_gb`` free."""
    folder = Path(base_dir).resolve()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free / 1e9
    if free < need_gb:
        return f"only {free:.1f} GB free under {folder}: the models need about {need_gb:g} GB; free space there"
    return None


def check_models(params_file: str, base_dir: str) -> list[tuple[str, str, str | None]]:
    """Return ``(role, what it resolves to, problem or None)`` for each role in params.yaml."""
    from refinery.core.errors import RefineryError
    from refinery.models import resolve
    from refinery.core.params import load_section
    from refinery.models.provision import ROLES, ProvisionParams, raw_spec

    rows = []
    try:
        params = load_section(params_file, "provision", ProvisionParams)
    except RefineryError as e:
        return [("provision", "-", str(e))]
    for role in ROLES:
        try:
            spec = resolve.parse_spec(role, raw_spec(getattr(params, role)))
            if spec.kind == "embedded":
                entry, path, version = resolve.embedded_source(spec)
                where = f"{entry.distribution} {version}: {path}"
            elif spec.kind == "local":
                where = str(Path(spec.ref).resolve())
                if not Path(spec.ref).expanduser().exists():
                    raise RefineryError(f"role '{role}': local path '{spec.ref}' does not exist")
            elif spec.kind == "served":
                where = _served(role, spec)
            elif spec.kind == "hf":
                where = f"Hugging Face {spec.ref}{'@' + spec.revision if spec.revision else ''} (HF cache)"
                _in_hf_cache(role, spec)
            else:
                where = f"endpoint {spec.ref} model {spec.revision}"
                _endpoint_answers(role, spec)
            prov = Path(base_dir) / role / resolve.PROVENANCE_FILE
            where += f"  [provisioned: {prov}]" if prov.exists() else "  [not provisioned yet: dvc repro provision]"
            rows.append((role, where, None))
        except RefineryError as e:
            rows.append((role, "-", str(e)))
    return rows


@click.command("doctor")
@click.option("--params", "params_file", default="params.yaml", show_default=True)
@click.option("--base", "base_dir", default=dag.default("provision", "--out", needed_for="--base"),
              show_default="provision's --out in dvc.yaml",
              help="Provisioned models folder: one subfolder per role with its PROVENANCE.json.")
def cli(params_file: str, base_dir: str) -> None:
    """Check installed packages and that every role's model resolves."""
    problems = []
    click.echo(f"python   {platform.python_version()} ({sys.executable})")
    for name, version in check_packages():
        click.echo(f"package  {name:<22} {version or 'MISSING'}")
        if version is None:
            problems.append(f"package {name} is missing: run `make install` (or pip install -c constraints.txt -e .)")
    for tool in ("git", "dvc"):
        where = shutil.which(tool)
        click.echo(f"tool     {tool:<22} {where or 'MISSING'}")
        if where is None:
            problems.append(f"{tool} is not on PATH: activate the venv (. .venv/bin/activate)")
    for role, where, problem in check_models(params_file, base_dir):
        click.echo(f"model    {role:<22} {where if problem is None else 'UNRESOLVED'}")
        if problem:
            problems.append(problem)
    disk = check_disk(base_dir)
    click.echo(f"disk     {base_dir:<22} {'LOW' if disk else 'ok'}")
    if disk:
        problems.append(disk)
    for tool, why in (("/usr/bin/chromium", "browser tests of the review page and Data Docs (make test-tools)"),):
        click.echo(f"optional {Path(tool).name:<22} {tool if Path(tool).exists() else 'absent: ' + why}")
    llama = _optional_version("llama-cpp-python")
    click.echo(f"optional {'llama-cpp-python':<22} {llama or 'absent: needed by serve: llama.cpp (make install-llamacpp)'}")
    if problems:
        for p in problems:
            click.echo(f"fix: {p}", err=True)
        raise SystemExit(1)
    click.echo("doctor: all good")
