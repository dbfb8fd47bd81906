"""Random access to sharded Parquet outputs by ``doc_id``, reading only the row groups that hold the requested rows.

Row ``doc_id`` lives in shard ``doc_id // shard_rows`` (``shard_rows`` from the folder's info JSON); within that shard
the row group is found from the footer's row counts (read once per shard). Recently read row groups are kept in a small
LRU cache, since decoding asks for the same passages again and again. ``row_groups_read`` counts real reads.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from stages.errors import InputError


def passage_shards(passages: Path) -> list[Path]:
    """The ``passages-*.parquet`` files of a ConvertCorpus artifact, in order; none is an input error."""

    shards = sorted(Path(passages).glob("passages-*.parquet"))
    if not shards:
        raise InputError(passages, None, "no passages-*.parquet files (expected a ConvertCorpus artifact)")
    return shards


class ShardedRows:
    """Rows of ``prefix-NNNNN.parquet`` shards described by ``info_name`` (``num_rows``, ``shard_rows``, ``shards``)."""

    def __init__(self, folder: str | Path, info_name: str, cache_row_groups: int = 16):
        self.folder = Path(folder)
        info_path = self.folder / info_name
        if not info_path.is_file():
            raise FileNotFoundError(f"{info_path}: missing (not a {info_name.split('.')[0]} artifact folder?)")
        self.info = json.loads(info_path.read_text())
        self.num_rows = int(self.info["num_rows"])
        self.shard_rows = int(self.info["shard_rows"])
        self.shard_files = [self.folder / s["file"] for s in self.info["shards"]]
        self.cache_row_groups = cache_row_groups
        self.row_groups_read = 0
        self._files: dict[int, object] = {}
        self._starts: dict[int, np.ndarray] = {}
        self._cache: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return self.num_rows

    def _file(self, shard: int):
        import pyarrow.parquet as pq

        if shard not in self._files:
            pf = pq.ParquetFile(self.shard_files[shard])
            md = pf.metadata
            self._files[shard] = pf
            self._starts[shard] = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        return self._files[shard]

    def _row_group(self, shard: int, group: int, columns: tuple[str, ...]):
        key = (shard, group, columns)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        table = self._file(shard).read_row_group(group, columns=list(columns))
        self.row_groups_read += 1
        self._cache[key] = table
        while len(self._cache) > self.cache_row_groups:
            self._cache.popitem(last=False)
        return table

    def take(self, doc_ids: Sequence[int], columns: Sequence[str]) -> list[dict]:
        """Rows for ``doc_ids`` (any order, repeats allowed) as dicts of ``columns``, in the order asked."""
        ids = np.asarray(doc_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            return []
        bad = (ids < 0) | (ids >= self.num_rows)
        if bad.any():
            raise IndexError(f"doc_id {int(ids[bad][0])} out of range 0..{self.num_rows - 1}")
        columns = tuple(columns)
        shards = ids // self.shard_rows
        local = ids - shards * self.shard_rows
        out: list = [None] * len(ids)
        for shard in np.unique(shards):
            in_shard = np.flatnonzero(shards == shard)
            self._file(int(shard))
            starts = self._starts[int(shard)]
            groups = np.searchsorted(starts, local[in_shard], side="right") - 1
            for group in np.unique(groups):
                where = in_shard[groups == group]
                table = self._row_group(int(shard), int(group), columns)
                rows = table.take(local[where] - starts[group]).to_pylist()
                for pos, row in zip(where.tolist(), rows):
                    out[pos] = row
        return out

    def iter_batches(self, columns: Sequence[str] | None = None, batch_size: int = 10_000) -> Iterator:
        """Stream every row in ``doc_id`` order as ``pyarrow.RecordBatch`` es of at most ``batch_size`` rows."""
        import pyarrow.parquet as pq

        for path in self.shard_files:
            # a fresh reader per shard, closed after it: the cached readers of random access (_file) would keep every
            # shard's buffers alive and make a full scan's memory grow with the corpus
            with pq.ParquetFile(path) as pf:
                yield from pf.iter_batches(batch_size=batch_size, columns=list(columns) if columns else None)

    def iter_range(self, start: int, end: int, columns: Sequence[str] | None = None,
                   batch_size: int = 10_000) -> Iterator:
        """Rows ``[start, end)`` (row positions = doc_ids) in order, as record batches of at most ``batch_size`` rows,
        reading only the files and row groups that hold them (a shard of a sharded stage)."""
        import pyarrow.parquet as pq

        offset = 0
        for path in self.shard_files:
            with pq.ParquetFile(path) as pf:
                md = pf.metadata
                if offset >= end or offset + md.num_rows <= start:
                    offset += md.num_rows
                    continue
                group_start = offset
                for g in range(md.num_row_groups):
                    rows = md.row_group(g).num_rows
                    lo, hi = max(start, group_start), min(end, group_start + rows)
                    if lo < hi:
                        table = pf.read_row_group(g, columns=list(columns) if columns else None)
                        table = table.slice(lo - group_start, hi - lo)
                        yield from table.to_batches(max_chunksize=batch_size)
                    group_start += rows
                offset += md.num_rows


class PassageReader(ShardedRows):
    """Passages written by :mod:`stages.corpus.convert` (``passages.json`` + ``passages-NNNNN.parquet``)."""

    def __init__(self, passages_dir: str | Path, cache_row_groups: int = 16):
        super().__init__(passages_dir, "passages.json", cache_row_groups)
        self.columns = tuple(self.info.get("columns") or ("doc_id", "source_id", "title", "section", "text"))

    @property
    def num_passages(self) -> int:
        return self.num_rows

    def get(self, doc_ids: Sequence[int], columns: Sequence[str] | None = None) -> list[dict]:
        """``[{"doc_id", "source_id", "title", "section", "part", "text", "meta"}, ...]`` in the order of ``doc_ids``."""
        return self.take(doc_ids, columns or self.columns)


def ends_document(passage_reader, doc_ids: list[int], rows: list[dict]) -> list[bool]:
    """Per passage: is it the last passage of its source article? Passages of one source have consecutive doc_ids
    (ConvertCorpus), so a passage ends its article when the next doc_id belongs to another source (or does not exist)."""
    if not hasattr(passage_reader, "__len__") or any("source_id" not in r for r in rows):
        return [False] * len(doc_ids)  # a reader that knows no sources: no passage is known to end an article
    n = len(passage_reader)
    nxt = [int(d) + 1 for d in doc_ids if int(d) + 1 < n]
    nxt_source = {int(r["doc_id"]): r.get("source_id") for r in passage_reader.get(nxt, ("doc_id", "source_id"))} if nxt else {}
    return [int(d) + 1 >= n or nxt_source.get(int(d) + 1) != r.get("source_id") for d, r in zip(doc_ids, rows)]


def document_end_ids(reader: PassageReader, doc_ids: Sequence[int] | None = None) -> set[int]:
    """The doc_ids (among ``doc_ids``; None: the whole corpus, in one streaming pass) of passages that end their source
    article (:func:`ends_document`)."""
    if doc_ids is not None:
        ids = list(doc_ids)
        flags = ends_document(reader, ids, reader.get(ids, ("doc_id", "source_id"))) if ids else []
        return {d for d, e in zip(ids, flags) if e}
    out: set[int] = set()
    prev = None  # (doc_id, source_id) of the previous row: doc_ids are dense and in order
    for batch in reader.iter_batches(["doc_id", "source_id"]):
        for d, src in zip(batch.column("doc_id").to_pylist(), batch.column("source_id").to_pylist()):
            if prev is not None and prev[1] != src:
                out.add(prev[0])
            prev = (int(d), src)
    if prev is not None:
        out.add(prev[0])
    return out
