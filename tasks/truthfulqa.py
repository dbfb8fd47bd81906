"""TruthfulQA generation task (817 questions, test only), scored as Lin et al. (2022).

Format: the CSV of ``sylinrl/TruthfulQA`` with a header; columns used (by name): ``Question``, ``Correct Answers``,
``Incorrect Answers`` (``;``-separated lists), optionally ``Best Answer``, ``Type``, ``Category``, ``Source`` (kept in
meta). As in Lin et al.'s ``split_multi_answer``, answers are stripped and closed with a period; "I have no comment."
is added to the true references. ``references`` = true references; ``meta["incorrect_answers"]`` = false references.

Metric (``tasks.metrics.truthfulqa_deltas``): ∆BLEU = max BLEU over true refs − max over false refs; ∆RG-1 the same
with ROUGE-1 F ×100; plus ``*_max`` and ``*_acc``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterator

from tasks.base import Column, Example, Task
from tasks.errors import TaskInputError
from tasks.files import open_text_stream, read_text
from tasks.metrics import truthfulqa_deltas
from tasks.registry import register

NO_COMMENT = "I have no comment."
REQUIRED = ("Question", "Correct Answers", "Incorrect Answers")
OPTIONAL = ("Best Answer", "Type", "Category", "Source")


def split_answers(field: str) -> list[str]:
    """``"a; b."`` → ``["a.", "b."]``: split on ``;``, strip, drop empties, close each with a period."""
    out = []
    for a in field.strip().split(";"):
        a = a.strip()
        if a:
            out.append(a if a.endswith(".") else a + ".")
    return out


def true_references(correct: list[str]) -> list[str]:
    return correct if NO_COMMENT in correct else [*correct, NO_COMMENT]


@register("truthfulqa")
class TruthfulQA(Task):
    name = "truthfulqa"
    kind = "qa"
    metrics = ("bleu_diff", "rouge1_diff", "bleu_acc", "rouge1_acc", "bleu_max", "rouge1_max")
    quality_metric = "rouge1_diff"
    headline_metrics = ("bleu_diff", "rouge1_diff")
    report_columns = (Column("bleu_diff", "∆BLEU", 1, 2), Column("rouge1_diff", "∆RG-1", 1, 2),
                      Column("num_tokens", "Avg.Len"))
    data_help = "TruthfulQA.csv"
    max_new_tokens = 128

    def read(self, path: Path, stats: dict) -> Iterator[Example]:
        text = read_text(path)
        reader = csv.reader(open_text_stream(text), strict=True)
        try:
            header = next(reader)
        except StopIteration:
            raise TaskInputError(path, None, "empty file (expected a CSV header)") from None
        except csv.Error as e:
            raise TaskInputError(path, 1, f"bad CSV header: {e}") from None
        col = {name.strip(): i for i, name in enumerate(header)}
        missing = [c for c in REQUIRED if c not in col]
        if missing:
            raise TaskInputError(path, 1, f"missing column(s) {', '.join(map(repr, missing))} "
                                          f"(header: {', '.join(header)})")
        n = 0
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise TaskInputError(path, start, f"bad CSV row: {e} (file truncated?)") from None
            if not any(f.strip() for f in row):
                continue
            if len(row) != len(header):
                raise TaskInputError(path, start, f"expected {len(header)} columns, got {len(row)}"
                                     + (" (file truncated?)" if reader.line_num >= text.count("\n") else ""))
            question = " ".join(row[col["Question"]].split())
            if not question:
                raise TaskInputError(path, start, "empty question")
            correct = split_answers(row[col["Correct Answers"]])
            incorrect = split_answers(row[col["Incorrect Answers"]])
            if not correct:
                raise TaskInputError(path, start, "empty answer list in 'Correct Answers'")
            if not incorrect:
                raise TaskInputError(path, start, "empty answer list in 'Incorrect Answers'")
            meta: dict[str, Any] = {"line": start, "incorrect_answers": incorrect}
            meta.update({c.lower().replace(" ", "_"): row[col[c]] for c in OPTIONAL if c in col})
            n += 1
            yield Example(example_id=-1, task=self.name, kind="qa", query=question, question=question,
                          references=true_references(correct), meta=meta)
        if n == 0:
            raise TaskInputError(path, None, "no questions (header only)")

    def score_text(self, text: str, example: Example) -> dict[str, Any]:

        return truthfulqa_deltas(text, example.references, example.meta["incorrect_answers"])
