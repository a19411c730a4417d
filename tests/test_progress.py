"""Progress where people look: a line every few seconds when stderr is a log, not a terminal."""

from __future__ import annotations

import io

from refinery.core import progress as progress_mod
from refinery.models.backends.fake import FakeBackend
from refinery.core.progress import LineProgress, progress
from refinery.generation.teacher import GenerationCache, run_jobs
from tests.test_generate import _jobs


def test_a_log_gets_a_line_with_done_total_rate_and_eta_every_interval(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    bar = LineProgress(100, "generate", "call", every_s=10, file=out)
    for _ in range(4):  # 25 calls every 5 s: a line every other update
        now[0] += 5
        bar.update(25)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == ["generate: 50/100 calls (50%), 5.00/s, elapsed 0:10, ETA 0:10",
                     "generate: 100/100 calls (100%), 5.00/s, elapsed 0:20"]


def test_a_pipe_gets_lines_and_a_terminal_gets_a_bar():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(progress(5, "x", "step", file=io.StringIO()), LineProgress)
    assert not isinstance(progress(5, "x", "step", file=Tty()), LineProgress)
    quiet = io.StringIO()
    bar = progress(5, "x", "step", enabled=False, file=quiet)
    bar.update(5)
    bar.close()
    assert quiet.getvalue() == ""


def test_teacher_calls_print_progress_lines_when_stderr_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REFINERY_PROGRESS_S", "0")
    run_jobs(_jobs(6), FakeBackend(), GenerationCache(tmp_path / "c.sqlite"), batch_size=2, desc="generate")
    err = capsys.readouterr().err.splitlines()
    assert err and err[-1].startswith("generate: 6/6 calls (100%)") and all(" calls " in e for e in err)
