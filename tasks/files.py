"""Reading task files: plain, ``.gz`` or ``.zst``, strict UTF-8, every failure a :class:`TaskInputError` with a line.

Evaluation files are small (the largest, TriviaQA test, is ~1 MB), so they are read whole; that lets a decoding error
name its line (count of newlines before the bad byte) and lets loaders tell a truncated last line (no final newline).
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any, Iterator

from tasks.errors import TaskInputError


def read_bytes(path: str | Path) -> bytes:
    """The decompressed bytes of ``path``; a missing file or a corrupt archive is a :class:`TaskInputError`."""
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        if name.endswith((".zst", ".zstd")):
            import zstandard

            with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise TaskInputError(path, None, "file not found") from None
    except IsADirectoryError:
        raise TaskInputError(path, None, "is a folder, expected a file") from None
    except (OSError, EOFError) as e:  # gzip/zstd: truncated or corrupt archive
        raise TaskInputError(path, None, f"cannot read compressed file ({e})") from None
    except Exception as e:  # zstandard.ZstdError is not an OSError
        if type(e).__name__ == "ZstdError":
            raise TaskInputError(path, None, f"cannot read compressed file ({e})") from None
        raise


def read_text(path: str | Path) -> str:
    """The whole file as text, strict UTF-8 (a leading BOM dropped); bad bytes name their line and column."""
    data = read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise TaskInputError(path, line, f"not valid UTF-8 (byte 0x{data[e.start]:02x} at column {col})") from None
    return text[1:] if text.startswith("\ufeff") else text


def read_lines(path: str | Path) -> tuple[list[str], bool]:
    """``(lines, ends_with_newline)``: lines without their ``\\n``/``\\r\\n``; line ``i`` of the file is ``lines[i-1]``.

    ``ends_with_newline`` is False when the last line has no line end, the usual sign of a truncated copy.
    """
    text = read_text(path)
    ends = text.endswith("\n") or text == ""
    lines = text.split("\n")
    if ends:
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines], ends


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(line_number, object)`` for every non-blank line of a JSON-lines file; each line must hold a JSON object."""
    lines, ends = read_lines(path)
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            hint = " (file truncated?)" if i == last and not ends else ""
            raise TaskInputError(path, i + 1, f"invalid JSON: {e.msg} at column {e.colno}{hint}") from None
        if not isinstance(obj, dict):
            raise TaskInputError(path, i + 1, f"expected a JSON object, got {type(obj).__name__}")
        yield i + 1, obj


def iter_json_array(path: str | Path) -> Iterator[tuple[int, int, Any]]:
    """``(line_number, index, element)`` for each element of a file holding one JSON array.

    Decodes element by element (``raw_decode``) so that an error names the line where the bad element starts, even in a
    one-line file (then the message also gives the element's index).
    """
    text = read_text(path)
    dec = json.JSONDecoder()

    seen = [0, 1]  # (position, its line): positions only grow, so counting newlines incrementally keeps this O(n)

    def line_of(pos: int) -> int:
        if pos < seen[0]:
            return text.count("\n", 0, pos) + 1
        seen[1] += text.count("\n", seen[0], pos)
        seen[0] = pos
        return seen[1]

    def skip_ws(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip_ws(0)
    if pos >= len(text) or text[pos] != "[":
        raise TaskInputError(path, line_of(pos), "expected a JSON array ('[') at the start of the file")
    pos = skip_ws(pos + 1)
    index = 0
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        if pos >= len(text):
            raise TaskInputError(path, line_of(pos), f"JSON array ends early after element {index} (file truncated?)")
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            hint = "" if text.rstrip().endswith("]") else " (file truncated?)"
            raise TaskInputError(path, e.lineno, f"invalid JSON in element {index}: {e.msg} at column {e.colno}{hint}"
                                 ) from None
        yield line_of(pos), index, obj
        index += 1
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            if skip_ws(pos + 1) != len(text):
                raise TaskInputError(path, line_of(skip_ws(pos + 1)), "unexpected text after the JSON array")
            return
        raise TaskInputError(path, line_of(pos), f"expected ',' or ']' after element {index - 1}"
                             + (" (file truncated?)" if pos >= len(text) else ""))


def text_field(path, line: int, obj: dict, key: str, *, where: str = "") -> str:
    """``obj[key]`` as a non-empty string, else a one-line error naming the field."""
    if key not in obj:
        raise TaskInputError(path, line, f"{where}missing field {key!r} (fields: {', '.join(map(str, obj)) or 'none'})")
    value = obj[key]
    if not isinstance(value, str):
        raise TaskInputError(path, line, f"{where}field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise TaskInputError(path, line, f"{where}field {key!r} is empty")
    return value


def answer_list(path, line: int, value: Any, *, field: str = "answer", where: str = "") -> list[str]:
    """A non-empty list of non-empty strings (gold aliases), else a one-line error."""
    if not isinstance(value, (list, tuple)):
        raise TaskInputError(path, line, f"{where}{field} must be a list of strings, got {type(value).__name__}")
    if not value:
        raise TaskInputError(path, line, f"{where}empty answer list")
    out = []
    for a in value:
        if not isinstance(a, str):
            raise TaskInputError(path, line, f"{where}{field} holds a {type(a).__name__}, expected strings")
        if a.strip():
            out.append(a)
    if not out:
        raise TaskInputError(path, line, f"{where}answer list holds only empty strings")
    return out


def open_text_stream(text: str) -> io.StringIO:
    """A text stream for the ``csv`` module (newline='' semantics: embedded newlines stay inside quoted fields)."""
    return io.StringIO(text, newline="")
