"""PreRetrieve (stages/retrieval/pre_retrieve.py) on a micro corpus: the three modes, exclusions, the exact output schema."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.retrieval import bm25

from stages.retrieval import dense

from stages.retrieval import fusion

from stages.retrieval import pre_retrieve

from tests.stages.retrieval.test_bm25 import PASSAGES, SCHEMA as PASSAGE_SCHEMA  # the same six passages
EXAMPLE_SCHEMA = pa.schema([("example_id", pa.int64()), ("task", pa.string()), ("kind", pa.string()),
                            ("query", pa.string()), ("question", pa.string()), ("prefix", pa.string()),
                            ("references", pa.list_(pa.string())), ("exclude_doc_ids", pa.list_(pa.int64())),
                            ("meta", pa.string())])
QUERIES = [("capital of France", []), ("capital of France", [0]), ("highest mountain on Earth", [4, 5])]


def write_passages(folder: Path) -> Path:
    folder.mkdir(parents=True)
    ids = list(range(len(PASSAGES)))
    pq.write_table(pa.table({"doc_id": ids, "source_id": [str(i) for i in ids], "title": [t for t, _ in PASSAGES],
                             "section": [""] * len(ids), "text": [x for _, x in PASSAGES]}, schema=PASSAGE_SCHEMA),
                   folder / "passages-00000.parquet")
    return folder


def write_examples(folder: Path) -> Path:
    folder.mkdir(parents=True)
    n = len(QUERIES)
    pq.write_table(pa.table({"example_id": list(range(n)), "task": ["qa"] * n, "kind": ["qa"] * n,
                             "query": [q for q, _ in QUERIES], "question": [q for q, _ in QUERIES],
                             "prefix": [""] * n, "references": [["x"]] * n,
                             "exclude_doc_ids": [e for _, e in QUERIES], "meta": ["{}"] * n},
                            schema=EXAMPLE_SCHEMA), folder / "examples.parquet")
    return folder


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    passages = write_passages(root / "passages")
    for name in ("bm25", "emb", "dense"):
        (root / name).mkdir()
    bm25.run(root / "bm25", passages=passages)
    dense.run_encode(root / "emb", passages=passages)
    dense.run_index(root / "dense", embeddings=root / "emb")
    return root, write_examples(root / "examples")


BUILT = ("hybrid", "bm25", "dense")  # the modes whose indexes the fixture builds


def _run(root, examples, mode, **kw):
    out = root / f"out_{mode}_{len(list(root.glob('out_*')))}"
    out.mkdir()
    stats = pre_retrieve.run(out, examples=examples, bm25=root / "bm25", dense=root / "dense",
                             encoder=dense.embedded_encoder(), mode=mode, **kw)
    return pq.read_table(out / "retrievals.parquet"), stats, out


def _by_example(table):
    rows = {}
    for r in table.to_pylist():
        rows.setdefault(r["example_id"], []).append(r)
    return rows


def test_hybrid_schema_ranks_and_fusion(artifacts):
    root, examples = artifacts
    table, stats, out = _run(root, examples, "hybrid", b=6, candidates=4000)
    assert table.schema.equals(pre_retrieve.SCHEMA)
    assert [f.name for f in table.schema] == ["example_id", "rank", "doc_id", "fused", "bm25", "dense", "search_s"]
    assert pq.ParquetFile(out / "retrievals.parquet").metadata.row_group(0).column(0).compression == "ZSTD"
    assert [p.name for p in out.iterdir()] == ["retrievals.parquet"]
    assert stats["candidates"] == 6 and stats["num_examples"] == 3  # 4000 clamped to the corpus
    assert stats["excluded_hits_dropped"] >= 3
    rows = _by_example(table)
    assert [r["rank"] for r in rows[0]] == list(range(1, 7))
    assert rows[0][0]["doc_id"] == 0
    # the same numbers as fusing the two retrievers' lists by hand
    s = bm25.BM25Searcher(root / "bm25").search(["capital of France"], 6)[0]
    d = dense.DenseSearcher(root / "dense", dense.embedded_encoder()).search(["capital of France"], 6)[0]
    expected = fusion.fuse(s, d, 6)
    assert [(r["doc_id"], r["bm25"]) for r in rows[0]] == [(e[0], e[2]) for e in expected]
    # dense scores agree to float32 noise (the queries were encoded in another batch, with other padding)
    assert [r["dense"] for r in rows[0]] == pytest.approx([e[3] for e in expected], abs=1e-5)
    assert [r["fused"] for r in rows[0]] == pytest.approx([e[1] for e in expected], abs=1e-5)
    # BM25 matches only Paris and Berlin: the others got the BM25 minimum and a null sparse score
    assert sum(r["bm25"] is None for r in rows[0]) == 4
    assert all(r["dense"] is not None for r in rows[0])
    assert stats["eta_min"] <= stats["eta_mean"] <= stats["eta_max"]


def test_search_seconds_are_shared_per_example(artifacts):
    """Each example carries one positive search time on all its rows; the examples' shares add up to the stage's."""
    from stages.retrieval.pre_retrieve import read_search_seconds

    root, examples = artifacts
    table, stats, out = _run(root, examples, "hybrid", b=4, candidates=4000, batch_size=2)
    rows = _by_example(table)
    per_example = {e: {r["search_s"] for r in rs} for e, rs in rows.items()}
    assert all(len(v) == 1 and next(iter(v)) > 0 for v in per_example.values())
    # a batch of 2 examples shares its time equally: examples 0 and 1 carry the same share
    assert per_example[0] == per_example[1]
    shares = read_search_seconds(out)
    assert set(shares) == set(rows) and all(shares[e] == next(iter(per_example[e])) for e in rows)
    assert sum(shares.values()) == pytest.approx(stats["search_s"], abs=2e-3)
    # an artifact without the column (written before it existed) gives no shares rather than an error
    old = out.parent / "old_retrievals"
    old.mkdir()
    pq.write_table(table.drop(["search_s"]), old / "retrievals.parquet")
    assert read_search_seconds(old) == {} and read_search_seconds(None) == {}


def test_exclusions_are_dropped_before_fusion(artifacts):
    root, examples = artifacts
    for mode in pre_retrieve.modes():
        if mode not in BUILT:  # a retriever registered later (docs/extending.md) has no index in this fixture
            continue
        table, _, _ = _run(root, examples, mode, b=6)
        rows = _by_example(table)
        assert 0 not in {r["doc_id"] for r in rows[1]}, mode
        assert not {4, 5} & {r["doc_id"] for r in rows.get(2, [])}, mode
    # with doc 0 gone, BM25 has only Berlin for "capital of France": its minimum (the fill) is Berlin's own score
    table, _, _ = _run(root, examples, "hybrid", b=6, candidates=10)
    ex1 = _by_example(table)[1]
    berlin = next(r for r in ex1 if r["doc_id"] == 1)
    s = bm25.BM25Searcher(root / "bm25").search(["capital of France"], 6)[0]
    d = dense.DenseSearcher(root / "dense", dense.embedded_encoder()).search(["capital of France"], 6)[0]
    expected = fusion.fuse([h for h in s if h[0] != 0], [h for h in d if h[0] != 0], 6)
    assert [r["doc_id"] for r in ex1] == [e[0] for e in expected]
    assert berlin["bm25"] == pytest.approx(dict(s)[1])


def test_single_retriever_modes(artifacts):
    root, examples = artifacts
    table, stats, _ = _run(root, examples, "bm25", b=3)
    rows = _by_example(table)
    assert "eta_mean" not in stats
    # one score column per retriever used: bm25 only
    assert table.column_names == ["example_id", "rank", "doc_id", "fused", "bm25", "search_s"]
    assert all(r["fused"] == r["bm25"] for r in table.to_pylist())
    assert [r["doc_id"] for r in rows[0]] == [0, 1]  # BM25 returns only the two passages with "capital"
    assert 2 not in rows  # BM25 matched only Everest, and example 2 excludes it: no rows, not a wrong one
    assert stats["examples_with_fewer_than_b"] == 3
    table, _, _ = _run(root, examples, "dense", b=3)
    rows = _by_example(table)
    assert table.column_names == ["example_id", "rank", "doc_id", "fused", "dense", "search_s"]
    assert all(r["fused"] == r["dense"] for r in table.to_pylist())
    assert [len(rows[i]) for i in range(3)] == [3, 3, 3]
    assert rows[0][0]["doc_id"] == 0
    assert [r["fused"] for r in rows[0]] == sorted((r["fused"] for r in rows[0]), reverse=True)


def test_bad_arguments(artifacts, tmp_path):
    root, examples = artifacts
    with pytest.raises(ValueError, match="mode"):
        pre_retrieve.run(tmp_path, examples=examples, bm25=root / "bm25", mode="rrf")
    with pytest.raises(ValueError, match="needs a dense index"):
        pre_retrieve.run(tmp_path, examples=examples, bm25=root / "bm25", mode="hybrid")
    from stages.errors import InputError

    with pytest.raises(InputError, match="examples.parquet"):
        pre_retrieve.run(tmp_path, examples=tmp_path, bm25=root / "bm25", mode="bm25")
    assert list(tmp_path.iterdir()) == []


def test_retrieval_half_on_the_micro_corpus(micro_passages_dir, tmp_path):
    """BM25 + dense + hybrid PreRetrieve over real ConvertCorpus output (60 passages in shards of 25, 25, 10)."""
    import json

    import numpy as np

    for name in ("bm25", "emb", "dense", "out"):
        (tmp_path / name).mkdir()
    assert bm25.run(tmp_path / "bm25", passages=micro_passages_dir)["num_docs"] == 60
    dense.run_encode(tmp_path / "emb", passages=micro_passages_dir, batch_size=16)
    rows = [np.load(p).shape[0] for p in sorted((tmp_path / "emb").glob("embeddings-*.npy"))]
    shards = json.loads((micro_passages_dir / "passages.json").read_text())["shards"]
    assert rows == [s["rows"] for s in shards] == [25, 25, 10]  # embeddings shards follow the passages shards
    dense.run_index(tmp_path / "dense", embeddings=tmp_path / "emb")

    titles = {r["doc_id"]: r["title"] for p in sorted(micro_passages_dir.glob("passages-*.parquet"))
              for r in pq.read_table(p, columns=["doc_id", "title"]).to_pylist()}
    volcano = [d for d, t in titles.items() if t == "Volcano"]
    queries = ["volcano eruption magma lava", "volcano eruption magma lava", "Konrad Zuse computer"]
    n = len(queries)
    pq.write_table(pa.table({"example_id": list(range(n)), "task": ["bio"] * n, "kind": ["qa"] * n,
                             "query": queries, "question": [""] * n, "prefix": [""] * n, "references": [[]] * n,
                             "exclude_doc_ids": [[], volcano, []], "meta": ["{}"] * n}, schema=EXAMPLE_SCHEMA),
                   tmp_path / "examples.parquet")
    stats = pre_retrieve.run(tmp_path / "out", examples=tmp_path / "examples.parquet", bm25=tmp_path / "bm25",
                             dense=tmp_path / "dense", encoder=dense.embedded_encoder(), b=5)
    got = _by_example(pq.read_table(tmp_path / "out" / "retrievals.parquet"))
    assert stats["candidates"] == 60 and stats["rows"] == 15
    assert titles[got[0][0]["doc_id"]] == "Volcano"
    assert "Volcano" not in {titles[r["doc_id"]] for r in got[1]}  # the source-excluded variant
    assert titles[got[2][0]["doc_id"]] == "Konrad Zuse"


def test_hybrid_retriever_gives_the_stage_rows_for_an_ad_hoc_query(artifacts):
    root, examples = artifacts
    table, _, _ = _run(root, examples, "hybrid", b=4)
    stage_rows = _by_example(table)[1]
    retriever = pre_retrieve.HybridRetriever(bm25=root / "bm25", dense=root / "dense",
                                             encoder=dense.embedded_encoder(), b=4)
    (res,) = retriever.retrieve(["capital of France"], exclude=[[0]])
    assert [r[0] for r in res.rows] == [r["doc_id"] for r in stage_rows]
    assert res.excluded_hits == 2  # doc 0 was in both lists
    # 5 dense candidates, the last one scoring below 0: with the paper's formula eta_dense = 1 - s[-1]/max > 1 and
    # BM25 has one hit left (eta_sparse = 0), so eta = 0.7 + 0.3 * eta_dense > 1; the released code's clip bounds it
    assert res.eta > 1
    clipped = pre_retrieve.HybridRetriever(bm25=root / "bm25", dense=root / "dense", encoder=dense.embedded_encoder(),
                                           b=4, clip_dense=True).retrieve(["capital of France"], exclude=[[0]])[0]
    assert clipped.eta == pytest.approx(1.0)
