"""Load versioned prompt templates (one file each) and render them with checked placeholders."""

from __future__ import annotations

import hashlib
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from refinery.core.errors import RefineryError

SHOT_MARKER = "### shot"
PLACEHOLDERS = frozenset({"question", "answer", "evidence", "passage", "title", "shots",
                          "intent", "definition", "tone", "negatives",  # rare_intent
                          "constitution", "rule",  # critique, revise
                          "expression", "tests", "entry_point",  # verifiable math and code
                          "instruction", "example_question", "example_answer", "example_rejected"})  # dpo


@dataclass(frozen=True)
class Template:
    """A prompt template: ``body`` with ``{placeholders}``, and an optional ``shot`` format for few-shot examples.

    ``{shots}`` in the body is replaced by the rendered examples. ``version`` is the file's content hash:
    rows record ``name@version`` so any edit of a template is visible in provenance.
    """

    name: str
    body: str
    shot: str | None
    version: str

    @property
    def ref(self) -> str:
        """Return ``name@version``, the value stamped in ``prompt_template``."""
        return f"{self.name}@{self.version}"

    def render(self, values: Mapping[str, str], shots: Sequence[Mapping[str, str]] = ()) -> str:
        """Fill the template.

        Args:
            values: the placeholders of the body.
            shots: one mapping per few-shot example, rendered with the shot format.

        Raises:
            RefineryError: a placeholder without a value.
        """
        rendered_shots = ""
        if self.shot is not None:
            rendered_shots = "\n\n".join(_fill(self.shot, s, self.name) for s in shots)
        return _fill(self.body, {**values, "shots": rendered_shots}, self.name).replace("\n\n\n\n", "\n\n")


def _fields(text: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}


def _fill(text: str, values: Mapping[str, str], name: str) -> str:
    missing = _fields(text) - set(values)
    if missing:
        raise RefineryError(f"template {name}: no value for placeholder(s) {', '.join(sorted(missing))}")
    return text.format_map(dict(values))


def load_template(path: str | Path) -> Template:
    """Read a template file and check its placeholders.

    Raises:
        RefineryError: a missing file, or an unknown placeholder (one line naming file and placeholder).
    """
    path = Path(path)
    if not path.is_file():
        raise RefineryError(f"{path}: prompt template not found")
    text = path.read_text(encoding="utf-8")
    version = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    body, _, shot = text.partition(f"\n{SHOT_MARKER}\n")
    body, shot = body.rstrip("\n"), (shot.strip("\n") or None) if _ else None
    try:
        used = _fields(body) | (_fields(shot) if shot else set())
    except ValueError as e:
        raise RefineryError(f"{path}: malformed placeholder ({e})") from None
    unknown = used - PLACEHOLDERS
    if unknown:
        raise RefineryError(f"{path}: unknown placeholder {{{sorted(unknown)[0]}}} "
                            f"(known: {', '.join(sorted(PLACEHOLDERS))})")
    if shot is not None and "shots" not in _fields(body):
        raise RefineryError(f"{path}: has a '{SHOT_MARKER}' section but no {{shots}} in its body")
    return Template(path.stem, body, shot, version)
