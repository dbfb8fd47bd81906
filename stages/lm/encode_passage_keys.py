"""EncodePassageKeys: the LM's keys of passages, computed offline into a passage-key store.

Keys depend only on a passage's tokens and the LM, so they are an artifact like the token shards. Each passage is
encoded alone, exactly as the decoders do on the fly (:func:`stages.decoding.passage_keys.encode_passages` with the
decoder's key layer, BOS rule and token cut at the LM's window − 1), and written to the store of
:mod:`stages.decoding.key_store` (memory-mapped shards by doc_id range, ``index.parquet``, ``store.json``).

Scope:

- ``retrieved``: the union of the doc_ids in the given ``retrievals.parquet`` files (PreRetrieve artifacts), each
  example's first ``passages`` (b) ranks: the passages a run's decoders will index;
- ``corpus``: every passage of the tokens artifact (what a corpus-wide store would hold).

Compression: ``fp32``, ``fp16`` (the default: 2·d bytes per key) or ``pq``: a FAISS product quantizer trained on a
seeded sample of ``pq_train_tokens`` keys, M = the largest divisor of d ≤ ``pq_bytes`` subquantizers of 8 bits (576-d
SmolLM2 states: M = 64, i.e. 64 bytes per key). Keys come back as fp32 in every case.

The LM identity stored is the decoders' own keys' identity (:func:`stages.decoding.passage_keys.lm_fingerprint`, plus
``+bf16`` when ``key_precision = "bf16"``: :func:`stages.decoding.passage_keys.key_identity`); a decoder whose LM, key
precision, layer or BOS rule differ never reads the store (it encodes on the fly instead).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import pyarrow.parquet as pq

from stages.corpus.passages import PassageReader, document_end_ids
from stages.decoding.config import NestConfig
from stages.decoding.key_store import COMPRESSIONS, KeyStoreWriter, pq_subquantizers, train_pq
from stages.errors import InputError
from stages.lm.load import load_lm
from stages.lm.pretokenize import TokenLookup

VERSION = "1"

SCOPES = ("retrieved", "corpus")


def retrieved_doc_ids(retrievals: Sequence[Path], passages: int) -> list[int]:
    """Sorted union of each example's first ``passages`` doc_ids (by rank) over the ``retrievals.parquet`` files."""
    found: set[int] = set()
    for folder in retrievals:
        path = Path(folder) / "retrievals.parquet"
        if not path.is_file():
            raise InputError(path, None, "missing (expected a PreRetrieve artifact)")
        t = pq.read_table(path, columns=["example_id", "rank", "doc_id"])
        per: dict[int, list[tuple[int, int]]] = {}
        for e, r, d in zip(*(t.column(c).to_pylist() for c in ("example_id", "rank", "doc_id"))):
            per.setdefault(int(e), []).append((int(r), int(d)))
        for ranked in per.values():
            found.update(d for _, d in sorted(ranked)[:passages])
    return sorted(found)


def _iter_tokens(tokens: Path, doc_ids: Sequence[int] | None, chunk: int = 2048) -> Iterator[tuple[int, list[int]]]:
    """(doc_id, token ids) in doc_id order: the given doc_ids, or every row of the token shards."""
    lookup = TokenLookup(tokens)
    if doc_ids is None:
        for f in lookup.shard_files:
            pf = pq.ParquetFile(f)
            for g in range(pf.metadata.num_row_groups):
                t = pf.read_row_group(g, columns=["doc_id", "token_ids"])
                yield from zip(t.column("doc_id").to_pylist(), t.column("token_ids").to_pylist())
        return
    for s in range(0, len(doc_ids), chunk):
        part = list(doc_ids[s:s + chunk])
        yield from zip(part, lookup.get(part))


def _as_list(retrievals) -> list[Path]:
    if retrievals is None:
        return []
    if isinstance(retrievals, Mapping):
        return [Path(retrievals[k]) for k in sorted(retrievals)]
    if isinstance(retrievals, (str, Path)):
        return [Path(retrievals)]
    return [Path(r) for r in retrievals]


