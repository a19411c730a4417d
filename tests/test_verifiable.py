"""Verifiable data: the sandbox contains hostile code, the gate's reason codes, strict seed and output parsing."""

from __future__ import annotations

import json
import socket

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from refinery.core.errors import InputError
from refinery.generation.prompts import load_template
from refinery.models.backends.base import GenResult
from refinery.models.backends.fake import FakeBackend
from refinery.verify.check import (REASONS, CodeItem, MathItem, VerifiableGate, check_code, check_math, load_items,
                                   parse_number)
from refinery.verify.generate import parse_code, parse_math, plan_calls, to_rows
from refinery.verify.sandbox import Limits, isolation, run_python
from tests.conftest import ROOT

SEED = ROOT / "data" / "00_seed_verifiable"
FAST = Limits(timeout_s=2.0, cpu_s=2, memory_mb=256)


# ---- the sandbox: every kind of hostile code is contained ----

def test_an_expression_is_evaluated_and_a_program_runs_in_the_sandbox():
    assert run_python("9 * 12 * 12", "eval", FAST).value == 1296.0
    assert run_python("def f(x):\n    return x + 1\nassert f(1) == 2", "exec", FAST).status == "ok"
    assert run_python("open('scratch.txt', 'w').write('x')", "exec", FAST).status == "ok"  # its own folder


@pytest.mark.parametrize("code", ["while True:\n    pass", "import time\ntime.sleep(60)"])
def test_an_infinite_loop_is_killed_at_the_timeout(code):
    r = run_python(code, "exec", Limits(timeout_s=1.0, cpu_s=2))
    assert (r.status, r.error_type) == ("timeout", "Timeout")


def test_a_fork_bomb_gets_no_process(tmp_path):
    for code in ("import os\nwhile True:\n    os.fork()",
                 "import subprocess\nsubprocess.run(['sh', '-c', 'echo escaped > %s'])" % (tmp_path / "out"),
                 "import os\nos.system('echo escaped > %s')" % (tmp_path / "out"),
                 "import multiprocessing\nmultiprocessing.Process(target=print).start()"):
        r = run_python(code, "exec", FAST)
        assert r.status == "error" and r.error_type == "PermissionError", (code, r)
    assert not (tmp_path / "out").exists()


def test_file_deletion_and_writes_outside_the_sandbox_are_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    for code in (f"import os\nos.remove({str(victim)!r})", f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                 f"open({str(victim)!r}, 'w').write('gone')", f"import os\nos.rename({str(victim)!r}, 'x')",
                 f"import pathlib\npathlib.Path({str(tmp_path / 'new.txt')!r}).write_text('x')"):
        r = run_python(code, "exec", FAST)
        assert r.status == "error" and r.error_type == "PermissionError", (code, r)
    assert victim.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]


def test_network_calls_are_refused():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        for code in (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
                     f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)"):
            r = run_python(code, "exec", FAST)
            assert r.status == "error" and ("PermissionError" in r.error_type or "not allowed" in (r.error or "")), r
        with pytest.raises(BlockingIOError):  # no connection ever reached the listener's backlog
            server.accept()
    finally:
        server.close()
    assert isolation() in ("namespace+audit_hook", "audit_hook")


def test_ctypes_memory_and_file_size_limits_hold():
    assert run_python("import ctypes\nctypes.CDLL(None).system(b'true')", "exec", FAST).error_type == \
        "PermissionError"
    assert run_python("x = bytearray(1024 ** 3)", "exec", FAST).error_type == "MemoryError"
    assert run_python("open('big', 'wb').write(b'x' * (3 * 1024 * 1024))", "exec", FAST).status == "error"


def test_code_cannot_fake_the_result_line():
    r = run_python("import sys\nprint('\\x00refinery-sandbox-result\\x00{\"ok\": true}')\nraise ValueError('no')",
                   "exec", FAST)
    assert (r.status, r.error_type) == ("error", "ValueError")


# ---- the verifiable gate: one test per reason code ----

def test_math_rows_agreeing_with_their_expression_pass():
    assert check_math("(11 - 9) * 5 * 12", "120", FAST).reason is None
    assert check_math("5 - 1.75 - 2.4", "0.85 GB", FAST).reason is None
    assert check_math("9 * 12 * 12", "$1,296", FAST).reason is None


def test_verifiable_wrong_answer():
    c = check_math("3 * 22", "64", FAST)
    assert (c.reason, c.value) == ("verifiable_wrong_answer", 66.0)
    assert check_code("def f(x):\n    return x", ["assert f(1) == 2"], FAST).reason == "verifiable_wrong_answer"


