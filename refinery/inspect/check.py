"""Check params, models and inputs before `dvc repro` deletes any output: every problem, each on one line."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import click

from refinery.core import dag
from refinery.core.errors import RefineryError

# params.yaml section -> the params class of the stage that reads it
SECTIONS: dict[str, str] = {
    "provision": "stages.provision:ProvisionParams",
    "ingest": "stages.ingest:IngestParams",
    "split": "stages.split:SplitParams",
    "coverage": "stages.coverage:CoverageParams",
    "generate": "stages.generate:GenerateParams",
    "contaminate": "stages.contaminate:ContaminateParams",
    "inject": "stages.inject:InjectParams",
    "train_verifier": "stages.train_verifier:TrainVerifierParams",
    "train_reward": "stages.train_reward:TrainRewardParams",
    "gate": "refinery.gates.run:GateParams",
    "audit_judge": "stages.audit_judge:AuditJudgeParams",
    "verifiable": "stages.verifiable:VerifiableParams",
    "engine": "refinery.engine.params:EngineParams",
    "recover": "stages.recover:RecoverParams",
    "dpo": "stages.dpo:DpoParams",
    "assemble": "stages.assemble:AssembleParams",
    "validate": "stages.validate:ValidateParams",
    "train": "stages.train:TrainParams",
    "evaluate": "stages.evaluate:EvaluateParams",
    "collapse": "stages.collapse:CollapseParams",
    "report": "stages.report:ReportParams",
    "review": "stages.review:ReviewParams",
    "raft": "stages.raft:RaftParams",
}


def _params_class(section: str):
    module, name = SECTIONS[section].split(":")
    return getattr(importlib.import_module(module), name)


def check_params(params_file: str | Path) -> tuple[dict, list[str]]:
    """Validate every section of the params file; return the parsed sections and every problem found."""
    from refinery.core.params import load_yaml, validation_problems

    try:
        data = load_yaml(params_file)
    except RefineryError as e:
        return {}, [str(e)]
    problems: list[str] = []
    parsed = {}
    for section in data:
        if section not in SECTIONS:
            problems.append(f"{params_file}: section '{section}' is read by no stage (known: {', '.join(SECTIONS)})")
    for section in SECTIONS:
        if section not in data:
            problems.append(f"{params_file}: section '{section}' is missing")
            continue
        found = validation_problems(data[section], _params_class(section), where=f"{params_file}: {section}")
        if found:
            problems.extend(found)
        else:
            parsed[section] = _params_class(section).model_validate(data[section] or {})
    if "assemble" in parsed and "raft" in parsed and parsed["raft"].arm not in parsed["assemble"].arms:
        problems.append(f"{params_file}: raft.arm '{parsed['raft'].arm}' is not an arm of assemble.arms "
                        f"({', '.join(parsed['assemble'].arms)})")
    if "engine" in parsed and parsed["engine"].kind == "ray" and importlib.util.find_spec("ray") is None:
        problems.append(f"{params_file}: engine.kind is ray but Ray is not installed: "
                        f"pip install -c constraints.txt 'ray[data]==2.60.0' (docs/ray.md)")
    if "assemble" in parsed and "validate" in parsed:  # thresholds for a misspelt arm would silently be unused
        try:
            parsed["validate"].check_arms(list(parsed["assemble"].arms))
        except RefineryError as e:
            problems.append(str(e).replace("params.yaml:", f"{params_file}:", 1))
    return parsed, problems


def check_input(parsed: dict) -> list[str]:
    """Return the problem with the seed input the ingest stage will read, if any (without reading it whole)."""
    from refinery.core.io import check_input as readable

    ingest = parsed.get("ingest")
    if ingest is None:
        return []
    if ingest.format == "hf":
        return []  # a dataset id: read over the network by the stage itself
    try:
        readable(ingest.input, "folder" if ingest.format == "refinery" else "file",
                 missing="seed input not found (params.yaml: ingest.input)")
    except RefineryError as e:
        return [str(e)]
    return []


def run_checks(params_file: str | Path, base_dir: str | Path) -> list[str]:
    """Return every problem with params, model roles and the seed input (empty: all good)."""
    from refinery.inspect.doctor import check_models

    parsed, problems = check_params(params_file)
    if "provision" in parsed:
        problems += [p for _, _, p in check_models(str(params_file), str(base_dir)) if p]
    problems += check_input(parsed)
    return problems


@click.command("check")
@click.option("--params", "params_file", default="params.yaml", show_default=True)
@click.option("--base", "base_dir", default=dag.default("provision", "--out", needed_for="--base"),
              show_default="provision's --out in dvc.yaml",
              help="Provisioned models folder: one subfolder per role with its PROVENANCE.json.")
def cli(params_file: str, base_dir: str) -> None:
    """Check every params section, every model role and the seed input, listing all problems at once.

    Run it before `dvc repro` (make repro does): DVC removes a stage's outputs before it runs the stage, so
    a params typo found by the stage itself costs the previous outputs (`dvc checkout` brings back cached
    ones, not metrics files).
    """
    problems = run_checks(params_file, base_dir)
    for p in problems:
        click.echo(f"error: {p}", err=True)
    if problems:
        raise SystemExit(2)
    click.echo(f"check: {params_file}: {len(SECTIONS)} sections valid, every model role resolves, seed input readable",
               err=True)
