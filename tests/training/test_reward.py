"""Reward: preference-pair building and its contract, a tiny Bradley-Terry run, loaders and the stage command."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from refinery.core.errors import InputError, ModelResolutionError
from refinery.models.reward import load_reward, train_reward
from schemas import preference_pairs as pairs_schema
from stages.train_reward import GROUPS, TrainRewardParams, build_preference_pairs, train_reward_core
from tests.training.conftest import as_split

PARAMS = dict(seed=5, pairs_per_row=3, epochs=4, lr=3e-3, batch_size=8, max_length=64, trainable_layers=2, threads=1)


def test_preference_pairs_follow_the_contract_and_rotate_categories(seed_tables):
    _, qa = seed_tables
    pairs = build_preference_pairs(qa, seed=0, pairs_per_row=len(GROUPS), phash="p", code_version="c")
    # then the table satisfies the contract, chosen is the human answer and rejected differs from it
    pairs_schema.CONTRACT.validate(pairs, "pairs")
    pairs_schema.check_dataset(pairs, "pairs")
    answers = set(qa.column("answer").to_pylist())
    assert set(pairs.column("chosen").to_pylist()) <= answers
    cats = set(pairs.column("category").to_pylist())
    assert {"factuality", "tone", "vagueness"} <= cats <= set(pairs_schema.CATEGORIES)
    # each row gets at most one pair per category group, and ids are stable
    assert pairs.num_rows <= qa.num_rows * len(GROUPS)
    again = build_preference_pairs(qa, seed=0, pairs_per_row=len(GROUPS), phash="p", code_version="c")
    assert again.column("pair_id").to_pylist() == pairs.column("pair_id").to_pylist()


def test_preference_pairs_name_a_missing_column(seed_tables):
    _, qa = seed_tables
    with pytest.raises(InputError, match="missing column.*question"):
        build_preference_pairs(qa.drop_columns(["question"]), seed=0, pairs_per_row=1, phash="p", code_version="c")


def test_dataset_check_rejects_identical_chosen_and_rejected(seed_tables):
    _, qa = seed_tables
    pairs = build_preference_pairs(qa, seed=0, pairs_per_row=1, phash="p", code_version="c")
    bad = pairs.set_column(pairs.schema.get_field_index("rejected"), "rejected", pairs.column("chosen"))
    with pytest.raises(InputError, match="rejected equals chosen"):
        pairs_schema.check_dataset(bad, "pairs.parquet")


def test_tiny_bradley_terry_run_lowers_the_loss_and_reloads(tmp_path, seed_tables, tiny_bert):
    _, qa = seed_tables
    pairs = build_preference_pairs(qa, seed=0, pairs_per_row=3, phash="p", code_version="c")
    m = train_reward(pairs, tiny_bert, tmp_path / "r", epochs=6, lr=3e-3, batch_size=8, seed=0, max_length=64,
                     threads=1, trainable_layers=2)
    assert m["loss_per_epoch"][-1] < m["loss_per_epoch"][0]
    model = load_reward(tmp_path / "r")
    s = model.score(pairs.column("prompt").to_pylist(), pairs.column("chosen").to_pylist())
    assert s.shape == (pairs.num_rows,) and np.all((s >= 0) & (s <= 1))
    assert np.isnan(model.score(["q"], [""])).all()


def test_reward_loader_refuses_multi_label_models(tiny_nli):
    with pytest.raises(ModelResolutionError, match="one logit"):
        load_reward(tiny_nli)


def test_stage_core_is_deterministic(tmp_path, seed_tables, tiny_bert):
    _, qa = seed_tables
    params = TrainRewardParams(**PARAMS)
    a = train_reward_core(qa, qa, params, str(tiny_bert), tmp_path / "a", code_version="c")
    b = train_reward_core(qa, qa, params, str(tiny_bert), tmp_path / "b", code_version="c")
    assert a.metrics["val"] == b.metrics["val"] and a.metrics["train"]["loss_per_epoch"] == \
        b.metrics["train"]["loss_per_epoch"]
    assert a.pairs.equals(b.pairs)


def test_the_reward_head_never_trains_on_unseen_kinds_but_exports_them(tmp_path, seed_tables, tiny_bert):
    documents, qa = seed_tables
    params = TrainRewardParams(**PARAMS)
    result = train_reward_core(qa, qa, params, str(tiny_bert), tmp_path / "r", code_version="c",
                               unseen_kinds=("negation_flip", "other_document"))
    exported = result.pairs.column("corruption").to_pylist()
    m = result.metrics
    assert m["train_pairs"] == sum(k not in ("negation_flip", "other_document") for k in exported) < m["pairs"]
    assert m["unseen_kinds"] == ["negation_flip", "other_document"]
    assert "other_document" in exported and "off_topic" not in m["train_pairwise"]["per_category"]
    assert "off_topic" in m["val"]["per_category"]  # measured on them all the same


def test_command_exports_pairs_model_and_metrics(in_tmp, seed_tables, base_dir):
    import yaml

    from stages.train_reward import cli

    _, qa = seed_tables
    pq.write_table(as_split(qa, "train"), in_tmp / "train.parquet")
    pq.write_table(as_split(qa, "val"), in_tmp / "val.parquet")
    (in_tmp / "params.yaml").write_text(yaml.safe_dump({"train_reward": {**PARAMS, "epochs": 1}}))
    result = CliRunner().invoke(cli, ["--params", "params.yaml", "--train", "train.parquet", "--val", "val.parquet",
                                      "--base", str(base_dir), "--out", "out/reward", "--pairs",
                                      "prefs/pairs.parquet", "--metrics", "metrics/train_reward.json"])
    assert result.exit_code == 0, result.output
    pairs = pq.read_table(in_tmp / "prefs/pairs.parquet")
    assert pairs.schema.equals(pairs_schema.ARROW) and pairs.num_rows > 0
    metrics = json.loads((in_tmp / "metrics/train_reward.json").read_text())
    assert metrics["pairs"] == pairs.num_rows and "per_category" in metrics["val"]
    record = json.loads((in_tmp / "out/reward/TRAINING.json").read_text())
    assert record["task"] == "reward" and record["seed"] == 5
    assert load_reward(in_tmp / "out/reward").max_length == 64
