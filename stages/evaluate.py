"""Answer the human test split with one model (a LoRA adapter or the untuned student) and score every answer."""

from __future__ import annotations

import sys

import click

from refinery.core.errors import RefineryError
from refinery.core.params import load_section
from refinery.training.evaluation import BASE, EvaluateParams, evaluate_core
from refinery.training.student import TrainParams, read_documents, student_path



@click.command("evaluate")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="Params file; this stage reads its evaluate and train sections.")
@click.option("--name", required=True, help="Model name: base (the untuned student) or a run name (<arm>-s<seed>).")
@click.option("--adapter", "adapter_dir", default=None,
              help="Train's LoRA adapter folder for this run; omit for the untuned student (--name base).")
@click.option("--test", "test_file", required=True,
              help="Human test split (split's test.parquet): one row per seed QA pair; the questions answered.")
@click.option("--documents", "documents_file", required=True,
              help="Source documents (ingest's documents.parquet): one row per document; the passages of the "
                   "prompts.")
@click.option("--models", "models_dir", required=True,
              help="Provisioned models folder (provision's --out): the student answers, the embedder scores "
                   "BERTScore.")
@click.option("--out", "out_file", required=True,
              help="Writes the predictions here (Parquet): one row per (model, human test row), with its scores.")
@click.option("--metrics", "metrics_file", required=True,
              help="Writes the run's EM, F1, ROUGE, BERTScore and factual accuracy here (JSON).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def cli(params_file: str, name: str, adapter_dir: str | None, test_file: str, documents_file: str, models_dir: str,
        out_file: str, metrics_file: str, progress: bool) -> None:
    """Answer the human test split with one model and score EM, F1, ROUGE, BERTScore and factual accuracy."""
    from refinery.core.io import atomic_outputs, read_parquet
    from refinery.models.resolve import load_target
    from schemas import predictions as pred_schema
    from schemas import split as split_schema

    params = load_section(params_file, "evaluate", EvaluateParams)
    train_params = load_section(params_file, "train", TrainParams)
    if (name == BASE) != (adapter_dir is None):
        raise RefineryError(f"evaluate: --name {BASE} takes no --adapter, and any other name needs one")
    test = split_schema.CONTRACT.validate(read_parquet(test_file), test_file)
    documents = read_documents(documents_file)
    ref, student_id = student_path(models_dir)
    emb = load_target(models_dir, "embedder")
    if "path" not in emb:
        raise RefineryError("evaluate: BERTScore needs a local embedder folder (provision.embedder: embedded:... or "
                            "a path)")
    result = evaluate_core(test, documents, params, train_params, name=name, student_ref=ref, student_id=student_id,
                           adapter_dir=adapter_dir, bert_path=emb["path"], bert_id=emb["id"], progress=progress,
                           log=lambda s: click.echo(s, err=True))
    table = pred_schema.CONTRACT.validate(result.predictions, out_file)
    with atomic_outputs() as outputs:
        outputs.parquet(table, out_file, pred_schema.ARROW)
        outputs.json(result.metrics, metrics_file)
    m = result.metrics
    click.echo(f"evaluate {name}: EM {m['exact_match']}, F1 {m['f1']}, ROUGE-L {m['rougeL']}, BERTScore "
               f"{m['bertscore_f1']}, factual {m['factual_accuracy']} ({m['factual_items']} items) -> {out_file}",
               err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
