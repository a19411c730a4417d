"""The published folder loads where users train: Hugging Face datasets configs (offline) and LLaMA-Factory's info."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refinery.training.publish import card_configs, dataset_card, dpo_sharegpt, llamafactory_info, size_category


@pytest.mark.parametrize(("rows", "bucket"), [(0, "n<1K"), (999, "n<1K"), (1000, "1K<n<10K"),
                                               (123_456, "100K<n<1M"), (2_000_000, "1M<n<10M")])
def test_size_category_buckets(rows, bucket):
    assert size_category(rows) == bucket


def test_card_declares_one_config_per_file_with_the_first_arm_default():
    configs = card_configs(["curated", "human"], dpo=False)
    assert [c["config_name"] for c in configs] == ["curated", "human"]
    assert [c["data_files"][0]["path"] for c in configs] == ["curated.sft.jsonl", "human.sft.jsonl"]
    assert configs[0]["default"] is True and not any(c.get("default") for c in configs[1:])


def _folder(tmp_path):
    """A folder as assemble writes it: two arms (Parquet + chat JSONL) and DPO, with the card and info."""
    metrics = {}
    for arm, n in (("curated", 4), ("human", 3)):
        pq.write_table(pa.table({"row_id": [f"{arm}_{i}" for i in range(n)], "question": ["q?"] * n,
                                 "answer": ["a."] * n, "weight": [1.0] * n}), tmp_path / f"{arm}.parquet")
        rec = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                            {"role": "assistant", "content": "a"}], "weight": 1.0, "row_id": "x"}
        (tmp_path / f"{arm}.sft.jsonl").write_text("".join(json.dumps(rec) + "\n" for _ in range(n)))
        metrics[arm] = {"rows": n, "human": n, "synthetic": 0, "synthetic_share": 0.0}
    dpo = [{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
            "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}],
            "category": "tone", "pair_id": "pref_1"}] * 2
    (tmp_path / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dpo))
    (tmp_path / "dpo.sharegpt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dpo_sharegpt(dpo)))
    (tmp_path / "README.md").write_text(dataset_card(metrics, len(dpo), license_id="cc-by-4.0", pretty_name="t",
                                                     language=["en"], description="d"))
    (tmp_path / "dataset_info.json").write_text(json.dumps(llamafactory_info(list(metrics), dpo=True)))
    return metrics


def test_load_dataset_reads_every_config_from_the_folder_offline(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="the datasets library is a dev dependency (make install)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "published"
    folder.mkdir()
    metrics = _folder(folder)
    for arm, m in metrics.items():
        sft = datasets.load_dataset(str(folder), arm, split="train", cache_dir=str(tmp_path / "cache"))
        assert sft.num_rows == m["rows"] and sft[0]["messages"][2]["role"] == "assistant"
        rows = datasets.load_dataset("parquet", data_files=str(folder / f"{arm}.parquet"), split="train",
                                     cache_dir=str(tmp_path / "cache"))
        assert rows.num_rows == m["rows"] and "row_id" in rows.column_names
    dpo = datasets.load_dataset(str(folder), "dpo", split="train", cache_dir=str(tmp_path / "cache"))
    assert dpo.num_rows == 2 and dpo[0]["chosen"][0]["content"] == "good"


def test_llamafactory_info_names_sharegpt_files_with_role_tags(tmp_path):
    _folder(tmp_path)
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert set(info) == {"refinery_curated", "refinery_human", "refinery_dpo"}
    for entry in info.values():
        first = json.loads((tmp_path / entry["file_name"]).read_text().splitlines()[0])
        messages = first[entry["columns"]["messages"]]
        assert {m[entry["tags"]["role_tag"]] for m in messages} <= {"system", "user", "assistant"}
    pair = json.loads((tmp_path / "dpo.sharegpt.jsonl").read_text().splitlines()[0])
    assert pair["chosen"] == {"role": "assistant", "content": "good"}
