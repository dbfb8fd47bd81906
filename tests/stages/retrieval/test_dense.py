"""EncodePassages / BuildDenseIndex / import / DenseSearcher (stages/retrieval/dense.py) on tiny fixtures."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.retrieval import dense
from stages.errors import InputError

SCHEMA = pa.schema([("doc_id", pa.int64()), ("source_id", pa.string()), ("title", pa.string()),
                    ("section", pa.string()), ("text", pa.string())])
# lengths vary a lot on purpose: length-sorted batching must put every vector back in its doc_id row
PASSAGES = [
    ("Paris", "Paris is the capital and largest city of France, on the Seine."),
    ("Jazz", "Jazz."),
    ("Lucene", "Apache Lucene is a free and open-source search engine library written in Java. " * 6),
    ("", "A passage without a title about photosynthesis in green plants."),
    ("Mount Everest", "Everest is Earth's highest mountain above sea level, in the Himalayas."),
    ("Berlin", "Berlin is the capital of Germany."),
]


def write_passages(folder: Path, passages, shard_rows=4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, len(passages), shard_rows)):
        chunk = passages[start:start + shard_rows]
        ids = list(range(start, start + len(chunk)))
        table = pa.table({"doc_id": ids, "source_id": [str(i) for i in ids], "title": [t for t, _ in chunk],
                          "section": [""] * len(chunk), "text": [x for _, x in chunk]}, schema=SCHEMA)
        pq.write_table(table, folder / f"passages-{s:05d}.parquet")
    return folder


def direct_encode(model_dir, text, pooling="mean", normalize=True, max_length=256):
    """Reference: one text alone, no padding, no batching."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    enc = tok(text, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state[0]
    v = h[0] if pooling == "cls" else h.mean(0)
    if normalize:
        v = v / v.norm()
    return v.numpy()


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    passages = write_passages(root / "passages", PASSAGES)
    emb = root / "emb"
    emb.mkdir()
    # batch_size 4 and chunk_rows 3: batches cross the length order and chunks cross shard boundaries' interiors
    stats = dense.run_encode(emb, passages=passages, encoder=dense.embedded_encoder(), batch_size=4, chunk_rows=3)
    return root, passages, emb, stats


def test_encode_matches_a_direct_per_text_encode(encoded):
    _, _, emb, stats = encoded
    assert stats["num_docs"] == 6 and stats["dim"] == 384
    shards = sorted(emb.glob("embeddings-*.npy"))
    assert [p.name for p in shards] == ["embeddings-00000.npy", "embeddings-00001.npy"]
    vecs = np.concatenate([np.load(p) for p in shards])
    assert vecs.dtype == np.float32 and vecs.shape == (6, 384)
    model_dir = dense.embedded_encoder().query_model
    for i, (title, text) in enumerate(PASSAGES):
        ref = direct_encode(model_dir, f"{title} {text}".strip())
        assert np.abs(vecs[i] - ref).max() < 1e-5, i
    meta = json.loads((emb / "encoder.json").read_text())
    assert meta["num_docs"] == 6 and meta["encoder"]["name"] == "all-MiniLM-L6-v2"


def test_embedded_encoder_agrees_with_sentence_transformers(encoded):
    from sentence_transformers import SentenceTransformer

    _, _, emb, _ = encoded
    vecs = np.concatenate([np.load(p) for p in sorted(emb.glob("embeddings-*.npy"))])
    st = SentenceTransformer(dense.embedded_encoder().query_model, device="cpu")
    ref = st.encode([f"{t} {x}".strip() for t, x in PASSAGES], batch_size=64, normalize_embeddings=True)
    assert np.abs(vecs - ref).max() < 1e-5


