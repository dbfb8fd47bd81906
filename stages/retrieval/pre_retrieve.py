"""PreRetrieve: each example's query -> its top-b passages, by NEST's hybrid fusion of BM25 and dense retrieval.

For each example (paper §3.1): take the top ``candidates`` (b·l = 4000) passages from each retriever, drop the
example's ``exclude_doc_ids`` from every list (so excluded passages influence neither η nor the fill values), fuse with
the adaptive coefficient η (:mod:`stages.retrieval.fusion`) and keep the top ``b`` (40). Mode ``hybrid`` fuses the
``retrievers`` (default ``bm25`` and ``dense``, the paper's pair; any registered ones,
:mod:`stages.retrieval.searchers`); a mode that names one retriever ranks by it alone. Each retriever's artifact is the
keyword argument named after it (``bm25=``, ``dense=``).

Output ``retrievals.parquet`` (zstd): ``example_id int64, rank int32 (1 = best), doc_id int64, fused float64``, then
one ``float64`` column per retriever used, named after it (``bm25``, ``dense``: its raw score, null if the passage was
not in its list), then ``search_s float64`` (the example's share of the search time: a batch's retrieval wall time
divided equally among its examples, repeated on each of the example's rows; Generate adds it to the example's
``passage_search`` and total).
"""

from __future__ import annotations

import contextlib
import json
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

from stages.errors import InputError
from stages.retrieval import fusion, searchers

VERSION = "3"  # 3: one score column per retriever, named after it (bm25, dense), instead of sparse/dense

HYBRID = "hybrid"
PAPER_PAIR = ("bm25", "dense")  # the paper's retrievers: priors 1 − dense_weight and dense_weight


def modes() -> tuple[str, ...]:
    """``hybrid`` (fuse several retrievers) or the name of one registered retriever."""
    return (HYBRID, *searchers.names())


def schema(retrievers: Sequence[str]) -> pa.Schema:
    """``retrievals.parquet``'s schema for the retrievers used (one score column each, in their order)."""
    return pa.schema([("example_id", pa.int64()), ("rank", pa.int32()), ("doc_id", pa.int64()),
                      ("fused", pa.float64()), *((name, pa.float64()) for name in retrievers),
                      ("search_s", pa.float64())])


SCHEMA = schema(PAPER_PAIR)  # the default hybrid run's


def used_retrievers(mode: str, retrievers: Sequence[str] | None = None) -> tuple[str, ...]:
    """The retrievers a mode reads: the ``retrievers`` to fuse (default bm25, dense) or the one it names."""
    if mode not in modes():
        raise ValueError(f"mode must be one of {modes()}, got {mode!r}")
    if mode != HYBRID:
        return (mode,)
    used = tuple(retrievers or PAPER_PAIR)
    for name in used:
        searchers.get(name)
    if len(used) < 2 or len(set(used)) != len(used):
        raise ValueError(f"hybrid mode fuses two or more different retrievers, got {list(used)}")
    return used


def fusion_priors(used: Sequence[str], weights: dict | None, dense_weight: float) -> list[float]:
    """Each fused retriever's prior: ``weights`` (one per retriever, summing to 1), else the paper's pair
    ``1 − dense_weight``, ``dense_weight`` for two retrievers."""
    if weights:
        missing = [n for n in used if n not in weights]
        if missing or abs(sum(float(weights[n]) for n in used) - 1.0) > 1e-9:
            raise ValueError(f"weights must give every fused retriever ({', '.join(used)}) a prior, summing to 1; "
                             f"got {dict(weights)}")
        return [float(weights[n]) for n in used]
    if len(used) != 2:
        raise ValueError(f"fusing {len(used)} retrievers needs weights (a prior per retriever, summing to 1)")
    return [1.0 - dense_weight, dense_weight]


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
    """One query's result: ``rows`` = ``(doc_id, fused, score per retriever | None, ...)`` best first, η (hybrid
    only: the last fused retriever's weight, the paper's η for bm25 + dense), every fused retriever's weight, and how
    many excluded passages the retrievers had returned."""

    rows: list[tuple]
    eta: float | None
    excluded_hits: int
    weights: dict[str, float] | None = None


