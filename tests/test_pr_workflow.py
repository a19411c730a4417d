"""The PR workflow's own steps, run locally on a git + DVC project with a local-directory remote.

Given a base commit whose outputs are pushed and a pull request that changes one threshold, the `run:` steps of
.github/workflows/refinery-pr.yml (read from the YAML, so this test cannot drift from it) run in order in a fresh
clone with an empty DVC cache, as on a hosted runner; the steps that need GitHub (checkout, caches, installing from
the network, the PR comment, the artifact upload) are left out. Also: how `refinery diff` reads outputs that are
not in the workspace.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from refinery.core.errors import RefineryError
from refinery.inspect.artifacts import Snapshot
from refinery.inspect.diff import diff_revisions

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "refinery-pr.yml"
# steps left out here, by id, and why; every other `run:` step runs
NEEDS_GITHUB = {"install": "installs from the network (this test runs in the test's own environment)",
                "comment": "posts to the pull request"}
SHELLS = {None: ["bash", "-e"], "bash": ["bash", "--noprofile", "--norc", "-eo", "pipefail"]}  # GitHub's, on Linux

# A toy DAG: a (seed rows) -> b (one "generated" row per seed row) -> c (a gate: rows under c.min_score are
# rejected) -> validate (fails when fewer than validate.min_accepted rows are accepted, after writing its audit,
# like refinery's validate stage).
PIPELINE = r'''
import json, pathlib, sys, yaml, pyarrow as pa, pyarrow.parquet as pq
stage, p = sys.argv[1], yaml.safe_load(open("params.yaml"))
if stage == "a":
    rows = [{"row_id": f"qa_{i:04d}", "origin": "human", "question": f"Question {i}?",
             "score": round((i * 7 % p["a"]["rows"]) / p["a"]["rows"], 3)} for i in range(p["a"]["rows"])]
    pq.write_table(pa.Table.from_pylist(rows), "data/a.parquet")
elif stage == "b":
    rows = [{**r, "row_id": "syn_" + r["row_id"][3:], "origin": "synthetic", "parent_ids": [r["row_id"]],
             "strategy": p["b"]["strategy"], "answer": f"Answer to {r['question']}"}
            for r in pq.read_table("data/a.parquet").to_pylist()]
    pq.write_table(pa.Table.from_pylist(rows), "data/b.parquet")
elif stage == "c":
    rows = pq.read_table("data/b.parquet").to_pylist()
    for r in rows:
        r["gate_reasons"] = [] if r["score"] >= p["c"]["min_score"] else ["faithfulness_unsupported"]
    out = pathlib.Path("data/c"); out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([r for r in rows if not r["gate_reasons"]]), out / "accepted.parquet")
    pq.write_table(pa.Table.from_pylist([r for r in rows if r["gate_reasons"]]), out / "rejected.parquet")
    accepted = sum(not r["gate_reasons"] for r in rows)
    json.dump({"total": len(rows), "kept": accepted}, open("metrics/c.json", "w"))
elif stage == "validate":
    audit = pathlib.Path(sys.argv[sys.argv.index("--audit") + 1]); audit.mkdir(parents=True, exist_ok=True)
    accepted = pq.read_metadata("data/c/accepted.parquet").num_rows
    ok = accepted >= p["validate"]["min_accepted"]
    json.dump({"datasets": [{"dataset": "curated", "decision": "accept" if ok else "reject",
                             "failed_checks": [] if ok else [f"curated: {accepted} rows < min_accepted"]}]},
              open(audit / "curated.json", "w"))
    sys.exit(0 if ok else 1)
'''
STAGES = {
    "a": {"cmd": "python pipeline.py a", "deps": ["pipeline.py"], "params": ["a"], "outs": ["data/a.parquet"]},
    "b": {"cmd": "python pipeline.py b", "deps": ["pipeline.py", "data/a.parquet"], "params": ["b"],
          "outs": ["data/b.parquet"]},
    "c": {"cmd": "python pipeline.py c", "deps": ["pipeline.py", "data/b.parquet"], "params": ["c"],
          "outs": ["data/c"], "metrics": [{"metrics/c.json": {"cache": False}}]},
    "validate": {"cmd": "python pipeline.py validate --audit reports/audit", "deps": ["pipeline.py", "data/c"],
                 "params": ["validate"], "outs": [{"reports/audit": {"cache": False}}]},
}
PARAMS = {"a": {"rows": 20}, "b": {"strategy": "answer_augmentation"}, "c": {"min_score": 0.3},
          "validate": {"min_accepted": 10}}
UNTOUCHED = ("data/a.parquet", "data/b.parquet")
NOT_PULLED = ["data/a.parquet"]  # b is pulled as a dependency of c, which reruns; a is never needed
CHANGED = ("data/c/accepted.parquet", "data/c/rejected.parquet")


def _env() -> dict[str, str]:
    """This environment's tools first on PATH (python, dvc, refinery), this checkout's refinery importable."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PATH": path, "PYTHONPATH": pythonpath, "DVC_NO_ANALYTICS": "1"}


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], repo)


