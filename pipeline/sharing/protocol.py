"""What a remote holds and how it is named: its URL and mode (``[nest] remote``, ``remote_mode``), the checks on the
stage names and keys read from it, and the remote manifest (the artifact's manifest plus ``remote.archive`` and
``manifest_sha256``). pipeline/sharing/remote.py moves the objects."""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pipeline.engine import config
from pipeline.storage.archive import safe_name
from pipeline.storage.store import KEY_LEN

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
    # the archive's sha256: what a manifest without the archive's first bytes is checked by (older pushes); a newer
    # one relies on the first bytes, zstd's content checksum and every file's sha256, which cover every byte
    if ("head" not in archive or "sha256" in archive) and not _is_hex(archive.get("sha256"), 64):
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