class HybridRetriever:
    """NEST's first stage over the artifacts of one or more retrievers, usable outside the stage (e.g. a demo query).

    ``bm25``/``dense`` (or ``artifacts={name: path}`` for any registered retriever): the artifacts; ``encoder``: the
    dense retriever's query encoder; ``retrievers``/``weights``: what hybrid mode fuses and their priors (default: the
    paper's pair, priors ``1 − dense_weight`` and ``dense_weight``). ``clip_dense`` clips every fused retriever's
    reference score at 0 (the released code clips the dense one; BM25 scores are never negative, so it changes only
    scores that can be). ``retrieve(queries, exclude)`` gives one :class:`Retrieved` per query. ``candidates`` is
    clamped to the corpus size.
    """

    def __init__(self, *, bm25: Path | None = None, dense: Path | None = None, encoder=None, mode: str = HYBRID,
                 b: int = 40, candidates: int = 4000, conf_rank: int = 100, clip_dense: bool = False,
                 dense_weight: float = 0.3, retrievers: Sequence[str] | None = None, weights: dict | None = None,
                 artifacts: dict[str, Path] | None = None, options: dict | None = None):
        self.names = used_retrievers(mode, retrievers)
        if b < 1 or candidates < 1:
            raise ValueError(f"b and candidates must be >= 1 (got b={b}, candidates={candidates})")
        self.mode, self.b = mode, int(b)
        self.conf_rank, self.clip_dense, self.dense_weight = conf_rank, clip_dense, dense_weight
        self.priors = fusion_priors(self.names, weights, dense_weight) if mode == HYBRID else [1.0]
        paths = {k: v for k, v in {"bm25": bm25, "dense": dense, **(artifacts or {})}.items() if v is not None}
        opts = {"encoder": encoder, **(options or {})}
        self.searchers = []
        for name in self.names:
            if name not in paths:
                raise ValueError(f"mode {mode!r} needs a {name} index ({name}=<artifact folder>)")
            self.searchers.append(searchers.get(name).open(Path(paths[name]), **opts))
        self.candidates = min(int(candidates), max(s.size for s in self.searchers))

    def retrieve(self, queries: Sequence[str], exclude: Sequence[Iterable[int]] | None = None) -> list[Retrieved]:
        excluded = [set(x or ()) for x in exclude] if exclude is not None else [set() for _ in queries]
        n_cand = self.candidates
        # fetch extra hits so that each list still holds n_cand passages after the exclusions
        k = n_cand + max((len(x) for x in excluded), default=0)
        hits = [s.search(list(queries), k) for s in self.searchers]
        out = []
        for j in range(len(queries)):
            lists = [_drop_excluded(h[j], excluded[j], n_cand) for h in hits]
            n_excl = sum(x[0] in excluded[j] for h in hits for x in h[j]) if excluded[j] else 0
            if self.mode == HYBRID:
                rows, w = fusion.fuse_many(lists, self.priors, self.b, conf_rank=self.conf_rank,
                                           clip=[bool(self.clip_dense)] * len(lists))
                out.append(Retrieved(rows, w[-1], n_excl, dict(zip(self.names, w))))
            else:
                out.append(Retrieved([(d, score, score) for d, score in fusion.top(lists[0], self.b)], None, n_excl))
        return out


