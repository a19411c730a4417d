"""Read tabular inputs with row positions, and write outputs atomically with explicit schemas."""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from refinery.errors import InputError, RefineryError

TABLE_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class Records:
    """Rows read from one file, each a dict, with the file they came from.

    ``rows[i]`` is data row ``i + 1`` in error messages (header excluded; for JSONL, the line number
    of a non-blank line).
    """

    path: str
    columns: tuple[str, ...]
    rows: list[dict[str, Any]]
    row_numbers: list[int] = field(default_factory=list)

    def row_number(self, index: int) -> int:
        """Return the 1-based row number users see for ``rows[index]``."""
        return self.row_numbers[index] if self.row_numbers else index + 1


def table_format(path: Path) -> str:
    """Return 'csv', 'jsonl' or 'parquet' from a file suffix, or fail naming the file."""
    fmt = TABLE_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise InputError(str(path), f"unknown file format '{path.suffix or '(none)'}' (expected one of: "
                                    f"{', '.join(sorted(TABLE_SUFFIXES))})")
    return fmt


def _decode(path: Path) -> str:
    """Decode UTF-8, keeping undecodable bytes as surrogates so they can be located by row and field."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.decode("utf-8", errors="surrogateescape")


def _bad_utf8(value: Any) -> str | None:
    if isinstance(value, str):
        for ch in value:
            if "\udc80" <= ch <= "\udcff":
                return f"invalid UTF-8 byte 0x{ord(ch) - 0xDC00:02x} (the file must be UTF-8)"
    return None


def read_records(path: str | Path) -> Records:
    """Read a CSV, JSONL or Parquet file into rows of Python values.

    Args:
        path: the file; its suffix picks the reader.

    Returns:
        The rows, with 1-based row numbers for error messages.

    Raises:
        InputError: missing, unreadable, empty, non-UTF-8 or malformed files, naming file and row.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(str(path), "file not found")
    if path.is_dir():
        raise InputError(str(path), "is a folder, expected a file")
    fmt = table_format(path)
    if path.stat().st_size == 0:
        raise InputError(str(path), "empty file (no header, no rows)")
    if fmt == "parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise InputError(str(path), f"not a readable Parquet file ({e})") from None
        recs = Records(str(path), tuple(table.column_names), table.to_pylist())
    elif fmt == "csv":
        recs = _read_csv(path)
    else:
        recs = _read_jsonl(path)
    if not recs.rows:
        raise InputError(str(path), "empty file (a header but no data rows)" if recs.columns else "empty file")
    for i, row in enumerate(recs.rows):
        for key, value in row.items():
            problem = _bad_utf8(value) or _bad_utf8(key)
            if problem:
                raise InputError(str(path), problem, row=recs.row_number(i), field=_clean(key))
    return recs


def _clean(key: Any) -> str:
    return str(key).encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")


def _read_csv(path: Path) -> Records:
    text = _decode(path)
    csv.field_size_limit(sys.maxsize)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise InputError(str(path), "empty file (no header row)")
        header = [h.strip() for h in header]
        rows, numbers = [], []
        for n, values in enumerate(reader, start=1):
            if not values or (len(values) == 1 and not values[0].strip()):
                continue  # blank line
            if len(values) != len(header):
                raise InputError(str(path), f"has {len(values)} fields, the header has {len(header)}", row=n)
            rows.append(dict(zip(header, values)))
            numbers.append(n)
    except csv.Error as e:
        raise InputError(str(path), f"malformed CSV ({e})", row=reader.line_num) from None
    return Records(str(path), tuple(header), rows, numbers)


def _read_jsonl(path: Path) -> Records:
    rows, numbers, columns = [], [], {}
    for n, line in enumerate(_decode(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(str(path), f"not valid JSON ({e.msg} at column {e.colno})", row=n) from None
        if not isinstance(obj, dict):
            raise InputError(str(path), f"expected a JSON object, got {type(obj).__name__}", row=n)
        rows.append(obj)
        numbers.append(n)
        columns.update(dict.fromkeys(obj))
    return Records(str(path), tuple(columns), rows, numbers)


def read_json(path: str | Path) -> Any:
    """Read a JSON document, failing with one line that names the file."""
    path = Path(path)
    if not path.exists():
        raise InputError(str(path), "file not found")
    try:
        return json.loads(_decode(path))
    except json.JSONDecodeError as e:
        raise InputError(str(path), f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def read_parquet(path: str | Path, schema: pa.Schema | None = None) -> pa.Table:
    """Read a Parquet artifact; with ``schema``, check its columns and cast to exactly that schema."""
    path = Path(path)
    if not path.exists():
        raise InputError(str(path), "file not found (did the upstream stage run?)")
    table = pq.read_table(path)
    if schema is None:
        return table
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise InputError(str(path), f"missing column(s) {', '.join(missing)}", field=missing[0])
    extra = [n for n in table.column_names if n not in schema.names]
    if extra:
        raise InputError(str(path), f"unexpected column(s) {', '.join(extra)}", field=extra[0])
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise InputError(str(path), f"does not match its schema ({e})") from None


class Outputs:
    """Stage outputs written into a scratch folder and moved into place only when all succeeded.

    Use via :func:`atomic_outputs`. A failing stage leaves no partial output: the scratch folder
    is removed and earlier outputs at the final paths are left untouched.
    """

    def __init__(self, scratch: Path):
        self._scratch = scratch
        self._moves: list[tuple[Path, Path]] = []

    def path(self, final: str | Path) -> Path:
        """Return the scratch path to write in place of ``final``."""
        final = Path(final)
        tmp = self._scratch / f"{len(self._moves):03d}_{final.name}"
        self._moves.append((tmp, final))
        return tmp

    def parquet(self, table: pa.Table, final: str | Path, schema: pa.Schema) -> None:
        """Write ``table`` cast to the explicit ``schema`` (never an inferred one)."""
        table = table.select(schema.names).cast(schema)
        pq.write_table(table, self.path(final), compression="zstd")

    def json(self, obj: Any, final: str | Path) -> None:
        """Write ``obj`` as stable, sorted, indented JSON."""
        self.path(final).write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                    encoding="utf-8")

    def text(self, content: str, final: str | Path) -> None:
        """Write a UTF-8 text file."""
        self.path(final).write_text(content, encoding="utf-8")

    def folder(self, final: str | Path) -> Path:
        """Return a scratch folder that replaces ``final`` whole on success."""
        tmp = self.path(final)
        tmp.mkdir(parents=True)
        return tmp

    def _commit(self) -> None:
        for tmp, final in self._moves:
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            elif final.exists() or final.is_symlink():
                final.unlink()
            shutil.move(tmp, final)  # a rename on one file system, copy + delete across


@contextmanager
def atomic_outputs(anchor: str | Path = ".") -> Iterator[Outputs]:
    """Collect outputs in a scratch folder beside ``anchor`` and move them into place on success.

    Args:
        anchor: a folder on the same file system as the outputs (renames are atomic there).
    """
    anchor = Path(anchor)
    anchor.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".refinery-tmp-", dir=anchor))
    try:
        outputs = Outputs(scratch)
        yield outputs
        outputs._commit()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def require_dir(path: str | Path, what: str) -> Path:
    """Return ``path`` as a Path if it is an existing folder, else fail with one line."""
    path = Path(path)
    if not path.is_dir():
        raise RefineryError(f"{path}: {what} folder not found")
    return path
