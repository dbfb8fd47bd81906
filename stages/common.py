"""Small shared helpers for stages: file digests (memoised), compressed text streams, atomic file writes."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from stages.errors import InputError

_DIGEST_CACHE = Path(os.environ.get("NEST_DIGEST_CACHE", Path.home() / ".cache" / "nest" / "digests.json"))


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 hex of a file, memoised on (absolute path, size, mtime_ns) so a no-op run does not re-hash large files."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = f"{st.st_size}:{st.st_mtime_ns}"
    cache: dict = {}
    with contextlib.suppress(OSError, ValueError):
        cache = json.loads(_DIGEST_CACHE.read_text())
    hit = cache.get(str(path))
    if hit and hit.get("stamp") == stamp:
        return hit["sha256"]
    digest = _sha256(path)
    cache[str(path)] = {"stamp": stamp, "sha256": digest}
    with contextlib.suppress(OSError):
        _DIGEST_CACHE.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(_DIGEST_CACHE, json.dumps(cache))
    return digest


def tree_digest(root: str | Path, pattern: str = "**/*") -> str:
    """Digest of every file under ``root`` (relative names and contents), independent of where ``root`` lives."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(q for q in root.glob(pattern) if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(file_digest(p).encode())
    return h.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and an atomic rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def open_binary(path: str | Path) -> Iterator[io.BufferedIOBase]:
    """Open plain, ``.gz`` or ``.zst`` files for streaming binary reads (decompressed)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".gz"):
        raw = gzip.open(path, "rb")
    elif name.endswith(".zst") or name.endswith(".zstd"):
        import zstandard

        raw = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    else:
        raw = open(path, "rb")
    try:
        yield raw
    finally:
        raw.close()


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` (1-based, newline stripped) from plain/.gz/.zst text.

    Each line is decoded on its own, so a non-UTF-8 byte raises :class:`InputError` naming the exact line.
    """
    with open_binary(path) as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(path, n, f"not valid UTF-8 ({e.reason} at byte {e.start} of the line)") from None
            yield n, line.rstrip("\r\n")
