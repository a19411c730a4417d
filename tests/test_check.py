"""`refinery check`: every params section, model role and the seed input, all problems at once, before DVC runs."""

from __future__ import annotations

import pytest
import yaml

from refinery.inspect.check import SECTIONS
from refinery.cli import main
from refinery.core.errors import ParamsError
from refinery.core.params import parse_section
from tests.conftest import ROOT


def test_the_projects_own_params_pass(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["check", "--params", "params.yaml"]) == 0
    assert f"{len(SECTIONS)} sections valid" in capsys.readouterr().err


def test_every_problem_is_listed_at_once_with_its_key_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["generate"]["budget"] = -1
    params["train"]["lr"] = "fast"
    params["train"]["max_steps"] = "many"
    params["ingest"]["input"] = str(tmp_path / "no_such_seed")
    params["provision"]["judge"] = "embedded:nope"
    params["typo_section"] = {}
    del params["report"]
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "--params", str(bad)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    expected = [f"{bad}: generate.budget:", f"{bad}: train.lr:", f"{bad}: train.max_steps:",
                f"{bad}: section 'typo_section' is read by no stage", f"{bad}: section 'report' is missing",
                "role 'judge': unknown embedded model 'nope'", "no_such_seed: seed input not found"]
    for e in expected:
        assert sum(e in line for line in lines) == 1, (e, lines)
    assert len(lines) == len(expected) and all(line.startswith("error: ") for line in lines)


def test_a_stage_names_all_its_bad_keys_in_one_line():
    from stages.train import TrainParams

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    with pytest.raises(ParamsError) as e:
        parse_section({**raw, "lr": "fast", "max_steps": "many"}, TrainParams, where="params.yaml: train")
    assert "params.yaml: train.lr:" in str(e.value) and "params.yaml: train.max_steps:" in str(e.value)
    assert "\n" not in str(e.value)


def test_thresholds_for_an_arm_that_does_not_exist_are_listed(tmp_path):
    from refinery.inspect.check import check_params
    from tests.conftest import ROOT

    text = (ROOT / "params.yaml").read_text().replace("    no_recovery: {max_synthetic_share: 0.5}",
                                                      "    no_recovry: {max_synthetic_share: 0.5}")
    (tmp_path / "params.yaml").write_text(text)
    _, problems = check_params(tmp_path / "params.yaml")
    assert any("validate.thresholds names no_recovry, not an arm of assemble.arms" in p for p in problems), problems
