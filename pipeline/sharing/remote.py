"""Remote stores: push and pull artifacts through fsspec (a folder, ``file://``, ``s3://``, ``gs://``, ...).

An artifact ``(stage, key)`` is two objects under the remote's root:

- ``<Stage>/<key>.tar.zst``: its files as a deterministic tar stream, zstandard-compressed (``pipeline.storage.archive``);
- ``<Stage>/<key>.manifest.json``: the artifact's manifest plus ``remote.archive`` (the archive's size and sha256) and
  ``manifest_sha256`` (over the rest of the document), uploaded **last**. Object stores cannot rename, so this order is
  the publication step: an archive without its manifest is invisible.

A pull reads the manifest, checks its own digest, streams the archive into a temp folder checking each file's size and
sha256 (and the archive's), and only then publishes through :meth:`pipeline.storage.store.Store.adopt` (temp folder, rename,
manifest last). Any mismatch raises :class:`RemoteError` with one line naming the artifact and the file; nothing local
changes. Uploads go through fsspec's non-autocommit files (a local folder: temp file + rename; S3: one PUT or a
multipart upload completed at the end), so two machines pushing the same key at once both succeed and leave one whole
artifact. Credentials come from each library's own configuration (AWS/botocore environment and files, gcloud ...); a
URL's user/password part is never printed (:func:`redact`).

Configuration: ``[nest] remote`` (or ``$NEST_REMOTE``) and ``[nest] remote_mode`` (or ``$NEST_REMOTE_MODE``):
``pull`` (default: a run pulls a missing stage from the remote instead of building it), ``push`` (a run pushes what it
builds), ``both``, ``off``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from pipeline.engine import config
from pipeline.engine.config import distributed
from pipeline.storage.archive import ArchiveError, pack, safe_name, unpack
from pipeline.storage.store import KEY_LEN, Store

REMOTE_FORMAT = 1
MODES = ("pull", "push", "both", "off")
_HEX = set("0123456789abcdef")


class RemoteError(Exception):
    """A one-line remote failure: unreachable, refused integrity check, missing library, bad configuration."""


# ---- configuration -------------------------------------------------------------------------------------------------

def redact(url: str) -> str:
    """``url`` without its user/password part and its query (where credentials can hide)."""
    parts = urlsplit(url)
    if not parts.scheme or len(parts.scheme) == 1:  # a plain path (or a Windows drive letter)
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, netloc, parts.path, "…" if parts.query else "", ""))


def remote_url() -> str | None:
    """``$NEST_REMOTE``, else ``[nest] remote``; None when neither is set."""
    value = os.environ.get("NEST_REMOTE")
    if value is None:
        value = config.config().get("nest", "remote", "")
    return value.strip() or None


def remote_mode() -> str:
    """``$NEST_REMOTE_MODE``, else ``[nest] remote_mode`` (default ``pull``)."""
    value = (os.environ.get("NEST_REMOTE_MODE") or config.config().get("nest", "remote_mode", "pull")).strip().lower()
    if value not in MODES:
        raise RemoteError(f"[nest] remote_mode = {value!r}: expected one of {', '.join(MODES)}")
    return value


_REMOTES: dict[str, "Remote"] = {}


def get_remote(url: str | None = None) -> "Remote | None":
    """The configured remote (one instance per URL and process), or None when none is configured."""
    url = url or remote_url()
    if url is None:
        return None
    if url not in _REMOTES:
        _REMOTES[url] = Remote(url)
    return _REMOTES[url]


def active_remote(direction: str) -> "Remote | None":
    """The remote when ``remote_mode`` lets runs ``direction`` (``pull`` or ``push``) through it, else None."""
    if remote_url() is None:
        return None
    mode = remote_mode()
    if mode == "off" or (mode != "both" and mode != direction):
        return None
    return get_remote()


# ---- manifests -----------------------------------------------------------------------------------------------------

def _digest(doc: dict) -> str:
    body = {k: v for k, v in doc.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def remote_manifest(local: dict, archive: dict) -> dict:
    """The document uploaded as ``<key>.manifest.json``: the local manifest, the archive's size and sha256, and a
    digest of all of it (a flipped byte anywhere in it is refused on pull)."""
    doc = dict(local)
    doc["remote"] = {"format": REMOTE_FORMAT, "archive": {"size": archive["size"], "sha256": archive["sha256"]},
                     "compression": "zstd"}
    doc["manifest_sha256"] = _digest(doc)
    return doc


def local_manifest(remote_doc: dict) -> dict:
    """The artifact's own manifest inside a remote manifest (what ``manifest.json`` holds after a pull)."""
    return {k: v for k, v in remote_doc.items() if k not in ("remote", "manifest_sha256")}


