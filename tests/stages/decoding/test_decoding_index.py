"""Passage keys (each passage encoded alone, batched), the token index (ids that never collide: B8) and the
passage-key cache (memory + shared folder, atomic writes, hit/miss counts)."""

import torch

from decoding_tiny import tiny_llama
from stages.decoding.lm_runner import KeyLayerCapture
from stages.decoding.passage_keys import (PassageKeyCache, encode_passages, lm_fingerprint, lookup_or_encode,
                                          passage_digest)
from stages.decoding.token_index import TokenIndex


def alone_states(model, ids, layer):
    cap = KeyLayerCapture(model, layer)
    with torch.no_grad():
        model(torch.tensor([ids]))
    cap.remove()
    return cap.value[0].float()


def test_passages_encoded_alone_in_padded_batches():
    model = tiny_llama(seed=4)
    passages = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22], [30, 31, 32, 33, 34]]
    for layer in ("paper", "code"):
        keys = encode_passages(model, passages, layer, bos_id=None, batch_size=2)
        for toks, k in zip(passages, keys):
            assert k.shape == (len(toks) - 1, 32)  # one key per token that has a next token
            assert torch.allclose(k, alone_states(model, toks, layer)[:-1], atol=1e-5)
    keys = encode_passages(model, passages, "paper", bos_id=2, batch_size=3)
    for toks, k in zip(passages, keys):
        assert k.shape == (len(toks), 32)  # with a BOS, the BOS state predicts the first token
        assert torch.allclose(k, alone_states(model, [2] + toks, "paper")[:-1], atol=1e-5)


def test_token_index_ids_never_collide_b8():
    # The released code's id doc·max_len + pos: with max_len 4, the pad key of doc 7 (id 7·4 − 2 = 26) equals key 2 of
    # doc 6 (6·4 + 2 = 26). Two separate arrays cannot collide, even with consecutive or huge doc ids.
    big = 2 ** 40
    passages = [(6, [10, 11, 12, 13]), (7, [20, 21]), (big, [30, 31, 32]), (big + 1, [40, 41, 42])]
    keys = [torch.randn(len(t) - 1, 3) for _, t in passages]
    index = TokenIndex(passages, keys, first_value_pos=1)
    pairs = [index.source(i) for i in range(len(index))]
    assert len(set(pairs)) == len(pairs) == 3 + 1 + 2 + 2
    tokens = dict(passages)
    for i, (doc, pos) in enumerate(pairs):
        assert tokens[doc][pos] == int(index.values[i])  # the value is the token at the source position
        assert index.key_row(doc, pos) == i
    assert index.doc_ids.dtype == torch.int64 and int(index.doc_ids.max()) == big + 1
    assert index.key_row(6, 0) == -1 and index.key_row(6, 4) == -1 and index.key_row(99, 1) == -1


def test_token_index_search_mask_and_continuation():
    keys = [torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]]), torch.tensor([[0.0, 1.0]])]
    index = TokenIndex([(1, [9, 10, 11, 12]), (2, [20, 21])], keys, first_value_pos=1)
    nb = index.search(torch.tensor([[0.9, 0.0]]), r=10)
    assert nb.rows.tolist() == [[1, 0, 3, 2]]  # r clamped to the 4 keys
    assert abs(nb.scores[0, 0].item() + 0.01) < 1e-6  # −‖(0.9, 0) − (1, 0)‖²
    assert index.mask(1, 2) and not index.mask(1, 2)  # row 1: the key whose value is token 2 of doc 1
    assert index.n_valid == 3
    nb = index.search(torch.tensor([[0.9, 0.0]]), r=10)
    assert nb.rows.tolist() == [[0, 3, 2]]
    assert index.continuation(1, 2, 64) == [11, 12]  # cut at the passage end, never padded
    assert index.continuation(1, 4, 64) == [] and index.continuation(2, 1, 1) == [21]
    for doc, pos in [(1, 1), (1, 3), (2, 1)]:
        index.mask(doc, pos)
    assert index.n_valid == 0 and index.search(torch.zeros(1, 2), 5).rows.shape == (1, 0)


def test_passage_key_cache_memory_disk_and_counts(tmp_path):
    model = tiny_llama(seed=5)
    ident = lm_fingerprint(model)
    assert ident == lm_fingerprint(model) and ident != lm_fingerprint(tiny_llama(seed=6))
    passages = [[5, 6, 7, 8], [9, 10, 11], [5, 6, 7, 8]]  # the third is the first again
    cache = PassageKeyCache(tmp_path)
    keys, hits, _, _ = lookup_or_encode(cache, model, passages, lm_identity=ident, key_layer="paper", bos_id=None,
                                        batch_size=4)
    assert hits == [False, False, False] and cache.stats["misses"] == 2  # duplicates are encoded once
    assert torch.equal(keys[0], keys[2])
    keys2, hits, _, _ = lookup_or_encode(cache, model, passages[:2], lm_identity=ident, key_layer="paper",
                                         bos_id=None, batch_size=4)
    assert hits == [True, True] and cache.stats["memory_hits"] == 2 and torch.equal(keys2[1], keys[1])
    assert cache.stats["saved_seconds_est"] > 0
    # another process (a fresh cache object on the same folder) reads the files; no temp file is left behind
    other = PassageKeyCache(tmp_path)
    keys3, hits, _, _ = lookup_or_encode(other, model, passages[:2], lm_identity=ident, key_layer="paper",
                                         bos_id=None, batch_size=4)
    assert hits == [True, True] and other.stats["disk_hits"] == 2 and torch.equal(keys3[0], keys[0])
    files = list(tmp_path.rglob("*"))
    assert not [f for f in files if f.name.startswith(".tmp-")]
    assert len([f for f in files if f.suffix == ".npy"]) == 2
    # another layer or BOS setting is another entry
    _, hits, _, _ = lookup_or_encode(other, model, passages[:1], lm_identity=ident, key_layer="code", bos_id=None,
                                     batch_size=4)
    assert hits == [False]
    assert PassageKeyCache.key(ident, "paper", False, passage_digest([1, 2])) != \
        PassageKeyCache.key(ident, "paper", True, passage_digest([1, 2]))


def test_passage_key_cache_lru_budget():
    cache = PassageKeyCache(None, max_bytes=3 * 4 * 10)  # room for three [1, 10] fp32 tensors
    for i in range(5):
        cache.put(f"k{i}", torch.full((1, 10), float(i)))
    assert cache.get("k0") is None and cache.get("k1") is None
    assert cache.get("k4") is not None and cache.get("k2") is not None


def test_lm_fingerprint_samples_every_layer_not_only_the_ends():
    # The old fingerprint hashed the embeddings and the last block only: a fine-tune of a middle layer kept the
    # identity, so the key cache served that LM another LM's keys. One changed weight of a middle layer (at a sampled
    # position) must give another identity; so must a dtype change; the same weights give the same identity.
    model = tiny_llama(seed=7, layers=4)
    ident = lm_fingerprint(model)
    assert lm_fingerprint(tiny_llama(seed=7, layers=4)) == ident
    middle = model.model.layers[1]
    for weight in (middle.mlp.down_proj.weight, middle.self_attn.k_proj.weight, middle.input_layernorm.weight):
        with torch.no_grad():
            old = weight.view(-1)[0].item()
            weight.view(-1)[0] += 0.5
            changed = lm_fingerprint(model)
            weight.view(-1)[0] = old
        assert changed != ident
        assert lm_fingerprint(model) == ident
    assert lm_fingerprint(tiny_llama(seed=7, layers=4).to(torch.float64)) != ident
