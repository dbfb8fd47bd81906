"""Streaming readers for the corpus formats ConvertCorpus accepts; each yields one :class:`Record` per source document.

Formats (plain, ``.gz`` or ``.zst``):

- ``ovos``: the embedded corpus, one JSON object ``{key: {"title", "extract", "description", "topic"}, ...}``. Read by
  :class:`JsonObjectStream`, which decodes one top-level entry at a time (memory: one entry plus a 64 KiB buffer).
- ``atlas``: JSONL ``{"id", "title", "section", "text"}`` (``section`` optional, default ``""``).
- ``dpr``: ``psgs_w100.tsv``, a header ``id<TAB>text<TAB>title`` (any column order), CSV quoting as DPR writes it.
- ``jsoncollection``: pyserini JsonCollection, a folder (or one file) of JSONL ``{"id", "contents"}``. A record's
  ``title`` field, if any, is the title; else DPR-style ``contents`` (``"Title"\\ntext``) are split by
  :func:`split_dpr_contents`.
- ``beir``: ``corpus.jsonl`` ``{"_id", "title", "text"}`` (``title`` optional, default ``""``).

Fields a format does not map are kept, as JSON, in ``Record.meta`` (e.g. ovos ``description`` and ``topic``).
Blank lines of line-based formats are ignored. Bad input raises :class:`stages.errors.InputError` naming file and line.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from stages.common import iter_lines, open_binary
from stages.errors import InputError

FORMATS = ("ovos", "atlas", "dpr", "jsoncollection", "beir")
_COMPRESSED = (".gz", ".zst", ".zstd")
_JSON_SUFFIXES = (".json", ".jsonl")


@dataclass
class Record:
    """One source document: ``source_id`` is the corpus's own id (as a string)."""

    path: str
    line: int
    source_id: str
    title: str
    text: str
    section: str = ""
    meta: dict = field(default_factory=dict)


def base_name(path: str | Path) -> str:
    """File name without a compression suffix, lower-cased (``corpus.jsonl.zst`` → ``corpus.jsonl``)."""
    name = Path(path).name.lower()
    for suffix in _COMPRESSED:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _str_field(rec: dict, name: str, path, line: int, required: bool = True) -> str:
    if name not in rec or rec[name] is None:
        if required:
            raise InputError(path, line, f"missing field {name!r}")
        return ""
    value = rec[name]
    if isinstance(value, (dict, list)):
        raise InputError(path, line, f"field {name!r} must be a string, got {type(value).__name__}")
    return str(value)


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    for n, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(path, n, f"malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(rec, dict):
            raise InputError(path, n, f"expected a JSON object, got {type(rec).__name__}")
        yield n, rec


def _extra(rec: dict, used: tuple[str, ...]) -> dict:
    return {k: v for k, v in rec.items() if k not in used}


# --- Atlas / BEIR / JsonCollection (JSONL) ------------------------------------------------------------------------

def read_atlas(path: Path) -> Iterator[Record]:
    used = ("id", "title", "section", "text")
    for n, rec in _json_lines(path):
        yield Record(str(path), n, _str_field(rec, "id", path, n), _str_field(rec, "title", path, n),
                     _str_field(rec, "text", path, n), _str_field(rec, "section", path, n, required=False),
                     _extra(rec, used))


def read_beir(path: Path) -> Iterator[Record]:
    used = ("_id", "title", "text")
    for n, rec in _json_lines(path):
        yield Record(str(path), n, _str_field(rec, "_id", path, n), _str_field(rec, "title", path, n, required=False),
                     _str_field(rec, "text", path, n), "", _extra(rec, used))


TITLE_LINE_MAX_WORDS = 12


def split_dpr_contents(contents: str) -> tuple[str, str]:
    """DPR-style JsonCollection ``contents`` → ``(title, text)``.

    The first line is the title when the contents has more than one line and that first line is either wrapped in
    double quotes (``'"Title"\\ntext'``, pyserini's and FlashRAG's encoding of ``psgs_w100``; the quotes are removed) or
    at most :data:`TITLE_LINE_MAX_WORDS` words (the same encoding with the quotes lost, seen in FlashRAG's sample).
    Otherwise there is no title and the whole contents is the text.
    """
    first, sep, rest = contents.partition("\n")
    if not sep:
        return "", contents
    line = first.strip()
    if len(line) >= 2 and line[0] == line[-1] == '"':
        return line[1:-1], rest
    if line and len(line.split()) <= TITLE_LINE_MAX_WORDS:
        return line, rest
    return "", contents


def _jsoncollection_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and not p.name.startswith(".") and base_name(p).endswith(_JSON_SUFFIXES))
    if not files:
        raise InputError(path, None, "empty corpus: no .json/.jsonl files (plain, .gz or .zst) in this folder")
    return files


