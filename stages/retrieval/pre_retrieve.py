"""PreRetrieve: each example's query -> its top-b passages, by NEST's hybrid fusion of BM25 and dense retrieval.

For each example (paper §3.1): take the top ``candidates`` (b·l = 4000) passages from each retriever, drop the
example's ``exclude_doc_ids`` from both lists (so excluded passages influence neither η nor the fill values), fuse with
the adaptive coefficient η (:mod:`stages.retrieval.fusion`) and keep the top ``b`` (40). Modes ``bm25`` and ``dense`` rank by
one retriever alone.

Output ``retrievals.parquet`` (zstd): ``example_id int64, rank int32 (1 = best), doc_id int64, fused float64,
sparse float64 (null if the passage was not in the BM25 list), dense float64 (null if not in the dense list),
search_s float64`` (the example's share of the search time: a batch's retrieval wall time divided equally among its
examples, repeated on each of the example's rows; Generate adds it to the example's ``passage_search`` and total).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from stages.retrieval import fusion
from stages.errors import InputError

VERSION = "2"

MODES = ("hybrid", "bm25", "dense")
SCHEMA = pa.schema([("example_id", pa.int64()), ("rank", pa.int32()), ("doc_id", pa.int64()),
                    ("fused", pa.float64()), ("sparse", pa.float64()), ("dense", pa.float64()),
                    ("search_s", pa.float64())])


def _examples_file(examples: Path) -> Path:
    examples = Path(examples)
    path = examples / "examples.parquet" if examples.is_dir() else examples
    if not path.is_file():
        raise InputError(path, None, "no examples.parquet (expected a LoadTask artifact)")
    return path


def _drop_excluded(hits: list[tuple[int, float]], excluded: set[int], keep: int) -> list[tuple[int, float]]:
    if excluded:
        hits = [h for h in hits if h[0] not in excluded]
    return hits[:keep]


@dataclass
class Retrieved:
    """One query's result: ``rows`` = ``(doc_id, fused, sparse|None, dense|None)`` best first, η (hybrid only), and
    how many excluded passages the retrievers had returned."""

    rows: list[tuple]
    eta: float | None
    excluded_hits: int


class HybridRetriever:
    """NEST's first stage over a BM25 and/or a dense artifact, usable outside the stage (e.g. a demo query).

    ``retrieve(queries, exclude)`` gives one :class:`Retrieved` per query. ``candidates`` is clamped to the corpus size.
    """

    def __init__(self, *, bm25: Path | None = None, dense: Path | None = None, encoder=None, mode: str = "hybrid",
                 b: int = 40, candidates: int = 4000, conf_rank: int = 100, clip_dense: bool = False,
                 dense_weight: float = 0.3):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if b < 1 or candidates < 1:
            raise ValueError(f"b and candidates must be >= 1 (got b={b}, candidates={candidates})")
        self.mode, self.b = mode, int(b)
        self.conf_rank, self.clip_dense, self.dense_weight = conf_rank, clip_dense, dense_weight
        self.sparse = self.dense = None
        sizes = []
        if mode in ("hybrid", "bm25"):
            if bm25 is None:
                raise ValueError(f"mode {mode!r} needs a BM25 index")
            from stages.retrieval.bm25 import BM25Searcher

            self.sparse = BM25Searcher(bm25)
            sizes.append(self.sparse.num_docs)
        if mode in ("hybrid", "dense"):
            if dense is None:
                raise ValueError(f"mode {mode!r} needs a dense index")
            from stages.retrieval.dense import DenseSearcher

            self.dense = DenseSearcher(dense, encoder)
            sizes.append(self.dense.ntotal)
        self.candidates = min(int(candidates), max(sizes))

    def retrieve(self, queries: Sequence[str], exclude: Sequence[Iterable[int]] | None = None) -> list[Retrieved]:
        excluded = [set(x or ()) for x in exclude] if exclude is not None else [set() for _ in queries]
        n_cand = self.candidates
        # fetch extra hits so that each list still holds n_cand passages after the exclusions
        k = n_cand + max((len(x) for x in excluded), default=0)
        sparse_hits = self.sparse.search(list(queries), k) if self.sparse else None
        dense_hits = self.dense.search(list(queries), k) if self.dense else None
        out = []
        for j in range(len(queries)):
            s = _drop_excluded(sparse_hits[j], excluded[j], n_cand) if sparse_hits is not None else None
            d = _drop_excluded(dense_hits[j], excluded[j], n_cand) if dense_hits is not None else None
            n_excl = sum(h[0] in excluded[j] for hits in (sparse_hits, dense_hits) if hits is not None
                         for h in hits[j]) if excluded[j] else 0
            eta = None
            if self.mode == "hybrid":
                eta = fusion.fusion_coefficient([x for _, x in s], [x for _, x in d], self.conf_rank,
                                                clip_dense=self.clip_dense, dense_weight=self.dense_weight)
                rows = fusion.fuse(s, d, self.b, eta=eta)
            elif self.mode == "bm25":
                rows = fusion.single(s, self.b, side="sparse")
            else:
                rows = fusion.single(d, self.b, side="dense")
            out.append(Retrieved(rows, eta, n_excl))
        return out


def run(out_dir: Path, *, examples: Path, bm25: Path | None = None, dense: Path | None = None, encoder=None,
        mode: str = "hybrid", b: int = 40, candidates: int = 4000, conf_rank: int = 100, clip_dense: bool = False,
        dense_weight: float = 0.3, batch_size: int = 256, threads: int = 1) -> dict:
    """Write ``retrievals.parquet`` for every example of ``examples``.

    ``bm25``/``dense`` are BuildBM25Index/BuildDenseIndex artifacts (only the ones the mode needs); ``encoder`` is the
    dense index's :class:`stages.retrieval.dense.EncoderSpec` (or its dict; None = the embedded MiniLM). ``candidates`` is
    clamped to the corpus size. ``conf_rank``/``clip_dense``/``dense_weight``: see :mod:`stages.retrieval.fusion`
    (``conf_rank=101, clip_dense=True`` reproduces the released code). ``batch_size`` examples are read and their
    queries encoded together. ``threads`` is accepted and ignored: BM25 queries run one at a time, which is faster here
    than Anserini's threaded ``batch_search`` (see :class:`stages.retrieval.bm25.BM25Searcher`).
    """
    path = _examples_file(Path(examples))
    retriever = HybridRetriever(bm25=bm25, dense=dense, encoder=encoder, mode=mode, b=b, candidates=candidates,
                                conf_rank=conf_rank, clip_dense=clip_dense, dense_weight=dense_weight)
    out_dir = Path(out_dir)
    pf = pq.ParquetFile(path)
    total = pf.metadata.num_rows
    tmp = out_dir / ".retrievals.parquet.tmp"
    etas: list[float] = []
    n_rows = short = dropped = 0
    search_total = 0.0
    writer = pq.ParquetWriter(tmp, SCHEMA, compression="zstd")
    try:
        with tqdm(total=total, unit="ex", desc=f"PreRetrieve ({mode})", file=sys.stderr, dynamic_ncols=True) as bar:
            for batch in pf.iter_batches(columns=["example_id", "query", "exclude_doc_ids"], batch_size=batch_size):
                cols = batch.to_pydict()
                t0 = time.perf_counter()
                results = retriever.retrieve([q or "" for q in cols["query"]], cols["exclude_doc_ids"])
                share = (time.perf_counter() - t0) / max(batch.num_rows, 1)
                search_total += share * batch.num_rows
                out = {name: [] for name in SCHEMA.names}
                for example_id, res in zip(cols["example_id"], results):
                    if res.eta is not None:
                        etas.append(res.eta)
                    dropped += res.excluded_hits
                    short += len(res.rows) < b
                    for rank, (doc_id, fused, sp, de) in enumerate(res.rows, start=1):
                        out["example_id"].append(int(example_id))
                        out["rank"].append(rank)
                        out["doc_id"].append(doc_id)
                        out["fused"].append(fused)
                        out["sparse"].append(sp)
                        out["dense"].append(de)
                        out["search_s"].append(share)
                n_rows += len(out["doc_id"])
                writer.write_table(pa.table(out, schema=SCHEMA))
                bar.update(batch.num_rows)
        writer.close()
        os.replace(tmp, out_dir / "retrievals.parquet")
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    stats = {"mode": mode, "num_examples": total, "rows": n_rows, "b": int(b), "candidates": retriever.candidates,
             "examples_with_fewer_than_b": int(short), "excluded_hits_dropped": int(dropped),
             "search_s": round(search_total, 3)}
    if etas:
        e = np.asarray(etas)
        stats.update(eta_mean=float(e.mean()), eta_min=float(e.min()), eta_max=float(e.max()))
    return stats