@pytest.fixture(scope="module")
def origin(tmp_path_factory) -> Path:
    """The project's "GitHub" repository: main reproduced, committed and pushed to a local DVC remote, and
    pull-request branches that each change one threshold (params.yaml only: CI reruns what changed)."""
    root = tmp_path_factory.mktemp("prflow")
    repo, remote = root / "origin", root / "dvc-remote"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _run(["dvc", "init", "-q"], repo)
    _run(["dvc", "remote", "add", "-d", "storage", str(remote)], repo)
    (repo / "pipeline.py").write_text(PIPELINE)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": STAGES}, sort_keys=False))
    (repo / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    for folder in ("data", "metrics"):
        (repo / folder).mkdir()
    _run(["dvc", "repro", "-q"], repo)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "base: reproduced")
    _run(["dvc", "push", "-q"], repo)
    for branch, min_score in (("pr-lenient", 0.4), ("pr-strict", 0.6)):
        _git(repo, "checkout", "-qb", branch, "main")
        (repo / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "c": {"min_score": min_score}}))
        _git(repo, "commit", "-qam", f"raise c.min_score to {min_score}")
    _git(repo, "checkout", "-q", "main")
    return repo


def _runner(origin: Path, branch: str, where: Path) -> Path:
    """A hosted runner's checkout of the pull request: a clone with history and an empty DVC cache."""
    _run(["git", "clone", "-q", "--branch", branch, str(origin), str(where)], origin.parent)
    return where


# ---- the workflow's steps ------------------------------------------------------------------------------------

EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def _resolve(value, context: dict[str, str]) -> str:
    """Substitute ``${{ expr }}`` as GitHub would, from ``context``; secrets are empty (a local remote needs none)."""
    def one(match: re.Match) -> str:
        expr = match.group(1)
        if expr.startswith("secrets."):
            return ""
        assert expr in context, f"{WORKFLOW.name}: no local value for ${{{{ {expr} }}}}; add it to this test"
        return context[expr]

    return EXPRESSION.sub(one, str(value))


def run_workflow(repo: Path, base_ref: str, scratch: Path) -> dict[str, dict]:
    """Run the review job's steps in order in ``repo`` as a hosted runner would (GitHub's shells, env, step
    outcomes, continue-on-error, ``if: always()``), leaving out the steps that need GitHub.

    Returns:
        ``{step id: {"outcome", "rc", "log"}}`` for the steps that ran.
    """
    job = yaml.safe_load(WORKFLOW.read_text())["jobs"]["review"]
    shell = (job.get("defaults") or {}).get("run", {}).get("shell")
    context = {"github.base_ref": base_ref, "github.token": "", "github.event.pull_request.number": "1"}
    files = {name: scratch / name for name in ("GITHUB_STEP_SUMMARY", "GITHUB_PATH", "GITHUB_ENV", "GITHUB_OUTPUT")}
    for f in files.values():
        f.touch()
    results: dict[str, dict] = {}
    job_failed = False
    for step in job["steps"]:
        if "uses" in step or step.get("id") in NEEDS_GITHUB:
            continue
        assert "id" in step, f"{WORKFLOW.name}: step {step['name']!r} needs an id (this test reports by id)"
        condition = step.get("if")
        assert condition in (None, "always()"), f"{step['id']}: `if: {condition}` is not evaluated by this test"
        if job_failed and condition is None:
            continue
        assert "${{" not in step["run"], f"{step['id']}: pass expressions through env:, not inside run:"
        script = scratch / f"{step['id']}.sh"
        script.write_text(step["run"])
        env = {**_env(), "CI": "true", "GITHUB_ACTIONS": "true", "GITHUB_BASE_REF": base_ref,
               **{k: str(v) for k, v in files.items()}}
        env.update({k: _resolve(v, context) for k, v in (job.get("env") or {}).items()})
        env.update({k: _resolve(v, context) for k, v in (step.get("env") or {}).items()})
        proc = subprocess.run([*SHELLS[step.get("shell", shell)], str(script)], cwd=repo, env=env,
                              capture_output=True, text=True)
        outcome = "success" if proc.returncode == 0 else "failure"
        context[f"steps.{step['id']}.outcome"] = outcome
        context[f"steps.{step['id']}.conclusion"] = "success" if step.get("continue-on-error") else outcome
        job_failed |= outcome == "failure" and not step.get("continue-on-error")
        results[step["id"]] = {"outcome": outcome, "rc": proc.returncode, "log": proc.stdout + proc.stderr}
    return results