def read_jsoncollection(path: Path) -> Iterator[Record]:
    used = ("id", "contents", "title")
    for f in _jsoncollection_files(path):
        for n, rec in _json_lines(f):
            source_id = _str_field(rec, "id", f, n)
            contents = _str_field(rec, "contents", f, n)
            if rec.get("title") is not None:
                title, text = _str_field(rec, "title", f, n), contents
            else:
                title, text = split_dpr_contents(contents)
            yield Record(str(f), n, source_id, title, text, "", _extra(rec, used))


# --- DPR psgs_w100.tsv ----------------------------------------------------------------------------------------------

def read_dpr(path: Path) -> Iterator[Record]:
    lines = iter_lines(path)
    with contextlib.closing(lines):
        csv.field_size_limit(1 << 30)  # the default (128 KiB) would reject a long passage
        reader = csv.reader((line for _, line in lines), delimiter="\t")
        try:
            yield from _dpr_rows(path, reader)
        except csv.Error as e:
            raise InputError(path, reader.line_num, f"bad TSV row: {e}") from None


def _dpr_rows(path: Path, reader) -> Iterator[Record]:
    header = next(reader, None)
    if header is None:
        raise InputError(path, None, "empty corpus: no header line")
    missing = [c for c in ("id", "text", "title") if c not in header]
    if missing:
        raise InputError(path, 1, f"header must name the columns id, text, title (missing {', '.join(missing)}); "
                                  f"got {header[:6]}")
    idx = {c: header.index(c) for c in ("id", "text", "title")}
    extra = [(i, c) for i, c in enumerate(header) if c not in idx]
    for row in reader:
        n = reader.line_num
        if not row or row == [""]:
            continue
        if len(row) != len(header):
            raise InputError(path, n, f"expected {len(header)} tab-separated fields, got {len(row)}")
        yield Record(str(path), n, row[idx["id"]], row[idx["title"]], row[idx["text"]], "",
                     {c: row[i] for i, c in extra})


# --- ovos: one big JSON object, streamed ----------------------------------------------------------------------------

_WS = re.compile(r"[ \t\n\r]*")


class JsonObjectStream:
    """Iterate ``(line, key, value)`` over the top-level entries of one JSON object without loading the whole file.

    Decodes UTF-8 incrementally (strict; a bad byte raises :class:`InputError` naming its line) and parses each key and
    value with :meth:`json.JSONDecoder.raw_decode` on a buffer that holds about one entry: when a value runs past the
    buffer, more is read (doubling the read size, so a huge entry costs O(size), not O(size²)) and the value re-parsed.
    """

    def __init__(self, path: str | Path, f, chunk: int = 1 << 16):
        self.path, self.f, self.chunk = path, f, chunk
        self.buf, self.pos, self.line = "", 0, 1  # self.line = line number at self.pos
        self.eof = False
        self._utf8 = codecs.getincrementaldecoder("utf-8")("strict")
        self._json = json.JSONDecoder()

    def _fill(self, size: int | None = None) -> bool:
        if self.eof:
            return False
        data = self.f.read(size or self.chunk)
        final = not data
        try:
            text = self._utf8.decode(data, final=final)
        except UnicodeDecodeError as e:
            line = self.line + self.buf.count("\n", self.pos) + e.object[: e.start].count(b"\n")
            raise InputError(self.path, line, f"not valid UTF-8 ({e.reason})") from None
        self.buf = self.buf[self.pos:] + text
        self.pos = 0
        self.eof = final
        return True

    def _advance(self, new_pos: int) -> None:
        self.line += self.buf.count("\n", self.pos, new_pos)
        self.pos = new_pos

    def _peek(self) -> str:
        """Skip whitespace, then return the next character ('' at end of file)."""
        while True:
            self._advance(_WS.match(self.buf, self.pos).end())
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._fill():
                return ""

    def _value(self):
        size = self.chunk
        while True:
            try:
                obj, end = self._json.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof:  # a number at the buffer's end might continue
                    self._advance(end)
                    return obj
            except json.JSONDecodeError as e:
                # An error at the buffer's end (or a string still open there) may just be a cut entry: read more.
                # Anything earlier is a real syntax error: report it now rather than buffer the rest of the file.
                cut = e.pos >= len(self.buf) - 6 or e.msg.startswith("Unterminated string")
                if self.eof or not cut:
                    raise InputError(self.path, self.line + self.buf.count("\n", self.pos, e.pos),
                                     f"malformed JSON: {e.msg}") from None
            self._fill(size)
            size *= 2

    def _expect(self, chars: str, what: str) -> str:
        c = self._peek()
        if c == "" or c not in chars:
            got = "end of file" if c == "" else repr(c)
            raise InputError(self.path, self.line, f"malformed JSON: expected {what}, got {got}")
        self._advance(self.pos + 1)
        return c

    def __iter__(self) -> Iterator[tuple[int, str, object]]:
        self._expect("{", "a JSON object '{' at the top level")
        if self._peek() == "}":
            self._advance(self.pos + 1)
        else:
            while True:
                if self._peek() != '"':
                    self._expect('"', "a string key")
                line = self.line
                key = self._value()
                self._expect(":", "':' after a key")
                if not self._peek():
                    self._expect("", "a value")
                value = self._value()
                yield line, key, value
                if self._expect(",}", "',' or '}' after an entry") == "}":
                    break
        if self._peek() != "":
            raise InputError(self.path, self.line, "malformed JSON: extra data after the top-level object")


