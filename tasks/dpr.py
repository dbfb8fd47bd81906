"""DPR-style question files: one line per question, ``question<TAB>answers``, answers a Python-literal list.

Used by NQ (DPR ``nq-test.qa.csv`` / pyserini ``topics.dpr.nq.*.txt``) and TriviaQA (``topics.dpr.trivia.test.txt``).
Fields follow CSV quoting with a tab delimiter, as DPR reads them (``csv.reader(f, delimiter="\\t")``): a field with
quotes is wrapped in ``"`` and its inner quotes doubled, e.g. ``"['Dangerous Minds', ""My Posse Don't Do Homework""]"``
(20% of the TriviaQA sample). Each line is decoded on its own, so a stray quote cannot swallow the next lines. The
pyserini copies quote some questions twice (the question decodes to ``"Who ... the ""Bomb Plot"" of 1944?"``); that
second layer is removed too.
"""

from __future__ import annotations

import ast
import csv
import re
from pathlib import Path
from typing import Iterator

from tasks.errors import TaskInputError
from tasks.files import answer_list, read_lines

_QUOTED = re.compile(r'"((?:[^"]|"")*)"', re.DOTALL)


def csv_unquote(field: str) -> str:
    """Remove one layer of CSV quoting (``"a ""b"" c"`` → ``a "b" c``) when ``field`` is a well-formed quoted field."""
    m = _QUOTED.fullmatch(field.strip())
    return m.group(1).replace('""', '"') if m else field


def split_line(line: str) -> list[str]:
    """The tab-separated CSV fields of one line."""
    try:
        return next(csv.reader([line], delimiter="\t", strict=True))
    except csv.Error:
        return line.split("\t")


def parse_answers(field: str) -> list | None:
    """The answer list of a DPR line, or None when the field is not a list literal (``['a', "b"]``)."""
    for text in (field, csv_unquote(field)):
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, (list, tuple)):
            return list(value)
    return None


def iter_dpr_tsv(path: Path, stats: dict, *, skip_unparsable: bool) -> Iterator[tuple[int, str, list[str]]]:
    """``(line, question, answers)`` per line. A line without exactly two fields is the wrong format (error). An answer
    field that is not a list literal is skipped and counted in ``stats["skipped_unparsable"]`` when
    ``skip_unparsable`` (TriviaQA, as the paper), else an error; a last line cut short (no final newline) is always
    an error. An empty answer list is an error."""
    lines, ends = read_lines(path)
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    if last < 0:
        raise TaskInputError(path, None, "no questions (empty file)")
    stats.setdefault("skipped_unparsable", 0)
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        lineno = i + 1
        parts = split_line(ln)
        if len(parts) != 2:
            raise TaskInputError(path, lineno, f"expected 2 tab-separated columns (question, answer list), got "
                                               f"{len(parts)}")
        question, field = csv_unquote(parts[0]).strip(), parts[1]
        if not question:
            raise TaskInputError(path, lineno, "empty question")
        answers = parse_answers(field)
        if answers is None:
            if i == last and not ends:
                raise TaskInputError(path, lineno, "answer list cut short (file truncated?)")
            if not skip_unparsable:
                raise TaskInputError(path, lineno, f"answer column is not a list literal: {field[:60]!r}")
            stats["skipped_unparsable"] += 1
            continue
        yield lineno, question, answer_list(path, lineno, answers)
