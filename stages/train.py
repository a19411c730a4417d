"""Fine-tune the student with LoRA on one assembled dataset, keeping the adapter with the best human val loss."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from refinery.core.errors import InputError
from refinery.core.params import load_section, params_hash
from refinery.training.finetune import train_core
from refinery.training.student import TrainParams, read_documents, student_path

ENVIRONMENT_FILE = "environment.json"
LOG_FILE = "training_log.json"


def environment(params: TrainParams, student_id: str, inputs: dict[str, str], code_version: str,
                device: str) -> dict[str, Any]:
    """Describe what a run depended on: package versions, hardware, seeds, config hash, git commit."""
    import importlib.metadata as md

    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    versions = {"python": platform.python_version()}
    for dist in ("refinery", "torch", "transformers", "peft", "numpy", "pyarrow", "tokenizers", "safetensors"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    # the device the student was trained on (where its parameters were), not merely one that is present
    hardware = {"machine": platform.machine(), "system": platform.system(), "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(), "device": device,
                "cuda_present": torch.cuda.is_available()}
    return {"versions": versions, "hardware": hardware, "seeds": {"train": params.seed},
            "config_hash": params_hash(params), "params": params.model_dump(mode="json"), "git_commit": commit,
            "code_version": code_version, "student": student_id, "inputs_sha256": inputs}


def loss_png(log: dict[str, Any], name: str, path: Path) -> None:
    """Plot train loss per step and val loss per evaluation to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([c["step"] for c in log["curve"]], [c["loss"] for c in log["curve"]], label="train", lw=1)
    ax.plot([c["step"] for c in log["val_curve"]], [c["val_loss"] for c in log["val_curve"]], "o-", label="val")
    ax.axvline(log["best_step"], color="grey", ls=":", lw=1, label=f"best (step {log['best_step']})")
    ax.set(xlabel="optimizer step", ylabel="loss per answer token", title=f"LoRA loss: {name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)


def csv_text(rows: list[dict], columns: tuple[str, ...]) -> str:
    """Render rows as CSV (for `dvc plots`)."""
    return ",".join(columns) + "\n" + "".join(",".join(str(r[c]) for c in columns) + "\n" for r in rows)


@click.command("train")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="Params file; this stage reads its train section.")
@click.option("--dataset", "dataset_file", required=True,
              help="An assembled dataset (assemble's <arm>.parquet): one row per training example.")
@click.option("--name", required=True, help="The run's name (<arm>-s<seed>): adapter, metrics and plot files.")
@click.option("--seed", type=int, default=None, help="This run's training seed (default: the first of train.seeds).")
@click.option("--val", "val_file", required=True,
              help="Human validation split (split's val.parquet): one row per seed QA pair; the adapter with the "
                   "best loss on it is kept.")
@click.option("--documents", "documents_file", required=True,
              help="Source documents (ingest's documents.parquet): one row per document; the passages of the "
                   "prompts.")
@click.option("--models", "models_dir", required=True,
              help="Provisioned models folder (provision's --out): the student role is fine-tuned.")
@click.option("--out", "out_dir", required=True,
              help="Writes the LoRA adapter here (a folder: adapter weights, environment.json, training log).")
@click.option("--metrics", "metrics_file", required=True,
              help="Writes the run's train and val losses and its best step here (JSON).")
@click.option("--plots", "plots_dir", required=True,
              help="Writes loss_<name>.png, train_loss_<name>.csv and val_loss_<name>.csv here.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar with ETA on stderr.")
def cli(params_file: str, dataset_file: str, name: str, seed: int | None, val_file: str, documents_file: str,
        models_dir: str, out_dir: str, metrics_file: str, plots_dir: str, progress: bool) -> None:
    """Fine-tune the student with LoRA on one dataset; keep the adapter with the best human val loss."""
    from refinery.core.io import atomic_outputs, read_parquet
    from refinery.core.provenance import code_version
    from schemas import datasets as datasets_schema
    from schemas import split as split_schema
    from refinery.models.resolve import sha256_file

    params = load_section(params_file, "train", TrainParams)
    if seed is not None:
        params = params.model_copy(update={"seed": seed})
    dataset = datasets_schema.CONTRACT.validate(read_parquet(dataset_file, datasets_schema.ARROW), dataset_file)
    if dataset.num_rows == 0:
        raise InputError(dataset_file, "no rows to train on")
    val = split_schema.CONTRACT.validate(read_parquet(val_file), val_file)
    documents = read_documents(documents_file)
    ref, student_id = student_path(models_dir)
    version = code_version(sys.modules[__name__])
    inputs = {"dataset": sha256_file(Path(dataset_file)), "val": sha256_file(Path(val_file)),
              "documents": sha256_file(Path(documents_file))}
    plots = Path(plots_dir)
    with atomic_outputs() as outputs:
        folder = outputs.folder(out_dir)
        result = train_core(dataset, val, documents, params, ref, folder, name=name, progress=progress,
                            log=lambda s: click.echo(s, err=True))
        result.metrics["student"] = student_id
        env = environment(params, student_id, inputs, version, result.metrics["device"])
        (folder / ENVIRONMENT_FILE).write_text(json.dumps(env, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (folder / LOG_FILE).write_text(json.dumps({"metrics": result.metrics, **result.log}, indent=2,
                                                  sort_keys=True) + "\n", encoding="utf-8")
        outputs.json(result.metrics, metrics_file)
        outputs.text(csv_text(result.log["curve"], ("step", "loss")), plots / f"train_loss_{name}.csv")
        outputs.text(csv_text(result.log["val_curve"], ("step", "val_loss")), plots / f"val_loss_{name}.csv")
        loss_png(result.log, name, outputs.path(plots / f"loss_{name}.png"))
    m = result.metrics
    click.echo(f"train {name}: train loss {m['train_loss_before']} -> {m['train_loss_after']}, val loss "
               f"{m['val_loss_initial']} -> best {m['val_loss_best']} (step {m['best_step']}) -> {out_dir}", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
