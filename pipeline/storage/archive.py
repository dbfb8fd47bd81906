"""An artifact folder as one streamed ``.tar.zst``: packing for a push, checked extraction for a pull.

Both directions stream in constant memory whatever the artifact's size: files are read and written in 1 MiB chunks,
the tar stream is never seeked, and zstandard compresses in a bounded window (multi-threaded when ``threads`` allows).
Every archive carries zstd's content checksum.
Archives are deterministic for the same files: names sorted, owner, times and modes normalised, and zstandard's
multi-threaded output does not depend on the number of threads, so two machines pushing the same artifact write the
same bytes.

Extraction accepts only regular files (each named in the manifest, once) and folders, under the destination. It runs
tarfile's ``data`` filter on every member and refuses, in one line, absolute names, ``..``, links, device files and
anything else; every file's size and sha256 is checked while it is written, the archive's size and zstd frame checksum
at its end (and its sha256 when the manifest records one, as every remote manifest does).
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import tarfile
import threading
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, Mapping

import zstandard

CHUNK = 1 << 20
LEVEL = 3
TAIL = 8  # bytes of an archive's end read back after an upload (the last 4: zstd's content checksum)
HEAD = 32  # bytes of an archive's start recorded in its manifest (zstd's frame header: at most 18)


class ArchiveError(Exception):
    """An archive that must not be extracted (one line: the artifact, the member, what is wrong)."""


class _HashingWriter(io.RawIOBase):
    """Write-through wrapper counting what passes (the archive's bytes on their way to the remote), keeping its last
    ``TAIL`` bytes and, with ``digest``, hashing it on a second thread (hashlib releases the GIL), in the same pass."""

    def __init__(self, out: BinaryIO, progress: Callable[[int], Any] | None = None, digest: bool = True):
        self.out, self.progress = out, progress
        self.sha = hashlib.sha256()
        self.size = 0
        self.tail = b""
        self.head = b""
        self._q: queue.Queue | None = queue.Queue(maxsize=16) if digest else None
        if digest:
            self._thread = threading.Thread(target=self._hash, daemon=True)
            self._thread.start()

    def _hash(self) -> None:
        while (chunk := self._q.get()) is not None:
            self.sha.update(chunk)

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = len(b)
        b = bytes(b)
        if self._q is not None:
            self._q.put(b)
        self.out.write(b)
        self.size += n
        self.tail = (self.tail + b[-TAIL:])[-TAIL:]
        if len(self.head) < HEAD:
            self.head = (self.head + b[:HEAD])[:HEAD]
        if self.progress:
            self.progress(n)
        return n

    def digest(self) -> str:
        """The sha256 of everything written (call once, after the last write)."""
        self._q.put(None)
        self._thread.join()
        self._q = None
        return self.sha.hexdigest()

    def close(self) -> None:
        if self._q is not None:
            self._q.put(None)
            self._thread.join()
            self._q = None
        super().close()


class _HashingReader:
    """Read-through wrapper counting the archive's bytes as they arrive from the remote, keeping its first ``HEAD``
    bytes and, with ``digest``, hashing it on a second thread (hashlib releases the GIL). zstandard's stream reader
    calls :meth:`read` directly: no buffering layer copies the bytes again."""

    def __init__(self, raw: BinaryIO, progress: Callable[[int], Any] | None = None, digest: bool = True):
        self.raw, self.progress = raw, progress
        self.sha = hashlib.sha256()
        self.size = 0
        self.head = b""
        self.hashing = digest
        self._q: queue.Queue = queue.Queue(maxsize=16)
        self._thread = threading.Thread(target=self._hash, daemon=True)
        if digest:
            self._thread.start()

    def _hash(self) -> None:
        while (chunk := self._q.get()) is not None:
            self.sha.update(chunk)

    def read(self, n: int = CHUNK) -> bytes:
        data = self.raw.read(n if n is not None and n >= 0 else CHUNK)
        if data:
            data = bytes(data)
            if self.hashing:
                self._q.put(data)
            if len(self.head) < HEAD:
                self.head = (self.head + data[:HEAD])[:HEAD]
            self.size += len(data)
            if self.progress:
                self.progress(len(data))
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    def digest(self) -> str:
        """The archive's sha256 (call once, after the last read)."""
        self._q.put(None)
        self._thread.join()
        return self.sha.hexdigest()

    def close(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()


def safe_name(name: str) -> str | None:
    """``name`` as a relative POSIX path with no ``..``, empty or absolute part, or None when it is not one."""
    if not name or "\\" in name or "\x00" in name or name.startswith("/"):
        return None
    parts = PurePosixPath(name).parts
    if not parts or any(p in ("", ".", "..") for p in parts):
        return None
    return "/".join(parts)


def pack(folder: Path, files: Mapping[str, Mapping], out: BinaryIO, *, threads: int = -1, level: int = LEVEL,
         verify: bool = False, label: str = "", progress: Callable[[int], Any] | None = None,
         digest: bool = True) -> dict:
    """Write the files ``files`` (``{relative path: {size, sha256}}``, a manifest's table) of ``folder`` to ``out`` as
    a ``.tar.zst``; return ``{"size", "tail", "sha256"}`` of the archive (``tail``: hex of its last bytes, the zstd
    frame's content checksum, which a push reads back after the upload; ``sha256`` hashed on a second thread in the
    same pass, left out when ``digest`` is false). ``verify``
    re-hashes each file as it is read and refuses to send one that no longer matches the manifest. ``progress(n)`` is
    called with input bytes packed.

    The tar stream is written here, not through ``tarfile``'s buffered stream: headers from ``TarInfo.tobuf`` and each
    file's bytes read into one reused buffer and handed straight to the compressor (the bytes are the same as
    ``tarfile.open(mode="w|")`` writes: 512-byte padding, two zero blocks, padding to a 10 KiB record): one copy of
    each byte fewer than tarfile's stream, and the compressor's threads get the cores."""
    sink = _HashingWriter(out, digest=digest)
    try:
        _pack(sink, folder, files, threads=threads, level=level, verify=verify, label=label, progress=progress)
        result = {"size": sink.size, "head": sink.head.hex(), "tail": sink.tail.hex()}
        if digest:
            result["sha256"] = sink.digest()
        return result
    finally:
        sink.close()  # stops the hashing thread, also when packing failed


def _pack(sink: "_HashingWriter", folder: Path, files: Mapping[str, Mapping], *, threads: int, level: int,
          verify: bool, label: str, progress: Callable[[int], Any] | None) -> None:
    cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    offset = 0
    with cctx.stream_writer(sink, closefd=False, write_size=CHUNK) as zout:
        for rel in sorted(files):
            want = files[rel]
            if safe_name(rel) != rel:
                raise ArchiveError(f"{label}: manifest names {rel!r}, not a plain relative path")
            path = folder / rel
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                raise ArchiveError(f"{label}: {rel} is in the manifest but missing from the artifact") from None
            if not os.path.isfile(path) or os.path.islink(path):
                raise ArchiveError(f"{label}: {rel} is not a regular file")
            if st.st_size != want["size"]:
                raise ArchiveError(f"{label}: {rel} has {st.st_size} bytes, the manifest says {want['size']}")
            info = tarfile.TarInfo(rel)
            info.size, info.mode, info.mtime, info.type = st.st_size, 0o644, 0, tarfile.REGTYPE
            header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
            zout.write(header)
            offset += len(header)
            sha = hashlib.sha256() if verify else None
            left = st.st_size
            with open(path, "rb", buffering=0) as f:
                while left:
                    n = f.readinto(view[: min(left, CHUNK)])
                    if not n:
                        raise ArchiveError(f"{label}: {rel} shrank while it was packed")
                    chunk = view[:n]
                    if sha is not None:
                        sha.update(chunk)
                    zout.write(chunk)
                    left -= n
                    if progress:
                        progress(n)
            pad = -st.st_size % tarfile.BLOCKSIZE
            if pad:
                zout.write(tarfile.NUL * pad)
            offset += st.st_size + pad
            if sha is not None and sha.hexdigest() != want["sha256"]:
                raise ArchiveError(f"{label}: {rel} differs from its manifest (sha256); not pushed")
        end = tarfile.BLOCKSIZE * 2
        end += -(offset + end) % tarfile.RECORDSIZE
        zout.write(tarfile.NUL * end)


class _Writer(threading.Thread):
    """Hash and write one file's chunks on a second thread, so that hashing overlaps decompression (both release the
    GIL). The queue is bounded: memory stays a few chunks whatever the file's size."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path = path
        self.q: queue.Queue = queue.Queue(maxsize=8)
        self.sha = hashlib.sha256()
        self.size = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with open(self.path, "xb") as f:
                while True:
                    chunk = self.q.get()
                    if chunk is None:
                        break
                    self.sha.update(chunk)
                    f.write(chunk)
                    self.size += len(chunk)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:  # reported by the caller
            self.error = e
            while self.q.get() is not None:  # let the producer finish
                pass


def unpack(raw: BinaryIO, dest: Path | None, files: Mapping[str, Mapping], archive: Mapping | None, *, label: str,
           progress: Callable[[int], Any] | None = None) -> None:
    """Extract the ``.tar.zst`` stream ``raw`` into the empty folder ``dest``, checking every member against the
    manifest table ``files`` and the whole archive against ``archive`` (``{"size", "sha256"}``, or None). Raises
    :class:`ArchiveError` (one line naming ``label`` and the member) at the first problem; the caller discards
    ``dest``. ``dest`` None checks the archive the same way and writes nothing. ``progress(n)`` is called with archive bytes read."""
    # an archive whose manifest records its first bytes (every push since they are) is checked by those, its size,
    # zstd's content checksum and every file's sha256, which cover every byte that matters; older manifests: its sha256
    src = _HashingReader(raw, progress, digest=bool(archive and archive.get("sha256") and "head" not in archive))
    try:
        _unpack(src, dest, files, archive, label)
    finally:
        src.close()  # stops the hashing thread


def _unpack(src: "_HashingReader", dest: Path | None, files: Mapping[str, Mapping], archive: Mapping | None,
            label: str) -> None:
    seen: set[str] = set()
    dest_str = str(dest) if dest is not None else "/nonexistent-check-only"
    try:
        dctx = zstandard.ZstdDecompressor()
        with dctx.stream_reader(src, read_size=CHUNK, closefd=False) as zin:
            with tarfile.open(fileobj=zin, mode="r|", bufsize=CHUNK) as tar:
                for member in tar:
                    _check_member(member, dest_str, files, seen, label)
                    rel = safe_name(member.name.rstrip("/") if member.isdir() else member.name)
                    if dest is None:  # check only (nest push --verify of what the remote holds)
                        if member.isreg():
                            _check_file(tar, member, files[rel], label, rel)
                            seen.add(rel)
                        continue
                    target = dest / rel
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    _extract_file(tar, member, target, files[rel], label, rel)
                    seen.add(rel)
                while zin.read(CHUNK):  # the rest of the zstd frame (its checksum is checked at its end)
                    pass
            src.drain()  # the archive's hash covers every byte, the end of the zstd frame included
    except (tarfile.TarError, zstandard.ZstdError, EOFError) as e:
        raise ArchiveError(f"{label}: archive unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                           ) from None
    missing = sorted(set(files) - seen)
    if missing:
        raise ArchiveError(f"{label}: {missing[0]} is in the manifest but not in the archive"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if archive is not None:
        if src.size != archive.get("size"):
            raise ArchiveError(f"{label}: archive has {src.size} bytes, the manifest says {archive.get('size')}")
        if "head" in archive and src.head.hex() != archive["head"]:
            raise ArchiveError(f"{label}: archive's first bytes (its zstd frame header) differ from the manifest")
        if src.hashing and src.digest() != archive["sha256"]:  # a table without one (dest None,
            # a check only) relies on zstd's frame checksum, checked above, and every file's sha256
            raise ArchiveError(f"{label}: archive sha256 differs from the manifest")


def _check_member(member: tarfile.TarInfo, dest: str, files: Mapping[str, Mapping], seen: set[str], label: str) -> None:
    """Refuse anything but a regular file named in the manifest (once) or a folder, under ``dest``."""
    name = member.name
    rel = safe_name(name.rstrip("/") if member.isdir() else name)
    if rel is None:
        raise ArchiveError(f"{label}: refused member {name!r}: absolute name, '..' or empty part")
    if member.issym() or member.islnk():
        raise ArchiveError(f"{label}: refused member {name!r}: a link (only regular files and folders are accepted)")
    if not (member.isreg() or member.isdir()):
        raise ArchiveError(f"{label}: refused member {name!r}: a device, fifo or other special file")
    try:
        tarfile.data_filter(member, dest)
    except tarfile.FilterError as e:
        raise ArchiveError(f"{label}: refused member {name!r}: {e}") from None
    if member.isreg():
        if rel not in files:
            raise ArchiveError(f"{label}: refused member {name!r}: not in the manifest")
        if rel in seen:
            raise ArchiveError(f"{label}: refused member {name!r}: appears twice")


def _extract_file(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, want: Mapping, label: str,
                  rel: str) -> None:
    if member.size != want["size"]:
        raise ArchiveError(f"{label}: {rel}: {member.size} bytes in the archive, the manifest says {want['size']}")
    fobj = tar.extractfile(member)
    writer = _Writer(target)
    writer.start()
    try:
        while True:
            if writer.error is not None:
                break
            chunk = fobj.read(CHUNK)
            if not chunk:
                break
            writer.q.put(chunk)
    finally:
        writer.q.put(None)
        writer.join()
    if writer.error is not None:
        raise writer.error
    if writer.size != want["size"]:
        raise ArchiveError(f"{label}: {rel}: {writer.size} bytes, the manifest says {want['size']}")
    if writer.sha.hexdigest() != want["sha256"]:
        raise ArchiveError(f"{label}: {rel}: sha256 differs from the manifest")


def _check_file(tar: tarfile.TarFile, member: tarfile.TarInfo, want: Mapping, label: str, rel: str) -> None:
    if member.size != want["size"]:
        raise ArchiveError(f"{label}: {rel}: {member.size} bytes in the archive, the manifest says {want['size']}")
    fobj = tar.extractfile(member)
    sha = hashlib.sha256()
    while chunk := fobj.read(CHUNK):
        sha.update(chunk)
    if sha.hexdigest() != want["sha256"]:
        raise ArchiveError(f"{label}: {rel}: sha256 differs from the manifest")
