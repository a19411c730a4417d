"""Answer questions with one model (a LoRA adapter or the untuned student) and score every answer (the evaluate
stage's work; :mod:`stages.evaluate` adds the command and its files; the collapse stage answers with it too)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from refinery.core.errors import InputError, RefineryError
from refinery.core.params import StageParams, params_hash
from refinery.training.student import TrainParams

TEST_COLUMNS = ("row_id", "qa_id", "doc_id", "question", "answer")
BASE = "base"  # the model name of the untuned student


class EvaluateParams(StageParams):
    """Knobs of the evaluate stage (the passage window and prompt length come from the train section)."""

    max_new_tokens: int = Field(ge=1)  # greedy decoding budget per answer, in tokens
    batch_size: int = Field(ge=1)  # prompts per generate call
    threads: int = Field(ge=1)  # torch CPU threads
    bertscore_layers: int = Field(ge=1)  # encoder layer BERTScore matches on (the embedder role's model)
    bertscore_batch_size: int = Field(ge=1)
    factual_min_facts: int = Field(ge=1)  # facts a reference must state (all found in its passage) to be checked
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")  # auto: CUDA, else MPS, else CPU
    dtype: str = "float32"  # decoding weights (the adapter merged first): float32 | bfloat16 | float16 | auto
    # (bfloat16 where the CPU computes it natively)


@dataclass(frozen=True)
class EvalResult:
    """Per-row predictions with scores, and the metrics of one model."""

    predictions: pa.Table
    metrics: dict[str, Any]


def score_rows(test: pa.Table, predictions: list[str], passages: list[str], *, name: str, bert_f1: list[float],
               min_facts: int) -> pa.Table:
    """Score each prediction against its reference (EM, F1, ROUGE, given BERTScore, fact check).

    Args:
        test: the test rows (row_id, qa_id, doc_id, question, answer).
        predictions: one answer per test row.
        passages: the passage each question was asked with.
        name: the model name stamped on every row.
        bert_f1: BERTScore F1 per row.
        min_facts: see :func:`refinery.training.textmetrics.factual_check`.

    Returns:
        A table of the predictions contract.
    """
    from refinery.training import textmetrics as tm
    from schemas import predictions as pred_schema

    refs = test.column("answer").to_pylist()
    if not (len(refs) == len(predictions) == len(passages) == len(bert_f1)):
        raise RefineryError(f"evaluate {name}: {len(refs)} test rows but {len(predictions)} predictions")
    rg = tm.rouge(predictions, refs)
    checks = [tm.factual_check(p, r, s, min_facts=min_facts) for p, r, s in zip(predictions, refs, passages)]
    cols = {
        "model": [name] * len(refs),
        **{c: test.column(c).to_pylist() for c in ("row_id", "qa_id", "doc_id", "question")},
        "reference": refs,
        "prediction": predictions,
        "exact_match": [tm.exact_match(p, r) for p, r in zip(predictions, refs)],
        "f1": [tm.token_f1(p, r) for p, r in zip(predictions, refs)],
        **rg,
        "bertscore_f1": bert_f1,
        "factual_verifiable": [v for v, _ in checks],
        "factual_correct": [a for _, a in checks],
    }
    return pa.Table.from_pydict(cols, schema=pred_schema.ARROW)


def summarise(rows: pa.Table, *, name: str, model_id: str, bert_info: dict[str, Any], extra: dict[str, Any]) -> dict:
    """Aggregate per-row scores into the model's metrics (means over the test rows)."""
    from refinery.training import textmetrics as tm

    col = {c: rows.column(c).to_pylist() for c in rows.column_names}
    verifiable = [a for v, a in zip(col["factual_verifiable"], col["factual_correct"]) if v]
    preds = col["prediction"]
    return {
        "name": name,
        "model": model_id,
        "test_rows": rows.num_rows,
        "exact_match": tm.mean(col["exact_match"]),
        "f1": tm.mean(col["f1"]),
        "rouge1": tm.mean(col["rouge1"]),
        "rouge2": tm.mean(col["rouge2"]),
        "rougeL": tm.mean(col["rougeL"]),
        "bertscore_f1": tm.mean(col["bertscore_f1"]),
        "factual_items": len(verifiable),
        "factual_correct": int(sum(bool(a) for a in verifiable)),
        "factual_accuracy": round(sum(bool(a) for a in verifiable) / len(verifiable), 4) if verifiable else None,
        "empty_predictions": sum(1 for p in preds if not p.strip()),
        "mean_prediction_words": round(float(np.mean([len(p.split()) for p in preds])), 2) if preds else None,
        "bertscore": bert_info,
        **extra,
    }