def run(out_dir: Path, *, tokens: Path, lm: Path, retrievals=None, scope: str = "retrieved",
        key_layer: str = "paper", passage_bos: str = "auto", passages: int = 40, compression: str = "fp16",
        pq_bytes: int = 64, pq_train_tokens: int = 65_536, seed: int = 0, shard_passages: int = 4096,
        batch_size: int = 16, device: str = "cpu", dtype: str | None = None, document_end: str = "none",
        corpus: Path | None = None, key_precision: str = "fp32") -> dict:
    """Encode the passages of ``scope`` into a passage-key store in ``out_dir`` (see the module docstring).

    ``document_end = "eos"`` (NestConfig.document_end) stores the keys of the token lists the decoder indexes: the last
    passage of each article gets EOS after its last token; ``corpus`` (the ConvertCorpus folder) tells which passages
    end their article. ``key_precision`` (NestConfig.key_precision): the encoding's arithmetic, part of the stored
    keys' identity."""

    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}; expected one of {SCOPES}")
    t_start = time.perf_counter()
    folders = _as_list(retrievals)
    if scope == "retrieved" and not folders:
        raise ValueError("scope='retrieved' needs at least one PreRetrieve artifact (retrievals)")
    doc_ids = retrieved_doc_ids(folders, int(passages)) if scope == "retrieved" else None

    ends = None
    if document_end == "eos":
        if corpus is None:
            raise ValueError("document_end='eos' needs the corpus (which passages end their article)")
        ends = document_end_ids(PassageReader(Path(corpus)), doc_ids)
    model, tokenizer = load_lm(lm, device=device, dtype=dtype)
    stats = encode_store(out_dir, model, tokenizer, lambda: _iter_tokens(tokens, doc_ids), key_layer=key_layer,
                         passage_bos=passage_bos, compression=compression, pq_bytes=pq_bytes,
                         pq_train_tokens=pq_train_tokens, seed=seed, shard_passages=shard_passages,
                         batch_size=batch_size, document_end=document_end, ends=ends, key_precision=key_precision,
                         extra={"scope": scope, "passages": int(passages) if scope == "retrieved" else None})
    stats["scope"] = scope
    stats["seconds"] = round(time.perf_counter() - t_start, 3)
    stats["seconds_per_1k_passages"] = round(1000 * stats["seconds"] / max(stats["passages"], 1), 3)
    return stats