@contextlib.contextmanager
def _retrievals_writer(out_dir: Path, out_schema: pa.Schema):
    """A Parquet writer of ``out_dir/retrievals.parquet``: written under a temp name, renamed into place only when the
    block ends without an error (else the temp file is removed)."""
    tmp = out_dir / ".retrievals.parquet.tmp"
    writer = pq.ParquetWriter(tmp, out_schema, compression="zstd")
    try:
        yield writer
        writer.close()
        os.replace(tmp, out_dir / "retrievals.parquet")
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def run(out_dir: Path, *, examples: Path, encoder=None, mode: str = HYBRID, b: int = 40, candidates: int = 4000,
        conf_rank: int = 100, clip_dense: bool = False, dense_weight: float = 0.3, retrievers: Sequence[str] | None = None,
        weights: dict | None = None, batch_size: int = 256, threads: int = 1, start: int | None = None,
        end: int | None = None, **artifacts: Path) -> dict:
    """Write ``retrievals.parquet`` for every example of ``examples``.

    ``artifacts``: each retriever's artifact under its name (``bm25=`` a BuildBM25Index, ``dense=`` a
    BuildDenseIndex artifact; only the ones the mode reads); ``encoder`` is the dense index's
    :class:`stages.retrieval.dense.EncoderSpec` (or its dict; None = the embedded MiniLM). ``retrievers``/``weights``:
    what hybrid mode fuses and their priors (default: bm25 and dense, priors ``1 − dense_weight``, ``dense_weight``).
    ``candidates`` is clamped to the corpus size. ``conf_rank``/``clip_dense``/``dense_weight``: see
    :mod:`stages.retrieval.fusion` (``conf_rank=101, clip_dense=True`` reproduces the released code). ``batch_size``
    examples are read and their queries encoded together. ``threads`` is accepted and ignored: BM25 queries run one at
    a time, which is faster here than Anserini's threaded ``batch_search`` (see
    :class:`stages.retrieval.bm25.BM25Searcher`).

    ``start``/``end`` (a shard of the sharded stage, pipeline/engine/sharding.py): only the batches of ``batch_size``
    examples that *start* at a row in ``[start, end)``; the batches are those of a whole run, and :func:`merge`
    concatenates the shards' row groups into the whole run's file.
    """
    names = used_retrievers(mode, retrievers)
    unknown = sorted(set(artifacts) - set(searchers.names()))
    if unknown:
        raise ValueError(f"PreRetrieve: unknown argument(s) {', '.join(unknown)} (not a registered retriever)")
    path = _examples_file(Path(examples))
    retriever = HybridRetriever(encoder=encoder, mode=mode, b=b, candidates=candidates, conf_rank=conf_rank,
                                clip_dense=clip_dense, dense_weight=dense_weight, retrievers=retrievers,
                                weights=weights, artifacts=artifacts)
    out_schema = schema(names)
    out_dir = Path(out_dir)
    pf = pq.ParquetFile(path)
    total = pf.metadata.num_rows
    lo, hi = int(start or 0), total if end is None else int(end)
    etas: list[float] = []
    n_rows = short = dropped = n_examples = 0
    search_total = 0.0
    position = 0
    with _retrievals_writer(out_dir, out_schema) as writer, \
            tqdm(total=total, unit="ex", desc=f"PreRetrieve ({mode})", file=sys.stderr, dynamic_ncols=True) as bar:
        for batch in pf.iter_batches(columns=["example_id", "query", "exclude_doc_ids"], batch_size=batch_size):
            position += batch.num_rows
            if not lo <= position - batch.num_rows < hi:  # a shard: another shard's batch
                continue
            n_examples += batch.num_rows
            cols = batch.to_pydict()
            t0 = time.perf_counter()
            results = retriever.retrieve([q or "" for q in cols["query"]], cols["exclude_doc_ids"])
            share = (time.perf_counter() - t0) / max(batch.num_rows, 1)
            search_total += share * batch.num_rows
            out = {name: [] for name in out_schema.names}
            for example_id, res in zip(cols["example_id"], results):
                if res.eta is not None:
                    etas.append(res.eta)
                dropped += res.excluded_hits
                short += len(res.rows) < b
                for rank, (doc_id, fused, *scores) in enumerate(res.rows, start=1):
                    out["example_id"].append(int(example_id))
                    out["rank"].append(rank)
                    out["doc_id"].append(doc_id)
                    out["fused"].append(fused)
                    for name, score in zip(names, scores):
                        out[name].append(score)
                    out["search_s"].append(share)
            n_rows += len(out["doc_id"])
            writer.write_table(pa.table(out, schema=out_schema))
            bar.update(batch.num_rows)
    stats = {"mode": mode, **({"retrievers": list(names)} if names != PAPER_PAIR and mode == HYBRID else {}),
             "num_examples": n_examples, "rows": n_rows, "b": int(b), "candidates": retriever.candidates,
             "examples_with_fewer_than_b": int(short), "excluded_hits_dropped": int(dropped),
             "search_s": round(search_total, 3)}
    if etas:
        e = np.asarray(etas)
        stats.update(eta_mean=float(e.mean()), eta_min=float(e.min()), eta_max=float(e.max()), eta_count=len(etas))
    if start is not None or end is not None:
        stats["range"] = [lo, hi]
        (out_dir / SHARD_STATS).write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    return stats


