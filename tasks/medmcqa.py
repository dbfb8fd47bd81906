"""MedMCQA dev (NEST: dev split, answer filter, seeded 2,500-question subsample), asked as open QA.

Format: JSON lines ``{"question": str, "choices": ["A. ...", "B. ...", ...], "answer": 0-based index}`` (the HF
``openlifescienceai/medmcqa`` validation split as converted in ``../shared/data/medmcqa``). Only the question is shown
to the LM; the reference is the text of the correct option (its ``A. `` label removed).

The paper's filter keeps a question when the correct option's text
1. has at most 5 words, 2. has no punctuation (``string.punctuation``), 3. is not "All of the above"
(case-insensitive), and 4. the question does not contain "figure" (case-insensitive).
Each drop reason is counted in the load stats. Metric: ALR.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Iterator

from tasks.base import Example, QATask, qa_example
from tasks.errors import TaskInputError
from tasks.files import iter_jsonl, text_field
from tasks.registry import register

SAMPLE_SIZE = 2500
MAX_ANSWER_WORDS = 5
_LABEL = re.compile(r"^\s*[A-Za-z]\s*[.)]\s+")
_PUNCT = set(string.punctuation)


def option_text(choice: str) -> str:
    """``"A. Vitamin C"`` → ``"Vitamin C"``."""
    return _LABEL.sub("", choice, count=1).strip()


def filter_reason(question: str, answer: str) -> str | None:
    """Why the paper's filter drops this question (a stats key), or None to keep it."""
    if not answer:
        return "filtered_empty_answer"
    if len(answer.split()) > MAX_ANSWER_WORDS:
        return "filtered_long_answer"
    if any(c in _PUNCT for c in answer):
        return "filtered_punctuation"
    if answer.lower() == "all of the above":
        return "filtered_all_of_the_above"
    if "figure" in question.lower():
        return "filtered_figure"
    return None


@register("medmcqa")
class MedMCQA(QATask):
    name = "medmcqa"
    data_help = "MedMCQA dev JSONL"
    family = "multiple_choice"
    sample_size = SAMPLE_SIZE

    def read(self, path: Path, stats: dict) -> Iterator[Example]:
        for key in ("filtered_empty_answer", "filtered_long_answer", "filtered_punctuation",
                    "filtered_all_of_the_above", "filtered_figure"):
            stats.setdefault(key, 0)
        n = 0
        for line, obj in iter_jsonl(path):
            n += 1
            question = text_field(path, line, obj, "question")
            choices = obj.get("choices")
            if "choices" not in obj:
                raise TaskInputError(path, line, f"missing field 'choices' (fields: {', '.join(obj)})")
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
                raise TaskInputError(path, line, "'choices' must be a non-empty list of strings")
            if "answer" not in obj:
                raise TaskInputError(path, line, f"missing field 'answer' (fields: {', '.join(obj)})")
            idx = obj["answer"]
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < len(choices):
                raise TaskInputError(path, line, f"'answer' must be an option index 0..{len(choices) - 1}, "
                                                 f"got {idx!r}")
            answer = option_text(choices[idx])
            reason = filter_reason(question, answer)
            if reason:
                stats[reason] += 1
                continue
            yield qa_example(self.name, question, [answer], line=line, choices=choices, answer_index=idx)
        if n == 0:
            raise TaskInputError(path, None, "no questions (empty file)")
