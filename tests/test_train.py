"""Train stage: weighted epochs, passage windows, tokenisation, and LoRA runs on tiny causal and seq2seq models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from refinery.training import lora
from refinery.seed.adapters import read_source
from refinery.core.errors import InputError, RefineryError
from refinery.core.params import parse_section
from stages.ingest import IngestParams, ingest
from stages.train import TrainParams, train_core
from tests.conftest import TINY_DOCS, TINY_QA, write_jsonl

TINY_TRAIN = dict(seed=0, r=4, alpha=8, dropout=0.0, target_modules=None, top_layers=None, epochs=3, lr=0.01,
                  batch_size=2, grad_accum=1, warmup_steps=1, max_steps=None, eval_every=0, max_length=96,
                  max_answer_tokens=16, window_chars=120, threads=1, probe_rows=8,
                  check_loss_decrease=True)
TINY_EVALUATE = dict(max_new_tokens=6, batch_size=4, threads=1, bertscore_layers=6, bertscore_batch_size=8,
                     factual_min_facts=1)
TINY_REPORT = dict(right_f1=0.5, bootstrap=200, ci=0.95, seed=0, min_factual_recall=0.5)


# ------------------------------------------------------------------------------------------ fixtures
def tiny_model(folder: Path, tokenizer_dir: Path, kind: str) -> Path:
    """Save a randomly initialised 2-layer causal (Llama) or seq2seq (T5) model with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    if kind == "causal":
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                          tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          bos_token_id=tok.bos_token_id)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                       num_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       decoder_start_token_id=tok.pad_token_id)
        model = T5ForConditionalGeneration(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_causal(tmp_path_factory, smol_dir) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tiny_causal"), smol_dir, "causal")


@pytest.fixture(scope="session")
def tiny_seq2seq(tmp_path_factory, smol_dir) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tiny_t5"), smol_dir, "seq2seq")


def seed_tables(tmp_path: Path) -> tuple[pa.Table, pa.Table]:
    """Ingest the tiny seed: (documents, qa rows of the seed_qa contract)."""
    seed = tmp_path / "seed"
    write_jsonl(seed / "documents.jsonl", TINY_DOCS)
    write_jsonl(seed / "qa.jsonl", TINY_QA)
    result = ingest(read_source("refinery", str(seed)), IngestParams(input=str(seed), format="refinery",
                                                                     max_field_chars=10_000), "test")
    return result.documents, result.qa


def with_split(qa: pa.Table, name: str) -> pa.Table:
    return qa.append_column(pa.field("split", pa.string(), nullable=False), pa.array([name] * qa.num_rows))


def as_dataset(qa: pa.Table, weights: list[float]) -> pa.Table:
    """Seed QA rows as a table of the datasets contract (source human), with the given sampling weights."""
    from schemas import datasets as datasets_schema

    cols = {n: qa.column(n) for n in datasets_schema.ARROW.names if n in qa.column_names}
    cols.update(weight=pa.array(weights, pa.float64()), source=pa.array(["human"] * qa.num_rows))
    return pa.table(cols).select(datasets_schema.ARROW.names).cast(datasets_schema.ARROW)


def project(tmp_path: Path, student: Path, embedder: Path | None = None) -> dict[str, Path]:
    """Write a tiny project: params, documents, datasets (human + weighted curated), val/test, models/base."""
    import yaml

    docs, qa = seed_tables(tmp_path)
    paths = {"params": tmp_path / "params.yaml", "documents": tmp_path / "documents.parquet",
             "val": tmp_path / "val.parquet", "test": tmp_path / "test.parquet", "models": tmp_path / "base",
             "human": tmp_path / "human.parquet", "curated": tmp_path / "curated.parquet"}
    pq.write_table(docs, paths["documents"])
    pq.write_table(with_split(qa, "val"), paths["val"])
    pq.write_table(with_split(qa, "test"), paths["test"])
    pq.write_table(as_dataset(qa, [1.0] * qa.num_rows), paths["human"])
    pq.write_table(as_dataset(qa, [2.0] + [0.5] * (qa.num_rows - 1)), paths["curated"])
    roles = {"student": student, "embedder": embedder or student}
    for role, folder in roles.items():
        (paths["models"] / role).mkdir(parents=True)
        (paths["models"] / role / "PROVENANCE.json").write_text(json.dumps(
            {"role": role, "kind": "local", "spec": str(folder), "files": {"x": "0"},
             "load": {"path": str(folder), "relative_to": "cwd"}}))
    paths["params"].write_text(yaml.safe_dump({"train": {**TINY_TRAIN, "max_steps": 4}, "evaluate": TINY_EVALUATE,
                                               "report": TINY_REPORT}))
    return paths


# ------------------------------------------------------------------------------------------ rules
def test_equal_weights_give_one_pass_over_every_row():
    # given equal weights, when an epoch is drawn, then every row appears exactly once
    idx = lora.weighted_epoch([1.0] * 7, np.random.default_rng(0))
    assert sorted(idx) == list(range(7))


def test_weights_set_how_often_a_row_is_seen():
    # given weights 2 : 1 : 1 : 0, when many epochs are drawn, then row 0 is seen twice as often and row 3 never
    rng = np.random.default_rng(0)
    counts = np.bincount(np.concatenate([lora.weighted_epoch([2.0, 1.0, 1.0, 0.0], rng) for _ in range(200)]),
                         minlength=4)
    assert counts[3] == 0
    assert counts[0] / counts[1] == pytest.approx(2.0, rel=0.15)


def test_invalid_weights_are_refused():
    with pytest.raises(RefineryError, match="weights"):
        lora.weighted_epoch([0.0, 0.0], np.random.default_rng(0))
    with pytest.raises(RefineryError, match="weights"):
        lora.weighted_epoch([1.0, float("nan")], np.random.default_rng(0))


def test_passage_window_is_centred_on_the_evidence():
    # given a long document with the evidence near its end
    doc = " ".join(f"word{i}" for i in range(200)) + " The refund window is 30 days. " + "tail " * 50
    start = doc.index("The refund")
    # when a 120-character window is cut
    out = lora.passage_window(doc, "The refund window is 30 days.", start, start + 29, 120)
    # then it holds the evidence and stays within the window
    assert "The refund window is 30 days." in out
    assert len(out) <= 120
    # and without a span, the evidence is found verbatim; 0 keeps the whole document
    assert "30 days" in lora.passage_window(doc, "The refund window is 30 days.", None, None, 120)
    assert lora.passage_window(doc, None, None, None, 0) == doc.strip()


def test_causal_labels_cover_only_the_answer(tiny_causal):
    # given a chat prompt and an answer
    _, tok, seq2seq = lora.load_student(str(tiny_causal), 1)
    prompt = lora.prompt_text(tok, lora.sft.messages("Refunds take 14 days.", "How long?"), seq2seq)
    ex = lora.encode(tok, prompt, "Within 14 days.", seq2seq=False, max_length=64, max_answer_tokens=16)
    # then the prompt tokens are ignored by the loss and the answer ends with the end-of-sequence token
    answer = [t for t in ex.labels if t != lora.IGNORE]
    assert tok.decode(answer[:-1]).strip() == "Within 14 days."
    assert answer[-1] == tok.eos_token_id
    assert ex.labels[:len(ex.labels) - len(answer)] == [lora.IGNORE] * (len(ex.labels) - len(answer))
    # and a too-long prompt loses its left end, never the answer
    short = lora.encode(tok, prompt, "Within 14 days.", seq2seq=False, max_length=20, max_answer_tokens=16)
    assert short.truncated and len(short.input_ids) == 20 and short.labels[-len(answer):] == answer


def test_params_reject_unknown_keys():
    from refinery.core.errors import ParamsError

    with pytest.raises(ParamsError, match="lora_rank"):
        parse_section({**TINY_TRAIN, "lora_rank": 8}, TrainParams, where="params.yaml: train")


# ------------------------------------------------------------------------------------------ stage core
@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_lora_training_lowers_the_loss_and_saves_the_best_adapter(tmp_path, kind, request):
    # given a tiny randomly initialised model of each architecture and the tiny seed
    student = request.getfixturevalue("tiny_causal" if kind == "causal" else "tiny_seq2seq")
    docs, qa = seed_tables(tmp_path)
    documents = dict(zip(docs.column("doc_id").to_pylist(), docs.column("text").to_pylist()))
    params = TrainParams(**{**TINY_TRAIN, "target_modules": ["q_proj", "v_proj"] if kind == "causal" else ["q", "v"]})
    # when a LoRA adapter is trained
    out = train_core(qa, with_split(qa, "val"), documents, params, str(student), tmp_path / "adapter", name="human",
                     progress=False)
    # then the train loss fell, every step and val pass is logged, and the adapter was saved
    m = out.metrics
    assert m["architecture"] == kind
    assert m["loss_decreased"] and m["train_loss_after"] < m["train_loss_before"]
    assert m["steps"] == len(out.log["curve"]) == 3 * 4  # 7 rows / batch 2 = 4 steps per epoch
    assert [v["step"] for v in out.log["val_curve"]] == [0, 4, 8, 12]
    assert m["val_loss_best"] == min(v["val_loss"] for v in out.log["val_curve"][1:])
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_bfloat16_autocast_training_lowers_the_loss_and_keeps_float32_adapters(tmp_path, tiny_causal):
    # given the tiny causal model trained with train.dtype bfloat16
    from safetensors.torch import load_file

    docs, qa = seed_tables(tmp_path)
    documents = dict(zip(docs.column("doc_id").to_pylist(), docs.column("text").to_pylist()))
    params = TrainParams(**{**TINY_TRAIN, "target_modules": ["q_proj", "v_proj"], "dtype": "bfloat16"})
    out = train_core(qa, with_split(qa, "val"), documents, params, str(tiny_causal), tmp_path / "adapter",
                     name="human", progress=False)
    # then it still learns, says which dtype it ran in, and the saved LoRA weights are float32
    assert out.metrics["loss_decreased"] and out.metrics["dtype"] == "bfloat16"
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert weights and {str(t.dtype) for t in weights.values()} == {"torch.float32"}


def test_missing_answer_column_is_a_clear_error(tmp_path, tiny_causal):
    docs, qa = seed_tables(tmp_path)
    with pytest.raises(InputError, match="answer"):
        train_core(qa.drop_columns(["answer"]), with_split(qa, "val"), {}, TrainParams(**TINY_TRAIN),
                   str(tiny_causal), tmp_path / "a", name="human", progress=False)


def test_a_loss_that_does_not_fall_fails_the_stage(tmp_path, tiny_causal):
    # given a learning rate too small to move anything
    docs, qa = seed_tables(tmp_path)
    documents = dict(zip(docs.column("doc_id").to_pylist(), docs.column("text").to_pylist()))
    params = TrainParams(**{**TINY_TRAIN, "lr": 1e-12, "epochs": 1, "max_steps": 2, "seed": 3})
    # when trained, then the stage refuses to pass it off as a trained adapter
    with pytest.raises(RefineryError, match="did not decrease"):
        train_core(qa, with_split(qa, "val"), documents, params, str(tiny_causal), tmp_path / "a", name="human",
                   progress=False)


def test_train_cli_writes_adapter_environment_metrics_and_plots(tmp_path, tiny_causal, monkeypatch):
    # given a tiny project whose student is the tiny causal model
    from stages.train import cli

    p = project(tmp_path, tiny_causal)
    monkeypatch.chdir(tmp_path)
    # when the stage runs on the weighted curated dataset
    res = CliRunner().invoke(cli, ["--params", str(p["params"]), "--dataset", str(p["curated"]), "--name", "curated",
                                   "--val", str(p["val"]), "--documents", str(p["documents"]), "--models",
                                   str(p["models"]), "--out", "adapters/curated", "--metrics",
                                   "metrics/train_curated.json", "--plots", "plots", "--no-progress"])
    assert res.exit_code == 0, res.output
    # then adapter, environment.json, training log, metrics and plot files exist
    env = json.loads((tmp_path / "adapters/curated/environment.json").read_text())
    assert {"versions", "hardware", "seeds", "config_hash", "git_commit"} <= set(env)
    assert env["versions"]["peft"] and env["seeds"]["train"] == 0
    metrics = json.loads((tmp_path / "metrics/train_curated.json").read_text())
    assert metrics["weights"]["rows_not_1"] == 7 and metrics["steps"] == 4
    assert (tmp_path / "adapters/curated/training_log.json").is_file()
    assert (tmp_path / "plots/train_loss_curated.csv").read_text().startswith("step,loss\n")
    assert (tmp_path / "plots/val_loss_curated.csv").read_text().startswith("step,val_loss\n0,")
    assert (tmp_path / "plots/loss_curated.png").read_bytes()[:4] == b"\x89PNG"
