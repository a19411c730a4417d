"""Side by side on the CPU: refinery's LoRA loop and TRL's SFTTrainer, same rows, tokens, LoRA and schedule.

Usage: python bench/bench_trl_sft.py [--rows 64] [--val-rows 24] [--steps 12] [--repeats 2] [--arm curated]
Needs `pip install trl` (not a refinery dependency) and a `dvc repro` that wrote the arm's dataset, the split and
models/base.

Both trainers get the same tokenised examples (as the train stage builds them: the shared chat prompt, the loss
on the answer tokens only, via TRL's ``completion_mask``), the same LoRA (train params: r, alpha, dropout, target
modules, top layers), AdamW with the same peak rate, linear warm-up and decay, batch size, clipping and seed, and
``max_steps``. refinery draws rows by their sampling weight and groups them by length; TRL samples with ``train_sampling_strategy="group_by_length"`` (it
is asked for, so padding is comparable). Runs alternate (ours, TRL, ours, TRL, ...) in one process and print:
- seconds per optimizer step of each (the ratio within this run is the figure; the 2 cores must be otherwise idle),
  TRL with SFTConfig's default gradient checkpointing and without it;
- whether two runs with the same seed give the same per-step loss curve (loss-based reproducibility);
- the answer-token loss of the trained adapter on ``--val-rows`` human val rows, measured the same way for both.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--val-rows", type=int, default=24)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--arm", default="curated")
    args = ap.parse_args(argv)

    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from refinery.core.params import load_section
    from refinery.training import lora
    from refinery.training.student import TrainParams, read_documents, student_path

    try:
        import trl
        from peft import LoraConfig, TaskType
        from datasets import Dataset
    except ImportError as e:
        sys.exit(f"bench_trl_sft: {e} (pip install trl datasets)")
    params = load_section(str(ROOT / "params.yaml"), "train", TrainParams)
    ref, _ = student_path(str(ROOT / "models/base"))
    documents = read_documents(str(ROOT / "data/01_seed/documents.parquet"))
    rows = pq.read_table(ROOT / f"data/06_datasets/{args.arm}.parquet").slice(0, args.rows)
    val = pq.read_table(ROOT / "data/02_split/val.parquet").slice(0, args.val_rows)
    seed = params.seeds[0]
    print(f"trl {trl.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{rows.num_rows} {args.arm} rows, {val.num_rows} val rows, {args.steps} steps of batch {params.batch_size}, "
          f"lr {params.lr}, warm-up {params.warmup_steps}, LoRA r {params.r} on the top {params.top_layers} blocks, "
          f"seed {seed}")

    def fresh():
        return lora.load_student(ref, params.threads)

    model0, tok, seq2seq = fresh()

    def build_examples(table):  # as the train stage builds them: the shared chat prompt, the answer's tokens
        return [lora.encode(tok, lora.prompt_text(tok, lora.messages_for(r, documents, params.window_chars,
                                                                          with_answer=True), seq2seq),
                            r["answer"], seq2seq=seq2seq, max_length=params.max_length,
                            max_answer_tokens=params.max_answer_tokens) for r in table.to_pylist()]

    train_ex = build_examples(rows)
    val_ex = build_examples(val)
    n_layers = lora.num_layers(model0)
    del model0
    weights = [float(w) for w in rows.column("weight").to_pylist()]

    def peft_config():
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=params.r, lora_alpha=params.alpha,
                          lora_dropout=params.dropout, target_modules=list(params.target_modules),
                          layers_to_transform=list(range(n_layers - params.top_layers, n_layers))
                          if params.top_layers else None)

    def run_ours() -> tuple[float, list[float], float]:
        model, tok, _ = fresh()
        model = lora.attach_lora(model, seq2seq=seq2seq, r=params.r, alpha=params.alpha, dropout=params.dropout,
                                 target_modules=params.target_modules, top_layers=params.top_layers, seed=seed)
        cfg = lora.LoraTrainConfig(epochs=100, lr=params.lr, batch_size=params.batch_size, grad_accum=1,
                                   warmup_steps=params.warmup_steps, seed=seed, threads=params.threads,
                                   eval_every=10**9, max_steps=args.steps)
        with tempfile.TemporaryDirectory() as out:
            t = time.perf_counter()
            res = lora.train_lora(model, tok, seq2seq=seq2seq, train=train_ex, weights=weights, val=val_ex[:1],
                                  cfg=cfg, out_dir=Path(out), progress=False)
            wall = time.perf_counter() - t
        model.eval()
        vl = lora.eval_loss(model, val_ex, pad_id=tok.pad_token_id, seq2seq=seq2seq, batch_size=params.batch_size)
        return wall / args.steps, [c["loss"] for c in res.curve], vl

    def run_trl(checkpointing: bool) -> tuple[float, list[float], float]:
        model, tok, _ = fresh()
        data = Dataset.from_list([{"input_ids": e.input_ids,
                                   "completion_mask": [0 if x == lora.IGNORE else 1 for x in e.labels]}
                                  for e in train_ex])
        losses: list[float] = []

        class Keep(__import__("transformers").TrainerCallback):
            def on_log(self, _args, _state, _control, logs=None, **kw):
                if logs and "loss" in logs:
                    losses.append(round(float(logs["loss"]), 5))

        with tempfile.TemporaryDirectory() as out:
            cfg = trl.SFTConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=params.batch_size,
                                gradient_accumulation_steps=1, learning_rate=params.lr, lr_scheduler_type="linear",
                                warmup_steps=params.warmup_steps, weight_decay=0.0, max_grad_norm=1.0, seed=seed,
                                data_seed=seed, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                dataloader_num_workers=0, completion_only_loss=True, max_length=None,
                                train_sampling_strategy="group_by_length", disable_tqdm=True, bf16=False, fp16=False,
                                gradient_checkpointing=checkpointing)
            torch.manual_seed(seed)  # the LoRA A matrices are drawn when SFTTrainer wraps the model
            trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok,
                                     peft_config=peft_config(), callbacks=[Keep()])
            t = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - t
        trained = trainer.model
        trained.eval()
        vl = lora.eval_loss(trained, val_ex, pad_id=tok.pad_token_id, seq2seq=seq2seq, batch_size=params.batch_size)
        return wall / args.steps, losses, vl

    variants = (("refinery", run_ours), ("trl", lambda: run_trl(True)),  # SFTConfig's default: checkpointing on
                ("trl-no-ckpt", lambda: run_trl(False)))
    results: dict[str, list[tuple[float, list[float], float]]] = {name: [] for name, _ in variants}
    for i in range(args.repeats):
        for name, fn in variants:
            r = fn()
            results[name].append(r)
            print(f"run {i + 1} {name:11s}: {r[0]:.2f} s/step, losses {r[1]}, val loss after {r[2]:.4f}", flush=True)
    ours = np.mean([r[0] for r in results["refinery"]])
    print()
    for name in results:
        theirs = np.mean([r[0] for r in results[name]])
        print(f"seconds per step: {name} {theirs:.2f} ({name} / refinery = {theirs / ours:.2f})")
    for name, runs in results.items():
        same = all(r[1] == runs[0][1] for r in runs[1:])
        print(f"{name}: loss curves of {len(runs)} same-seed runs identical: {same}; "
              f"val loss after: {', '.join(f'{r[2]:.4f}' for r in runs)}")


if __name__ == "__main__":
    main()
