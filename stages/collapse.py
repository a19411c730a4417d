"""Replace vs accumulate: train generations of students on their predecessor's answers and measure what is lost.

Off in the demo (``collapse.generations: 0`` writes empty outputs at once); ``profiles/collapse.yaml`` turns it on.
The method and its sources: :mod:`refinery.training.collapse`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow as pa

from refinery.core.errors import RefineryError
from refinery.core.params import load_section, params_hash
from refinery.training.collapse import CollapseParams
from refinery.training.student import TrainParams, read_documents, student_path

OFF = "collapse.generations is 0 in this profile: `make repro PROFILE=collapse STAGE=collapse` runs it"


@dataclass(frozen=True)
class CollapseResult:
    """Every generation's test answers, the synthetic rows each trained on, and the metrics."""

    answers: pa.Table
    synthetic: pa.Table
    metrics: dict[str, Any]


def collapse_core(train: pa.Table, val: pa.Table, test: pa.Table, documents: dict[str, str], params: CollapseParams,
                  train_params: TrainParams, eval_params: Any, *, student_ref: str, student_id: str,
                  embed: Callable, bert_path: str, bert_id: str, work: Path, progress: bool = True,
                  log: Callable[[str], None] = lambda s: None) -> CollapseResult:
    """Run generation 0 (the untuned student) and ``params.generations`` generations of every arm.

    Args:
        train, val, test: the human splits (split contract).
        documents: doc_id -> text.
        params, train_params, eval_params: the collapse, train and evaluate sections.
        student_ref, student_id: the student's folder or HF id, and its provenance id.
        embed: the embedder role (clusters, embedding spread).
        bert_path, bert_id: the BERTScore encoder (evaluate scores every answer with it).
        work: a scratch folder for the adapters.
        progress: progress bars; log: one-line messages.
    """
    from refinery.training import collapse as col
    from schemas import collapse as schema
    from refinery.training.evaluation import evaluate_core
    from refinery.training.finetune import train_core

    train_s = col.sample(train, params.train_rows, params.seed)
    test_s = col.sample(test, params.test_rows, params.seed + 1)
    rare_i = col.rare_intents(train_s, params.rare_min_rows)
    test_c, rare_c, cluster_info = col.clusters_of(train_s.column("question").to_pylist(),
                                                   test_s.column("question").to_pylist(), embed, k=params.clusters,
                                                   seed=params.seed, rare_share=params.rare_share)
    intents = test_s.column("intent").to_pylist() if "intent" in test_s.column_names else [None] * test_s.num_rows
    both = pa.concat_tables([test_s, train_s.cast(test_s.schema)])  # test questions, then the train questions
    tp = train_params.model_copy(update={"max_steps": params.max_steps or train_params.max_steps,
                                         "check_loss_decrease": False})
    seconds: dict[str, float] = {}

    def answer(arm: str, generation: int, adapter: str | None) -> tuple[list[dict], list[str]]:
        """The model's test rows (ANSWERS contract) and, but at the last generation, its train answers."""
        name = f"{arm}-g{generation}"
        t0 = time.perf_counter()
        questions = both if generation < params.generations else test_s
        res = evaluate_core(questions, documents, eval_params, train_params, name=name, student_ref=student_ref,
                            student_id=student_id, adapter_dir=adapter, bert_path=bert_path, bert_id=bert_id,
                            progress=progress, log=log)
        seconds[f"answer {name}"] = round(time.perf_counter() - t0, 1)
        preds = res.predictions.to_pylist()
        rows = []
        for i, p in enumerate(preds[:test_s.num_rows]):
            rows.append({"item_id": f"{name}:{p['row_id']}", "arm": arm, "generation": generation, "model": name,
                         "row_id": p["row_id"], "question": p["question"], "reference": p["reference"],
                         "prediction": p["prediction"], "f1": p["f1"], "correct": bool(p["f1"] >= params.correct_f1),
                         "factual_verifiable": p["factual_verifiable"], "factual_correct": p["factual_correct"],
                         "intent": intents[i], "rare_intent": intents[i] in rare_i, "cluster": int(test_c[i]),
                         "rare_cluster": int(test_c[i]) in rare_c})
        return rows, [p["prediction"] for p in preds[test_s.num_rows:]]

    log(f"collapse: generation 0 (the untuned student) answers {test_s.num_rows} test and {train_s.num_rows} train "
        f"questions")
    base_rows, base_train = answer("base", 0, None)
    answers = list(base_rows)
    synthetic: list[dict] = []
    writer = {arm: ("base-g0", base_train) for arm in params.arms}
    trained: dict[str, list[dict]] = {arm: [] for arm in params.arms}
    curves: dict[str, list[dict]] = {arm: [{"generation": 0, **col.measure(base_rows, embed)}]
                                     for arm in params.arms}
    for g in range(1, params.generations + 1):
        for arm in params.arms:
            name = f"{arm}-g{g}"
            synthetic += col.synthetic_rows(train_s, writer[arm][1], arm=arm, generation=g, writer=writer[arm][0])
            mine = [s for s in synthetic if s["arm"] == arm and (s["generation"] == g or arm == "accumulate")]
            data = col.training_table(train_s, mine, with_human=arm == "accumulate")
            if data.num_rows == 0:
                raise RefineryError(f"collapse {name}: every answer of {writer[arm][0]} is empty; nothing to train on")
            adapter = work / name
            adapter.mkdir(parents=True)
            t0 = time.perf_counter()
            out = train_core(data, val, documents, tp, student_ref, adapter, name=name, progress=progress, log=log)
            seconds[f"train {name}"] = round(time.perf_counter() - t0, 1)
            m = out.metrics
            trained[arm].append({"generation": g, "rows": data.num_rows, "steps": m["steps"],
                                 "examples_seen": m["examples_seen"], "val_loss_initial": m["val_loss_initial"],
                                 "val_loss_best": m["val_loss_best"], "loss_decreased": m["loss_decreased"]})
            rows, train_answers = answer(arm, g, str(adapter))
            answers += rows
            writer[arm] = (name, train_answers)
            curves[arm].append({"generation": g, **col.measure(rows, embed)})
            log(f"collapse {name}: trained on {data.num_rows} rows, test F1 {curves[arm][-1]['f1']}")
    table = schema.ANSWERS.validate(pa.Table.from_pylist(answers, schema=schema.ANSWERS_ARROW), "answers")
    syn = schema.SYNTHETIC.validate(pa.Table.from_pylist(synthetic, schema=schema.SYNTHETIC_ARROW), "synthetic")
    metrics = summary(table, synthetic, curves, trained, params, tp, cluster_info, rare_i, train_s, test_s)
    metrics["seconds"] = seconds
    return CollapseResult(table, syn, metrics)


