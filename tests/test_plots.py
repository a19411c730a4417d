"""`refinery plots`: the DVC plots page draws its Vega charts offline (bundle inlined), checked in headless Chromium."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from refinery.core.errors import RefineryError
from refinery.inspect.plots import render_plots
from tests.conftest import offline, watched_page

DVC_YAML = """\
stages:
  report:
    cmd: echo done
    plots:
      - plots/report_f1.csv:
          cache: false
          template: bar_horizontal
          x: f1
          y: model
      - plots/loss.csv:
          cache: false
          x: step
          y: loss
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots/report_f1.csv").write_text("model,f1\nBase (untuned),0.175\nC: curated,0.155\n")
    (tmp_path / "plots/loss.csv").write_text("step,loss\n" + "".join(f"{i},{2.0 / (i + 1):.3f}\n" for i in range(10)))
    return tmp_path


def test_plots_page_has_no_cdn_and_draws_every_plot_offline(project, chromium):
    browser, shoot = chromium
    # when the page is written
    page_file = render_plots(project / "out", root=project)
    html = page_file.read_text()
    # then Vega is inlined, not loaded from a CDN
    assert "cdn.jsdelivr.net" not in html and "window.vegaEmbed" in html
    page, requests, errors = watched_page(browser, 1100, 800)
    page.goto(page_file.as_uri())
    # and Chromium draws both charts (Vega renders each into an SVG), with the bars' labels, and nothing fetched
    page.wait_for_function("document.querySelectorAll('.vega-embed svg.marks').length == 2", timeout=20_000)
    text = page.inner_text("body")
    assert "C: curated" in text and "Base (untuned)" in text
    shoot(page, "dvc_plots")
    assert errors == [] and offline(requests) == []


def test_a_project_that_declares_no_plot_is_one_line_that_says_what_to_run(project):
    (project / "dvc.yaml").write_text("stages:\n  report:\n    cmd: echo done\n")
    with pytest.raises(RefineryError, match=r"^dvc plots show wrote no page \(.+\): run dvc repro or dvc pull first$"):
        render_plots(project / "out", root=project)