def merge(out_dir: Path, *, shards: Sequence[Path], mode: str = HYBRID, retrievers: Sequence[str] | None = None,
          **_params) -> dict:
    """The shards of a sharded PreRetrieve (in example order) → the ``retrievals.parquet`` :func:`run` writes for
    every example, byte for byte: each shard's row groups (one per batch of examples) are written again in order, as
    the whole run writes one per batch. (``search_s`` is each batch's measured search time, as in any run.)"""
    out_schema = schema(used_retrievers(mode, retrievers))
    stats = [json.loads((Path(s) / SHARD_STATS).read_text(encoding="utf-8")) for s in shards]
    with _retrievals_writer(Path(out_dir), out_schema) as writer:
        for s in shards:
            with pq.ParquetFile(Path(s) / "retrievals.parquet") as pf:
                for g in range(pf.metadata.num_row_groups):
                    writer.write_table(pf.read_row_group(g).cast(out_schema))
    return merge_stats(stats)


SHARD_STATS = "shard.json"  # a shard's stats (only a shard writes it), summed by the merge


def merge_stats(parts: Sequence[dict]) -> dict:
    """A whole run's stats from its shards' (counts summed, η's range and mean over every example)."""
    out = {k: v for k, v in parts[0].items() if k not in ("range", "eta_count")}
    for k in ("num_examples", "rows", "examples_with_fewer_than_b", "excluded_hits_dropped"):
        out[k] = sum(int(p.get(k, 0)) for p in parts)
    out["search_s"] = round(sum(float(p.get("search_s", 0.0)) for p in parts), 3)
    with_eta = [p for p in parts if p.get("eta_count")]
    if with_eta:
        n = sum(p["eta_count"] for p in with_eta)
        out.update(eta_mean=sum(p["eta_mean"] * p["eta_count"] for p in with_eta) / n,
                   eta_min=min(p["eta_min"] for p in with_eta), eta_max=max(p["eta_max"] for p in with_eta))
    out["merged_shards"] = len(parts)
    return out


# ---- reading the artifact (Generate, the benches) ---------------------------------------------------------------

def read_retrievals(retrievals_dir: Path | None) -> dict[int, list[int]]:
    """``{example_id: [doc_id by rank]}`` from PreRetrieve's ``retrievals.parquet``."""
    if retrievals_dir is None:
        return {}
    t = pq.read_table(Path(retrievals_dir) / "retrievals.parquet", columns=["example_id", "rank", "doc_id"])
    out: dict[int, list[tuple[int, int]]] = {}
    for e, r, d in zip(*(t.column(c).to_pylist() for c in ("example_id", "rank", "doc_id"))):
        out.setdefault(int(e), []).append((int(r), int(d)))
    return {e: [d for _, d in sorted(v)] for e, v in out.items()}


def read_search_seconds(retrievals_dir: Path | None) -> dict[int, float]:
    """``{example_id: seconds}``: each example's share of PreRetrieve's search time (empty for artifacts that predate
    the ``search_s`` column, or without retrievals)."""
    if retrievals_dir is None:
        return {}
    path = Path(retrievals_dir) / "retrievals.parquet"
    if "search_s" not in pq.read_schema(path).names:
        return {}
    t = pq.read_table(path, columns=["example_id", "search_s"])
    return {int(e): float(s or 0.0) for e, s in zip(t.column("example_id").to_pylist(), t.column("search_s").to_pylist())}