def _is_hex(s: Any, n: int) -> bool:
    return isinstance(s, str) and len(s) == n and set(s) <= _HEX


def check_remote_manifest(doc: Any, stage: str, key: str) -> None:
    """Raise :class:`RemoteError` unless ``doc`` is a well-formed, untouched manifest of ``(stage, key)``."""
    label = f"{stage}/{key[:12]}"
    if not isinstance(doc, dict):
        raise RemoteError(f"pull refused: {label}: manifest.json is not a JSON object")
    if doc.get("manifest_sha256") != _digest(doc):
        raise RemoteError(f"pull refused: {label}: manifest.json does not match its own sha256 (altered or damaged)")
    if doc.get("stage") != stage or doc.get("key") != key:
        raise RemoteError(f"pull refused: {label}: manifest names {doc.get('stage')}/{str(doc.get('key'))[:12]}")
    files = doc.get("files")
    archive = (doc.get("remote") or {}).get("archive") if isinstance(doc.get("remote"), dict) else None
    if not isinstance(files, dict) or not isinstance(archive, dict):
        raise RemoteError(f"pull refused: {label}: manifest.json lacks its file table or archive digest")
    for rel, want in files.items():
        if safe_name(rel) != rel or rel == "manifest.json":
            raise RemoteError(f"pull refused: {label}: manifest names {rel!r}, not a plain relative path")
        if not (isinstance(want, dict) and isinstance(want.get("size"), int) and want["size"] >= 0
                and _is_hex(want.get("sha256"), 64)):
            raise RemoteError(f"pull refused: {label}: manifest entry of {rel} has no valid size and sha256")


# ---- the remote ----------------------------------------------------------------------------------------------------

