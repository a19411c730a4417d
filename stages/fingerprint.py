"""Write each stage's code fingerprint (its modules' AST hashes) for DVC to depend on instead of source files."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("fingerprint")
@click.option("--out", "out_dir", required=True,
              help="Folder for one <stage>.json per stage module (the fingerprint folder dvc.yaml names).")
def cli(out_dir: str) -> None:
    """Write <out>/<stage>.json for every stage: its code modules, their AST hashes and the combined hash.

    Comments, docstrings and formatting leave these files byte-identical, so DVC reruns no stage for them.
    """
    from refinery.core.codehash import fingerprints
    from refinery.core.io import atomic_outputs

    found = fingerprints()
    with atomic_outputs() as outputs:
        for stage, record in found.items():
            outputs.json(record, Path(out_dir) / f"{stage}.json")
    click.echo(f"fingerprint: {len(found)} stages -> {out_dir}", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
