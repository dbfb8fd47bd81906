"""TriviaQA, open-domain unfiltered test (11,313 questions; DPR split), DPR TSV ``question<TAB>['alias', ...]``.

As in the paper, rows whose answer list does not parse are skipped and counted (``stats["skipped_unparsable"]``).
Metric: ALR over all aliases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from tasks.base import Example, QATask, qa_example
from tasks.dpr import iter_dpr_tsv
from tasks.errors import TaskInputError
from tasks.registry import register


@register("triviaqa")
class TriviaQA(QATask):
    name = "triviaqa"
    data_help = "DPR trivia-test.qa.csv / pyserini topics TSV"

    def read(self, path: Path, stats: dict) -> Iterator[Example]:
        n = 0
        for line, question, answers in iter_dpr_tsv(path, stats, skip_unparsable=True):
            n += 1
            yield qa_example(self.name, question, answers, line=line)
        if n == 0:
            raise TaskInputError(path, None, f"no parsable question (skipped {stats['skipped_unparsable']} rows)")