class Remote:
    """An fsspec file system and a root under it, holding ``<Stage>/<key>.tar.zst`` + ``<Stage>/<key>.manifest.json``."""

    def __init__(self, url: str):
        self.url = url
        self.shown = redact(url)
        try:
            import fsspec  # lazy: start-up time

            self.fs, root = fsspec.core.url_to_fs(url)
        except ImportError as e:
            need = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(
                urlsplit(url).scheme, "the fsspec backend of this protocol")
            raise RemoteError(f"remote {self.shown}: needs the {need} package, which is not installed "
                              f"(pip install {need})") from None
        except (ValueError, TypeError) as e:
            raise RemoteError(f"remote {self.shown}: {self._clean(e)}") from None
        self.root = root.rstrip("/")
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def __repr__(self) -> str:
        return f"Remote({self.shown!r})"

    # ---- errors: one line, never a credential --------------------------------------------------------------------
    def _clean(self, e: BaseException) -> str:
        text = (str(e).splitlines() or [""])[0] or type(e).__name__
        text = text.replace(self.url, self.shown)
        user = urlsplit(self.url).netloc.rpartition("@")[0] if "://" in self.url else ""
        if user:
            text = text.replace(user, "***")
        return text

    @contextlib.contextmanager
    def _io(self, what: str):
        try:
            yield
        except (RemoteError, ArchiveError, FileNotFoundError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise RemoteError(f"remote {self.shown}: {what}: {type(e).__name__}: {self._clean(e)}") from None

    # ---- layout --------------------------------------------------------------------------------------------------
    def archive_path(self, stage: str, key: str) -> str:
        return f"{self.root}/{stage}/{key}.tar.zst"

    def manifest_path(self, stage: str, key: str) -> str:
        return f"{self.root}/{stage}/{key}.manifest.json"

    def _fresh(self, path: str | None = None) -> None:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path) if path else self.fs.invalidate_cache()

    def has(self, stage: str, key: str) -> bool:
        """Whether the remote holds a published artifact (its manifest exists)."""
        path = self.manifest_path(stage, key)
        self._fresh(path.rsplit("/", 1)[0])
        with self._io("checking an artifact"):
            return bool(self.fs.exists(path))

    def manifest(self, stage: str, key: str) -> dict | None:
        """The remote manifest of ``(stage, key)``, checked (None when it is not on the remote)."""
        path = self.manifest_path(stage, key)
        self._fresh(path.rsplit("/", 1)[0])
        try:
            with self._io("reading a manifest"):
                raw = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            raise RemoteError(f"pull refused: {stage}/{key[:12]}: manifest.json is not valid JSON") from None
        check_remote_manifest(doc, stage, key)
        return doc

    def list(self, stage: str | None = None) -> list[tuple[str, str]]:
        """``(stage, key)`` of every published artifact (of ``stage``), sorted."""
        self._fresh()
        pattern = f"{self.root}/{stage or '*'}/*.manifest.json"
        with self._io("listing"):
            try:
                paths = self.fs.glob(pattern)
            except FileNotFoundError:
                return []
        out = []
        for p in paths:
            parts = p.rstrip("/").split("/")
            name, st = parts[-1], parts[-2]
            key = name[: -len(".manifest.json")]
            if _is_hex(key, KEY_LEN):
                out.append((st, key))
        return sorted(out)

    # ---- push ----------------------------------------------------------------------------------------------------
    def push(self, store: Store, stage: str, key: str, *, verify: bool = False,
             progress: Callable[[int], Any] | None = None) -> dict | None:
        """Upload ``(stage, key)`` from ``store`` unless the remote has it: archive first, manifest last.

        Returns ``{"size", "sha256", "bytes"}`` of what was sent, or None when it was already there. Sizes are always
        checked against the local manifest; ``verify`` also re-hashes every file while packing and refuses to send one
        that no longer matches it (without it, such a file is sent, and every pull refuses it, naming the file).
        """
        local = store.manifest(stage, key)
        if local is None:
            raise RemoteError(f"push: {stage}/{key[:12]} is not a complete artifact in {store.root}")
        if self.has(stage, key):
            return None
        label = f"{stage}/{key[:12]}"
        folder = store.path(stage, key)
        with self._io(f"pushing {label}"):
            self.fs.makedirs(f"{self.root}/{stage}", exist_ok=True)
            archive = self._upload(self.archive_path(stage, key),
                                   lambda f: pack(folder, local["files"], f, verify=verify, label=label,
                                                  progress=progress))
            doc = remote_manifest(local, archive)
            body = (json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
            self._upload(self.manifest_path(stage, key), lambda f: f.write(body))  # the publication step
        return {**archive, "bytes": local.get("size", 0)}

    def _upload(self, path: str, write: Callable[[Any], Any]) -> Any:
        """Write ``path`` through a non-autocommit file: nothing appears under ``path`` until all of it is written."""
        f = self.fs.open(path, "wb", autocommit=False)
        try:
            result = write(f)
            f.close()
            f.commit()
            return result
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard()  # an S3 multipart upload is aborted; a local temp file removed
            if hasattr(f, "forced"):  # an fsspec buffered file: never let its __del__ upload the discarded part
                f.closed = True
            else:
                with contextlib.suppress(Exception):
                    f.close()
            raise

    # ---- pull ----------------------------------------------------------------------------------------------------
    def pull(self, store: Store, stage: str, key: str, *, progress: Callable[[int], Any] | None = None,
             doc: dict | None = None) -> Path:
        """Download ``(stage, key)`` into ``store`` after checking every file; nothing local changes on a mismatch."""
        if store.complete(stage, key):
            return store.path(stage, key)
        doc = doc or self.manifest(stage, key)
        if doc is None:
            raise RemoteError(f"pull: {stage}/{key[:12]} is not on the remote {self.shown}")
        label = f"{stage}/{key[:12]}"

        def fill(tmp: Path) -> None:
            with self._io(f"pulling {label}"):
                raw = self.fs.open(self.archive_path(stage, key), "rb")
            try:
                with self._io(f"pulling {label}"):
                    unpack(raw, tmp, doc["files"], doc["remote"]["archive"], label=label, progress=progress)
            except ArchiveError as e:
                raise RemoteError(f"pull refused: {e}; nothing changed locally") from None
            except FileNotFoundError:
                raise RemoteError(f"pull refused: {label}: the manifest is there but the archive is not") from None
            finally:
                with contextlib.suppress(Exception):
                    raw.close()

        try:
            return store.adopt(stage, key, fill, local_manifest(doc))
        except FileNotFoundError:
            raise RemoteError(f"pull refused: {label}: the manifest is there but the archive is not") from None


# ---- progress ------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def byte_bar(desc: str, total: int | None):
    """A tqdm bar in bytes (stderr); yields its ``update``."""
    from tqdm import tqdm  # lazy: start-up time

    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
              mininterval=0.5, file=sys.stderr) as bar:
        yield bar.update


