"""The one training loop of the verifier and reward heads: seeded batches, reproducible weights, one saved folder."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from refinery.core.errors import RefineryError
from refinery.models.heads import TrainConfig, length_batches, load_base, read_training, train_head

TEXTS = ["refunds take 14 days.", "sync runs every 5 minutes.", "export to pdf.", "the pro plan is not free.",
         "can i export?", "sync is hourly on free.", "refunds are not available for gift cards.", "pdf."]
LABELS = np.array([1, 1, 0, 1, 0, 0, 1, 0], dtype=np.float32)


def test_length_batches_cover_every_row_once_in_a_seeded_order():
    lengths = [5, 1, 9, 3, 3, 7, 2, 8, 4, 6, 1]
    batches = list(length_batches(lengths, 3, np.random.default_rng(0)))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(1 <= len(b) <= 3 for b in batches)
    # within a batch, rows are sorted by length (less padding)
    assert all([lengths[i] for i in b] == sorted(lengths[i] for i in b) for b in batches)
    assert batches == list(length_batches(lengths, 3, np.random.default_rng(0)))
    assert batches != list(length_batches(lengths, 3, np.random.default_rng(1)))


def _train(tiny_bert, out, seed: int = 0, log=lambda s: None) -> dict:
    import torch

    def batch_loss(model, tokenizer, idx):
        enc = tokenizer([TEXTS[i] for i in idx], truncation=True, max_length=32, padding=True, return_tensors="pt")
        return torch.nn.functional.binary_cross_entropy_with_logits(model(**enc).logits[:, 0],
                                                                    torch.from_numpy(LABELS[idx]))

    cfg = TrainConfig(epochs=2, lr=3e-3, batch_size=3, seed=seed, max_length=32, threads=1, trainable_layers=1)
    return train_head(cfg, tiny_bert, out, lengths=[len(t) for t in TEXTS], batch_loss=batch_loss, name="probe",
                      label="probe_label", log=log)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_same_seed_gives_the_same_weights_and_another_seed_does_not(tmp_path, tiny_bert):
    lines: list[str] = []
    a = _train(tiny_bert, tmp_path / "a", log=lines.append)
    b = _train(tiny_bert, tmp_path / "b")
    c = _train(tiny_bert, tmp_path / "c", seed=1)
    # then the run is reproducible bit for bit, and the seed matters
    assert _sha(tmp_path / "a/model.safetensors") == _sha(tmp_path / "b/model.safetensors")
    assert _sha(tmp_path / "a/model.safetensors") != _sha(tmp_path / "c/model.safetensors")
    assert a == b and a != c
    # and the metrics count the steps of every epoch, and the folder is a one-logit model named by its label
    assert a["steps"] == 2 * 3 and len(a["loss_per_epoch"]) == 2
    assert [s.split(":")[0] for s in lines] == ["probe epoch 1/2", "probe epoch 2/2"]
    model, _ = load_base(tmp_path / "a", trainable_layers=1)
    assert model.config.id2label == {0: "probe_label"} and read_training(tmp_path / "a") is None


def test_lower_layers_stay_frozen(tiny_bert):
    model, _ = load_base(tiny_bert, trainable_layers=1)
    layers = model.bert.encoder.layer
    assert not any(p.requires_grad for p in model.bert.embeddings.parameters())
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert all(p.requires_grad for p in layers[1].parameters())


def test_a_missing_base_folder_is_named(tmp_path):
    with pytest.raises(RefineryError, match="absent: base model folder not found"):
        load_base(tmp_path / "absent", trainable_layers=1)
