"""PreTokenize: every passage's ``template`` text (default ``"{title}. {text}"``) → token ids of the LM's tokenizer.

Output: ``tokens-NNNNN.parquet`` (zstd; columns ``doc_id int64, token_ids list<int32>``), sharded exactly like the
passages (same ``shard_rows`` and row-group size, so row ``doc_id`` sits at the same shard and offset), and
``tokens.json``. :class:`TokenLookup` reads ids back by ``doc_id``, touching only the row groups that hold them.

Speed: the template is filled by Arrow string kernels over whole batches, the fast tokenizer's Rust ``encode_batch_fast``
(no offsets) tokenizes each batch, and the Arrow list column is built from flat NumPy values/offsets; there is no
per-row Python work beyond what the tokenizer returns. Token ids are those of ``tokenizer(texts, add_special_tokens=False)``.
"""

from __future__ import annotations

import itertools
import json
import string
from pathlib import Path
from typing import Sequence

import numpy as np

from stages.common import ShardedWriter, atomic_write_text
from stages.corpus.passages import PassageReader, ShardedRows
from stages.lm.load import load_tokenizer

VERSION = "1"

TOKENS_INFO = "tokens.json"
TOKENS_PREFIX = "tokens"
SHARD_PREFIX = "shard"  # a shard of the sharded stage: shard-00000.parquet + shard.json
SHARD_INFO = "shard.json"
DEFAULT_TEMPLATE = "{title}. {text}"


def tokens_schema():
    import pyarrow as pa

    return pa.schema([("doc_id", pa.int64()), ("token_ids", pa.list_(pa.int32()))])


def template_fields(template: str) -> list[tuple[str, str | None]]:
    """``"{title}. {text}"`` → ``[("", "title"), (". ", "text")]``; only plain ``{column}`` fields are allowed."""
    parts = []
    for literal, name, spec, conversion in string.Formatter().parse(template):
        if name is not None and (spec or conversion or not name.isidentifier()):
            raise ValueError(f"template field {{{name}}}: only plain {{column}} fields are supported")
        parts.append((literal, name))
    return parts