# ---- runs: read-through and push-after-build -----------------------------------------------------------------------

def read_through(task) -> bool | float:
    """Called by ``NestTask.complete()`` for a stage missing locally: pull it when the remote has it (and
    ``remote_mode`` is pull or both). Returns the seconds the pull took (the task records them), or False (build it)
    when it is not there or the pull is refused; the reason is printed in one line.

    In distributed mode (``nest worker``, ``--scheduler-url``: :mod:`pipeline.engine.scheduling`) an artifact on the remote
    counts as done without being pulled (True): the worker that runs a stage needing it pulls it then
    (:func:`pull_inputs`).
    """
    if distributed():
        try:
            remote = active_remote("pull")
            return remote is not None and remote.has(task.stage, task.key)
        except RemoteError as e:
            print(f"[nest] {task.label} {task.key[:12]}: remote not checked ({e})", file=sys.stderr, flush=True)
            return False
    seconds = pull_now(task)
    return False if seconds is None else seconds


def pull_now(task, *, quiet_missing: bool = True) -> float | None:
    """Pull ``task``'s artifact into the local store when the remote has it: the seconds it took, or None (with one
    line) when it was not pulled."""
    try:
        remote = active_remote("pull")
        if remote is None:
            return None
        store = task.store
        doc = remote.manifest(task.stage, task.key)
        if doc is None:
            return None
        print(f"[nest] {task.label} {task.key[:12]}: pulling from {remote.shown}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with byte_bar(f"pull {task.stage}", doc["remote"]["archive"]["size"]) as update:
            remote.pull(store, task.stage, task.key, progress=update, doc=doc)
    except (RemoteError, ArchiveError) as e:
        print(f"[nest] {task.label} {task.key[:12]}: not pulled ({e}); building it", file=sys.stderr, flush=True)
        return None
    seconds = time.perf_counter() - t0
    print(f"[nest] {task.label} {task.key[:12]}: pulled in {seconds:.1f} s", file=sys.stderr, flush=True)
    return seconds


def pull_inputs(task, pulled: Callable[[tuple[str, str], float], Any]) -> None:
    """Distributed mode, before a stage runs: pull every input that is not in the local store (another worker built
    it and pushed it; a sharded stage's merge: its shards), telling ``pulled((stage, key), seconds)`` of each. Raises
    :class:`RemoteError` naming an input that is neither local nor on the remote."""
    for name, dep in task.run_inputs().items():
        if dep.store.complete(dep.stage, dep.key):
            continue
        seconds = pull_now(dep)
        if seconds is None:
            raise RemoteError(f"{task.label}: input {name} ({dep.label} {dep.key[:12]}) is neither in the local store "
                              f"nor on the remote")
        pulled((dep.stage, dep.key), seconds)


def push_built(task, *, strict: bool = False) -> None:
    """Called by ``NestTask.run()`` after a build: push it when ``remote_mode`` is push or both (a failure is
    reported in one line; the local build stands). ``strict`` (distributed mode): a failed push fails the stage, since
    the workers that run its dependents could not pull it."""
    try:
        remote = active_remote("push")
        if remote is None:
            return
        m = task.store.manifest(task.stage, task.key) or {}
        with byte_bar(f"push {task.stage}", m.get("size")) as update:
            sent = remote.push(task.store, task.stage, task.key, progress=update)
        if sent is not None:
            print(f"[nest] {task.label} {task.key[:12]}: pushed to {remote.shown}", file=sys.stderr, flush=True)
    except (RemoteError, ArchiveError) as e:
        print(f"[nest] {task.label} {task.key[:12]}: not pushed ({e})", file=sys.stderr, flush=True)
        if strict:
            raise


def share_local(task) -> bool:
    """Distributed mode, ``complete()`` of a stage found in the local store: make sure the remote has it too (a build
    whose push failed, or an artifact built before this run), so that other workers can pull it. False when the push
    failed: the task then runs, which pushes again (strictly)."""
    try:
        remote = active_remote("push")
        if remote is None or remote.has(task.stage, task.key):
            return True
    except RemoteError as e:
        print(f"[nest] {task.label} {task.key[:12]}: remote not checked ({e})", file=sys.stderr, flush=True)
        return False
    try:
        push_built(task, strict=True)
    except (RemoteError, ArchiveError):
        return False
    return True