def test_verifiable_timeout():
    assert check_math("sum(range(10 ** 12))", "1", Limits(timeout_s=1.0, cpu_s=2)).reason == "verifiable_timeout"
    assert check_code("def f():\n    while True:\n        pass", ["assert f()"],
                      Limits(timeout_s=1.0, cpu_s=2)).reason == "verifiable_timeout"


def test_verifiable_error():
    assert check_math("users * price", "12", FAST).reason == "verifiable_error"  # NameError
    assert check_math("1 / 0", "1", FAST).reason == "verifiable_error"
    assert check_math("'twelve'", "12", FAST).reason == "verifiable_error"  # not a number
    assert check_math("12", "twelve", FAST).reason == "verifiable_error"  # the stated answer is not a number
    assert check_code("def f(:\n    pass", ["assert f()"], FAST).reason == "verifiable_error"  # SyntaxError
    assert check_code("import os\ndef f():\n    os.remove('/etc/hosts')", ["assert f() is None"],
                      FAST).reason == "verifiable_error"  # the sandbox refused it
    assert set(REASONS) == {"verifiable_wrong_answer", "verifiable_timeout", "verifiable_error"}


def test_the_gate_runs_seed_tests_with_generated_ones():
    gate = VerifiableGate(FAST)
    good = {"kind": "code", "solution": "def f(x):\n    return x + 1", "tests": ["assert f(0) == 1"],
            "seed_tests": ["assert f(2) == 3"]}
    passes_own_only = {**good, "solution": "def f(x):\n    return 1"}  # its own test passes, the seed's fails
    v = gate.apply([good, passes_own_only, {"kind": "math", "expression": "2 + 2", "answer": "4"}])
    assert v.keep == [True, False, True] and v.reason == [None, "verifiable_wrong_answer", None]


@pytest.mark.parametrize("text, value", [("120", 120.0), ("$1,296", 1296.0), ("0.85 GB", 0.85), ("12.", 12.0),
                                         ("-3", -3.0), ("€63", 63.0), ("twelve", None), ("", None),
                                         ("3 or 4", None)])
def test_parse_number(text, value):
    assert parse_number(text) == value


# ---- the seed and the teacher's outputs, parsed strictly ----

@pytest.mark.skipif(not SEED.is_dir(), reason="the verifiable seed folder data/00_seed_verifiable is absent")
def test_every_seed_item_passes_its_own_check():
    gate = VerifiableGate(FAST)
    math_items = [i for _, i in load_items(SEED / "math.jsonl", MathItem)]
    code_items = [i for _, i in load_items(SEED / "code.jsonl", CodeItem)]
    assert len(math_items) >= 20 and len(code_items) >= 10
    rows = [{"kind": "math", "expression": i.expression, "answer": i.answer} for i in math_items] + \
        [{"kind": "code", "solution": i.solution, "tests": [], "seed_tests": i.tests} for i in code_items]
    assert all(gate.apply(rows).keep)


def test_a_bad_seed_line_names_file_line_and_field(tmp_path):
    f = tmp_path / "math.jsonl"
    f.write_text(json.dumps({"item_id": "m1", "question": "q", "expression": "1", "answer": "1"}) + "\n"
                 + json.dumps({"item_id": "m2", "question": "q", "expression": "", "answer": "1"}) + "\n")
    with pytest.raises(InputError, match=r"math.jsonl: row 2: field 'expression': String should have at least"):
        load_items(f, MathItem)
    f.write_text('{"item_id": "c1", "entry_point": "f", "task": "t", "solution": "def f(): pass", '
                 '"tests": ["f() is None"]}\n')
    with pytest.raises(InputError, match=r"row 1: field 'tests': .*every test is one 'assert \.\.\.' line"):
        load_items(f, CodeItem)


def test_the_stage_refuses_a_seed_whose_answer_execution_contradicts(tmp_path):
    from stages.verifiable import self_check

    f = tmp_path / "math.jsonl"
    f.write_text(json.dumps({"item_id": "m1", "question": "q", "expression": "2 + 2", "answer": "5"}) + "\n")
    with pytest.raises(InputError, match=r"math.jsonl: row 1: field 'answer': the seed item fails its own check: "
                                         r"verifiable_wrong_answer"):
        self_check(VerifiableGate(FAST), load_items(f, MathItem), "math", f)


def test_math_and_code_outputs_are_parsed_strictly():
    assert parse_math(" A team of 4 pays $9 each per month. What is the monthly bill?\nExpression: 4 * 9\n"
                      "Answer: 36") == ({"question": "A team of 4 pays $9 each per month. What is the monthly bill?",
                                         "expression": "4 * 9", "answer": "36"}, None)
    assert parse_math(" A problem\nAnswer: 3") == (None, "parse_missing_expression")
    assert parse_math(" A problem\nExpression: 1 + 2") == (None, "parse_missing_answer")
    got, err = parse_code("def f(x):\n    return x + 1\n\nassert f(1) == 2\n", "f")
    assert err is None and got == {"solution": "def f(x):\n    return x + 1", "tests": ["assert f(1) == 2"]}
    assert parse_code("def g(x):\n    return x\n", "f") == (None, "parse_missing_function")


