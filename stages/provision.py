"""Provision each role's model as data: resolve, materialise and record its provenance."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from refinery.models import resolve
from refinery.core.params import load_section
from refinery.models.provision import ROLES, ProvisionParams, raw_spec


def plan(params: ProvisionParams) -> dict[str, resolve.ModelSpec]:
    """Parse every role's spec (fails fast, before any conversion, on the first bad one)."""
    return {role: resolve.parse_spec(role, raw_spec(getattr(params, role))) for role in ROLES}


def provision(params: ProvisionParams, out: Path, log=lambda s: None) -> dict[str, Any]:
    """Materialise every role's model under ``out`` and write ``out/<role>/PROVENANCE.json``.

    Models named by several roles are materialised once, in ``out/weights/<slug>``; roles that name the same
    weights with different settings (an endpoint's concurrency, a served model's processes) keep their own.

    Returns:
        The metrics record: the spec, kind and load id of each role, and the seconds spent.
    """
    import json

    specs = plan(params)
    weights = out / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"roles": {}, "distinct_models": len({s.slug for s in specs.values()})}
    done: dict[tuple, dict[str, Any]] = {}  # a model named by several roles alike is materialised once
    for role, spec in specs.items():
        t0 = time.perf_counter()
        # a served judge keeps prompt logits (for scoring) where a served teacher does not: its record is its own
        key = (spec.slug, spec.client, spec.serve, role if spec.kind == "served" else "")
        if key not in done:
            done[key] = resolve.materialize(spec, weights, log=log)
        record = {**done[key], "role": role}
        (out / role).mkdir(parents=True, exist_ok=True)
        (out / role / resolve.PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        metrics["roles"][role] = {"kind": spec.kind, "spec": spec.ref, "seconds": round(time.perf_counter() - t0, 2),
                                  "id": resolve.load_target(out, role)["id"]}
    if not any(weights.iterdir()):
        weights.rmdir()
    return metrics


@click.command("provision")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="Params file; this stage reads its provision section.")
@click.option("--out", "out_dir", required=True,
              help="Writes the provisioned models here: one folder per role (teacher, judge, student, embedder) "
                   "with its PROVENANCE.json, and the weights under weights/<model>/.")
@click.option("--metrics", "metrics_file", required=True,
              help="Writes what each role resolved to here (JSON: model id, revision or hash).")
def cli(params_file: str, out_dir: str, metrics_file: str) -> None:
    """Resolve teacher, judge, student and embedder models into models/base with provenance."""
    from refinery.core.io import atomic_outputs

    params = load_section(params_file, "provision", ProvisionParams)
    plan(params)  # fail on a bad spec before touching any output
    with atomic_outputs() as outputs:
        staged = outputs.folder(out_dir)
        metrics = provision(params, staged, log=lambda s: click.echo(f"provision: {s}", err=True))
        outputs.json(_stable(metrics), metrics_file)
    for role, info in metrics["roles"].items():
        click.echo(f"provision: {role:<8} {info['id']}  ({info['seconds']} s)", err=True)


def _stable(metrics: dict[str, Any]) -> dict[str, Any]:
    """Drop timings from the metrics file so two runs write identical bytes."""
    return {"distinct_models": metrics["distinct_models"],
            "roles": {r: {k: v for k, v in info.items() if k != "seconds"} for r, info in metrics["roles"].items()}}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