@pytest.mark.slow
@pytest.mark.parametrize(("branch", "threshold_rc"), [("pr-lenient", 0), ("pr-strict", 1)])
def test_workflow_steps_diff_only_the_changed_stage_and_exit_on_the_threshold(origin, tmp_path, branch,
                                                                               threshold_rc):
    # given a pull request that changes c.min_score only, checked out on a "runner" with an empty DVC cache
    repo = _runner(origin, branch, tmp_path / "runner")
    scratch = tmp_path / "github"
    scratch.mkdir()
    # when the workflow's steps run in order
    steps = run_workflow(repo, "main", scratch)
    # then every step that needs no GitHub ran, the repro only failing where validate rejects the dataset
    assert list(steps) == ["repro", "diff", "threshold"], {k: v["log"][-3000:] for k, v in steps.items()}
    assert steps["diff"]["outcome"] == "success", steps["diff"]["log"][-3000:]
    assert steps["repro"]["outcome"] == ("success" if threshold_rc == 0 else "failure"), steps["repro"]["log"][-3000:]
    # a stage that did not change was skipped without being pulled (`dvc repro --allow-missing`) ...
    assert [path for path in UNTOUCHED if not (repo / path).exists()] == NOT_PULLED
    report = json.loads((repo / "diff.json").read_text())
    by_name = {d["dataset"]: d for d in report["datasets"]}
    # ... and the diff read them from the remote by their dvc.lock hash: present and unchanged, not deleted
    assert set(by_name) == {*UNTOUCHED, *CHANGED}
    for path in UNTOUCHED:
        d = by_name[path]
        assert (d["status"], d["rows_a"], d["rows_b"], d["added"], d["removed"], d["changed"]) == \
            ("unchanged", 20, 20, 0, 0, 0), d
    assert report["rev_b"]["not_in_workspace"] == NOT_PULLED
    # exactly the changed stage's datasets changed: rows moved from accepted to rejected, for faithfulness
    assert {n for n, d in by_name.items() if d["status"] != "unchanged"} == set(CHANGED)
    accepted, rejected = by_name["data/c/accepted.parquet"], by_name["data/c/rejected.parquet"]
    moved = accepted["rows_a"] - accepted["rows_b"]
    assert moved > 0 and (accepted["removed"], rejected["added"]) == (moved, moved)
    assert report["moved"] == [{"from": "data/c/accepted.parquet", "to": "data/c/rejected.parquet", "rows": moved,
                                "reasons": {"faithfulness_unsupported": moved}}]
    # the threshold status and the threshold step's exit code follow from the change
    assert report["violations"] == ([] if threshold_rc == 0 else ["curated"])
    assert steps["threshold"]["rc"] == threshold_rc, steps["threshold"]["log"][-3000:]
    # the comment and the job summary carry the Markdown
    md = (repo / "diff.md").read_text()
    assert (repo / "comment.md").read_text() == md and (scratch / "GITHUB_STEP_SUMMARY").read_text() == md
    assert "2 of 4 datasets changed" in md and "| params.yaml | `c.min_score` | 0.3 |" in md
    assert ("**dvc repro failed**" in md) == (threshold_rc == 1)
    (tmp_path / "diff.md").write_text(md)
    print(f"\n--- refinery diff Markdown of {branch} ({tmp_path / 'diff.md'}) ---\n{md}")


# ---- refinery diff on a workspace that lacks outputs ----------------------------------------------------------

@pytest.fixture
def bare_runner(origin, tmp_path) -> Path:
    """A clone of the strict pull request with c rerun, a never pulled (as `dvc repro --allow-missing` leaves it)."""
    repo = _runner(origin, "pr-strict", tmp_path / "runner")
    _run(["dvc", "repro", "--pull", "--allow-missing", "-q", "c"], repo)
    assert not (repo / "data" / "a.parquet").exists() and (repo / "data" / "c" / "accepted.parquet").exists()
    return repo