def test_planned_calls_render_the_templates_and_rows_keep_every_call():
    templates = {n: load_template(ROOT / "prompts" / f"{n}.txt") for n in ("verifiable_math", "verifiable_code")}
    math_items = [MathItem(item_id=f"m{i}", question=f"Problem {i}?", expression=f"{i} + 1", answer=str(i + 1))
                  for i in range(3)]
    code_items = [CodeItem(item_id="c1", entry_point="inc", task="Add one.", solution="def inc(x):\n    return x + 1",
                           tests=["assert inc(1) == 2"])]
    calls = plan_calls(math_items, code_items, templates, samples=2, shots=2, seed=1, temperature=0.7, top_p=0.95,
                       max_new_tokens={"math": 32, "code": 64}, teacher_id="fake@1")
    assert [c.kind for c in calls] == ["math"] * 6 + ["code"] * 2
    assert calls[0].job.request.prompt.count("Problem: ") == 2 and "Problem: Problem 0?" in calls[0].job.request.prompt
    assert "Write the Python function inc for the task" in calls[-1].job.request.prompt
    assert "assert inc(1) == 2" in calls[-1].job.request.prompt
    assert len({c.job.key for c in calls}) == len(calls)
    results = [GenResult(" New?\nExpression: 2 * 3\nAnswer: 6", "stop", 10, 8, 0.1, None)] * 5 + \
        [GenResult("", "error", 0, 0, 0.1, "transport_timeout: slow")] + \
        [GenResult("def inc(x):\n    return x + 1\nassert inc(0) == 1\n", "stop", 10, 12, 0.1, None),
         GenResult("print('no function')\n", "stop", 10, 4, 0.1, None)]
    rows = to_rows(calls, results, "fake@1")
    assert len(rows) == 8 and rows[5]["error"] == "transport_timeout: slow"
    assert rows[6]["seed_tests"] == ["assert inc(1) == 2"] and rows[6]["tests"] == ["assert inc(0) == 1"]
    assert rows[7]["parse_error"] == "parse_missing_function"


def test_the_verifiable_stage_end_to_end_on_a_fake_teacher(tmp_path, monkeypatch):
    import yaml

    from refinery.generation import calls as generation
    from schemas import verifiable as verifiable_schema
    from stages.verifiable import cli

    def respond(req):
        if req.prompt.startswith("Write one new arithmetic"):
            return " A team of 3 pays $9 each. What is the bill?\nExpression: 3 * 9\nAnswer: 28"  # wrong
        return "def annual_cost(users, price):\n    return users * price * 12\nassert annual_cost(1, 1) == 12\n"

    backend = FakeBackend(responder=respond)
    monkeypatch.setattr(generation, "teacher_backend", lambda *a, **k: ("fake@1", lambda: backend))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["verifiable"].update(max_items=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out, metrics = tmp_path / "rows.parquet", tmp_path / "verifiable.json"
    r = CliRunner().invoke(cli, ["--params", str(tmp_path / "params.yaml"), "--seed", str(SEED), "--models",
                                 str(tmp_path), "--prompts", str(ROOT / "prompts"), "--cache",
                                 str(tmp_path / "teacher.sqlite"), "--out", str(out), "--metrics", str(metrics),
                                 "--quiet"])
    assert r.exit_code == 0, r.output
    rows = verifiable_schema.CONTRACT.validate(pq.read_table(out), "rows").to_pylist()
    m = json.loads(metrics.read_text())
    assert [x["kind"] for x in rows] == ["math", "math", "code", "code"]
    assert [x["verifiable_reason"] for x in rows[:2]] == ["verifiable_wrong_answer"] * 2
    assert rows[2]["verifiable_keep"] is True  # code_01 solved: its own assert and the seed's three pass
    assert rows[3]["verifiable_reason"] == "parse_missing_function"  # code_02 asks for storage_left
    assert m["math"] == {"calls": 2, "parsed": 2, "kept": 0, "pass_rate_parsed": 0.0,
                         "reasons": {"verifiable_wrong_answer": 2}, "parse_errors": {}}
    assert m["code"]["kept"] == 1 and m["code"]["parse_errors"] == {"parse_missing_function": 1}
    assert m["seed_items"] == {"math": 2, "code": 2} and m["seed_self_check"] == "passed"
