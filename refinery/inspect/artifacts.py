"""Find a DVC project's Parquet artifacts at any git revision (or the workspace) without checking it out."""

from __future__ import annotations

import functools
import json
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from refinery.core.errors import RefineryError

WORKSPACE = "workspace"


def git(root: Path, *args: str, check: bool = True) -> str:
    """Run git in ``root`` and return its stdout; fail with one line naming the command."""
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True)
    if check and proc.returncode != 0:
        raise RefineryError(f"git {' '.join(args)}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode("utf-8", errors="replace")


def repo_root(start: str | Path = ".") -> Path:
    """Return the git top-level folder containing ``start``."""
    return Path(git(Path(start), "rev-parse", "--show-toplevel").strip())


def default_base(root: Path) -> str:
    """Return the merge-base of HEAD with the base branch (CI's base ref, origin/HEAD, main or master)."""
    import os

    candidates = []
    if os.environ.get("GITHUB_BASE_REF"):
        candidates.append(f"origin/{os.environ['GITHUB_BASE_REF']}")
    candidates += ["origin/HEAD", "origin/main", "origin/master", "main", "master"]
    for ref in candidates:
        if git(root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False).strip():
            base = git(root, "merge-base", "HEAD", ref, check=False).strip()
            if base:
                return base
    return "HEAD"


@dataclass
class Snapshot:
    """The project as it was at one git revision (``rev=None``: the files on disk).

    Artifacts are read from the DVC cache by the md5 that ``dvc.lock`` records at that revision, so the
    workspace is never checked out; objects missing from the local cache are fetched with ``dvc.api``.
    """

    root: Path
    rev: str | None = None
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return WORKSPACE if self.rev is None else self.rev

    @property
    def commit(self) -> str | None:
        if self.rev is None:
            return None
        return git(self.root, "rev-parse", "--verify", f"{self.rev}^{{commit}}").strip()

    # ---- raw files -----------------------------------------------------------------------------
    def read_git(self, path: str) -> bytes | None:
        """Return a git-tracked file's bytes at this revision (the file on disk for the workspace)."""
        if self.rev is None:
            p = self.root / path
            return p.read_bytes() if p.is_file() else None
        proc = subprocess.run(["git", "show", f"{self.rev}:{path}"], cwd=self.root, capture_output=True)
        return proc.stdout if proc.returncode == 0 else None

    def list_files(self, folder: str) -> list[str]:
        """Return the files directly in ``folder`` at this revision, sorted: git-tracked ones, else those of a
        DVC-cached folder output (the folder's files on disk for the workspace)."""
        folder = folder.rstrip("/")
        if self.rev is None:
            p = self.root / folder
            return sorted(str(f.relative_to(self.root)) for f in p.iterdir() if f.is_file()) if p.is_dir() else []
        proc = subprocess.run(["git", "ls-tree", "--name-only", f"{self.rev}:{folder}"], cwd=self.root,
                              capture_output=True, text=True)
        if proc.returncode == 0 and proc.stdout.strip():
            return sorted(f"{folder}/{name}" for name in proc.stdout.split())
        md5 = self.lock_outs().get(folder, "")
        if md5.endswith(".dir"):
            return sorted(f"{folder}/{e['relpath']}" for e in self._dir_manifest(folder, md5) if "/" not in e["relpath"])
        return []

    def lock_outs(self) -> dict[str, str]:
        """Return ``{out path: md5}`` from dvc.lock at this revision (empty when there is none)."""
        raw = self.read_git("dvc.lock")
        if not raw:
            return {}
        lock = yaml.safe_load(raw) or {}
        return {o["path"]: o.get("md5", "") for st in (lock.get("stages") or {}).values()
                for o in st.get("outs", []) or []}

    def yaml_outs(self) -> list[str]:
        """Return the literal out paths that dvc.yaml declares at this revision (templated ones skipped)."""
        raw = self.read_git("dvc.yaml")
        if not raw:
            return []
        stages = (yaml.safe_load(raw) or {}).get("stages") or {}
        paths = []
        for st in stages.values():
            body = st.get("do", st) if isinstance(st, dict) else {}
            for out in body.get("outs", []) or []:
                path = next(iter(out)) if isinstance(out, dict) else out
                if isinstance(path, str) and "${" not in path:
                    paths.append(path)
        return paths

    @functools.cached_property
    def cache_dir(self) -> Path:
        """The DVC cache folder: ``cache.dir`` from .dvc/config.local or .dvc/config, else .dvc/cache."""
        from configobj import ConfigObj

        for name in ("config.local", "config"):
            conf = self.root / ".dvc" / name
            if conf.is_file():
                folder = (ConfigObj(str(conf)).get("cache") or {}).get("dir")
                if folder:
                    return (conf.parent / folder).resolve()
        return self.root / ".dvc" / "cache"

    def _cache_object(self, md5: str) -> Path | None:
        cache = self.cache_dir
        for base in (cache / "files" / "md5", cache):
            p = base / md5[:2] / md5[2:]
            if p.is_file():
                return p
        return None

    def _fetch(self, path: str) -> Path:
        """Fetch one tracked file at this revision with dvc.api (remote or non-default cache)."""
        from dvc.api import DVCFileSystem

        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="refinery-snapshot-")
        dest = Path(self._tmp.name) / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            DVCFileSystem(str(self.root), rev=self.rev).get_file(path, str(dest))
        except Exception as e:  # noqa: BLE001 - dvc raises many types; report the file and the cause
            raise RefineryError(f"{path}@{self.rev}: not in the DVC cache and not fetchable ({e}); "
                                f"run `dvc fetch --rev {self.rev}` or `dvc pull`") from None
        return dest

    def file(self, path: str) -> Path | None:
        """Return a local path holding ``path`` as it was at this revision, or None when it did not exist."""
        if self.rev is None:
            p = self.root / path
            return p if p.is_file() else None
        for out, md5 in self.lock_outs().items():
            if path == out and md5 and not md5.endswith(".dir"):
                return self._cache_object(md5) or self._fetch(path)
            if path.startswith(out.rstrip("/") + "/") and md5.endswith(".dir"):
                rel = path[len(out.rstrip("/")) + 1:]
                entry = next((e for e in self._dir_manifest(out, md5) if e["relpath"] == rel), None)
                if entry is None:
                    return None
                return self._cache_object(entry["md5"]) or self._fetch(path)
        raw = self.read_git(path)
        if raw is None:
            return None
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="refinery-snapshot-")
        dest = Path(self._tmp.name) / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(raw)
        return dest

    def read_json(self, path: str):
        """Return a JSON file's content at this revision, or None when it did not exist."""
        p = self.file(path)
        return json.loads(p.read_text(encoding="utf-8")) if p else None

    def _dir_manifest(self, out: str, md5: str) -> list[dict]:
        obj = self._cache_object(md5)
        if obj is None:
            return [{"relpath": str(p.relative_to(out)), "md5": ""}
                    for p in map(Path, self._dvcfs_listing(out))]
        return json.loads(obj.read_text())

    def _dvcfs_listing(self, out: str) -> list[str]:
        from dvc.api import DVCFileSystem

        fs = DVCFileSystem(str(self.root), rev=self.rev)
        return [p for p in fs.find(out) if p.endswith(".parquet")]

    # ---- artifacts -----------------------------------------------------------------------------
    def parquet_outs(self, under: str = "data/") -> dict[str, Path]:
        """Return ``{relative path: local file}`` for every Parquet file inside a DVC out under ``under``."""
        found: dict[str, Path] = {}
        if self.rev is None:
            outs = sorted(set(self.lock_outs()) | set(self.yaml_outs()))
            for out in outs:
                if not out.startswith(under):
                    continue
                p = self.root / out
                if p.is_file() and p.suffix == ".parquet":
                    found[out] = p
                elif p.is_dir():
                    for f in sorted(p.rglob("*.parquet")):
                        found[str(f.relative_to(self.root))] = f
            return found
        for out, md5 in sorted(self.lock_outs().items()):
            if not out.startswith(under) or not md5:
                continue
            if md5.endswith(".dir"):
                for e in self._dir_manifest(out, md5):
                    if e["relpath"].endswith(".parquet"):
                        rel = f"{out.rstrip('/')}/{e['relpath']}"
                        found[rel] = (self._cache_object(e["md5"]) if e["md5"] else None) or self._fetch(rel)
            elif out.endswith(".parquet"):
                found[out] = self._cache_object(md5) or self._fetch(out)
        return found

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def columns(path: Path) -> list[str]:
    """Return a Parquet file's column names (reads the footer only)."""
    import pyarrow.parquet as pq

    return pq.read_schema(path).names


def row_tables(files: dict[str, Path], key: str = "row_id") -> dict[str, Path]:
    """Keep the artifacts that have a ``key`` column."""
    return {name: p for name, p in files.items() if key in columns(p)}
