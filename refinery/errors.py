"""Define the one-line errors refinery reports to users."""

from __future__ import annotations


class RefineryError(Exception):
    """An error the user can fix; the CLI prints its one-line message and exits non-zero."""

    exit_code = 2

    def __str__(self) -> str:  # always one line, whatever the message held
        return " ".join(super().__str__().split())


class InputError(RefineryError):
    """Bad input data, located by file, row and field.

    Args:
        file: the path the data came from.
        message: what is wrong, in words.
        row: 1-based data row (header excluded; the line number for JSONL), when known.
        field: the column / key, when known.
    """

    def __init__(self, file: str, message: str, *, row: int | None = None, field: str | None = None):
        self.file, self.row, self.field, self.message = str(file), row, field, message
        where = [self.file]
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(": ".join(where) + ": " + message)


class ParamsError(RefineryError):
    """A params.yaml value that is missing or invalid."""


class ModelResolutionError(RefineryError):
    """A model named for a role that cannot be resolved."""
