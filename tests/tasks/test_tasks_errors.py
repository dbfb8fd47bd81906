"""Bad input to every loader: one-line ``path:line: message`` errors (truncated, wrong fields, empty answers, bytes)."""

from __future__ import annotations

import pickle

import pytest

from tasks import registry
from tasks.errors import TaskInputError


def _write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _error(task_name, path, **options) -> TaskInputError:
    with pytest.raises(TaskInputError) as info:
        registry.get(task_name, **options).load(path)
    err = info.value
    assert "\n" not in str(err)
    assert str(err).startswith(str(path))
    return err


def test_error_format_and_pickling():
    e = TaskInputError("data/x.jsonl", 7, "missing field 'answer'")
    assert str(e) == "data/x.jsonl:7: missing field 'answer'"
    assert str(TaskInputError("f", None, "empty")) == "f: empty"
    again = pickle.loads(pickle.dumps(e))
    assert (again.path, again.line, again.message, str(again)) == (e.path, e.line, e.message, str(e))


CASES = [
    # task, file name, content, expected line, message fragment
    ("nq", "t.jsonl", '{"question": "a", "answer": ["x"]}\n{"question": "b", "answ', 2, "truncated"),
    ("nq", "f.jsonl", '{"question": "a", "answer": ["x"]}\n{"question": "b", "answers": ["y"]}\n', 2,
     "missing field 'answer'"),
    ("nq", "e.jsonl", '{"question": "a", "answer": []}\n', 1, "empty answer list"),
    ("nq", "s.jsonl", '{"question": "a", "answer": "x"}\n', 1, "must be a list"),
    ("nq", "a.jsonl", '{"question": "a", "answer": ["x"]}\n["a", ["x"]]\n', 2, "JSON object"),
    ("nq", "c.tsv", "q1\t['a']\nq2\t['b']\textra\n", 2, "2 tab-separated columns"),
    ("nq", "u.tsv", "q1\t['a']\nq2\tnot a list\n", 2, "not a list literal"),
    ("nq", "z.tsv", "q1\t[]\n", 1, "empty answer list"),
    ("nq", "x.txt", "just some text\n", 1, "neither NQ-open"),
    ("triviaqa", "t.tsv", "q1\t['a']\nq2\t['b', 'c", 2, "truncated"),
    ("triviaqa", "c.tsv", "q1 without answers\n", 1, "2 tab-separated columns"),
    ("triviaqa", "e.tsv", "q1\t['a']\nq2\t[]\n", 2, "empty answer list"),
    ("hotpotqa", "t.json", '[{"question": "q", "answer": "a"},\n {"question": "q2", "ans', 2, "truncated"),
    ("hotpotqa", "f.json", '[{"question": "q", "answer": "a"},\n {"question": "q2"}]', 2, "missing field 'answer'"),
    ("hotpotqa", "e.json", '[{"question": "q", "answer": "  "}]', 1, "'answer' is empty"),
    ("hotpotqa", "o.json", '{"question": "q", "answer": "a"}', 1, "JSON array"),
    ("medmcqa", "t.jsonl", '{"question": "q", "choices": ["A. x"], "answer": 0}\n{"question"', 2, "truncated"),
    ("medmcqa", "f.jsonl", '{"question": "q", "options": ["A. x"], "answer": 0}\n', 1, "missing field 'choices'"),
    ("medmcqa", "i.jsonl", '{"question": "q", "choices": ["A. x", "B. y"], "answer": 2}\n', 1, "option index"),
    ("medmcqa", "e.jsonl", '{"question": "q", "choices": [], "answer": 0}\n', 1, "non-empty list"),
    ("truthfulqa", "c.csv", "Type,Question,Correct Answers\nA,q,a\n", 1, "'Incorrect Answers'"),
    ("truthfulqa", "t.csv", 'Question,Correct Answers,Incorrect Answers\nq,a,"b; c\n', 2, "truncated"),
    ("truthfulqa", "n.csv", "Question,Correct Answers,Incorrect Answers\nq,a\n", 2, "expected 3 columns"),
    ("truthfulqa", "e.csv", "Question,Correct Answers,Incorrect Answers\nq1,a,b\nq2, ; ,b\n", 3,
     "empty answer list in 'Correct Answers'"),
    ("factscore", "e.txt", "\n\n", None, "no entities"),
    ("wikitext", "w.raw", " \n plain text without headings \n", 2, "heading"),
]


@pytest.mark.parametrize("task_name,name,content,line,fragment", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_input(tmp_path, task_name, name, content, line, fragment):
    path = _write(tmp_path, name, content)
    options = {"tokenizer": object()} if task_name == "wikitext" else {}
    err = _error(task_name, path, **options)
    assert err.line == line, str(err)
    assert fragment in err.message, str(err)


@pytest.mark.parametrize("task_name,name,good_first_line", [
    ("nq", "n.jsonl", b'{"question": "a", "answer": ["x"]}\n'),
    ("triviaqa", "n.tsv", b"q1\t['a']\n"),
    ("hotpotqa", "n.json", b'[{"question": "a", "answer": "x"},\n'),
    ("medmcqa", "n.jsonl", b'{"question": "q", "choices": ["A. x"], "answer": 0}\n'),
    ("truthfulqa", "n.csv", b"Question,Correct Answers,Incorrect Answers\n"),
    ("factscore", "n.txt", b"Ada Lovelace\n"),
    ("wikitext", "n.raw", b" = Title = \n"),
])
def test_non_utf8_names_the_line(tmp_path, task_name, name, good_first_line):
    path = _write(tmp_path, name, good_first_line + b"caf\xe9 latin-1 bytes\n")
    options = {"tokenizer": object()} if task_name == "wikitext" else {}
    err = _error(task_name, path, **options)
    assert err.line == 2 and "not valid UTF-8" in err.message and "0xe9" in err.message


def test_missing_file(tmp_path):
    err = _error("nq", tmp_path / "absent.jsonl")
    assert "file not found" in err.message


def test_truncated_gzip(tmp_path):
    import gzip

    data = gzip.compress(b'{"question": "a", "answer": ["x"]}\n' * 50)
    err = _error("nq", _write(tmp_path, "t.jsonl.gz", data[: len(data) // 2]))
    assert "compressed" in err.message


def test_compressed_files_are_read(tmp_path):
    import gzip

    import zstandard

    raw = b'{"question": "a", "answer": ["x"]}\n'
    assert len(registry.get("nq").load(_write(tmp_path, "a.jsonl.gz", gzip.compress(raw)))) == 1
    zst = zstandard.ZstdCompressor().compress(raw)
    assert len(registry.get("nq").load(_write(tmp_path, "a.jsonl.zst", zst))) == 1
