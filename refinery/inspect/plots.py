"""`refinery plots`: every plot dvc.yaml declares, as one HTML page that renders offline (Vega inlined).

``dvc plots show`` writes a page that loads Vega from a CDN; this runs it with an HTML template that carries the
Vega bundle (:func:`refinery.core.offline.offline_html_template`), so the page draws its charts with no network.
Given revisions, it runs ``dvc plots diff`` instead and overlays them.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import click

from refinery.core.errors import RefineryError
from refinery.core.offline import offline_html_template


def render_plots(out: Path, revisions: tuple[str, ...] = (), root: Path = Path(".")) -> Path:
    """Write the offline plots page into ``out`` (``index.html`` plus DVC's ``static/`` images) and return it.

    Raises:
        RefineryError: DVC failed (its last line of output is named), e.g. outside a DVC project.
    """
    out = Path(out).resolve()
    with tempfile.TemporaryDirectory(prefix="refinery-plots-") as tmp:
        template = Path(tmp) / "offline.html"
        template.write_text(offline_html_template(), encoding="utf-8")
        args = ["diff", *revisions] if revisions else ["show"]
        cmd = [sys.executable, "-m", "dvc", "plots", *args, "--html-template", str(template), "-o", str(out)]
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
    if done.returncode != 0:
        raise RefineryError(f"dvc plots {args[0]} failed (exit {done.returncode}): {last}")
    page = out / "index.html"
    if not page.is_file():  # e.g. no plot file in the workspace: DVC says so and exits 0
        raise RefineryError(f"dvc plots {args[0]} wrote no page ({last}): run dvc repro or dvc pull first")
    return page


@click.command()
@click.option("--out", "out_dir", default="build/plots", show_default=True,
              help="Folder the page goes to (index.html, and static/ for the PNG plots).")
@click.argument("revisions", nargs=-1)
def cli(out_dir: str, revisions: tuple[str, ...]) -> None:
    """Write every DVC plot as an HTML page that renders offline; given REVISIONS, compare them (dvc plots diff)."""
    page = render_plots(Path(out_dir), revisions)
    click.echo(f"plots: {page}")
