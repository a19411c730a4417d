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


@dataclass(frozen=True)
class Tracked:
    """One output that dvc.lock records: its path, hash and whether DVC caches it (``cache: false`` ones are not)."""

    path: str
    md5: str
    legacy: bool  # recorded by DVC 2 (no ``hash: md5``): stored under the cache's and the remote's legacy layout
    cached: bool

    @property
    def is_dir(self) -> bool:
        return self.md5.endswith(".dir")


@dataclass
class Snapshot:
    """The project as it was at one git revision (``rev=None``: the workspace, files on disk).

    Artifacts are read from the DVC cache by the md5 that ``dvc.lock`` records at that revision, so nothing is
    checked out; objects missing from the local cache are fetched from the default DVC remote by that hash. In the
    workspace, an output that dvc.lock records but that is not on disk (``dvc repro --allow-missing`` skips
    unchanged stages without pulling them) is read the same way, never taken for deleted; its path is listed in
    ``not_in_workspace``.
    """

    root: Path
    rev: str | None = None
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)
    not_in_workspace: list[str] = field(default_factory=list)
    _tracked: dict[str, Tracked] | None = field(default=None, repr=False)

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
        """Return the files directly in ``folder`` at this revision, sorted: git-tracked ones (the folder on disk
        for the workspace), else those of a DVC-cached folder output."""
        folder = folder.rstrip("/")
        if self.rev is None:
            p = self.root / folder
            if p.is_dir():
                return sorted(str(f.relative_to(self.root)) for f in p.iterdir() if f.is_file())
        else:
            proc = subprocess.run(["git", "ls-tree", "--name-only", f"{self.rev}:{folder}"], cwd=self.root,
                                  capture_output=True, text=True)
            if proc.returncode == 0 and proc.stdout.strip():
                return sorted(f"{folder}/{name}" for name in proc.stdout.split())
        out = self.tracked().get(folder)
        if out is None or not out.cached or not out.is_dir:
            return []
        if self.rev is None:
            self._note_missing(folder)
        return sorted(f"{folder}/{e['relpath']}" for e in self._manifest(out) if "/" not in e["relpath"])

    def lock_outs(self) -> dict[str, str]:
        """Return ``{out path: md5}`` from dvc.lock at this revision (empty when there is none)."""
        return {path: out.md5 for path, out in self.tracked().items()}

    def _dvc_yaml(self) -> dict | None:
        raw = self.read_git("dvc.yaml")
        return (yaml.safe_load(raw) or {}) if raw else None

    def tracked(self) -> dict[str, Tracked]:
        """Return the outputs dvc.lock records at this revision, by path, for the stages dvc.yaml still declares
        (a stage removed from dvc.yaml can leave its entry in dvc.lock)."""
        if self._tracked is None:
            self._tracked = self._read_tracked()
        return self._tracked

    def _read_tracked(self) -> dict[str, Tracked]:
        raw = self.read_git("dvc.lock")
        if not raw:
            return {}
        lock = yaml.safe_load(raw) or {}
        spec = self._dvc_yaml()
        declared = set((spec or {}).get("stages") or {}) if spec is not None else None
        uncached = self._uncached_outs(spec or {})
        found = {}
        for name, stage in (lock.get("stages") or {}).items():
            if declared is not None and name.split("@", 1)[0] not in declared:
                continue
            for o in (stage or {}).get("outs") or []:
                if o.get("md5"):
                    found[o["path"]] = Tracked(o["path"], o["md5"], legacy=o.get("hash") != "md5",
                                               cached=o["path"] not in uncached)
        return found

    @staticmethod
    def _uncached_outs(spec: dict) -> set[str]:
        """The literal output paths dvc.yaml declares with ``cache: false`` (outs, metrics and plots)."""
        found = set()
        for st in (spec.get("stages") or {}).values():
            body = st.get("do", st) if isinstance(st, dict) else {}
            for kind in ("outs", "metrics", "plots"):
                for out in body.get(kind, []) or []:
                    if isinstance(out, dict):
                        path, opts = next(iter(out.items()))
                        if isinstance(opts, dict) and opts.get("cache") is False:
                            found.add(path)
        return found

    def yaml_outs(self) -> list[str]:
        """Return the literal out paths that dvc.yaml declares at this revision (templated ones skipped)."""
        spec = self._dvc_yaml()
        if not spec:
            return []
        paths = []
        for st in (spec.get("stages") or {}).values():
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

    def _pull(self, wanted: list[tuple[str, str, bool]]) -> None:
        """Fetch ``(path, md5, legacy)`` objects missing from the local cache from the default DVC remote, by hash,
        in one transfer (a folder's hash brings its files); fail with one line naming the first one still missing.
        """
        missing = [(path, md5, legacy) for path, md5, legacy in wanted if self._cache_object(md5) is None]
        if not missing:
            return
        why = ""
        try:
            from dvc.repo import Repo
            from dvc_data.hashfile.hash_info import HashInfo

            with Repo(str(self.root)) as repo:
                remote = repo.config["core"].get("remote")
                repo.cloud.pull([HashInfo("md5-dos2unix" if legacy else "md5", md5) for _, md5, legacy in missing])
            why = f"not on the DVC remote '{remote}'"
        except Exception as e:  # noqa: BLE001 - dvc raises many types (no remote, credentials, network): reported
            why = f"{type(e).__name__}: {' '.join(str(e).split())}"
        for path, md5, _ in missing:
            if self._cache_object(md5) is None:
                if self.rev is None:
                    raise RefineryError(f"{path}: recorded in dvc.lock (md5 {md5}) but not in the workspace, the "
                                        f"DVC cache or the remote ({why}); run `dvc pull {path}`, or `dvc repro` "
                                        f"where no remote has it")
                raise RefineryError(f"{path}@{self.rev}: recorded in dvc.lock there (md5 {md5}) but not in the DVC "
                                    f"cache or the remote ({why}); run `dvc push` in a checkout of {self.rev} "
                                    f"that has it (`git checkout {self.rev} && dvc repro && dvc push`)")

    def _object(self, path: str, md5: str, legacy: bool) -> Path:
        """The cache file of one object, fetched from the remote when the local cache lacks it."""
        self._pull([(path, md5, legacy)])
        return self._cache_object(md5)  # type: ignore[return-value]  (_pull raised if it is still missing)

    def _manifest(self, out: Tracked) -> list[dict]:
        """A folder output's ``[{relpath, md5}]``, from its ``.dir`` object (fetched with its files if missing)."""
        return json.loads(self._object(out.path, out.md5, out.legacy).read_text())

    def _note_missing(self, path: str) -> None:
        if path not in self.not_in_workspace:
            self.not_in_workspace.append(path)

    def _git_copy(self, path: str) -> Path | None:
        raw = self.read_git(path)
        if raw is None:
            return None
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="refinery-snapshot-")
        dest = Path(self._tmp.name) / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(raw)
        return dest

    def file(self, path: str) -> Path | None:
        """Return a local path holding ``path`` as it was at this revision, or None when it did not exist.

        The workspace's file on disk when there is one; else the object dvc.lock records for it (alone, or in a
        folder output) from the DVC cache or the remote; else, at a revision, the git-tracked file.
        """
        if self.rev is None and (self.root / path).is_file():
            return self.root / path
        for out in self.tracked().values():
            if not out.cached:
                continue
            if path == out.path and not out.is_dir:
                if self.rev is None:
                    self._note_missing(path)
                return self._object(path, out.md5, out.legacy)
            if path.startswith(out.path.rstrip("/") + "/") and out.is_dir:
                if self.rev is None and (self.root / out.path).is_dir():
                    return None  # the folder is there, without this file
                rel = path[len(out.path.rstrip("/")) + 1:]
                entry = next((e for e in self._manifest(out) if e["relpath"] == rel), None)
                if entry is None:
                    return None
                if self.rev is None:
                    self._note_missing(out.path)
                return self._object(path, entry["md5"], out.legacy)
        return None if self.rev is None else self._git_copy(path)

    def read_json(self, path: str):
        """Return a JSON file's content at this revision, or None when it did not exist."""
        p = self.file(path)
        return json.loads(p.read_text(encoding="utf-8")) if p else None

    # ---- artifacts -----------------------------------------------------------------------------
    def parquet_outs(self, under: str = "data/") -> dict[str, Path]:
        """Return ``{relative path: local file}`` for every Parquet file inside a DVC out under ``under``.

        At a revision: every output dvc.lock records there. In the workspace: every output dvc.lock or dvc.yaml
        declares, read from disk, or by its dvc.lock hash when it is not on disk; one that neither the disk nor
        dvc.lock has is absent.
        """
        tracked = self.tracked()
        found: dict[str, Path] = {}
        pending: list[tuple[str, Tracked]] = []
        for out in sorted(set(tracked) | (set(self.yaml_outs()) if self.rev is None else set())):
            if not out.startswith(under):
                continue
            p = self.root / out
            if self.rev is None and p.exists():
                if p.is_file() and p.suffix == ".parquet":
                    found[out] = p
                elif p.is_dir():
                    for f in sorted(p.rglob("*.parquet")):
                        found[str(f.relative_to(self.root))] = f
                continue
            entry = tracked.get(out)
            if entry is None:
                continue  # declared but never produced
            if not entry.cached:
                if self.rev is not None and out.endswith(".parquet"):
                    copy = self._git_copy(out)
                    if copy is not None:
                        found[out] = copy
                continue
            if entry.is_dir or out.endswith(".parquet"):
                pending.append((out, entry))
        # one transfer for every folder manifest, then one for every file they and the file outputs name
        self._pull([(out, e.md5, e.legacy) for out, e in pending])
        files: list[tuple[str, str, bool]] = []
        for out, entry in pending:
            if self.rev is None:
                self._note_missing(out)
            if entry.is_dir:
                files += [(f"{out.rstrip('/')}/{e['relpath']}", e["md5"], entry.legacy)
                          for e in self._manifest(entry) if e["relpath"].endswith(".parquet")]
            else:
                files.append((out, entry.md5, entry.legacy))
        self._pull(files)
        for rel, md5, legacy in files:
            found[rel] = self._object(rel, md5, legacy)
        return dict(sorted(found.items()))

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
