"""Constitutional critique -> revise: a draft, a critique that names the rule the draft breaks, a revision.

The constitution (``prompts/constitution.txt``) is a numbered list of rules written as plain sentences, versioned by
its content hash like every template. The critique call must answer with a rule number first (0: no rule broken);
anything else is ``critique_unparseable`` and the row fails closed (kept with that reason, never passed on). A
draft that breaks a rule is rewritten by the revise call to follow it; the revised answer is a new answer that every
gate judges again. Each chain (draft, critique, rule, revision) is kept beside the rows (``critiques.parquet``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from refinery.core.errors import RefineryError

_RULE = re.compile(r"^\s*(\d+)\.\s+(\S.*?)\s*$")
_VERDICT = re.compile(r"^\s*(?:rule\s*)?(\d+)\s*[.)]?\s*(?:$|[-:(—]|\s)", re.IGNORECASE)
OUTCOMES = ("revised", "no_rule_broken", "critique_unparseable", "critique_failed", "draft_unparsed", "revise_failed")

CHAINS = pa.schema([  # data/03_generated/critiques.parquet: one row per critique_revise call chain
    pa.field("row_id", pa.string(), nullable=False),  # the row the chain produced (synthetic.parquet)
    pa.field("draft_row_id", pa.string(), nullable=False),  # the draft's own id (its cache key's row id)
    pa.field("parent_id", pa.string(), nullable=False),  # the seed row
    pa.field("draft", pa.string(), nullable=True),  # the draft answer (null: the draft did not parse)
    pa.field("critique", pa.string(), nullable=True),  # the critique call's raw text
    pa.field("rule", pa.int32(), nullable=True),  # the rule number it names (0: none broken; null: unparseable)
    pa.field("rule_text", pa.string(), nullable=True),
    pa.field("revision", pa.string(), nullable=True),  # the revised answer (null: no revision)
    pa.field("outcome", pa.string(), nullable=False),  # one of OUTCOMES
    pa.field("constitution", pa.string(), nullable=False),  # constitution name@content hash
    pa.field("critique_template", pa.string(), nullable=False),
    pa.field("revise_template", pa.string(), nullable=False),
])


@dataclass(frozen=True)
class Constitution:
    """Numbered rules, the text shown to the critic, and ``name@version`` (content hash)."""

    rules: tuple[str, ...]
    text: str
    ref: str

    def rule(self, number: int) -> str:
        """The rule's sentence (1-based)."""
        return self.rules[number - 1]


def load_constitution(path: str | Path) -> Constitution:
    """Read a constitution: every non-empty line ``N. rule``, numbered 1, 2, ... in order.

    Raises:
        RefineryError: a missing file, or a line that is not the next numbered rule (one line naming file and line).
    """
    from refinery.generation.prompts import load_template

    tpl = load_template(path)  # the content hash, and no placeholders allowed
    rules = []
    for n, line in enumerate(tpl.body.splitlines(), start=1):
        if not line.strip():
            continue
        m = _RULE.match(line)
        if m is None or int(m.group(1)) != len(rules) + 1:
            raise RefineryError(f"{path}: line {n}: expected rule {len(rules) + 1} as '{len(rules) + 1}. <rule>'")
        rules.append(m.group(2))
    if not rules:
        raise RefineryError(f"{path}: no rule")
    return Constitution(tuple(rules), "\n".join(f"{i}. {r}" for i, r in enumerate(rules, start=1)), tpl.ref)


def parse_critique(text: str, rules: int) -> int | None:
    """The rule number a critique names first (0: none broken), or None when it names none of 0..``rules``.

    Only a reply that starts with the number counts ("3", "Rule 3.", "0 - none"); prose that mentions a number
    later ("The answer breaks rule 3") is not read, so the row fails closed.
    """
    first = next((line for line in text.split("\n") if line.strip()), "")
    m = _VERDICT.match(first)
    if m is None:
        return None
    number = int(m.group(1))
    return number if 0 <= number <= rules else None