def fill_template(batch, template: str) -> list[str]:
    """The template filled for every row of an Arrow batch, by vectorised string joins (no per-row Python)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    pieces = []
    for literal, name in template_fields(template):
        if literal:
            pieces.append(pa.scalar(literal))
        if name is not None:
            pieces.append(batch.column(name).cast(pa.string()))
    if not pieces:
        return [""] * batch.num_rows
    if len(pieces) == 1:
        joined = pieces[0] if not isinstance(pieces[0], pa.Scalar) else pa.array([literal] * batch.num_rows)
    else:
        joined = pc.binary_join_element_wise(*pieces, "")
    return joined.to_pylist()


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of ``tokenizer(texts, add_special_tokens=False)``, through the Rust backend when there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def token_list_array(ids: list[list[int]]):
    """``list<int32>`` Arrow array from Python id lists via one flat NumPy buffer and its offsets."""
    import pyarrow as pa

    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError("a batch has more than 2^31 tokens; use a smaller batch")
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat))


def run(out_dir: Path, *, passages: Path, lm: Path, template: str = DEFAULT_TEMPLATE, batch_size: int = 2_000,
        start: int | None = None, end: int | None = None) -> dict:
    """Tokenize every passage of ``passages`` with ``lm``'s tokenizer into token shards in ``out_dir``.

    ``start``/``end`` (a shard of the sharded stage, pipeline/engine/sharding.py): tokenize doc_ids ``[start, end)`` only,
    into ``shard-00000.parquet`` + ``shard.json``; :func:`merge` turns the shards into the files of a whole run."""
    import pyarrow as pa
    from tqdm import tqdm

    out_dir = Path(out_dir)
    reader = PassageReader(passages)
    fields = [name for _, name in template_fields(template) if name is not None]
    missing = [f for f in fields if f not in reader.columns]
    if missing:
        raise ValueError(f"template {template!r} names columns the passages lack: {missing}")
    tokenizer = load_tokenizer(lm)
    schema = tokens_schema()
    total = 0
    row_group_size = int(reader.info.get("row_group_size", batch_size))
    columns = ["doc_id", *dict.fromkeys(fields)]
    if start is not None or end is not None:  # one shard: its rows in one file, the layout is the merge's job
        lo, hi = int(start or 0), reader.num_passages if end is None else min(int(end), reader.num_passages)
        batches = reader.iter_range(lo, hi, columns, batch_size)
        writer = ShardedWriter(out_dir, SHARD_PREFIX, schema, max(hi - lo, 1), row_group_size)
        expected = max(hi - lo, 0)
    else:
        batches = reader.iter_batches(columns, batch_size)
        writer = ShardedWriter(out_dir, TOKENS_PREFIX, schema, reader.shard_rows, row_group_size)
        expected = reader.num_passages
    with writer, tqdm(total=expected, desc="PreTokenize", unit=" passages", mininterval=1.0, disable=None) as bar:
        for batch in batches:
            ids = encode_texts(tokenizer, fill_template(batch, template))
            token_ids = token_list_array(ids)
            total += len(token_ids.values)
            writer.write(pa.Table.from_arrays([batch.column("doc_id"), token_ids], schema=schema))
            bar.update(batch.num_rows)
    if writer.num_rows != expected:
        raise RuntimeError(f"wrote {writer.num_rows} token rows for {expected} passages")
    if start is not None or end is not None:
        shard = {"start": lo, "end": hi, "num_passages": reader.num_passages, "num_tokens": total,
                 "shard_rows": reader.shard_rows, "row_group_size": row_group_size, "template": template,
                 "vocab_size": len(tokenizer), "files": [s["file"] for s in writer.shards]}
        atomic_write_text(out_dir / SHARD_INFO, json.dumps(shard, indent=1) + "\n")
        return {"start": lo, "end": hi, "num_passages": writer.num_rows, "num_tokens": total}
    return _finish(out_dir, writer, total, template, len(tokenizer))


def _finish(out_dir: Path, writer: ShardedWriter, total: int, template: str, vocab_size: int) -> dict:
    """``tokens.json`` and the stats of a whole run (the unsharded stage and the merge of its shards)."""
    info = {
        "num_rows": writer.num_rows,
        "num_tokens": total,
        "shard_rows": writer.rows_per_shard,
        "row_group_size": writer.row_group_size,
        "shards": writer.shards,
        "template": template,
        "vocab_size": vocab_size,
    }
    atomic_write_text(out_dir / TOKENS_INFO, json.dumps(info, indent=1) + "\n")
    return {"num_passages": writer.num_rows, "num_tokens": total,
            "mean_tokens_per_passage": round(total / max(writer.num_rows, 1), 2), "num_shards": len(writer.shards)}


def merge(out_dir: Path, *, shards: Sequence[Path], **_params) -> dict:
    """The shards of a sharded PreTokenize (in doc_id order, covering every passage) → the files :func:`run` writes
    for the whole corpus, byte for byte: the rows are streamed into the same writer with the passages' layout."""
    import pyarrow.parquet as pq

    infos = [json.loads((Path(s) / SHARD_INFO).read_text(encoding="utf-8")) for s in shards]
    if not infos:
        raise ValueError("PreTokenize merge: no shards")
    expected = 0
    for s, info in zip(shards, infos):
        if info["start"] != expected:
            raise ValueError(f"PreTokenize merge: shard {s} starts at doc_id {info['start']}, expected {expected}")
        expected = info["end"]
    first = infos[0]
    if expected != first["num_passages"]:
        raise ValueError(f"PreTokenize merge: the shards end at doc_id {expected}, the corpus has "
                         f"{first['num_passages']} passages")
    out_dir = Path(out_dir)
    writer = ShardedWriter(out_dir, TOKENS_PREFIX, tokens_schema(), first["shard_rows"], first["row_group_size"])
    with writer:
        for s, info in zip(shards, infos):
            for name in info["files"]:
                with pq.ParquetFile(Path(s) / name) as pf:
                    for batch in pf.iter_batches(batch_size=first["row_group_size"]):
                        writer.write(batch)
    if writer.num_rows != first["num_passages"]:
        raise RuntimeError(f"merged {writer.num_rows} token rows for {first['num_passages']} passages")
    stats = _finish(out_dir, writer, sum(i["num_tokens"] for i in infos), first["template"], first["vocab_size"])
    return {**stats, "merged_shards": len(infos)}


class TokenLookup(ShardedRows):
    """``TokenLookup(tokens_dir).get(doc_ids) -> list[list[int]]``, reading only the row groups that hold them."""

    def __init__(self, tokens_dir: str | Path, cache_row_groups: int = 16):
        super().__init__(tokens_dir, TOKENS_INFO, cache_row_groups)

    def get(self, doc_ids: Sequence[int]) -> list[list[int]]:
        return [row["token_ids"] for row in self.take(doc_ids, ("token_ids",))]
