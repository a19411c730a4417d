"""The scale benchmark's smoke mode runs every stage end to end, so the benchmark cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT


def test_mock_teacher_replies_parse_in_every_strategy_format():
    from bench.scale_data import mock_reply
    from refinery.generation import strategies as strat

    # given prompts ending as each strategy's template ends
    endings = {"answer_augmentation": "Answer:", "question_rephrasing": "Rewritten:\n", "new_question": "Question:",
               "evol_depth": "Harder question:\n", "evol_breadth": "New question:\n"}
    for name, end in endings.items():
        s = strat.STRATEGIES[name]
        errors = [strat.parse_output(s, mock_reply(f"Passage: p\n{end}", seed))[2] for seed in range(200)]
        # then most replies parse, and the planted failures are a few percent
        assert 0.8 <= errors.count(None) / len(errors) < 1.0, (name, errors)
    # and a reply is a pure function of prompt and seed
    assert mock_reply("Question:", 3) == mock_reply("Question:", 3) != mock_reply("Question:", 4)


@pytest.mark.slow
def test_smoke_mode_runs_every_stage_and_prints_its_figures(tmp_path):
    # given the smoke size, no model gates (no model download), inputs kept for inspection
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_scale.py"), "--rows", "2000", "--model-sample",
                           "0", "--keep", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # then every stage ran on the rows of the previous one and printed its figures
    out = proc.stdout
    for stage in ("generate", "generate_cached", "gate", "recover", "recover_cached", "assemble", "validate"):
        line = next((x for x in out.splitlines() if x.startswith(stage + " ")), None)
        assert line is not None, out
        result = json.loads((tmp_path / "2000" / f"{stage}.result.json").read_text())
        assert result["rows"] > 0 and result["wall_s"] > 0 and result["base_rss_mb"] > 0
    assert pq.read_metadata(tmp_path / "2000" / "03" / "synthetic.parquet").num_rows == 2000
    gated = sum(pq.read_metadata(tmp_path / "2000" / "04" / f"{k}.parquet").num_rows for k in ("accepted", "rejected"))
    assert gated == 2000
    # the cached reruns of generate and recover wrote the same bytes, recover without a teacher call
    recover_cached = next(x for x in out.splitlines() if x.startswith("recover_cached "))
    assert "byte-identical" in next(x for x in out.splitlines() if x.startswith("generate_cached "))
    assert "byte-identical" in recover_cached and ", 0 made)" in recover_cached
    assert (tmp_path / "2000" / "reports" / "audit" / "curated.json").is_file()


@pytest.mark.slow
def test_smoke_mode_runs_every_stage_on_the_ray_engine(tmp_path):
    pytest.importorskip("ray", reason="the Ray engine needs ray (make install installs it)")
    # given a small size on the Ray engine: generate's teacher on Ray actors, the gate stage's row gates (the
    # benchmark's stand-ins, shipped to the workers by value) as Ray Data units, validate's per-row checks as tasks
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_scale.py"), "--rows", "500", "--model-sample",
                           "0", "--engine", "ray", "--keep", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # then every stage ran and the gate stage's verdicts came back for every row
    for stage in ("generate", "generate_cached", "gate", "recover", "assemble", "validate"):
        result = json.loads((tmp_path / "500" / f"{stage}.result.json").read_text())
        assert result["rows"] > 0, stage
    gated = sum(pq.read_metadata(tmp_path / "500" / "04" / f"{k}.parquet").num_rows for k in ("accepted", "rejected"))
    assert gated == 500
    assert "the other gates ran on the Ray workers" in proc.stdout
    assert "byte-identical" in proc.stdout


def test_the_http_benchmarks_schedule_bound_is_a_window_without_overhead():
    from bench.bench_http_teacher import latency, schedule_rate

    prompts = [f"t prompt {i:06d}" for i in range(300)]
    lat = [latency(p) for p in prompts]
    # one slot sends the prompts one after another; as many slots as prompts wait only for the slowest
    assert schedule_rate(prompts, 1) == pytest.approx(300 / sum(lat))
    assert schedule_rate(prompts, 300) == pytest.approx(300 / max(lat))
    # in between, the drain keeps the bound below concurrency / mean latency, the more the wider the window
    mean = sum(lat) / len(lat)
    ratios = [schedule_rate(prompts, c) / (c / mean) for c in (4, 16, 64)]
    assert 1.0 >= ratios[0] > ratios[1] > ratios[2]


@pytest.mark.slow
def test_the_validate_benchmark_runs_at_a_small_size_and_prints_the_stages_own_peak_rss():
    # the benchmark rotted once (a params key the validate stage no longer takes): run it small
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_validate.py"), "--rows", "2000"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("validate on 2,000 rows"))
    assert "peak RSS" in line and "VmHWM" not in proc.stdout
