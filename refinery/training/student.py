"""The student fine-tune's knobs, its provisioned weights and the documents its prompts quote (train and evaluate)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from refinery.core.errors import RefineryError, require_columns
from refinery.core.params import StageParams


class TrainParams(StageParams):
    """Knobs of the train stage (LoRA on the ``student`` role)."""

    seeds: list[int] | None = Field(default=None, min_length=1)  # training seeds per arm (dvc.yaml's matrix)
    seed: int | None = None  # this run's seed (torch, epoch composition, batch order); set by --seed; null: seeds[0]
    r: int = Field(ge=1)  # LoRA rank
    alpha: int = Field(ge=1)  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = Field(ge=0, lt=1)  # dropout on the LoRA input
    target_modules: list[str] | None = None  # module names to adapt; null: peft's default for the architecture
    top_layers: int | None = Field(default=None, ge=1)  # adapt only the last k blocks (causal); null: all
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)  # AdamW peak learning rate
    batch_size: int = Field(ge=1)  # rows per forward pass
    grad_accum: int = Field(ge=1)  # forward passes per optimizer step (effective batch = batch_size x grad_accum)
    warmup_steps: int = Field(ge=0)  # linear warm-up, in optimizer steps (capped at the run's steps - 1)
    max_steps: int | None = Field(default=None, ge=1)  # stop after this many optimizer steps; null: epochs decide
    eval_every: int = Field(ge=0)  # optimizer steps between val-loss passes; 0: at the end of every epoch
    max_length: int = Field(ge=16)  # tokens per example (prompt + answer); longer prompts lose their left end
    max_answer_tokens: int = Field(ge=1)  # reference answers are cut to this many tokens
    window_chars: int = Field(ge=0)  # passage = this many characters around the evidence; 0: whole document
    threads: int = Field(ge=1)  # torch CPU threads
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")  # auto: CUDA, else MPS, else CPU
    dtype: str = "float32"  # forward passes: float32 | bfloat16 (CPU autocast; weights and LoRA stay float32) |
    # auto (bfloat16 where the CPU computes it natively)
    probe_rows: int = Field(default=32, ge=1)  # training rows whose loss is measured before and after training
    check_loss_decrease: bool = True  # fail when the probe rows' loss did not fall
    val_rows: int | None = Field(default=None, ge=1)  # human val rows the val loss is measured on (a seeded sample,
    # the same for every run); null: all

    @model_validator(mode="before")
    @classmethod
    def _one_seed(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("seed") is None:
            if not data.get("seeds"):
                raise ValueError("seeds: give at least one training seed")
            data = {**data, "seed": data["seeds"][0]}
        return data


def student_path(models_dir: str) -> tuple[str, str]:
    """Return (loadable path or HF id, provenance id) of the provisioned student."""
    from refinery.models.resolve import backend_spec, load_target

    target = load_target(models_dir, "student")
    if "endpoint" in target:
        raise RefineryError("student: an endpoint cannot be fine-tuned; name embedded:smollm2-135m-instruct, an HF id "
                            "or a local folder in provision.student")
    return backend_spec(target)["path"], target["id"]


def read_documents(path: str) -> dict[str, str]:
    """Return doc_id -> text from the ingested documents table."""
    from refinery.core.io import read_parquet

    table = read_parquet(path)
    require_columns(table, ("doc_id", "text"), path)
    return dict(zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist()))