def read_ovos(path: Path) -> Iterator[Record]:
    with open_binary(path) as f:
        for line, key, value in JsonObjectStream(path, f):
            if not isinstance(value, dict):
                raise InputError(path, line, f"entry {key!r}: expected an object, got {type(value).__name__}")
            text = _str_field(value, "extract", path, line)
            title = _str_field(value, "title", path, line, required=False) or key
            yield Record(str(path), line, key, title, text, "", _extra(value, ("title", "extract")))


READERS = {"ovos": read_ovos, "atlas": read_atlas, "dpr": read_dpr, "jsoncollection": read_jsoncollection,
           "beir": read_beir}


def detect_format(path: str | Path) -> str:
    """Guess the format from the name (folder → jsoncollection, ``*.tsv`` → dpr) or else the first record's keys."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, None, "corpus source not found")
    if path.is_dir():
        return "jsoncollection"
    if base_name(path).endswith(".tsv"):
        return "dpr"
    lines = iter_lines(path)
    with contextlib.closing(lines):
        for n, line in lines:
            if line.strip():
                first = line.strip()
                break
        else:
            raise InputError(path, None, "empty corpus: the file has no records")
    if first.startswith("id\t"):
        return "dpr"
    try:
        rec = json.loads(first)
    except json.JSONDecodeError:
        rec = None
    if isinstance(rec, dict):
        if "_id" in rec:
            return "beir"
        if "contents" in rec:
            return "jsoncollection"
        if "id" in rec and "text" in rec:
            return "atlas"
        if rec and all(isinstance(v, dict) and "extract" in v for v in rec.values()):
            return "ovos"
        raise InputError(path, n, f"cannot tell the corpus format from the first record (keys {sorted(rec)[:8]}); "
                                  f"pass fmt= one of {', '.join(FORMATS)}")
    if first.startswith("{") and _first_entry_is_ovos(path):
        return "ovos"
    if first.startswith("{"):
        try:
            json.loads(first)
        except json.JSONDecodeError as e:
            raise InputError(path, n, f"cannot tell the corpus format: the first line is not valid JSON ({e.msg} at "
                                      f"column {e.colno}; cut or unterminated?) and the file is not one JSON object "
                                      f"of ovos entries; pass fmt= one of {', '.join(FORMATS)}") from None
    raise InputError(path, n, f"cannot tell the corpus format from the first line; pass fmt= one of {', '.join(FORMATS)}")


def _first_entry_is_ovos(path: Path) -> bool:
    """Whether the file is one JSON object whose first entry is an ovos article (``{key: {"extract": ...}}``): read
    with the streaming parser, one entry at most (a cut or malformed JSONL line is not taken for ovos)."""
    with open_binary(path) as f:
        try:
            for _line, _key, value in JsonObjectStream(path, f):
                return isinstance(value, dict) and "extract" in value
        except InputError:
            return False
    return False


def read_records(path: str | Path, fmt: str = "auto") -> Iterator[Record]:
    """Stream :class:`Record` s from ``path`` in format ``fmt`` (``auto`` → :func:`detect_format`)."""
    path = Path(path)
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in READERS:
        raise ValueError(f"unknown corpus format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")
    if not path.exists():
        raise InputError(path, None, "corpus source not found")
    return READERS[fmt](path)
