"""Build preference pairs from the seed train split, export them for DPO, and train the embedded reward head."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from refinery.planted import corruptions as corr
from refinery.core.device import resolve_device
from refinery.core.errors import InputError, RefineryError
from refinery.core.params import StageParams, load_section, params_hash, read_key
from refinery.core.text import stable_id
from schemas import preference_pairs as pairs_schema

ROW_COLUMNS = ("row_id", "question", "answer", "evidence", "doc_id")
# Category group -> corruption kinds tried in a seeded order; the first that applies makes the rejected answer.
GROUPS: dict[str, tuple[str, ...]] = {
    "factuality": ("entity_swap", "number_change", "negation_flip", "unsupported_claim"),
    "constraint_following": ("missing_direct_answer", "truncation"),
    "tone": ("condescending_tone",),
    "vagueness": ("vague_answer", "refusal"),
    "escalation_or_off_topic": ("missing_escalation", "other_document"),
}
CATEGORY_OF_KIND = {"missing_escalation": "missing_escalation", "other_document": "off_topic",
                    **{k: g for g, ks in GROUPS.items() if g != "escalation_or_off_topic" for k in ks}}


class TrainRewardParams(StageParams):
    """Knobs of the train_reward stage."""

    seed: int
    pairs_per_row: int = Field(ge=1, le=len(GROUPS))  # rejected answers per seed row, categories rotated
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)
    batch_size: int = Field(ge=1)  # preference pairs per step (2x sequences)
    max_length: int = Field(ge=32, le=512)  # tokens per (question, answer)
    trainable_layers: int = Field(default=6, ge=0, le=24)  # top encoder layers fine-tuned; the rest frozen
    threads: int = Field(ge=1)
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")  # training; auto: CUDA, MPS, else CPU


@dataclass(frozen=True)
class RewardResult:
    """The exported train pairs, the val pairs and the metrics (the model is in out_dir)."""

    pairs: pa.Table
    val_pairs: pa.Table
    metrics: dict[str, Any]


def build_preference_pairs(rows: pa.Table, *, seed: int, pairs_per_row: int, phash: str, code_version: str,
                           where: str = "split") -> pa.Table:
    """Pair each seed answer (chosen) with realistic degradations of it (rejected), categories rotated per row.

    Args:
        rows: split-contract rows (row_id, question, answer, evidence, doc_id are read).
        seed: seeds the category order and the corruptions.
        pairs_per_row: rejected answers per row (each of a different category group).
        phash: params hash stamped on each pair.
        code_version: code version stamped on each pair.
        where: the input's name for error messages.

    Returns:
        A table of the preference_pairs contract.

    Raises:
        InputError: a required column is missing.
    """
    missing = [c for c in ROW_COLUMNS if c not in rows.column_names]
    if missing:
        raise InputError(where, f"missing column(s) {', '.join(missing)}", field=missing[0])
    rng = np.random.default_rng(seed)
    data = rows.select(list(ROW_COLUMNS)).to_pylist()
    groups = list(GROUPS)
    out = []
    for n, r in enumerate(data):
        other_answers = [x["answer"] for k in range(1, min(len(data), 25))
                         if (x := data[(n + k * 7) % len(data)])["doc_id"] != r["doc_id"]]
        start = int(rng.integers(len(groups)))
        made = 0
        for i in range(len(groups)):
            if made == pairs_per_row:
                break
            kinds = list(GROUPS[groups[(start + i) % len(groups)]])
            if len(kinds) > 1 and groups[(start + i) % len(groups)] != "escalation_or_off_topic":
                kinds = [kinds[j] for j in rng.permutation(len(kinds))]
            for kind in kinds:
                c = corr.corrupt(kind, r["answer"], passage=r["evidence"],
                                 other_texts=other_answers if kind == "other_document" else [r["evidence"]], rng=rng)
                if c.applied and c.text.strip() and c.text.strip() != r["answer"].strip():
                    out.append({"pair_id": stable_id("pref", r["row_id"], kind, c.text), "prompt": r["question"],
                                "chosen": r["answer"], "rejected": c.text, "category": CATEGORY_OF_KIND[kind],
                                "corruption": kind, "detail": c.detail, "parent_id": r["row_id"],
                                "doc_id": r["doc_id"], "category_source": "templated",
                                "params_hash": phash, "code_version": code_version})
                    made += 1
                    break
    return pa.Table.from_pylist(out, schema=pairs_schema.ARROW)


def pairwise_accuracy(model: Any, pairs: pa.Table) -> dict[str, Any]:
    """Return the share of pairs where the chosen answer outscores the rejected one, overall and per category."""
    prompts, chosen, rejected = (pairs.column(c).to_pylist() for c in ("prompt", "chosen", "rejected"))
    rc = model.logits(prompts, chosen)
    rr = model.logits(prompts, rejected)
    win = rc > rr
    cats = pairs.column("category").to_pylist()
    per = {}
    for cat in sorted(set(cats)):
        m = np.array([c == cat for c in cats])
        per[cat] = {"n": int(m.sum()), "accuracy": round(float(win[m].mean()), 4)}
    return {"pairs": len(cats), "accuracy": round(float(win.mean()), 4) if len(cats) else None,
            "per_category": per, "nan_scores": int(np.isnan(rc).sum() + np.isnan(rr).sum()),
            "mean_margin": round(float(np.nanmean(rc - rr)), 4) if len(cats) else None}


def train_reward_core(train: pa.Table, val: pa.Table, params: TrainRewardParams, base_path: str, out_dir: Path, *,
                      code_version: str, unseen_kinds: Sequence[str] = (),
                      log: Callable[[str], None] = lambda s: None) -> RewardResult:
    """Build train and val preference pairs, train the reward head into ``out_dir``, and measure val accuracy.

    Args:
        train, val: split-contract tables.
        params: the stage params.
        base_path: the encoder folder to start from.
        out_dir: an empty folder the model and tokenizer are saved into.
        code_version: stamped on the exported pairs.
        unseen_kinds: corruption kinds the head never trains on (leave-families-out); their pairs are still
            exported (the DPO data keeps every category) and measured in the val accuracy.
        log: progress callback.

    Returns:
        The exported (train) pairs, val pairs and metrics.
    """
    from refinery.models.reward import load_reward, train_reward

    phash = params_hash(params)
    pairs = build_preference_pairs(train, seed=params.seed, pairs_per_row=params.pairs_per_row, phash=phash,
                                   code_version=code_version, where="train")
    val_pairs = build_preference_pairs(val, seed=params.seed + 1, pairs_per_row=len(GROUPS), phash=phash,
                                       code_version=code_version, where="val")
    seen = pairs.filter(pc.invert(pc.is_in(pairs.column("corruption"), pa.array(list(unseen_kinds), pa.string()))))
    if seen.num_rows == 0:
        raise RefineryError("inject.unseen_families leaves the reward head no preference pair to train on")
    train_metrics = train_reward(seen, base_path, out_dir, epochs=params.epochs, lr=params.lr,
                                 batch_size=params.batch_size, seed=params.seed, max_length=params.max_length,
                                 threads=params.threads, trainable_layers=params.trainable_layers,
                                 device=resolve_device(params.device, "train_reward.device"), log=log)
    model = load_reward(out_dir, batch_size=64, max_length=params.max_length, threads=params.threads)
    metrics = {
        "pairs": pairs.num_rows, "train_pairs": seen.num_rows, "unseen_kinds": list(unseen_kinds),
        "pairs_per_category": dict(sorted(Counter(pairs.column("category").to_pylist()).items())),
        "pairs_per_corruption": dict(sorted(Counter(pairs.column("corruption").to_pylist()).items())),
        "train": train_metrics,
        "train_pairwise": pairwise_accuracy(model, seen),
        "val": pairwise_accuracy(model, val_pairs),
    }
    return RewardResult(pairs, val_pairs, metrics)


@click.command("train-reward")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="Params file; this stage reads its train_reward section and "
                   "inject.unseen_families.")
@click.option("--train", "train_file", required=True,
              help="Human train split (split's train.parquet): one row per seed QA pair; "
                   "the preference pairs are built from it.")
@click.option("--val", "val_file", required=True,
              help="Human validation split (split's val.parquet): one row per seed QA pair; the held-out pairs "
                   "that measure pairwise accuracy are built from it.")
@click.option("--base", "base_dir", required=True,
              help="Provisioned models folder (provision's --out): the embedder role is the reward head's base.")
@click.option("--out", "out_dir", required=True,
              help="Writes the trained reward model here (a folder: head weights and training record).")
@click.option("--pairs", "pairs_file", required=True,
              help="Writes the DPO preference pairs here (Parquet): one row per (prompt, chosen, rejected).")
@click.option("--metrics", "metrics_file", required=True,
              help="Writes the pair counts and the validation pairwise accuracy here (JSON).")
def cli(params_file: str, train_file: str, val_file: str, base_dir: str, out_dir: str, pairs_file: str,
        metrics_file: str) -> None:
    """Export DPO preference pairs from the seed and train the embedded reward head (MiniLM, Bradley-Terry)."""
    from refinery.core.io import atomic_outputs, read_parquet
    from refinery.core.provenance import code_version
    from refinery.models.heads import TRAINING_FILE
    from refinery.models.resolve import base_model_path, sha256_file
    from schemas import split as split_schema

    params = load_section(params_file, "train_reward", TrainRewardParams)
    unseen = corr.unseen_kinds(read_key(params_file, "inject.unseen_families", []), params_file)
    train = split_schema.CONTRACT.validate(read_parquet(train_file), train_file)
    val = split_schema.CONTRACT.validate(read_parquet(val_file), val_file)
    base_path, base_id = base_model_path(base_dir)
    version = code_version(sys.modules[__name__])
    inputs = {"train": sha256_file(train_file), "val": sha256_file(val_file)}
    import importlib.metadata as md

    with atomic_outputs() as outputs:
        folder = outputs.folder(out_dir)
        result = train_reward_core(train, val, params, base_path, folder, code_version=version,
                                   unseen_kinds=unseen, log=lambda s: click.echo(s, err=True))
        pairs = pairs_schema.CONTRACT.validate(result.pairs, pairs_file)
        pairs_schema.check_dataset(pairs, pairs_file)
        record = {"task": "reward", "base": base_id, "params": params.model_dump(mode="json"),
                  "params_hash": params_hash(params), "seed": params.seed, "max_length": params.max_length,
                  "inputs_sha256": inputs, "metrics": result.metrics, "code_version": version,
                  "versions": {d: md.version(d) for d in ("torch", "transformers", "numpy", "pyarrow")}}
        (folder / TRAINING_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        outputs.parquet(pairs, pairs_file, pairs_schema.ARROW)
        outputs.json(result.metrics, metrics_file)
    m = result.metrics
    click.echo(f"train_reward: {m['pairs']} pairs, val pairwise accuracy {m['val']['accuracy']} -> {out_dir}, "
               f"{pairs_file}", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