def test_length_sorted_batches_restore_input_order():
    enc = dense.TextEncoder(dense.embedded_encoder().query_model, pooling="mean", normalize=True, max_length=256)
    texts = [f"{t} {x}".strip() for t, x in PASSAGES]
    perm = [3, 0, 5, 2, 1, 4]
    a = enc.encode(texts, batch_size=2)
    b = enc.encode([texts[i] for i in perm], batch_size=4)
    assert np.abs(a[perm] - b).max() < 1e-5
    assert not np.allclose(a[0], a[1])


def test_flat_index_self_retrieval_and_text_query(encoded):
    root, _, emb, _ = encoded
    idx = root / "flat"
    idx.mkdir()
    stats = dense.run_index(idx, embeddings=emb)
    assert stats["ntotal"] == 6 and stats["trained_on"] == 0
    meta = json.loads((idx / "dense.json").read_text())
    assert meta["index_string"] == "Flat" and meta["metric"] == "ip" and meta["encoder"]["name"] == "all-MiniLM-L6-v2"
    searcher = dense.DenseSearcher(idx, dense.embedded_encoder())
    vecs = np.concatenate([np.load(p) for p in sorted(emb.glob("embeddings-*.npy"))])
    hits = searcher.search_vectors(vecs, k=2)
    assert [h[0][0] for h in hits] == list(range(6))
    assert all(h[0][1] == pytest.approx(1.0, abs=1e-5) for h in hits)  # normalised: self inner product is 1
    q = searcher.search(["What is the capital of France?", "highest mountain on Earth"], k=100)
    assert q[0][0][0] == 0 and q[1][0][0] == 4
    assert len(q[0]) == 6  # k clamped to the corpus
    assert [s for _, s in q[0]] == sorted((s for _, s in q[0]), reverse=True)


def _random_embeddings(folder: Path, n=300, dim=16, seed=0) -> np.ndarray:
    folder.mkdir(parents=True)
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.save(folder / "embeddings-00000.npy", x[:200])
    np.save(folder / "embeddings-00001.npy", x[200:])
    return x


def test_ivf_index_string_on_random_vectors(tmp_path):
    x = _random_embeddings(tmp_path / "emb")
    out = tmp_path / "ivf"
    out.mkdir()
    stats = dense.run_index(out, embeddings=tmp_path / "emb", index_string="IVF4,Flat", nprobe=4, train_size=250)
    assert stats == {"ntotal": 300, "dim": 16, "index_string": "IVF4,Flat", "trained_on": 250}
    searcher = dense.DenseSearcher(out, check_encoder=False)
    assert searcher.meta["nprobe"] == 4
    hits = searcher.search_vectors(x, k=1)
    assert [h[0][0] for h in hits] == list(range(300))  # nprobe = nlist: exact search
    with pytest.raises(ValueError, match="not an IVF index"):
        dense.run_index(tmp_path, embeddings=tmp_path / "emb", nprobe=4)
    with pytest.raises(ValueError, match="index string"):
        dense.run_index(tmp_path, embeddings=tmp_path / "emb", index_string="NoSuchIndex12")


def test_l2_metric_scores_are_negated_distances(tmp_path):
    x = _random_embeddings(tmp_path / "emb", n=50)
    out = tmp_path / "l2"
    out.mkdir()
    dense.run_index(out, embeddings=tmp_path / "emb", metric="l2")
    hits = dense.DenseSearcher(out, check_encoder=False).search_vectors(x[:3], k=3)
    for q, h in zip(x[:3], hits):
        assert h[0][1] == pytest.approx(0.0, abs=1e-5)
        d, s = h[1]
        assert s == pytest.approx(-float(((q - x[d]) ** 2).sum()), rel=1e-4)
        assert h[0][1] >= h[1][1] >= h[2][1]