def evaluate_core(test: pa.Table, documents: dict[str, str], params: EvaluateParams, train_params: TrainParams, *,
                  name: str, student_ref: str, student_id: str, adapter_dir: str | None, bert_path: str,
                  bert_id: str, progress: bool = True, log: Callable[[str], None] = lambda s: None) -> EvalResult:
    """Generate an answer per test row with the student (plus adapter, if given) and score them all.

    Args:
        test: the human test split.
        documents: doc_id -> text.
        params: the evaluate params.
        train_params: the train params (passage window, prompt length), so prompts match training.
        name: the model's name (base, human, contaminated, curated).
        student_ref, student_id: the student folder / HF id, and its provenance id.
        adapter_dir: the LoRA adapter folder; None evaluates the untuned student.
        bert_path, bert_id: the BERTScore encoder folder and its id.
        progress: show progress bars.
        log: one-line progress messages.

    Returns:
        Predictions with per-row scores, and the metrics.
    """
    from refinery.training import lora
    from refinery.training import textmetrics as tm

    missing = [c for c in TEST_COLUMNS if c not in test.column_names]
    if missing:
        raise InputError("test", f"missing column(s) {', '.join(missing)}", field=missing[0])
    from refinery.core.device import device_of, resolve_device

    model, tokenizer, seq2seq = lora.load_student(student_ref, params.threads,
                                                  resolve_device(params.device, "evaluate.device"))
    adapter_id = None
    if adapter_dir is not None:
        from peft import PeftModel

        from refinery.models.resolve import hash_folder

        if not (Path(adapter_dir) / "adapter_config.json").is_file():
            raise RefineryError(f"{adapter_dir}: not a LoRA adapter folder (no adapter_config.json): run "
                                f"`refinery train` first")
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()  # merged: plain-speed decoding
        files = hash_folder(Path(adapter_dir))
        adapter_id = files.get("adapter_model.safetensors") or files.get("adapter_model.bin")
    rows = test.to_pylist()
    prompts, passages = [], []
    for r in rows:
        msgs = lora.messages_for(r, documents, train_params.window_chars, with_answer=False)
        passages.append(lora.passage_window(documents[r["doc_id"]], r.get("evidence"), r.get("evidence_start"),
                                            r.get("evidence_end"), train_params.window_chars))
        prompts.append(lora.prompt_text(tokenizer, msgs, seq2seq))
    import torch

    from refinery.models.backends.local import resolve_dtype

    dtype = resolve_dtype(params.dtype)
    model = model.to(getattr(torch, dtype))
    device = device_of(model)
    log(f"evaluate {name}: {len(rows)} test rows, {'adapter ' + adapter_dir if adapter_dir else 'untuned student'}, "
        f"{dtype}")
    preds = lora.generate(model, tokenizer, prompts, seq2seq=seq2seq, max_new_tokens=params.max_new_tokens,
                          batch_size=params.batch_size, progress=progress)
    del model
    bert = tm.bertscore(preds, [r["answer"] for r in rows], model_path=bert_path, model_id=bert_id,
                        num_layers=params.bertscore_layers, batch_size=params.bertscore_batch_size)
    table = score_rows(test, preds, passages, name=name, bert_f1=bert.f1, min_facts=params.factual_min_facts)
    extra = {"student": student_id, "adapter": adapter_dir, "adapter_sha256": adapter_id,
             "max_new_tokens": params.max_new_tokens, "window_chars": train_params.window_chars, "dtype": dtype,
             "device": device,
             "params_hash": params_hash(params)}
    return EvalResult(table, summarise(table, name=name, model_id=f"{student_id}+{adapter_id or 'none'}",
                                       bert_info=bert.info, extra=extra))
