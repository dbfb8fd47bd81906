"""The passage-key store: passage keys computed once, offline, and read back memory-mapped (beyond the paper, which
encodes the retrieved passages for every query; the keys depend only on the passage tokens and the LM).

Layout of a store folder (the ``EncodePassageKeys`` artifact, :mod:`stages.lm.encode_passage_keys`):

| file | content |
|---|---|
| ``keys-NNNNN.npy`` | fp16 or fp32 ``[tokens, d]``: the keys of the passages of shard ``NNNNN`` (doc_id range), concatenated |
| ``codes-NNNNN.npy`` | instead, with ``compression = "pq"``: uint8 ``[tokens, M]`` product-quantization codes |
| ``pq.faiss`` | the trained FAISS ``ProductQuantizer`` (M subquantizers of 8 bits) that decodes the codes |
| ``index.parquet`` | ``doc_id int64, digest str, shard int32, offset int64, n_keys int32``: where each passage's keys are |
| ``store.json`` | ``lm_identity``, ``key_layer``, ``bos``, ``dim``, ``compression``, ``dtype``, sizes; written **last** |

Shard ``s`` holds the passages whose doc_id lies in ``[s·shard_passages, (s+1)·shard_passages)``. ``digest`` is
:func:`stages.decoding.passage_keys.passage_digest` of the token ids the decoder indexes (cut to the LM's window), so a
lookup by digest can never return another passage's or another corpus's keys. A passage whose tokens occur twice is
stored once (both doc_ids point at the same rows).

A folder without ``store.json`` is not a store (a build that died half-way): :meth:`PassageKeyStore.open` refuses it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from stages.common import atomic_write_text
from stages.errors import InputError

STORE_INFO = "store.json"
INDEX_FILE = "index.parquet"
PQ_FILE = "pq.faiss"
FORMAT = 1
COMPRESSIONS = ("fp32", "fp16", "pq")


def shard_file(compression: str, shard: int) -> str:
    return f"{'codes' if compression == 'pq' else 'keys'}-{shard:05d}.npy"


def pq_subquantizers(dim: int, pq_bytes: int) -> int:
    """M for a PQ of ≤ ``pq_bytes`` bytes per key at 8 bits per subquantizer: the largest divisor of ``dim`` that is
    ≤ ``pq_bytes`` (FAISS needs M | d; 576-d SmolLM2 states at 64 bytes: M = 64, 9 dimensions per subquantizer)."""
    if dim < 1 or pq_bytes < 1:
        raise ValueError(f"PQ needs dim >= 1 and pq_bytes >= 1, got dim={dim}, pq_bytes={pq_bytes}")
    return max(m for m in range(1, min(dim, pq_bytes) + 1) if dim % m == 0)


def train_pq(sample: np.ndarray, m: int, seed: int = 0):
    """A FAISS ``ProductQuantizer`` (M = ``m``, 8 bits) trained on ``sample`` [n, d] fp32 (n ≥ 256)."""
    # lazy: faiss takes seconds to import
    import faiss

    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if sample.shape[0] < 256:
        raise ValueError(f"PQ training needs at least 256 keys (one per centroid), got {sample.shape[0]}; "
                         f"use compression='fp16' for so small a store")
    pq = faiss.ProductQuantizer(int(sample.shape[1]), int(m), 8)
    pq.cp.seed = int(seed)
    pq.train(sample)
    return pq


class KeyStoreWriter:
    """Writes a store into an (empty) folder: :meth:`plan` every passage first (its doc_id and number of keys, in
    doc_id order), then :meth:`add` their keys in the same order, then :meth:`close`.

    Each shard is a ``.npy`` preallocated as a memory map under a temp name and renamed when full, so memory stays
    bounded by one encoding batch; ``index.parquet`` and then ``store.json`` are written last, atomically."""

    def __init__(self, out_dir: str | Path, *, lm_identity: str, key_layer: str, bos: bool, dim: int,
                 compression: str = "fp16", shard_passages: int = 4096, pq=None, extra: dict | None = None):
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression={compression!r}; expected one of {COMPRESSIONS}")
        if compression == "pq" and pq is None:
            raise ValueError("compression='pq' needs a trained ProductQuantizer")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.info = {"format": FORMAT, "lm_identity": str(lm_identity), "key_layer": str(key_layer), "bos": bool(bos),
                     "dim": int(dim), "compression": compression,
                     "dtype": {"fp32": "float32", "fp16": "float16", "pq": "uint8"}[compression],
                     "shard_passages": int(shard_passages), **(extra or {})}
        self.compression, self.dim, self.shard_passages, self.pq = compression, int(dim), int(shard_passages), pq
        self.width = int(pq.M) if compression == "pq" else int(dim)
        self._planned: list[tuple[int, str, int]] = []  # (doc_id, digest, n_keys)
        self._rows: list[tuple[int, str, int, int, int]] = []
        self._seen: dict[str, tuple[int, int, int]] = {}  # digest -> (shard, offset, n)
        self._shard_sizes: dict[int, int] = {}
        self._cursor = 0
        self._open: tuple[int, np.memmap, str] | None = None
        self._fill = 0
        self.shards: list[int] = []

    def plan(self, doc_id: int, digest: str, n_keys: int) -> None:
        if self._planned and doc_id <= self._planned[-1][0]:
            raise ValueError(f"passages must come in increasing doc_id order (got {doc_id} after "
                             f"{self._planned[-1][0]})")
        self._planned.append((int(doc_id), digest, int(n_keys)))
        if digest not in self._seen:
            self._seen[digest] = (-1, -1, int(n_keys))
            shard = int(doc_id) // self.shard_passages
            self._shard_sizes[shard] = self._shard_sizes.get(shard, 0) + int(n_keys)

    def _start_shard(self, shard: int):
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".npy")
        os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared store from other users
        dtype = np.uint8 if self.compression == "pq" else np.dtype(self.info["dtype"])
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(self._shard_sizes[shard], self.width))
        self._open, self._fill = (shard, mm, tmp), 0

    def _finish_shard(self) -> None:
        if self._open is None:
            return
        shard, mm, tmp = self._open
        if self._fill != mm.shape[0]:
            raise RuntimeError(f"shard {shard}: wrote {self._fill} of {mm.shape[0]} planned keys")
        mm.flush()
        del mm
        os.replace(tmp, self.dir / shard_file(self.compression, shard))
        self.shards.append(shard)
        self._open = None

    def stored(self, digest: str) -> bool:
        """True once the keys of these token ids are written (a later passage with the same tokens needs none)."""
        return self._seen.get(digest, (-1,))[0] >= 0

    def add(self, doc_id: int, keys) -> None:
        """The keys ``[n_keys, d]`` (torch or NumPy, fp32) of the next planned passage (None if :meth:`stored`)."""
        want_doc, digest, n = self._planned[self._cursor]
        if int(doc_id) != want_doc:
            raise ValueError(f"expected the keys of doc_id {want_doc}, got {doc_id}")
        self._cursor += 1
        shard, offset, _ = self._seen[digest]
        if shard < 0:  # first time these tokens are seen: write them
            if keys is None:
                raise ValueError(f"doc_id {doc_id}: no keys given for tokens not stored yet")
            arr = keys.detach().cpu().numpy() if hasattr(keys, "detach") else np.asarray(keys)
            if arr.shape != (n, self.dim):
                raise ValueError(f"doc_id {doc_id}: keys of shape {arr.shape}, planned {(n, self.dim)}")
            shard = int(doc_id) // self.shard_passages
            if self._open is None or self._open[0] != shard:
                self._finish_shard()
                self._start_shard(shard)
            mm = self._open[1]
            offset = self._fill
            if n:
                block = arr.astype(np.float32)
                mm[offset:offset + n] = self.pq.compute_codes(np.ascontiguousarray(block)) \
                    if self.compression == "pq" else block
            self._fill += n
            self._seen[digest] = (shard, offset, n)
        self._rows.append((int(doc_id), digest, shard, offset, n))

    def abort(self) -> None:
        if self._open is not None:
            Path(self._open[2]).unlink(missing_ok=True)
            self._open = None

    def close(self) -> dict:
        """Finish the last shard, write ``index.parquet``, the PQ and, last, ``store.json``; return the info."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._cursor != len(self._planned):
            raise RuntimeError(f"{len(self._planned) - self._cursor} planned passages got no keys")
        self._finish_shard()
        cols = list(zip(*self._rows)) if self._rows else [[]] * 5
        table = pa.table({"doc_id": pa.array(cols[0], pa.int64()), "digest": pa.array(cols[1], pa.string()),
                          "shard": pa.array(cols[2], pa.int32()), "offset": pa.array(cols[3], pa.int64()),
                          "n_keys": pa.array(cols[4], pa.int32())})
        tmp = self.dir / f".tmp-{INDEX_FILE}"
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, self.dir / INDEX_FILE)
        if self.compression == "pq":
            # lazy: faiss takes seconds to import
            import faiss

            tmp = self.dir / f".tmp-{PQ_FILE}"
            faiss.write_ProductQuantizer(self.pq, str(tmp))
            os.replace(tmp, self.dir / PQ_FILE)
            self.info["pq"] = {"M": int(self.pq.M), "nbits": int(self.pq.nbits)}
        stored = sum(n for (_s, _o, n) in self._seen.values())
        bytes_per_key = self.width * (1 if self.compression == "pq" else np.dtype(self.info["dtype"]).itemsize)
        self.info.update(num_passages=len(self._rows), num_distinct_passages=len(self._seen), num_keys=int(stored),
                         bytes_per_key=int(bytes_per_key), key_bytes=int(stored * bytes_per_key),
                         shards=sorted(self.shards))
        atomic_write_text(self.dir / STORE_INFO, json.dumps(self.info, indent=1, sort_keys=True) + "\n")
        return dict(self.info)