def encode_store(out_dir: Path, model, tokenizer, passages: Callable[[], Iterable[tuple[int, Sequence[int]]]], *,
                 key_layer: str = "paper", passage_bos: str = "auto", compression: str = "fp16", pq_bytes: int = 64,
                 pq_train_tokens: int = 65_536, seed: int = 0, shard_passages: int = 4096, batch_size: int = 16,
                 extra: dict | None = None, document_end: str = "none", ends: set[int] | None = None,
                 key_precision: str = "fp32") -> dict:
    """Write the store of ``passages()`` ((doc_id, token ids) in increasing doc_id order; called once per pass, two
    or three times) for ``model``: the core of :func:`run`, usable on any loaded LM."""
    # lazy: torch (and faiss through the key store) takes seconds to import
    import torch
    from tqdm import tqdm

    # lazy: torch and transformers take seconds to import
    from stages.decoding.passage_keys import (encode_passages, index_tokens, key_identity, lm_fingerprint,
                                              max_index_tokens, min_index_tokens, passage_bos_id, passage_digest)

    if compression not in COMPRESSIONS:
        raise ValueError(f"compression={compression!r}; expected one of {COMPRESSIONS}")
    t_start = time.perf_counter()
    # the decoders' own conventions (stages.decoding.passage_keys), so the stored keys are the on-the-fly ones
    NestConfig(key_layer=key_layer, passage_bos=passage_bos, document_end=document_end, key_precision=key_precision)
    bos_id = passage_bos_id(tokenizer, passage_bos)
    max_tokens = max_index_tokens(model)
    min_tokens = min_index_tokens(bos_id)
    identity = key_identity(lm_fingerprint(model), key_precision)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    dim = int(getattr(model.config, "hidden_size", 0) or model.get_input_embeddings().weight.shape[1])

    def passages_in_scope() -> Iterator[tuple[int, list[int]]]:
        for d, toks in passages():
            toks = index_tokens(toks, max_tokens, ends_document=bool(ends) and int(d) in ends, document_end=document_end,
                                eos_id=eos_id)
            if len(toks) >= min_tokens:
                yield int(d), toks

    # pass 1: plan (doc_id, digest, number of keys) of every passage, in doc_id order
    plan: list[tuple[int, str, int]] = []
    for d, toks in tqdm(passages_in_scope(), desc="Plan passage keys", unit=" passages", mininterval=1.0,
                        disable=None):
        plan.append((d, passage_digest(toks), len(toks) - 1 + (bos_id is not None)))
    if not plan:
        raise ValueError("no passage in scope has a key (empty retrievals or corpus?)")

    pq_model, m, sample_keys, train_s = None, None, {}, 0.0
    if compression == "pq":
        t0 = time.perf_counter()
        m = pq_subquantizers(dim, int(pq_bytes))
        rng = random.Random(seed)
        order = list(range(len(plan)))
        rng.shuffle(order)
        chosen, n_sample = set(), 0
        for i in order:
            if n_sample >= pq_train_tokens:
                break
            chosen.add(plan[i][0])
            n_sample += plan[i][2]
        sample_toks = [(d, toks) for d, toks in passages_in_scope() if d in chosen]
        keys = encode_passages(model, [t for _, t in sample_toks], key_layer, bos_id, batch_size, key_precision)
        sample_keys = {d: k for (d, _), k in zip(sample_toks, keys)}
        stack = torch.cat(list(sample_keys.values())).numpy()[:pq_train_tokens]
        pq_model = train_pq(stack, m, seed)
        train_s = time.perf_counter() - t0

    writer = KeyStoreWriter(out_dir, lm_identity=identity, key_layer=key_layer, bos=bos_id is not None,
                            dim=dim, compression=compression, shard_passages=shard_passages, pq=pq_model,
                            extra={**(extra or {}), "max_tokens": max_tokens, "bos_id": bos_id,
                                   "key_precision": key_precision})
    for d, digest, n in plan:
        writer.plan(d, digest, n)

    # pass 2: encode (groups of passages in doc_id order; tokens stored already, or seen earlier, are not encoded)
    encode_s, encoded_passages, encoded_tokens = 0.0, 0, 0
    group = max(1, batch_size) * 8
    pending: list[tuple[int, str, list[int]]] = []
    digests = {d: g for d, g, _ in plan}

    def flush() -> None:
        nonlocal encode_s, encoded_passages, encoded_tokens
        todo, wanted = [], set()
        for d, g, t in pending:
            if not writer.stored(g) and g not in wanted and d not in sample_keys:
                todo.append((d, t))
                wanted.add(g)
        t0 = time.perf_counter()
        keys = encode_passages(model, [t for _, t in todo], key_layer, bos_id, batch_size, key_precision) if todo else []
        encode_s += time.perf_counter() - t0
        encoded_passages += len(todo)
        encoded_tokens += sum(len(t) for _, t in todo)
        fresh = {g: k for (d, _), k in zip(todo, keys) for g in (digests[d],)}
        for d, g, _t in pending:
            writer.add(d, None if writer.stored(g) else sample_keys.get(d, fresh.get(g)))
        pending.clear()

    try:
        with tqdm(total=len(plan), desc=f"EncodePassageKeys ({compression})", unit=" passages",
                  mininterval=1.0, disable=None) as bar:
            for d, toks in passages_in_scope():
                pending.append((d, digests[d], toks))
                if len(pending) >= group:
                    bar.update(len(pending))
                    flush()
            if pending:
                bar.update(len(pending))
                flush()
        info = writer.close()
    except BaseException:
        writer.abort()
        raise
    total_s = time.perf_counter() - t_start
    stats = {"compression": compression, "passages": info["num_passages"],
             "distinct_passages": info["num_distinct_passages"], "keys": info["num_keys"], "dim": dim,
             "bytes_per_key": info["bytes_per_key"], "key_bytes": info["key_bytes"], "lm_identity": identity,
             "encoded_passages": encoded_passages, "encoded_tokens": encoded_tokens,
             "encode_seconds": round(encode_s, 3), "pq_sample_encode_and_train_seconds": round(train_s, 3),
             "seconds": round(total_s, 3),
             "seconds_per_1k_passages": round(1000 * total_s / max(info["num_passages"], 1), 3)}
    if m is not None:
        stats["pq_subquantizers"] = m
        stats["pq_note"] = (f"M = {m}: the largest divisor of d = {dim} that is <= pq_bytes = {pq_bytes} "
                            f"(FAISS needs M | d), 8 bits each: {m} bytes per key")
    return stats

