"""Remote stores: push and pull artifacts through fsspec (a folder, ``file://``, ``s3://``, ``gs://``, ...).

An artifact ``(stage, key)`` is two objects under the remote's root:

- ``<Stage>/<key>.tar.zst``: its files as a deterministic tar stream, zstandard-compressed (``pipeline.archive``);
- ``<Stage>/<key>.manifest.json``: the artifact's manifest plus ``remote.archive`` (the archive's size, sha256 and last
  bytes) and ``manifest_sha256`` (over the rest of the document: it detects damage, not tampering; anyone who can write
  to the remote can recompute it), uploaded **last**, only after the archive's size and last bytes (zstd's content
  checksum) were read back. Object stores cannot rename, so this order is the publication step: an archive without
  its manifest is invisible.

A folder remote gets each object under a temp name in its own folder, renamed into place (nothing is staged in
``$TMPDIR``, and a final name never shows a partial file); S3 a multipart upload completed at the end (aborted on
failure; ``nest push --clean-stale`` aborts those killed pushes left). A remote artifact counts (:meth:`Remote.has`)
only when its manifest is well formed and its archive has the recorded size; a push replaces a copy that does not.

A pull reads the manifest, checks its own digest, streams the archive into a temp folder checking each file's size and
sha256 (and the archive's), and only then publishes through :meth:`pipeline.store.Store.adopt` (temp folder, rename,
manifest last). Any mismatch raises :class:`RemoteError` with one line naming the artifact and the file; nothing local
changes. Every stage name and key from a listing or a manifest is checked (:func:`check_names`) before a path is made
of it. Credentials come from each library's own configuration (AWS/botocore environment and files, gcloud ...); a
URL's user/password part is never printed (:func:`redact`).

Configuration: ``[nest] remote`` (or ``$NEST_REMOTE``) and ``[nest] remote_mode`` (or ``$NEST_REMOTE_MODE``):
``pull`` (default: a run pulls a missing stage from the remote instead of building it), ``push`` (a run pushes what it
builds), ``both``, ``off``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import errno
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit, urlunsplit

from pipeline.archive import TAIL, ArchiveError, pack, safe_name, unpack
from pipeline.store import KEY_LEN, Store

REMOTE_FORMAT = 1
MODES = ("pull", "push", "both", "off")
_HEX = set("0123456789abcdef")
STAGE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
RESERVED_STAGES = frozenset({"runs"})  # folders of the store itself
TEMP_MARK = ".tmp-"  # a folder remote's temp names: .<key>.tar.zst.tmp-<pid>-<hex> beside the archive
STALE_HOURS = 24.0


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
    from pipeline import config

    value = os.environ.get("NEST_REMOTE")
    if value is None:
        value = config.config().get("nest", "remote", "")
    return value.strip() or None


def remote_mode() -> str:
    """``$NEST_REMOTE_MODE``, else ``[nest] remote_mode`` (default ``pull``)."""
    from pipeline import config

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


def check_names(stage: Any, key: Any, where: str = "the remote") -> None:
    """Raise :class:`RemoteError` unless ``stage`` is a stage name (an identifier, not a folder of the store itself)
    and ``key`` a content key (64 lowercase hex): called on every name that comes from a remote listing or a manifest,
    before any path is made of it."""
    if not (isinstance(stage, str) and STAGE_RE.fullmatch(stage) and stage not in RESERVED_STAGES):
        raise RemoteError(f"refused: {where} names the stage {str(stage)[:80]!r}, not a stage name; nothing written")
    if not _is_hex(key, KEY_LEN):
        raise RemoteError(f"refused: {where} names the key {str(key)[:80]!r} of {stage}, not a 64-hex content key; "
                          f"nothing written")


def remote_manifest(local: dict, archive: dict) -> dict:
    """The document uploaded as ``<key>.manifest.json``: the local manifest, the archive's size, sha256 and last bytes
    (``tail``: the zstd frame's content checksum, read back before this document is published), and
    ``manifest_sha256``, a digest of all of it. That digest catches damage (a flipped byte anywhere in the document is
    refused on pull), not tampering: anyone who can write to the remote can recompute it."""
    doc = dict(local)
    recorded = {k: archive[k] for k in ("size", "sha256", "head", "tail") if k in archive}
    doc["remote"] = {"format": REMOTE_FORMAT, "archive": recorded, "compression": "zstd"}
    doc["manifest_sha256"] = _digest(doc)
    return doc


def local_manifest(remote_doc: dict) -> dict:
    """The artifact's own manifest inside a remote manifest (what ``manifest.json`` holds after a pull)."""
    return {k: v for k, v in remote_doc.items() if k not in ("remote", "manifest_sha256")}


def _is_hex(s: Any, n: int) -> bool:
    return isinstance(s, str) and len(s) == n and set(s) <= _HEX


def check_remote_manifest(doc: Any, stage: str, key: str) -> None:
    """Raise :class:`RemoteError` unless ``doc`` is a well-formed, untouched manifest of ``(stage, key)``."""
    check_names(stage, key)
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
    size = archive.get("size")
    if not (type(size) is int and size >= 0):
        raise RemoteError(f"pull refused: {label}: manifest.json records no valid archive size")
    if not _is_hex(archive.get("sha256"), 64):
        raise RemoteError(f"pull refused: {label}: manifest.json records no valid archive sha256")
    for part in ("head", "tail"):
        if part in archive and not (isinstance(archive[part], str) and len(archive[part]) <= 64
                                    and set(archive[part]) <= _HEX and len(archive[part]) % 2 == 0):
            raise RemoteError(f"pull refused: {label}: manifest.json records no valid archive {part}")
    inputs = doc.get("inputs", {})
    if not isinstance(inputs, dict):
        raise RemoteError(f"pull refused: {label}: manifest.json inputs are not a table")
    for name, ref in inputs.items():
        if not isinstance(ref, dict):
            raise RemoteError(f"pull refused: {label}: input {str(name)[:40]!r} is not a stage and key")
        try:
            check_names(ref.get("stage"), ref.get("key"), where=f"{label}'s manifest (input {str(name)[:40]!r})")
        except RemoteError as e:
            raise RemoteError(f"pull {e}") from None
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
            import fsspec

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
        check_names(stage, key)
        return f"{self.root}/{stage}/{key}.tar.zst"

    def manifest_path(self, stage: str, key: str) -> str:
        check_names(stage, key)
        return f"{self.root}/{stage}/{key}.manifest.json"

    def _fresh(self, path: str | None = None) -> None:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path) if path else self.fs.invalidate_cache()

    def check_exists(self) -> None:
        """Raise :class:`RemoteError` (one line) when the remote's folder (a folder remote) or bucket does not exist:
        reading from a mistyped remote is an error, not an empty remote. A push creates a missing folder."""
        if getattr(self, "_exists", False):
            return
        with self._io("checking the remote"):
            if self.local:
                ok = os.path.isdir(self.root)
                what = "folder"
            else:
                bucket = self.root.split("/", 1)[0]
                self._fresh(bucket)
                ok = bool(self.fs.exists(bucket))
                what = "bucket"
        if not ok:
            raise RemoteError(f"remote {self.shown}: no such {what} (check [nest] remote, $NEST_REMOTE or --remote)")
        self._exists = True

    def check(self, stage: str, key: str) -> tuple[dict | None, str | None]:
        """``(manifest, problem)`` of ``(stage, key)`` on the remote, cheaply (no archive byte read): ``(None, None)``
        when it is not published; ``(doc, None)`` when its manifest is well formed and its archive is there with the
        size the manifest records; otherwise the problem in a few words (a damaged or half-replaced artifact)."""
        try:
            doc = self.manifest(stage, key)
        except RemoteError as e:
            if str(e).startswith("pull refused: "):
                return None, str(e)[len("pull refused: "):]
            raise
        if doc is None:
            return None, None
        size = doc["remote"]["archive"]["size"]
        with self._io("checking an archive"):
            try:
                info = self.fs.info(self.archive_path(stage, key))
            except FileNotFoundError:
                return doc, f"{stage}/{key[:12]}: the manifest is there but the archive is not"
        if info.get("type", "file") != "file" or info.get("size") != size:
            return doc, f"{stage}/{key[:12]}: archive has {info.get('size')} bytes, the manifest says {size}"
        return doc, None

    def has(self, stage: str, key: str) -> bool:
        """Whether the remote holds a published artifact: its manifest is well formed and its archive is there with
        the recorded size (a missing, truncated or half-replaced archive does not count; a flipped byte is found by
        the pull, which refuses it)."""
        doc, problem = self.check(stage, key)
        return doc is not None and problem is None

    def manifest(self, stage: str, key: str) -> dict | None:
        """The remote manifest of ``(stage, key)``, checked (None when it is not on the remote)."""
        path = self.manifest_path(stage, key)
        self.check_exists()
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
        """``(stage, key)`` of every published artifact (of ``stage``), sorted. A name that is not a stage name or a
        content key (``..``, ``runs``, a crafted object key) is left out and told in :attr:`refused` (one line each)."""
        self.check_exists()
        if stage is not None:
            check_names(stage, "0" * KEY_LEN)
        self._fresh()
        pattern = f"{self.root}/{stage or '*'}/*.manifest.json"
        with self._io("listing"):
            try:
                paths = self.fs.glob(pattern)
            except FileNotFoundError:
                return []
        out, self.refused = [], []
        for p in paths:
            parts = p.rstrip("/").split("/")
            name, st = parts[-1], parts[-2]
            key = name[: -len(".manifest.json")]
            try:
                check_names(st, key, where=f"the remote listing ({'/'.join(parts[-2:])[:120]!r})")
            except RemoteError as e:
                self.refused.append(str(e))
                continue
            out.append((st, key))
        return sorted(out)

    refused: list[str] = []

    # ---- push ----------------------------------------------------------------------------------------------------
    def push(self, store: Store, stage: str, key: str, *, verify: bool = False, force: bool = False,
             progress: Callable[[int], Any] | None = None) -> dict | None:
        """Upload ``(stage, key)`` from ``store`` unless the remote has it whole: archive first, read back, manifest
        last.

        Returns ``{"size", "tail", "bytes", "replaced"}`` of what was sent, or None when it was already there. What the
        remote holds is checked cheaply first (:meth:`check`): a damaged copy (unreadable manifest, missing archive or
        one of the wrong size) is replaced. ``verify`` also re-hashes every local file while packing (refusing to send
        one that no longer matches its manifest) and reads the remote copy whole, checking every byte: a damaged copy
        raises :class:`RemoteError` naming the problem, unless ``force``. ``force`` replaces the remote copy (with
        ``verify``: only a damaged one).
        """
        check_names(stage, key, where="push")
        local = store.manifest(stage, key)
        if local is None:
            raise RemoteError(f"push: {stage}/{key[:12]} is not a complete artifact in {store.root}")
        label = f"{stage}/{key[:12]}"
        with self._io(f"pushing {label}"):
            self.fs.makedirs(f"{self.root}/{stage}", exist_ok=True)  # a push may create the remote
            self._exists = True
        doc, problem = self.check(stage, key)
        if doc is not None and problem is None and verify:
            problem = self.verify(stage, key, doc)
        if doc is not None and problem is None and not (force and not verify):
            return None
        if problem is not None and verify and not force:
            raise RemoteError(f"push: {problem} (damaged on the remote {self.shown}; `nest push --force` replaces it)")
        folder = store.path(stage, key)
        with self._io(f"pushing {label}"):
            archive = self._put_archive(stage, key, lambda f: pack(folder, local["files"], f, verify=verify,
                                                                   label=label, progress=progress))
            doc = remote_manifest(local, archive)
            body = (json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
            self._put_manifest(stage, key, body)  # the publication step, after the archive was read back
        return {**archive, "bytes": local.get("size", 0), "replaced": problem or ("forced" if force else None)}

    def verify(self, stage: str, key: str, doc: dict | None = None) -> str | None:
        """Read the remote copy of ``(stage, key)`` whole and check every byte (the archive's size and zstd checksum,
        every file's size and sha256) without writing anything; the problem in one line, or None."""
        doc = doc or self.manifest(stage, key)
        label = f"{stage}/{key[:12]}"
        try:
            with self._io(f"verifying {label}"):
                raw = self.fs.open(self.archive_path(stage, key), "rb")
        except FileNotFoundError:
            return f"{label}: the manifest is there but the archive is not"
        try:
            with self._io(f"verifying {label}"):
                unpack(raw, None, doc["files"], doc["remote"]["archive"], label=label)
        except ArchiveError as e:
            return str(e)
        finally:
            with contextlib.suppress(Exception):
                raw.close()
        return None

    def _put_archive(self, stage: str, key: str, write: Callable[[Any], dict]) -> dict:
        """Write the archive under its final name whole or not at all, then read its size and last bytes back.

        A folder remote: written to a temp name in the archive's own folder (``.<key>.tar.zst.tmp-<pid>-<hex>``),
        fsynced, renamed over the final name (atomic on one file system), the folder fsynced; nothing is staged in
        ``$TMPDIR``, and the temp file is removed on any failure (a ``kill -9`` leaves it, under a name no listing or
        pull reads; ``nest push --clean-stale`` removes old ones). Elsewhere (S3, GCS): fsspec's non-autocommit file
        (S3: a multipart upload completed at the end, aborted on failure)."""
        final = self.archive_path(stage, key)
        if self.local:
            tmp = f"{self.root}/{stage}/.{key}.tar.zst{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
            try:
                with open(tmp, "xb") as f:
                    result = write(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            with contextlib.suppress(OSError):
                _fsync_dir(f"{self.root}/{stage}")
        else:
            result = self._upload(final, write)
        self._read_back(final, result)
        return result

    def _read_back(self, path: str, archive: dict) -> None:
        """Refuse to publish a manifest unless the archive now under ``path`` has the size and last bytes just sent."""
        self._fresh(path.rsplit("/", 1)[0])
        size = self.fs.info(path).get("size")
        tail = self.fs.cat_file(path, start=max(0, archive["size"] - TAIL)) if size == archive["size"] else b""
        if size != archive["size"] or tail.hex() != archive["tail"]:
            raise RemoteError(f"push: {path.rsplit('/', 2)[-2]}/{path.rsplit('/', 1)[-1][:12]}: the archive read "
                              f"back has {size} bytes (sent {archive['size']}) or another end; manifest not published")

    def _put_manifest(self, stage: str, key: str, body: bytes) -> None:
        path = self.manifest_path(stage, key)
        if self.local:
            tmp = f"{self.root}/{stage}/.{key}.manifest.json{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
            try:
                with open(tmp, "xb") as f:
                    f.write(body)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            with contextlib.suppress(OSError):
                _fsync_dir(f"{self.root}/{stage}")
        else:
            self._upload(path, lambda f: f.write(body))

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
                f.discard()  # an S3 multipart upload is aborted
            if hasattr(f, "forced"):  # an fsspec buffered file: never let its __del__ upload the discarded part
                f.closed = True
            else:
                with contextlib.suppress(Exception):
                    f.close()
            raise

    def clean_stale(self, hours: float = STALE_HOURS) -> list[str]:
        """Remove what killed pushes left that is older than ``hours``: a folder remote's temp files, an S3 bucket's
        incomplete multipart uploads under the remote's root (billable until aborted). Returns one line per item."""
        cutoff = time.time() - hours * 3600
        gone: list[str] = []
        with self._io("cleaning stale uploads"):
            if self.local:
                if not os.path.isdir(self.root):
                    return gone
                for stage in sorted(os.listdir(self.root)):
                    folder = os.path.join(self.root, stage)
                    if not STAGE_RE.fullmatch(stage) or os.path.islink(folder) or not os.path.isdir(folder):
                        continue
                    for name in sorted(os.listdir(folder)):
                        path = os.path.join(folder, name)
                        if (name.startswith(".") and TEMP_MARK in name and not os.path.islink(path)
                                and os.path.isfile(path) and os.lstat(path).st_mtime < cutoff):
                            os.unlink(path)
                            gone.append(f"{stage}/{name}")
            elif hasattr(self.fs, "call_s3"):
                bucket, _, prefix = self.root.partition("/")
                reply = self.fs.call_s3("list_multipart_uploads", Bucket=bucket,
                                        **({"Prefix": prefix + "/"} if prefix else {}))
                for up in reply.get("Uploads", []):
                    started = up.get("Initiated")
                    if started is not None and started.timestamp() < cutoff:
                        self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"],
                                        UploadId=up["UploadId"])
                        gone.append(f"multipart upload of {up['Key']}")
        return gone

    # ---- pull ----------------------------------------------------------------------------------------------------
    def pull(self, store: Store, stage: str, key: str, *, progress: Callable[[int], Any] | None = None,
             doc: dict | None = None) -> Path:
        """Download ``(stage, key)`` into ``store`` after checking every file; nothing local changes on a mismatch."""
        check_names(stage, key)  # before any local path is made of them
        if store.complete(stage, key):
            return store.path(stage, key)
        doc = doc or self.manifest(stage, key)
        if doc is None:
            raise RemoteError(f"pull: {stage}/{key[:12]} is not on the remote {self.shown}")
        check_remote_manifest(doc, stage, key)
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
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT):
                raise RemoteError(f"pull: {label}: cannot write into the store {store.root} ({e.strerror})") from None
            raise


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- progress ------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def byte_bar(desc: str, total: int | None):
    """A tqdm bar in bytes (stderr); yields its ``update``."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
              mininterval=0.5, file=sys.stderr) as bar:
        yield bar.update


# ---- runs: read-through and push-after-build -----------------------------------------------------------------------

def read_through(task) -> bool:
    """Called by ``NestTask.complete()`` for a stage missing locally: pull it when the remote has it (and
    ``remote_mode`` is pull or both). False (build it) when it is not there or the pull is refused; the reason is
    printed in one line.

    In distributed mode (``nest worker``, ``--scheduler-url``: :mod:`pipeline.scheduling`) an artifact on the remote
    counts as done without being pulled: the worker that runs a stage needing it pulls it then (:func:`pull_inputs`).
    """
    from pipeline.scheduling import distributed

    if distributed():
        try:
            remote = active_remote("pull")
            return remote is not None and remote.has(task.stage, task.key)
        except RemoteError as e:
            print(f"[nest] {task.label} {task.key[:12]}: remote not checked ({e})", file=sys.stderr, flush=True)
            return False
    return pull_now(task)


def pull_now(task, *, quiet_missing: bool = True) -> bool:
    """Pull ``task``'s artifact into the local store when the remote has it; False (with one line) otherwise."""
    from pipeline.base import RUN_LOG

    try:
        remote = active_remote("pull")
        if remote is None:
            return False
        store = task.store
        doc = remote.manifest(task.stage, task.key)
        if doc is None:
            return False
        print(f"[nest] {task.label} {task.key[:12]}: pulling from {remote.shown}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with byte_bar(f"pull {task.stage}", doc["remote"]["archive"]["size"]) as update:
            remote.pull(store, task.stage, task.key, progress=update, doc=doc)
    except (RemoteError, ArchiveError) as e:
        print(f"[nest] {task.label} {task.key[:12]}: not pulled ({e}); building it", file=sys.stderr, flush=True)
        return False
    seconds = time.perf_counter() - t0
    RUN_LOG.note("pulled", (task.stage, task.key), seconds)
    print(f"[nest] {task.label} {task.key[:12]}: pulled in {seconds:.1f} s", file=sys.stderr, flush=True)
    return True


def pull_inputs(task) -> None:
    """Distributed mode, before a stage runs: pull every input that is not in the local store (another worker built
    it and pushed it; a sharded stage's merge: its shards). An input whose remote copy is damaged (the pull refuses
    it, in one line) is built here instead, and pushed over the damaged copy. Raises :class:`RemoteError` naming an
    input that is neither local nor on the remote."""
    for name, dep in task.run_inputs().items():
        if dep.store.complete(dep.stage, dep.key):
            continue
        if pull_now(dep):
            continue
        remote = active_remote("pull")
        if remote is not None and remote.check(dep.stage, dep.key)[0] is not None:
            build_here(dep)  # on the remote but refused: damaged there
            continue
        raise RemoteError(f"{task.label}: input {name} ({dep.label} {dep.key[:12]}) is neither in the local store "
                          f"nor on the remote")


def build_here(task) -> None:
    """Build ``task``'s artifact in this worker (its inputs pulled, or built here the same way) and push it over the
    damaged remote copy: what a refused pull of an input falls back to in distributed mode."""
    from pipeline.base import RUN_LOG

    pull_inputs(task)
    print(f"[nest] {task.label} {task.key[:12]}: building it here (its remote copy was refused)", file=sys.stderr,
          flush=True)
    t0 = time.perf_counter()
    task.store.publish(task.stage, task.key, task.build, version=task.stage_version(), params=task.key_params,
                       inputs={n: (t.stage, t.key) for n, t in task.inputs().items()})
    RUN_LOG.note("built", (task.stage, task.key), time.perf_counter() - t0)  # the run record lists it as built
    remote = active_remote("push")
    if remote is not None:
        remote.push(task.store, task.stage, task.key, force=True)


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


# ---- status and pull planning --------------------------------------------------------------------------------------

def needed_from(tasks_dep_first: list, local: Callable[[Any], bool], remote: Callable[[Any], bool]) -> tuple[set, set]:
    """Walk the DAG from its targets: a stage cached locally or on the remote stops the walk (what it was built from
    is not needed). Returns (task_ids to pull, task_ids to build)."""
    inputs_of = {t.task_id: list(t.deps()) for t in tasks_dep_first}  # identity inputs and shards
    required = {d.task_id for deps in inputs_of.values() for d in deps}
    needed = {t.task_id for t in tasks_dep_first if t.task_id not in required}  # the targets
    pull, build = set(), set()
    for t in reversed(tasks_dep_first):  # dependents before their inputs
        if t.task_id not in needed or local(t):
            continue
        if remote(t):
            pull.add(t.task_id)
            continue
        build.add(t.task_id)
        needed.update(d.task_id for d in inputs_of[t.task_id])
    return pull, build


def mark_remote(rows: list, remote: "Remote") -> None:
    """``nest status``: a stage missing locally but on the remote becomes ``remote`` (pulled, not built); a stage only
    needed to build what is cached or on the remote becomes ``not needed``."""
    tasks = [s.task for s in rows]
    cached = {s.task.task_id for s in rows if s.state == "cached"}
    on_remote = {t.task_id for t in tasks if t.task_id not in cached and remote.has(t.stage, t.key)}
    pull, build = needed_from(tasks, lambda t: t.task_id in cached, lambda t: t.task_id in on_remote)
    for s in rows:
        tid = s.task.task_id
        if tid in cached:
            continue
        if tid in pull:
            s.state, s.reasons, s.compared_with = "remote", [f"on the remote {remote.shown} (pulled, not built)"], None
        elif tid not in build:
            s.state, s.reasons, s.compared_with = "not needed", ["what uses it is cached or on the remote"], None


def transfer(items: Iterable[tuple[str, str]], fn: Callable[[str, str, Callable[[int], Any]], Any],
             sizes: Callable[[str, str], int | None], verb: str) -> tuple[list, list[str]]:
    """Run ``fn(stage, key, progress)`` over ``items`` with an artifact bar and a byte bar; (results, error lines)."""
    from tqdm import tqdm

    items = list(items)
    results, errors = [], []
    with tqdm(total=len(items), desc=verb, unit="artifact", mininterval=0.5, file=sys.stderr) as bar:
        for stage, key in items:
            try:
                with byte_bar(f"{stage} {key[:12]}", sizes(stage, key)) as update:
                    results.append((stage, key, fn(stage, key, update)))
            except (RemoteError, ArchiveError) as e:
                errors.append(str(e))
            bar.update(1)
    return results, errors