def summary(answers: pa.Table, synthetic: list[dict], curves: dict[str, list[dict]], trained: dict[str, list[dict]],
            params: CollapseParams, tp: TrainParams, cluster_info: dict[str, Any], rare_i: set[str],
            train_s: pa.Table, test_s: pa.Table) -> dict[str, Any]:
    """Curves per arm, the synthetic data per generation, and paired intervals: accumulate - replace per
    generation, and each arm's last generation - generation 0."""
    from refinery.training import collapse as col
    from refinery.validation.diversity import distinct_n

    data: dict[str, list[dict]] = {}
    for arm in params.arms:
        for g in range(1, params.generations + 1):
            rows = [s for s in synthetic if s["arm"] == arm and s["generation"] == g]
            kept = [s["answer"] for s in rows if s["kept"]]
            data.setdefault(arm, []).append({
                "generation": g, "writer": rows[0]["writer"] if rows else None, "rows": len(rows),
                "kept": len(kept), "empty": len(rows) - len(kept),
                "f1_to_human": round(float(np.mean([s["f1_to_human"] for s in rows])), 4) if rows else None,
                "distinct_2": round(distinct_n(kept, 2), 4),
                "mean_words": round(float(np.mean([len(a.split()) for a in kept])), 2) if kept else None})
    compare: dict[str, Any] = {}
    opts = {"n": params.bootstrap, "ci": params.ci, "seed": params.seed}
    if {"replace", "accumulate"} <= set(params.arms):
        for g in range(1, params.generations + 1):
            compare[f"accumulate - replace, generation {g}"] = col.compare(
                answers, f"accumulate-g{g}", f"replace-g{g}", **opts)
    for arm in params.arms:
        if params.generations:
            compare[f"{arm} generation {params.generations} - generation 0"] = col.compare(
                answers, f"{arm}-g{params.generations}", "base-g0", **opts)
    return {"generations": params.generations, "arms": list(params.arms), "train_rows": train_s.num_rows,
            "test_rows": test_s.num_rows, "steps_per_generation": tp.max_steps,
            "batch_size": tp.batch_size, "correct_f1": params.correct_f1,
            "rare_intents": sorted(rare_i), "clusters": cluster_info, "curves": curves, "training": trained,
            "synthetic": data, "compare": compare, "params_hash": params_hash(params)}


