"""Name, commit and clean up refinery's scratch outputs (no heavy imports: the CLI runs this first)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

SCRATCH_PREFIX = ".refinery-tmp-"  # a new output being written, beside its target
BACKUP_PREFIX = ".refinery-old-"  # the previous output, kept until the new one is in place
JOURNAL_PREFIX = ".refinery-commit-"  # the list of renames of a commit under way, in the project folder


def backup_path(final: Path, token: str) -> Path:
    return final.parent / f"{BACKUP_PREFIX}{token}-{final.name}"


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fsync_file(path)
    except OSError:  # some file systems refuse fsync on a folder; the renames are still atomic
        pass


def write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def roll_back(plan: list[dict[str, str]]) -> None:
    """Undo a commit's renames: every target gets its old output back (or none, if it had none)."""
    for m in reversed(plan):
        final, backup, tmp = Path(m["final"]), Path(m["backup"]), Path(m["tmp"])
        if backup.exists() or backup.is_symlink():
            remove(final)
            os.replace(backup, final)
        elif final.exists() and not tmp.exists():
            remove(final)  # a new output with no old one beside it: the old state had none
        remove(tmp)


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, killed but not yet reaped, does not)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _owner(name: str, prefix: str) -> int | None:
    """Return the pid in a scratch, backup or journal name (None for names from older versions)."""
    head = name[len(prefix):].split("-", 1)[0].removesuffix(".json")
    return int(head) if head.isdigit() else None


def clean_stale(root: str | Path = ".") -> list[str]:
    """Remove refinery's own leftovers of killed runs under ``root``; return what was removed or restored.

    A commit journal of a dead process is rolled back first (old outputs restored), then scratch
    outputs (``.refinery-tmp-*``) and backups (``.refinery-old-*``) whose process is gone are removed.
    Only these names are touched, and never those of a live process. Hidden folders (``.git``, ``.dvc``,
    ``.venv``, the teacher cache) are not searched.
    """
    root = Path(root)
    done: list[str] = []
    try:
        journals = [p for p in root.iterdir() if p.name.startswith(JOURNAL_PREFIX)]
    except OSError:
        return done
    for j in journals:
        pid = _owner(j.name, JOURNAL_PREFIX)
        if pid is not None and _pid_alive(pid):
            continue
        try:
            plan = json.loads(j.read_text(encoding="utf-8")).get("moves", [])
            roll_back(plan)
            done.extend(f"restored {m['final']}" for m in plan)
            j.unlink()
        except (OSError, ValueError, KeyError, TypeError):
            continue
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        for name in [*dirs, *files]:
            prefix = SCRATCH_PREFIX if name.startswith(SCRATCH_PREFIX) else \
                BACKUP_PREFIX if name.startswith(BACKUP_PREFIX) else None
            if prefix is None:
                continue
            pid = _owner(name, prefix)
            if pid is not None and _pid_alive(pid):
                continue
            remove(here / name)
            done.append(f"removed {here / name}")
        dirs[:] = [d for d in dirs if not d.startswith(".")]
    return done