@pytest.mark.slow
def test_an_output_missing_from_the_workspace_is_read_by_its_hash_and_one_not_recorded_is_absent(bare_runner):
    # given a workspace without data/a.parquet (recorded in dvc.lock), and a stage d that
    # dvc.yaml declares but that never ran (in neither the workspace nor dvc.lock)
    spec = yaml.safe_load((bare_runner / "dvc.yaml").read_text())
    spec["stages"]["d"] = {"cmd": "python pipeline.py d", "deps": ["data/b.parquet"], "outs": ["data/d.parquet"]}
    (bare_runner / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    # when diffed against main
    report = diff_revisions(bare_runner, "origin/main", None, dvc_diffs=False)
    by_name = {d["dataset"]: d for d in report["datasets"]}
    # then a is read from the remote, and like b unchanged; d is absent, neither added nor removed
    assert {n: by_name[n]["status"] for n in UNTOUCHED} == {n: "unchanged" for n in UNTOUCHED}
    assert "data/d.parquet" not in by_name
    assert report["rev_b"]["not_in_workspace"] == NOT_PULLED


@pytest.mark.slow
def test_an_output_of_a_stage_removed_from_dvc_yaml_is_gone_even_though_dvc_lock_still_lists_it(bare_runner):
    # given stage a removed from dvc.yaml, its entry left in dvc.lock (DVC leaves it there) and its file absent
    spec = yaml.safe_load((bare_runner / "dvc.yaml").read_text())
    del spec["stages"]["a"]
    spec["stages"]["b"]["deps"] = ["pipeline.py"]
    (bare_runner / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    # when diffed against main
    report = diff_revisions(bare_runner, "origin/main", None, dvc_diffs=False)
    # then data/a.parquet is reported removed, not read back from the stale lock entry
    a = next(d for d in report["datasets"] if d["dataset"] == "data/a.parquet")
    assert (a["status"], a["removed"], a["rows_b"]) == ("removed", 20, 0)


@pytest.mark.slow
def test_an_output_recorded_but_not_fetchable_is_a_one_line_error_naming_it_and_what_to_run(bare_runner,
                                                                                          tmp_path):
    # given the runner's remote pointed at an empty folder (the objects were never pushed)
    empty = tmp_path / "empty-remote"
    empty.mkdir()
    _run(["dvc", "remote", "modify", "--local", "storage", "url", str(empty)], bare_runner)
    # when the workspace's outputs are read
    with pytest.raises(RefineryError) as err:
        Snapshot(bare_runner).parquet_outs()
    # then one line names the file, that dvc.lock records it, and what to run
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("data/a.parquet: recorded in dvc.lock (md5 ")
    assert "not on the DVC remote 'storage'" in message and "run `dvc pull data/a.parquet`" in message
    # and the same for a revision's outputs (the runner's cache is empty)
    with pytest.raises(RefineryError, match=r"^data/a\.parquet@origin/main: recorded in dvc.lock there .*`dvc push`"):
        Snapshot(bare_runner, "origin/main").parquet_outs()
    # the CLI prints it as one `error:` line with exit code 2
    proc = subprocess.run(["refinery", "diff", "origin/main", "--no-dvc-diffs"], cwd=bare_runner, env=_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: data/a.parquet@origin/main: ")


def test_the_workflow_installs_cpu_torch_and_the_remote_extra_and_posts_one_sticky_comment():
    job = yaml.safe_load(WORKFLOW.read_text())["jobs"]["review"]
    steps = {s.get("id") or s["name"]: s for s in job["steps"]}
    install = steps["install"]["run"]
    # the CPU wheel first, from PyTorch's index, at the pinned version; then make install; then the remote extra
    cpu = install.index("--index-url https://download.pytorch.org/whl/cpu")
    assert "torch==2.13.0" in install and cpu < install.index("\nmake install") < install.index('".[$REMOTE_EXTRA]"')
    pyproject = (ROOT / "pyproject.toml").read_text()
    extra = re.search(rf'^{job["env"]["REMOTE_EXTRA"]} = \["(dvc-[a-z0-9]+)==([0-9.]+)"\]', pyproject, re.M)
    assert extra, f"pyproject.toml: no optional extra {job['env']['REMOTE_EXTRA']!r}"
    constraints = (ROOT / "constraints.txt").read_text().split()
    assert f"{extra[1]}=={extra[2]}" in constraints  # pinned with its transitive dependencies
    # one comment, edited on every push, with CML pinned
    cml = next(s for s in job["steps"] if s.get("uses", "").startswith("iterative/setup-cml@"))
    assert re.fullmatch(r"\d+\.\d+\.\d+", cml["with"]["version"])
    assert steps["comment"]["run"].startswith("cml comment update --target=pr --watermark-title=")
    assert job["defaults"]["run"]["shell"] == "bash"  # pipefail: `dvc repro | tee` fails when dvc repro does
