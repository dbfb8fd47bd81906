"""Remote stores: push and pull artifacts through fsspec (a folder, ``file://``, ``s3://``, ``gs://``, ...).

An artifact ``(stage, key)`` is two objects under the remote's root:

- ``<Stage>/<key>.tar.zst``: its files as a deterministic tar stream, zstandard-compressed (``pipeline.storage.archive``);
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
sha256 (and the archive's), and only then publishes through :meth:`pipeline.storage.store.Store.adopt` (temp folder, rename,
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
import errno
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from pipeline.sharing.protocol import (STAGE_RE, STALE_HOURS, TEMP_MARK, RemoteError, check_names,
                                       check_remote_manifest, local_manifest, redact, remote_manifest, remote_mode,
                                       remote_url)
from pipeline.storage.archive import TAIL, ArchiveError, pack, unpack
from pipeline.storage.store import KEY_LEN, Store

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
                                                                   label=label, progress=progress, digest=False))
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
        result = self._write_local(stage, final, write) if self.local else self._upload(final, write)
        self._read_back(final, result)
        return result

    def _write_local(self, stage: str, final: str, write: Callable[[Any], Any]) -> Any:
        """A folder remote's publication of one file: ``write(f)`` into a temp name beside ``final`` (never in
        ``$TMPDIR``: the rename must stay on the remote's file system), fsync, rename over ``final``, fsync the folder;
        the temp is removed on any failure."""
        tmp = f"{final.rsplit('/', 1)[0]}/.{final.rsplit('/', 1)[1]}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
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
            self._write_local(stage, path, lambda f: f.write(body))
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
    from tqdm import tqdm  # lazy: start-up time

    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
              mininterval=0.5, file=sys.stderr) as bar:
        yield bar.update
