"""Make the assembled datasets load where users train: a Hugging Face dataset card and LLaMA-Factory's dataset_info.

``data/06_datasets/`` holds one Parquet file and one SFT chat export per arm and the DPO export. The card's YAML
header declares one named config per file (``datasets.load_dataset(<folder>, "<arm>")``, ``"<arm>_sft"``,
``"dpo"``), so the mixed formats load by name; ``dataset_info.json`` registers the SFT exports and the preference
pairs for LLaMA-Factory (``dataset_dir: <folder>``, ``dataset: refinery_<arm>``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

CARD_FILE = "README.md"
LLAMAFACTORY_FILE = "dataset_info.json"
DPO_SHAREGPT_FILE = "dpo.sharegpt.jsonl"
_SHAREGPT_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                  "system_tag": "system"}


def size_category(rows: int) -> str:
    """Return the Hugging Face ``size_categories`` bucket of a row count (``n<1K``, ``1K<n<10K``, ...)."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")]
    for bound, name in bounds:
        if rows < bound:
            return name
    return "n>1T" if rows >= 10 ** 12 else "100M<n<1B"


def card_configs(arms: Sequence[str], *, dpo: bool) -> list[dict[str, Any]]:
    """Return the card's ``configs``: one per arm (its SFT chat records, ``<arm>.sft.jsonl``) and ``dpo``.

    ``datasets`` picks one file format for a folder (from its first config), so every config names a JSON-lines
    file; each arm's Parquet table (the same rows with every provenance column) stays beside them.
    """
    configs: list[dict[str, Any]] = []
    for i, arm in enumerate(arms):
        configs.append({"config_name": arm, "data_files": [{"split": "train", "path": f"{arm}.sft.jsonl"}],
                        **({"default": True} if i == 0 else {})})
    if dpo:
        configs.append({"config_name": "dpo", "data_files": [{"split": "train", "path": "dpo.jsonl"}]})
    return configs


def dataset_card(arm_metrics: Mapping[str, Mapping[str, Any]], dpo_pairs: int, *, license_id: str, pretty_name: str,
                 language: Sequence[str], description: str) -> str:
    """Return a Hugging Face dataset card (README.md) for the assembled folder.

    Args:
        arm_metrics: per arm, assemble's counts (``rows``, ``human``, ``synthetic``, ``synthetic_share``).
        dpo_pairs: rows of dpo.jsonl.
        license_id, pretty_name, language, description: the card's fields (``assemble.card`` in params.yaml).
    """
    largest = max([int(m["rows"]) for m in arm_metrics.values()] + [dpo_pairs, 0])
    header = {
        "license": license_id,
        "language": list(language),
        "pretty_name": pretty_name,
        "task_categories": ["question-answering", "text-generation"],
        "size_categories": [size_category(largest)],
        "tags": ["synthetic", "refinery", "sft", "dpo"],
        "configs": card_configs(list(arm_metrics), dpo=dpo_pairs > 0),
    }
    lines = ["---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {pretty_name}", "", description.strip(), "",
             "Written by `refinery assemble`; every row carries its provenance (`row_id`, `origin`, `source`, "
             "`teacher`, `prompt_template`, `parent_ids`, `params_hash`, `code_version`).", "",
             "## Configs", "",
             "| config | file | rows | human | synthetic | synthetic share | rows with provenance |",
             "|---|---|---|---|---|---|---|"]
    for arm, m in arm_metrics.items():
        lines.append(f"| `{arm}` | `{arm}.sft.jsonl` | {m['rows']} | {m['human']} | {m['synthetic']} | "
                     f"{m['synthetic_share']} | `{arm}.parquet` |")
    if dpo_pairs:
        lines.append(f"| `dpo` | `dpo.jsonl` | {dpo_pairs} | | | | |")
    first = next(iter(arm_metrics), "curated")
    lines += ["", "## Loading", "", "```python", "from datasets import load_dataset", "",
              f"sft = load_dataset(\"path/to/this/folder\", \"{first}\", split=\"train\")",
              "dpo = load_dataset(\"path/to/this/folder\", \"dpo\", split=\"train\")",
              f"rows = load_dataset(\"parquet\", data_files=\"path/to/this/folder/{first}.parquet\", "
              f"split=\"train\")", "```", "",
              "An arm's config holds chat messages (system, user with the passage window training used, assistant) "
              "with the row's sampling `weight` and `row_id`; `dpo` rows are TRL's conversational preference shape "
              "(`prompt`, `chosen`, `rejected`). `<arm>.parquet` holds the same rows with every provenance column. "
              "LLaMA-Factory: `dataset_dir` this folder, `dataset: refinery_<arm>` or `refinery_dpo` "
              "(`dataset_info.json`).", ""]
    return "\n".join(lines)


def llamafactory_info(arms: Sequence[str], *, dpo: bool) -> dict[str, Any]:
    """Return LLaMA-Factory's ``dataset_info.json``: each arm's SFT export and the DPO pairs, sharegpt-formatted."""
    info: dict[str, Any] = {}
    for arm in arms:
        info[f"refinery_{arm}"] = {"file_name": f"{arm}.sft.jsonl", "formatting": "sharegpt",
                                   "columns": {"messages": "messages"}, "tags": dict(_SHAREGPT_TAGS)}
    if dpo:
        info["refinery_dpo"] = {"file_name": DPO_SHAREGPT_FILE, "formatting": "sharegpt", "ranking": True,
                                "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected"},
                                "tags": dict(_SHAREGPT_TAGS)}
    return info


def dpo_sharegpt(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return the DPO records in LLaMA-Factory's sharegpt ranking shape: the chosen and rejected turn as one message."""
    return [{"messages": r["prompt"], "chosen": r["chosen"][0], "rejected": r["rejected"][0],
             "category": r["category"], "category_source": r.get("category_source"), "pair_id": r["pair_id"]}
            for r in records]
