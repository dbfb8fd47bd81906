"""What a corpus task sees of the corpus (``Task.draw``): a duck-typed :class:`Corpus`, and helpers over it.

``tasks/`` imports nothing from ``stages``; LoadTask (``stages/evaluation/load_task.py``) hands a corpus task an object
with this interface, built over the ConvertCorpus passages and the LM's tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Protocol, Sequence


class Corpus(Protocol):
    """The passages (``doc_id``, ``source_id``, ``title``, ``text``, ``part``, ``meta`` JSON) and the LM's tokenizer."""

    folder: Path  # named in errors

    def iter_batches(self, columns: Sequence[str] | None = None, batch_size: int = 10_000) -> Iterator:
        """pyarrow record batches of ``columns``, in ``doc_id`` order."""

    def get(self, doc_ids: Sequence[int], columns: Sequence[str] | None = None) -> list[dict]:
        """The rows of ``doc_ids`` (dicts), in the order given."""

    def passage_texts(self, batch) -> list[str]:
        """Each passage of a batch (with ``title`` and ``text``) as the LM reads it (``"{title}. {text}"``)."""

    def passage_text(self, row: dict) -> str:
        """One passage row as the LM reads it (the same template)."""

    def encode(self, texts: list[str]) -> list[list[int]]:
        """The LM's token ids of each text, no special tokens."""

    def decode(self, ids: list[int]) -> str:
        """The LM's text of token ids, special tokens and spacing kept as they are."""


def doc_ids_of_sources(corpus: Corpus, sources: set[str]) -> dict[str, list[int]]:
    """``{source_id: [doc_id, ...]}`` for the given sources, in one streaming pass over two columns."""
    import pyarrow as pa
    import pyarrow.compute as pc

    found: dict[str, list[int]] = {s: [] for s in sources}
    value_set = pa.array(sorted(sources), type=pa.string())
    for batch in corpus.iter_batches(["doc_id", "source_id"]):
        hit = batch.filter(pc.is_in(batch.column("source_id"), value_set=value_set))
        for doc_id, source_id in zip(hit.column("doc_id").to_pylist(), hit.column("source_id").to_pylist()):
            found[source_id].append(doc_id)
    return found
