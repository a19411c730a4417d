"""Paths live in dvc.yaml only: stage commands take every path as a required option, and tools read dvc.yaml."""

from __future__ import annotations

import importlib
import re
import shlex

import click
import pytest
import yaml
from click.testing import CliRunner

from refinery.cli import COMMANDS, main
from refinery.core import dag
from refinery.core.errors import RefineryError
from tests.conftest import ROOT

STAGE_COMMANDS = {name: target for name, target in COMMANDS.items() if target[0].startswith("stages.")}
PATH_WORDS = re.compile(r"\b(file|files|folder|folders|path|paths|dir|dirs|directory)\b|_(file|dir)$")
PATH_PREFIXES = ("data/", "models/", "metrics/", "reports/", "prompts", ".refinery/", "schemas/")


def _command(name: str) -> click.Command:
    module, attr = STAGE_COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), attr)


def _default(option: click.Option):
    return option.to_info_dict()["default"]  # None where the option has none (click's UNSET sentinel)


def _path_like(option: click.Option) -> bool:
    if option.is_flag or option.name == "params_file":
        return False
    default = _default(option)
    return bool(PATH_WORDS.search(option.name or "") or PATH_WORDS.search((option.help or "").lower())
                or (isinstance(default, str) and default.startswith(PATH_PREFIXES)))


def path_defaults(command: click.Command) -> list[str]:
    """The path-like options of ``command`` that carry a default (``--params`` may: it is DVC's file name)."""
    return [f"{command.name} {option.opts[0]} = {_default(option)!r}" for option in command.params
            if isinstance(option, click.Option) and _path_like(option) and _default(option) not in (None, ())]


def test_no_stage_command_has_a_path_default():
    # given every stage command but the two rewritten elsewhere
    found = [line for name in sorted(STAGE_COMMANDS) for line in path_defaults(_command(name))]
    # then none of them writes a path a second time beside dvc.yaml
    assert found == [], "path options with a default (pass them from dvc.yaml's cmd instead):\n" + "\n".join(found)


def test_the_check_flags_a_path_default_by_its_value_its_name_or_its_help():
    @click.command("x")
    @click.option("--params", "params_file", default="params.yaml")
    @click.option("--in", "src", default="data/01_seed")
    @click.option("--metrics", "metrics_file", default="m.json")
    @click.option("--where", default="x", help="Folder the stage writes to.")
    @click.option("--out", "out_dir", required=True, help="Writes here (a folder).")
    @click.option("--quiet", is_flag=True, help="No progress bar on the terminal file.")
    @click.option("--seed", type=int, default=7, help="Random seed.")
    def x(**_):
        pass

    assert path_defaults(x) == ["x --in = 'data/01_seed'", "x --metrics = 'm.json'", "x --where = 'x'"]


def test_every_path_option_says_what_it_reads_or_writes():
    missing = [f"{name} {option.opts[0]}" for name in sorted(STAGE_COMMANDS)
               for option in _command(name).params
               if isinstance(option, click.Option) and _path_like(option) and len((option.help or "").split()) < 4]
    assert missing == [], "path options without a help text that says what is expected there: " + ", ".join(missing)


def _stage_commands() -> list[tuple[str, str, list[str]]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = []
    for stage, body in stages.items():
        words = shlex.split(" ".join(body.get("do", body)["cmd"].split()))
        assert words[0] == "refinery" and words[1] in STAGE_COMMANDS, f"stage {stage}: {words[:2]}"
        out.append((stage, words[1], words[2:]))
    return out


def test_dvc_yaml_passes_every_required_option_and_only_options_the_command_has():
    problems = []
    for stage, name, args in _stage_commands():
        command = _command(name)
        options = [p for p in command.params if isinstance(p, click.Option)]
        known = {o for p in options for o in p.opts + p.secondary_opts}
        passed = {a.split("=", 1)[0] for a in args if a.startswith("--")}
        problems += [f"{stage}: cmd does not pass {p.opts[0]}" for p in options
                     if p.required and not passed & set(p.opts)]
        problems += [f"{stage}: {flag} is no option of refinery {name}" for flag in sorted(passed - known)]
    assert problems == [], "\n".join(problems)


def test_every_stage_command_fails_with_one_line_naming_a_missing_path(tmp_path, monkeypatch, capsys):
    # given an empty folder: nothing to fall back on
    monkeypatch.chdir(tmp_path)
    for name in sorted(STAGE_COMMANDS):
        required = [p for p in _command(name).params if isinstance(p, click.Option) and p.required]
        # when run with no options at all
        rc = main([name])
        # then it names a missing option instead of reading a default path
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and re.fullmatch(r"Error: Missing option '(--[a-z-]+)'\.", err[-1]), (name, err)
        assert err[-1].split("'")[1] in {o for p in required for o in p.opts}, (name, err)


def test_dag_reads_an_option_and_the_outs_of_a_stage_from_dvc_yaml():
    assert dag.option("provision", "--out", ROOT) in dag.outs("provision", ROOT)
    metrics = dag.option("provision", "--metrics", ROOT)  # declared under metrics:, not outs:
    assert metrics not in dag.outs("provision", ROOT) and metrics in dag.written("provision", ROOT)
    assert dag.option("gate", "--out", ROOT) == "data/04_gated"  # a folded multi-line cmd
    assert dag.command("split", ROOT)[:2] == ["refinery", "split"]


def test_dag_reads_the_equals_form_and_refuses_templated_missing_or_repeated_options(tmp_path):
    stages = {"a": {"cmd": "refinery a --out=models/x --rows r1 --rows r2", "outs": ["models/x"]},
              "m": {"matrix": {"arm": ["h"]}, "cmd": "refinery m --out models/${item.arm}"}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    assert dag.option("a", "--out", tmp_path) == "models/x"
    for stage, flag, says in (("m", "--out", "templated"), ("a", "--metrics", "passes no --metrics"),
                              ("a", "--rows", "2 times"), ("zz", "--out", "no stage 'zz'")):
        with pytest.raises(RefineryError) as e:
            dag.option(stage, flag, tmp_path)
        assert says in str(e.value) and str(tmp_path / "dvc.yaml") in str(e.value), str(e.value)


def test_check_without_base_and_without_dvc_yaml_says_where_the_default_comes_from(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["check", "--params", str(ROOT / "params.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: dvc.yaml: not found (the default of --base is read from it: run in the project "
                               "root or pass --base)"]


def test_doctor_without_base_uses_the_provision_stages_out(tmp_path, monkeypatch):
    # given a project whose provision stage writes its models somewhere else than the demo's
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"provision": {
        "cmd": "refinery provision --params params.yaml --out elsewhere/base --metrics m.json",
        "outs": ["elsewhere/base"]}}}))
    monkeypatch.chdir(tmp_path)
    # when doctor runs without --base
    res = CliRunner().invoke(_tool("doctor"), ["--params", str(ROOT / "params.yaml")])
    # then it checks that folder
    assert re.search(r"^disk\s+elsewhere/base\s", res.output, re.M), res.output


def _tool(name: str) -> click.Command:
    module, attr = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), attr)