class PassageKeyStore:
    """Read side: ``PassageKeyStore.open(folder)``; ``get_by_digest(digest)`` → fp32 ``torch.Tensor [n_keys, d]`` or
    None. Shards are memory-mapped (``np.load(mmap_mode="r")``) on first use; fp16 keys come back as fp32, PQ codes
    are decoded by FAISS (``ProductQuantizer.decode``)."""

    def __init__(self, folder: Path, info: dict, where: dict[str, tuple[int, int, int]],
                 by_doc: dict[int, str]):
        self.folder, self.info, self._where, self._by_doc = folder, info, where, by_doc
        self.lm_identity: str = info["lm_identity"]
        self.key_layer: str = info["key_layer"]
        self.bos: bool = bool(info["bos"])
        self.dim: int = int(info["dim"])
        self.compression: str = info["compression"]
        self._shards: dict[int, np.ndarray] = {}
        self._pq = None
        self.reads = 0

    @classmethod
    def open(cls, folder: str | Path) -> "PassageKeyStore":
        import pyarrow.parquet as pq

        folder = Path(folder)
        info_path = folder / STORE_INFO
        if not info_path.is_file():
            raise InputError(info_path, None, "no store.json: not a finished passage-key store (EncodePassageKeys)")
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(info_path, e.lineno, f"not valid JSON: {e.msg}") from None
        missing = [k for k in ("lm_identity", "key_layer", "bos", "dim", "compression") if k not in info]
        if missing or info.get("format") != FORMAT:
            raise InputError(info_path, None, f"not a passage-key store of format {FORMAT} (missing {missing})")
        t = pq.read_table(folder / INDEX_FILE)
        cols = {c: t.column(c).to_numpy() for c in ("doc_id", "shard", "offset", "n_keys")}
        digests = t.column("digest").to_pylist()
        where = {d: (int(s), int(o), int(n)) for d, s, o, n in
                 zip(digests, cols["shard"], cols["offset"], cols["n_keys"])}
        by_doc = {int(doc): d for doc, d in zip(cols["doc_id"], digests)}
        return cls(folder, info, where, by_doc)

    def matches(self, lm_identity: str, key_layer: str, bos: bool) -> bool:
        """True if this store holds keys of that LM, layer and BOS rule (the only keys it may answer for)."""
        return (lm_identity, key_layer, bool(bos)) == (self.lm_identity, self.key_layer, self.bos)

    def __len__(self) -> int:
        return len(self._by_doc)

    def __contains__(self, digest: str) -> bool:
        return digest in self._where

    def doc_ids(self) -> list[int]:
        return sorted(self._by_doc)

    def digest_of(self, doc_id: int) -> str | None:
        return self._by_doc.get(int(doc_id))

    def _shard(self, shard: int) -> np.ndarray:
        arr = self._shards.get(shard)
        if arr is None:
            arr = self._shards[shard] = np.load(self.folder / shard_file(self.compression, shard), mmap_mode="r")
        return arr

    def _decoder(self):
        if self._pq is None:
            # lazy: faiss takes seconds to import
            import faiss

            self._pq = faiss.read_ProductQuantizer(str(self.folder / PQ_FILE))
        return self._pq

    def get_by_digest(self, digest: str):
        """fp32 keys ``[n_keys, d]`` of the passage whose token ids have this digest, or None if not stored."""
        # lazy: torch takes seconds to import
        import torch

        hit = self._where.get(digest)
        if hit is None:
            return None
        shard, offset, n = hit
        self.reads += 1
        if n == 0:
            return torch.zeros((0, self.dim), dtype=torch.float32)
        block = self._shard(shard)[offset:offset + n]
        if self.compression == "pq":
            out = self._decoder().decode(np.ascontiguousarray(block, dtype=np.uint8))
        else:
            out = np.array(block, dtype=np.float32)  # a copy: never hand out a view of the memory map
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    def get_by_doc_id(self, doc_id: int):
        digest = self.digest_of(doc_id)
        return None if digest is None else self.get_by_digest(digest)

    def iter_keys(self, doc_ids: Iterable[int]):
        for d in doc_ids:
            yield int(d), self.get_by_doc_id(d)
