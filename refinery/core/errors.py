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


def require_columns(table, columns, where: str) -> None:
    """Raise :class:`InputError` naming ``where`` and the first missing column unless ``table`` has ``columns``.

    Args:
        table: anything with ``column_names`` (a pyarrow Table).
        columns: the column names the caller reads.
        where: the file or input name for the message.
    """
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise InputError(where, f"missing column(s) {', '.join(missing)}", field=missing[0])


class ParamsError(RefineryError):
    """A params.yaml value that is missing or invalid."""


class ModelResolutionError(RefineryError):
    """A model named for a role that cannot be resolved."""


class FileSystemError(RefineryError):
    """The operating system refused to read or write a path (full disk, permissions, a symlink loop...)."""


# errno -> what it means for the user and what to do about it
_OS_HINTS = {
    "ENOSPC": "no space left on the device: free space there (or move the output folder) and run again",
    "EDQUOT": "disk quota exceeded: free space or raise the quota, then run again",
    "EFBIG": "file too large for this file system",
    "EACCES": "permission denied: check the owner and mode of the path and its folder",
    "EPERM": "operation not permitted: the path or its folder may be immutable (lsattr / chattr -i) or owned by "
             "another user",
    "EROFS": "read-only file system: write the outputs to a writable folder",
    "ELOOP": "too many levels of symbolic links (a symlink loop): fix or remove the link",
    "EISDIR": "is a folder, expected a file",
    "ENOTDIR": "a part of the path is a file, not a folder",
    "ENOENT": "not found",
    "ENAMETOOLONG": "the path is too long",
    "EMFILE": "too many open files: raise the limit (ulimit -n)",
    "EIO": "input/output error: the device may be failing",
}


def os_reason(exc: OSError) -> str:
    """Return what an OSError means and what to do, in words, with its errno name (e.g. '... [ENOSPC]')."""
    import errno as errno_mod

    code = exc.errno
    text = str(exc)
    if code is None:  # pyarrow and others raise OSError with the cause only in the message
        for name, probe in (("ENOSPC", "No space left"), ("EDQUOT", "quota exceeded"),
                            ("EACCES", "Permission denied"), ("EROFS", "Read-only file system"),
                            ("ELOOP", "symbolic links"), ("EPERM", "Operation not permitted")):
            if probe.lower() in text.lower():
                code = getattr(errno_mod, name)
                break
    name = errno_mod.errorcode.get(code, "") if code is not None else ""
    what = _OS_HINTS.get(name) or (exc.strerror or text or type(exc).__name__)
    return what + (f" [{name}]" if name else "")


def os_error(exc: OSError, path: object = None) -> FileSystemError:
    """Turn an OSError into one line naming the path, the cause and what to do.

    Args:
        exc: the error the operating system (or a library wrapping it) raised.
        path: the path to name, when it is known better than ``exc.filename`` (e.g. the target of a
            scratch file).
    """
    where = path if path is not None else exc.filename
    return FileSystemError(f"{where}: {os_reason(exc)}" if where is not None else os_reason(exc))
