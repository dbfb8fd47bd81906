"""Natural Questions, open-domain (NEST: the 3,610-question NQ-open test set = the original NQ-open dev split).

Formats (``fmt="auto"`` picks by the first non-blank line):
- ``jsonl``: NQ-open ``{"question": str, "answer": [aliases]}`` (google-research-datasets/natural-questions);
- ``dpr``: DPR / pyserini TSV ``question<TAB>['alias', ...]``.
Metric: ALR over all aliases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from tasks.base import Example, QATask, qa_example
from tasks.dpr import iter_dpr_tsv
from tasks.errors import TaskInputError
from tasks.files import answer_list, iter_jsonl, read_lines, text_field
from tasks.registry import register

FORMATS = ("auto", "jsonl", "dpr")


def sniff_format(path: Path) -> str:
    """``jsonl`` when the first non-blank line starts with ``{``, ``dpr`` when it has a tab; else an error."""
    lines, _ = read_lines(path)
    for i, ln in enumerate(lines):
        if ln.strip():
            if ln.lstrip().startswith("{"):
                return "jsonl"
            if "\t" in ln:
                return "dpr"
            raise TaskInputError(path, i + 1, "neither NQ-open JSON lines nor DPR 'question<TAB>answers' TSV")
    raise TaskInputError(path, None, "no questions (empty file)")


def iter_qa_jsonl(path: Path, task: str, answer_key: str = "answer") -> Iterator[Example]:
    """NQ-open style JSON lines: ``question`` string and a non-empty ``answer`` list."""
    for line, obj in iter_jsonl(path):
        question = text_field(path, line, obj, "question")
        if answer_key not in obj:
            raise TaskInputError(path, line, f"missing field {answer_key!r} (fields: {', '.join(obj)})")
        answers = answer_list(path, line, obj[answer_key], field=answer_key)
        yield qa_example(task, question, answers, line=line)


@register("nq")
class NaturalQuestions(QATask):
    name = "nq"
    data_help = "NQ-open JSONL or the DPR nq-test.qa.csv"

    def __init__(self, *, fmt: str = "auto", **options):
        super().__init__(**options)
        if fmt not in FORMATS:
            raise ValueError(f"unknown NQ format {fmt!r}; expected one of {FORMATS}")
        self.fmt = fmt

    def read(self, path: Path, stats: dict) -> Iterator[Example]:
        fmt = sniff_format(path) if self.fmt == "auto" else self.fmt
        stats["format"] = fmt
        if fmt == "jsonl":
            yield from iter_qa_jsonl(path, self.name)
        else:
            for line, question, answers in iter_dpr_tsv(path, stats, skip_unparsable=False):
                yield qa_example(self.name, question, answers, line=line)
