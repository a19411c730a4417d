"""The experiment's arms: each a dataset recipe over row sources (params.yaml: assemble.arms), trained per seed.

Stages that need the arms (assemble builds them; validate checks each; report compares them) read them from
here, so no stage imports another. ``dvc.yaml`` iterates the same mapping with ``matrix``, so adding an arm or a
training seed in params.yaml adds its stages without touching code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from refinery.core.errors import ParamsError
from refinery.core.params import StageParams, parse_section, read_key

Source = Literal["accepted", "recovered", "generated", "contaminated"]
BASE = "base"  # the untuned student: evaluated once, never an arm


class ArmRecipe(StageParams):
    """One arm's dataset: which rows it draws from, and how many."""

    human: bool = False  # every human train row (the anchor)
    sources: list[Source] = []  # synthetic row sources, in priority order (a row_id is taken once)
    dedup: bool = True  # drop synthetic rows duplicating a human train row or each other (exact + MinHash)
    max_synthetic_share: float | None = Field(default=None, ge=0, lt=1)  # synthetic rows / all rows; needs human
    max_synthetic_weight_share: float | None = Field(default=None, ge=0, lt=1)  # synthetic weight / all weight
    synthetic_rows_of: str | None = None  # take as many synthetic rows as this (earlier) arm holds, under the cap
    rare_intent_min: int = Field(default=0, ge=0)  # intents with fewer human rows are topped up to this first
    rare_category_min: int = Field(default=0, ge=0)  # then document categories, the same way
    suite: str | None = None  # GE suite (schemas/expectations/<suite>.json) validate checks it with; null: the arm's name

    @model_validator(mode="after")
    def _check(self) -> ArmRecipe:
        if not self.human and not self.sources:
            raise ValueError("an arm needs human: true or at least one synthetic source")
        if self.max_synthetic_share is not None and not self.human:
            raise ValueError("max_synthetic_share caps synthetic rows against human rows: it needs human: true")
        if len(set(self.sources)) != len(self.sources):
            raise ValueError("sources lists a source twice")
        return self


def check_arms(arms: dict[str, ArmRecipe]) -> None:
    """Raise ValueError for an empty mapping, a bad arm name, or a ``synthetic_rows_of`` not listed before."""
    if not arms:
        raise ValueError("arms: name at least one arm")
    names = list(arms)
    for i, (name, arm) in enumerate(arms.items()):
        if not name.replace("_", "").isalnum() or name == BASE:
            raise ValueError(f"arms.{name}: arm names are letters, digits and '_' ('{BASE}' is the untuned model)")
        if arm.synthetic_rows_of is not None and arm.synthetic_rows_of not in names[:i]:
            raise ValueError(f"arms.{name}.synthetic_rows_of: '{arm.synthetic_rows_of}' is not an arm listed before it")


def load_arms(params_file: str | Path) -> dict[str, ArmRecipe]:
    """Read and check ``assemble.arms`` of a params file (for stages other than assemble)."""
    raw = read_key(params_file, "assemble.arms")
    if not isinstance(raw, dict):
        raise ParamsError(f"{params_file}: assemble.arms is missing or not a mapping of arm name -> recipe")
    arms = {name: parse_section(recipe, ArmRecipe, where=f"{params_file}: assemble.arms.{name}")
            for name, recipe in raw.items()}
    try:
        check_arms(arms)
    except ValueError as e:
        raise ParamsError(f"{params_file}: assemble.{e}") from None
    return arms


def run_name(arm: str, seed: int) -> str:
    """The name of one training run of an arm: ``<arm>-s<seed>`` (adapter folder, metrics and predictions files)."""
    return f"{arm}-s{seed}"