def test_import_prebuilt_index(tmp_path):
    import faiss

    x = _random_embeddings(tmp_path / "emb", n=6)
    prebuilt = faiss.IndexFlatIP(16)
    prebuilt.add(x)
    faiss.write_index(prebuilt, str(tmp_path / "prebuilt.faiss"))
    passages = write_passages(tmp_path / "passages", PASSAGES)
    out = tmp_path / "imported"
    out.mkdir()
    stats = dense.run_import(out, index_file=tmp_path / "prebuilt.faiss", metric="ip", passages=passages)
    assert stats["ntotal"] == 6
    meta = json.loads((out / "dense.json").read_text())
    assert meta["ntotal"] == 6 and str(tmp_path) not in json.dumps(meta)
    hits = dense.DenseSearcher(out, check_encoder=False).search_vectors(x, k=1)
    assert [h[0][0] for h in hits] == list(range(6))
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(InputError, match="not 'l2'"):
        dense.run_import(bad, index_file=tmp_path / "prebuilt.faiss", metric="l2")
    with pytest.raises(InputError, match="corpus has 3 passages"):
        dense.run_import(bad, index_file=tmp_path / "prebuilt.faiss", passages=write_passages(
            tmp_path / "p3", PASSAGES[:3]))
    assert list(bad.iterdir()) == []  # nothing half-imported


def _tiny_bert(folder: Path, seed: int) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(dense.embedded_encoder().query_model).save_pretrained(folder)
    return folder


def test_dragon_style_asymmetric_encoder(tmp_path):
    qdir, cdir = _tiny_bert(tmp_path / "query", 1), _tiny_bert(tmp_path / "context", 2)
    spec = dense.dragon_plus_encoder(qdir, cdir, max_length=64)
    assert (spec.pooling, spec.normalize, spec.passage_model) == ("cls", False, str(cdir))
    ident = dense.encoder_identity(spec)
    assert ident["query_model"] != ident["context_model"]
    assert str(tmp_path) not in json.dumps(ident)
    # the identity follows the content, not the place
    ident2 = dense.encoder_identity(dense.dragon_plus_encoder(_tiny_bert(tmp_path / "q2", 1), cdir, max_length=64))
    assert ident2 == ident

    passages = write_passages(tmp_path / "passages", PASSAGES)
    emb = tmp_path / "emb"
    emb.mkdir()
    dense.run_encode(emb, passages=passages, encoder=spec.to_dict(), batch_size=4)
    vecs = np.concatenate([np.load(p) for p in sorted(emb.glob("embeddings-*.npy"))])
    assert vecs.shape == (6, 32)
    ref = direct_encode(cdir, "Berlin Berlin is the capital of Germany.", pooling="cls", normalize=False, max_length=64)
    assert np.abs(vecs[5] - ref).max() < 1e-5
    assert abs(np.linalg.norm(vecs[5]) - 1.0) > 1e-3  # not normalised

    idx = tmp_path / "idx"
    idx.mkdir()
    dense.run_index(idx, embeddings=emb)
    searcher = dense.DenseSearcher(idx, spec)
    qv = searcher.encoder.encode(["who wrote Lucene"])[0]
    assert np.abs(qv - direct_encode(qdir, "who wrote Lucene", pooling="cls", normalize=False)).max() < 1e-5
    assert len(searcher.search(["who wrote Lucene"], k=3)[0]) == 3
    # a searcher given another encoder than the one the index was built with refuses
    with pytest.raises(ValueError, match="built with encoder"):
        dense.DenseSearcher(idx, dense.dragon_plus_encoder(qdir, qdir, max_length=64))


def test_bad_encode_inputs(tmp_path):
    with pytest.raises(InputError, match="no passages"):
        dense.run_encode(tmp_path, passages=tmp_path)
    gap = tmp_path / "gap"
    gap.mkdir()
    pq.write_table(pa.table({"doc_id": [0, 2], "source_id": ["a", "b"], "title": ["", ""], "section": ["", ""],
                             "text": ["x", "y"]}, schema=SCHEMA), gap / "passages-00000.parquet")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match="dense and in order"):
        dense.run_encode(out, passages=gap)
    with pytest.raises(ValueError):
        dense.EncoderSpec(name="x", query_model="y", pooling="max")
