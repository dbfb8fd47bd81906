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

_UMASK = os.umask(0o022)
os.umask(_UMASK)
_DIGEST_CACHE = Path(os.environ.get("NEST_DIGEST_CACHE", Path.home() / ".cache" / "nest" / "digests.json"))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 hex of a file's bytes, streamed."""
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
    digest = sha256_file(path)
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


def atomic_write_text(path: str | Path, text: str, fsync: bool = False) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and an atomic rename; with ``fsync`` the bytes
    reach the disk before the rename (a power cut leaves the old file or the whole new one)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _ZstdReader(io.RawIOBase):
    """Decompress a ``.zst`` file (one frame or several concatenated), streamed, and check that the last frame ends.

    ``zstandard``'s stream reader stops silently when a file is cut between two blocks; this reader keeps its own
    decompression object per frame and raises :class:`InputError` when the file ends inside a frame (truncated) or the
    bytes are not zstd data (corrupt)."""

    def __init__(self, path: Path, chunk: int = 1 << 17):
        import zstandard

        self.path, self.chunk = path, chunk
        self._zstd = zstandard
        self._f = open(path, "rb")
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._in_frame = False  # bytes of the current frame were fed and its end not seen yet
        self._pending = b""
        self._done = False

    def readable(self) -> bool:
        return True

    def _feed(self, data: bytes) -> bytes:
        out = []
        while data:
            try:
                out.append(self._obj.decompress(data))
            except self._zstd.ZstdError as e:
                raise InputError(self.path, None, f"corrupt zstd data ({e})") from None
            self._in_frame = True
            if not self._obj.eof:
                break
            self._in_frame = False  # a frame ended: what follows is the next frame
            data = self._obj.unused_data
            self._obj = self._dctx.decompressobj()
        return b"".join(out)

    def readinto(self, buf) -> int:
        while not self._pending and not self._done:
            data = self._f.read(self.chunk)
            if not data:
                self._done = True
                if self._in_frame:
                    raise InputError(self.path, None, "truncated zstd file: it ends inside a frame (an incomplete "
                                                      "copy or download?)")
                break
            self._pending = self._feed(data)
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


class _GzipReader(io.RawIOBase):
    """``gzip`` streamed, with a truncated or corrupt file turned into one :class:`InputError` naming the file."""

    def __init__(self, path: Path):
        self.path = path
        self._g = gzip.open(path, "rb")

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        import zlib

        try:
            return self._g.readinto(buf)
        except EOFError:
            raise InputError(self.path, None, "truncated gzip file: it ends before the end-of-stream marker (an "
                                              "incomplete copy or download?)") from None
        except (gzip.BadGzipFile, zlib.error) as e:
            raise InputError(self.path, None, f"corrupt gzip data ({e})") from None

    def close(self) -> None:
        self._g.close()
        super().close()


@contextlib.contextmanager
def open_binary(path: str | Path) -> Iterator[io.BufferedIOBase]:
    """Open plain, ``.gz`` or ``.zst`` files for streaming binary reads (decompressed).

    A truncated or corrupt ``.gz``/``.zst`` raises :class:`InputError` (one line naming the file) when the reader gets
    there; a ``.zst`` cut exactly between two blocks is caught too (the last frame must end)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".gz"):
        raw = io.BufferedReader(_GzipReader(path))
    elif name.endswith(".zst") or name.endswith(".zstd"):
        raw = io.BufferedReader(_ZstdReader(path))
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


class ShardedWriter:
    """Append rows to zstd Parquet shards ``prefix-00000.parquet``, ``prefix-00001.parquet``, ... in ``out_dir``.

    Every shard holds exactly ``rows_per_shard`` rows (the last one fewer) and its row groups hold ``row_group_size``
    rows (the last group of a shard may be shorter), so a reader finds row ``i`` in shard ``i // rows_per_shard`` and
    reads one small row group to get it. Rows are buffered only up to one row group. Each shard is written to a hidden
    temp name and renamed when complete. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, out_dir: str | Path, prefix: str, schema, rows_per_shard: int, row_group_size: int):
        if rows_per_shard < 1 or row_group_size < 1:
            raise ValueError("rows_per_shard and row_group_size must be >= 1")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.schema = schema
        self.rows_per_shard = int(rows_per_shard)
        self.row_group_size = int(min(row_group_size, rows_per_shard))
        self.shards: list[dict] = []  # {"file": name, "rows": n}
        self.num_rows = 0
        self._pending: list = []
        self._pending_rows = 0
        self._writer = None
        self._tmp: Path | None = None
        self._shard_rows = 0

    def write(self, data) -> None:
        """Append a ``pyarrow.Table`` or ``RecordBatch`` (or a dict of columns) with this writer's schema."""
        import pyarrow as pa

        if isinstance(data, dict):
            data = pa.table(data, schema=self.schema)
        elif isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        if data.num_rows == 0:
            return
        if not data.schema.equals(self.schema):
            data = data.select(self.schema.names).cast(self.schema)
        self._pending.append(data)
        self._pending_rows += data.num_rows
        while self._pending_rows >= self._next_group_rows():
            self._flush_group(self._next_group_rows())

    def _next_group_rows(self) -> int:
        return min(self.row_group_size, self.rows_per_shard - self._shard_rows)

    def _flush_group(self, n: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = self._pending[0] if len(self._pending) == 1 else pa.concat_tables(self._pending)
        group, rest = table.slice(0, n), table.slice(n)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows -= n
        if self._writer is None:
            name = f"{self.prefix}-{len(self.shards):05d}.parquet"
            self._tmp = self.out_dir / f".{name}.tmp"
            self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
            self.shards.append({"file": name, "rows": 0})
        self._writer.write_table(group.combine_chunks(), row_group_size=n)
        self._shard_rows += n
        self.num_rows += n
        self.shards[-1]["rows"] = self._shard_rows
        if self._shard_rows == self.rows_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        os.replace(self._tmp, self.out_dir / self.shards[-1]["file"])
        self._writer, self._tmp, self._shard_rows = None, None, 0

    def close(self) -> list[dict]:
        """Flush what is buffered, finish the last shard and return ``[{"file", "rows"}, ...]``."""
        while self._pending_rows:
            self._flush_group(min(self._pending_rows, self._next_group_rows()))
        self._close_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (its temp file) without publishing it."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._writer = None

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