@click.command("collapse")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="Params file; this stage reads its collapse, train and evaluate sections.")
@click.option("--train", "train_file", required=True,
              help="Human train split (split's train.parquet): one row per QA pair; the questions each generation "
                   "answers, and the accumulate arm's human anchor.")
@click.option("--val", "val_file", required=True,
              help="Human val split (split's val.parquet): one row per QA pair; every fine-tune's val loss.")
@click.option("--test", "test_file", required=True,
              help="Human test split (split's test.parquet): one row per QA pair; what every generation answers.")
@click.option("--documents", "documents_file", required=True,
              help="Source documents (ingest's documents.parquet): one row per document; the passages of the "
                   "prompts.")
@click.option("--models", "models_dir", required=True,
              help="Provisioned models folder (provision's --out): the student, and the embedder role.")
@click.option("--out", "out_dir", required=True,
              help="Writes answers.parquet (one row per generation x test row) and synthetic.parquet (one row per "
                   "generation x train row) here.")
@click.option("--metrics", "metrics_file", required=True,
              help="Writes the per-generation curves of every arm and the paired intervals here (JSON).")
@click.option("--plot", "plot_file", required=True, help="Writes the curves here (PNG).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars on stderr.")
def cli(params_file: str, train_file: str, val_file: str, test_file: str, documents_file: str, models_dir: str,
        out_dir: str, metrics_file: str, plot_file: str, progress: bool) -> None:
    """Train generations of students on their predecessor's answers (replace) or on those plus the human rows
    (accumulate), and measure F1, factual accuracy, diversity and rare items per generation."""
    from refinery.core.io import atomic_outputs, read_parquet
    from refinery.training import collapse as col
    from schemas import collapse as schema
    from schemas import split as split_schema

    params = load_section(params_file, "collapse", CollapseParams)
    out = Path(out_dir)
    if params.generations == 0:
        with atomic_outputs() as outputs:
            outputs.parquet(schema.ANSWERS.empty(), out / "answers.parquet", schema.ANSWERS_ARROW)
            outputs.parquet(schema.SYNTHETIC.empty(), out / "synthetic.parquet", schema.SYNTHETIC_ARROW)
            outputs.json({"generations": 0, "off": OFF, "params_hash": params_hash(params)}, metrics_file)
            col.plot({}, outputs.path(plot_file), note=OFF)
        click.echo(f"collapse: off ({OFF})", err=True)
        return
    from refinery.models.embed import Embedder
    from refinery.models.resolve import load_target
    from refinery.training.evaluation import EvaluateParams

    train_params = load_section(params_file, "train", TrainParams)
    eval_params = load_section(params_file, "evaluate", EvaluateParams)
    splits = {name: split_schema.CONTRACT.validate(read_parquet(path), path)
              for name, path in (("train", train_file), ("val", val_file), ("test", test_file))}
    documents = read_documents(documents_file)
    ref, student_id = student_path(models_dir)
    emb = load_target(models_dir, "embedder")
    if "path" not in emb:
        raise RefineryError("collapse: BERTScore and the clusters need a local embedder folder (provision.embedder: "
                            "embedded:... or a path)")
    embed = Embedder(emb["path"], model_id=emb["id"]).embed
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="refinery-collapse-") as work:
        result = collapse_core(splits["train"], splits["val"], splits["test"], documents, params, train_params,
                               eval_params, student_ref=ref, student_id=student_id, embed=embed,
                               bert_path=emb["path"], bert_id=emb["id"], work=Path(work), progress=progress,
                               log=lambda s: click.echo(s, err=True))
    result.metrics["wall_seconds"] = round(time.perf_counter() - t0, 1)
    with atomic_outputs() as outputs:
        outputs.parquet(result.answers, out / "answers.parquet", schema.ANSWERS_ARROW)
        outputs.parquet(result.synthetic, out / "synthetic.parquet", schema.SYNTHETIC_ARROW)
        outputs.json(result.metrics, metrics_file)
        col.plot(result.metrics["curves"], outputs.path(plot_file))
    last = {arm: c[-1]["f1"] for arm, c in result.metrics["curves"].items()}
    click.echo(f"collapse: {params.generations} generations, test F1 at the last: {last} "
               f"({result.metrics['wall_seconds']} s) -> {out}", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
