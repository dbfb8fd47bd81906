"""LoadTask: one registered task's examples as ``examples.parquet`` (schema: ``tasks.base.examples_schema``).

The task is looked up in :mod:`tasks.registry`, never matched by name here. A ``file`` task (a paper benchmark) reads
its official file ``data`` and draws the paper's seeded subsample of ``n_examples`` (``Task.load_with_stats``). A
``corpus`` task (the embedded ``completion``, ``completion_excluded``, ``bio``: ``tasks/completion.py``,
``tasks/bio.py``) draws its examples from the ConvertCorpus passages through :class:`CorpusView`, with
``prefix_tokens``/``target_tokens`` as options. The counts go to the manifest.
"""

from __future__ import annotations

import os
from pathlib import Path

from stages.corpus.passages import PassageReader
from stages.errors import InputError
from stages.lm.load import load_tokenizer
from stages.lm.pretokenize import DEFAULT_TEMPLATE, encode_texts, fill_template
from tasks import registry
from tasks.base import examples_to_table
from tasks.errors import TaskInputError

VERSION = "1"

EXAMPLES_FILE = "examples.parquet"


class CorpusView:
    """The :class:`tasks.corpus.Corpus` a corpus task draws from: the passages, and the LM's tokenizer (loaded on first
    use: a task that tokenizes nothing never loads it)."""

    def __init__(self, passages: Path, lm: Path):
        self.reader = PassageReader(passages)
        self.folder = self.reader.folder
        self._lm, self._tokenizer = lm, None

    @property
    def tokenizer(self):
        if self._tokenizer is None:

            self._tokenizer = load_tokenizer(self._lm)
        return self._tokenizer

    def iter_batches(self, columns=None, batch_size: int = 10_000):
        return self.reader.iter_batches(columns, batch_size)

    def get(self, doc_ids, columns=None) -> list[dict]:
        return self.reader.get(doc_ids, columns) if columns is not None else self.reader.get(doc_ids)

    def passage_texts(self, batch) -> list[str]:
        return fill_template(batch, DEFAULT_TEMPLATE)

    def passage_text(self, row: dict) -> str:
        return DEFAULT_TEMPLATE.format(**row)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return encode_texts(self.tokenizer, texts)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _write(out_dir: Path, examples, sort_meta: bool) -> None:
    import pyarrow.parquet as pq

    tmp = Path(out_dir) / f".{EXAMPLES_FILE}.tmp"
    pq.write_table(examples_to_table(examples, sort_meta=sort_meta), tmp, compression="zstd")
    os.replace(tmp, Path(out_dir) / EXAMPLES_FILE)


def _from_file(spec, name: str, lm: Path, data: Path, n_examples: int, seed: int, options: dict):

    if spec.needs_tokenizer:

        options = {**options, "tokenizer": load_tokenizer(lm)}
    task = registry.get(name, **options)
    examples, stats = task.load_with_stats(data, limit=n_examples, seed=seed)
    if not examples:
        raise InputError(data, None, f"no usable {name} examples in this file")
    return examples, stats


def run(out_dir: Path, *, passages: Path, lm: Path, task: str, n_examples: int = 16, seed: int = 0,
        prefix_tokens: int = 32, target_tokens: int = 96, data: Path | None = None, **options) -> dict:
    """Write ``examples.parquet`` for the registered ``task``: a file task from its file ``data``, a corpus task drawn
    from ``passages`` (``prefix_tokens``/``target_tokens`` and ``options`` go to its ``draw``)."""

    try:
        spec = registry.spec(task)
    except KeyError as e:
        raise ValueError(str(e.args[0])) from None
    try:
        if spec.source == "file":
            if data is None:
                raise ValueError(f"task {task!r} reads its benchmark file: set [paper_tasks] {task} = <path>")
            examples, stats = _from_file(spec, task, lm, Path(data), n_examples, seed, options)
        else:
            if n_examples < 1 or prefix_tokens < 1 or target_tokens < 1:
                raise ValueError("n_examples, prefix_tokens and target_tokens must be >= 1")
            examples, stats = registry.get(task).draw(CorpusView(Path(passages), Path(lm)), n_examples=n_examples, seed=seed,
                                     prefix_tokens=prefix_tokens, target_tokens=target_tokens, **options)
    except TaskInputError as e:
        raise InputError(e.path, e.line, e.message) from None
    _write(out_dir, examples, spec.sort_meta)
    return {"task": task, "num_examples": len(examples), **stats}
