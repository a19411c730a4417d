"""Read tabular inputs with row positions, and write outputs atomically with explicit schemas."""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from refinery.core.errors import InputError, RefineryError, os_error, os_reason
from refinery.core.scratch import (JOURNAL_PREFIX, SCRATCH_PREFIX, backup_path, fsync_dir, fsync_file, remove,
                              roll_back, write_synced)

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


def check_input(path: str | Path, kind: str = "file", missing: str = "file not found") -> Path:
    """Return ``path`` if it is a readable ``kind`` ('file' | 'folder'), else fail with one line naming it.

    A symlink loop, a permission problem or a folder where a file belongs is named as such, not as
    "not found".
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise InputError(str(path), f"a symlink to a missing target ({os.readlink(path)})") from None
        raise InputError(str(path), missing) from None
    except OSError as e:
        raise InputError(str(path), os_reason(e)) from None
    import stat as stat_mod

    is_dir = stat_mod.S_ISDIR(st.st_mode)
    if kind == "file" and is_dir:
        raise InputError(str(path), "is a folder, expected a file")
    if kind == "folder" and not is_dir:
        raise InputError(str(path), "is a file, expected a folder")
    if not os.access(path, os.R_OK | (os.X_OK if is_dir else 0)):
        raise InputError(str(path), "permission denied: the file is not readable by this user [EACCES]")
    return path


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise InputError(str(path), f"cannot be read: {os_reason(e)}") from None


def _decode(path: Path) -> str:
    """Decode UTF-8, keeping undecodable bytes as surrogates so they can be located by row and field."""
    data = _read_bytes(path)
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
    path = check_input(path)
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
            problem = _bad_utf8(value) or _bad_utf8(key) or _nul(value) or _nul(key)
            if problem:
                raise InputError(str(path), problem, row=recs.row_number(i), field=_clean(key))
    return recs


def _nul(value: Any) -> str | None:
    if isinstance(value, str) and "\x00" in value:
        return f"contains a NUL byte (U+0000) at character {value.index(chr(0)) + 1}: remove it from the source"
    return None


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
    path = check_input(path)
    try:
        return json.loads(_decode(path))
    except json.JSONDecodeError as e:
        raise InputError(str(path), f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def read_parquet(path: str | Path, schema: pa.Schema | None = None) -> pa.Table:
    """Read a Parquet artifact; with ``schema``, check its columns and cast to exactly that schema."""
    path = check_input(path, missing="file not found (did the upstream stage run?)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        why = os_reason(e) if isinstance(e, OSError) and e.errno else f"not a readable Parquet file ({e})"
        raise InputError(str(path), why) from None
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
    """Stage outputs written beside their targets and put in place only when all of them are complete.

    Use via :func:`atomic_outputs`. Each output is written to a scratch file (or folder) in its target's
    own folder, so the final rename never crosses file systems and a full disk fails while writing the
    scratch copy, with the previous output untouched. At commit every scratch output is fsynced and read
    back (Parquet footers, JSON), then the old outputs are renamed aside, the new ones renamed into place
    and the old ones removed. A journal in the project folder lists the renames while they happen: a
    process killed in that window is rolled back to the old outputs by the next refinery command
    (:func:`clean_stale`), so readers see all-old or all-new outputs.
    """

    def __init__(self, token: str, journal_dir: Path):
        self._token = token
        self._journal = journal_dir / f"{JOURNAL_PREFIX}{token}.json"
        self._moves: list[tuple[Path, Path]] = []
        self._made_dirs: list[Path] = []

    def path(self, final: str | Path) -> Path:
        """Return the scratch path to write in place of ``final`` (same folder, same suffix)."""
        final = Path(final)
        if any(f == final for _, f in self._moves):
            raise RefineryError(f"{final}: written twice by one stage")
        self._mkdir(final.parent)
        tmp = final.parent / f"{SCRATCH_PREFIX}{self._token}-{len(self._moves):03d}-{final.name}"
        self._moves.append((tmp, final))
        return tmp

    def _mkdir(self, folder: Path) -> None:
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        self._made_dirs.extend(sorted(missing, key=lambda p: len(p.parts), reverse=True))

    def parquet(self, table: pa.Table, final: str | Path, schema: pa.Schema) -> None:
        """Write ``table`` cast to the explicit ``schema`` (never an inferred one)."""
        table = table.select(schema.names).cast(schema)
        with self._naming(final) as tmp:
            pq.write_table(table, tmp, compression="zstd")

    @contextmanager
    def parquet_stream(self, final: str | Path, schema: pa.Schema) -> Iterator[Callable[[pa.Table], None]]:
        """Yield ``write(table)``, which appends a block of rows (cast to ``schema``) to the Parquet output
        ``final``, a row group per block: a large output is never one table in memory. The file is complete
        when the ``with`` block ends; it is put in place with the other outputs, or not at all."""
        with self._naming(final) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            def write(table: pa.Table) -> None:
                writer.write_table(table.select(schema.names).cast(schema))

            yield write

    def json(self, obj: Any, final: str | Path) -> None:
        """Write ``obj`` as stable, sorted, indented JSON."""
        with self._naming(final) as tmp:
            tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")

    def text(self, content: str, final: str | Path) -> None:
        """Write a UTF-8 text file."""
        with self._naming(final) as tmp:
            tmp.write_text(content, encoding="utf-8")

    def lines(self, lines: Iterable[str], final: str | Path) -> None:
        """Write a UTF-8 text file from ``lines`` as they come (a large export is never one string in memory)."""
        with self._naming(final) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line)

    @contextmanager
    def _naming(self, final: str | Path) -> Iterator[Path]:
        """Yield the scratch path for ``final``; a write error names ``final`` (a full disk fails at close,
        and pyarrow's errors name no file)."""
        tmp = self.path(final)
        try:
            yield tmp
        except OSError as e:
            raise os_error(e, final) from None

    def folder(self, final: str | Path) -> Path:
        """Return a scratch folder that replaces ``final`` whole on success."""
        tmp = self.path(final)
        tmp.mkdir()
        return tmp

    def last_target(self) -> Path | None:
        """Return the target of the scratch output handed out last (the one being written)."""
        return self._moves[-1][1] if self._moves else None

    def final_of(self, path: str | Path | None) -> Path | None:
        """Return the target a scratch path (or a file inside a scratch folder) stands for."""
        if path is None:
            return None
        path = Path(path)
        for tmp, final in self._moves:
            if path == tmp:
                return final
            if tmp in path.parents:
                return final / path.relative_to(tmp)
        return None

    def _verify(self) -> None:
        """fsync every scratch output and read it back, so a short write fails before anything moves."""
        for tmp, final in self._moves:
            if not tmp.exists():
                raise RefineryError(f"{final}: the stage declared this output but wrote nothing")
            for f in ([tmp] if tmp.is_file() else sorted(p for p in tmp.rglob("*") if p.is_file())):
                fsync_file(f)
                if f.suffix == ".parquet":
                    try:
                        pq.read_metadata(f)
                    except (pa.ArrowException, OSError) as e:
                        raise RefineryError(f"{final}: the new output is not readable Parquet ({e})") from None
                elif f.suffix == ".json":
                    try:
                        json.loads(f.read_text(encoding="utf-8"))
                    except ValueError as e:
                        raise RefineryError(f"{final}: the new output is not valid JSON ({e})") from None

    def _commit(self) -> None:
        self._verify()
        plan = [{"tmp": str(t), "final": str(f), "backup": str(backup_path(f, self._token))} for t, f in self._moves]
        write_synced(self._journal, json.dumps({"pid": os.getpid(), "moves": plan}))
        done: list[dict[str, str]] = []
        try:
            for m in plan:
                final, backup = Path(m["final"]), Path(m["backup"])
                if final.exists() or final.is_symlink():
                    os.replace(final, backup)
                os.replace(m["tmp"], final)
                done.append(m)
            for folder in {Path(m["final"]).parent for m in plan}:
                fsync_dir(folder)
        except BaseException:
            roll_back(plan)
            self._journal.unlink(missing_ok=True)
            raise
        self._journal.unlink()  # the commit point: from here on the new outputs stand
        for m in plan:
            remove(Path(m["backup"]))

    def _discard(self) -> None:
        for tmp, _ in self._moves:
            remove(tmp)
        for folder in self._made_dirs:
            try:
                folder.rmdir()  # only folders this stage created and left empty
            except OSError:
                pass


@contextmanager
def atomic_outputs(journal_dir: str | Path = ".") -> Iterator[Outputs]:
    """Collect a stage's outputs beside their targets and put them in place together on success.

    Args:
        journal_dir: the project folder, where the commit journal lives while outputs are renamed.

    Raises:
        RefineryError: one line naming the target when the file system refuses a write (full disk,
            permissions, read-only); the previous outputs are then left as they were.
    """
    outputs = Outputs(f"{os.getpid()}-{secrets.token_hex(3)}", Path(journal_dir))
    try:
        yield outputs
        outputs._commit()
    except OSError as e:
        # an error with no file name (a full disk fails at close) comes from the output being written last
        raise os_error(e, outputs.final_of(e.filename) or e.filename or outputs.last_target()) from None
    finally:
        outputs._discard()


def require_dir(path: str | Path, what: str) -> Path:
    """Return ``path`` as a Path if it is an existing folder, else fail with one line."""
    path = Path(path)
    if not path.is_dir():
        raise RefineryError(f"{path}: {what} folder not found")
    return path
