"""The embedded completion tasks, drawn from the corpus: ``completion`` and ``completion_excluded``.

``completion`` is the paper's WikiText setting with the source article *in* the datastore. Each passage's
``"{title}. {text}"`` is tokenized; the eligible passages are those with at least ``prefix_tokens + target_tokens``
tokens (if fewer than ``n_examples`` are, those with at least ``prefix_tokens + 32``). From that list, sorted by
``doc_id``, ``n_examples`` are drawn without replacement with ``numpy.random.default_rng(seed)`` and kept in ``doc_id``
order. ``prefix`` = decode(first ``prefix_tokens`` ids), ``references`` = [decode(the next ≤ ``target_tokens`` ids)],
``query`` = the prefix, ``exclude_doc_ids`` = []. ``meta`` keeps the source (``doc_id``, ``source_id``, ``title``,
``part``) and the exact ids: ``prefix_ids`` (feed these to the LM rather than re-tokenizing ``prefix``) and
``target_ids`` (evaluation-mode PPL).

``completion_excluded`` gives the *same* examples with ``exclude_doc_ids`` = every passage of the same source article
(same ``source_id``), so retrieval can never return the article being continued.

Scored by ROUGE-1/2/L F (×100) against the reference continuation. Memory: one pass over the passages in batches;
8 bytes per eligible passage are kept.
"""

from __future__ import annotations

from typing import Any

from tasks.base import CompletionFamily, Example, Task
from tasks.corpus import Corpus, doc_ids_of_sources
from tasks.errors import TaskInputError
from tasks.metrics import rouge
from tasks.registry import register

FALLBACK_TARGET_TOKENS = 32


def draw_completion(corpus: Corpus, task: str, *, n_examples: int, seed: int, prefix_tokens: int = 32,
                    target_tokens: int = 96, excluded: bool = False) -> tuple[list[Example], dict[str, Any]]:
    """The completion examples of ``corpus`` and their counts (``eligible``, ``min_tokens``); see the module doc."""
    import numpy as np

    strict, relaxed = prefix_tokens + target_tokens, prefix_tokens + FALLBACK_TARGET_TOKENS
    pools: dict[int, list] = {strict: [], relaxed: []}
    for batch in corpus.iter_batches(["doc_id", "title", "text"], 2_000):
        lengths = np.fromiter(map(len, corpus.encode(corpus.passage_texts(batch))), dtype=np.int64)
        doc_ids = batch.column("doc_id").to_numpy()
        for need, chunks in pools.items():
            chunks.append(doc_ids[lengths >= need])
    pool_strict, pool_relaxed = (np.concatenate(pools[k]) for k in (strict, relaxed))
    pool, min_tokens = (pool_strict, strict) if len(pool_strict) >= n_examples else (pool_relaxed, relaxed)
    if len(pool) == 0:
        raise TaskInputError(corpus.folder, None, f"no passage has the {relaxed} tokens the completion task needs "
                                                  f"(prefix_tokens={prefix_tokens} + {FALLBACK_TARGET_TOKENS})")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(pool, size=min(n_examples, len(pool)), replace=False)).tolist()
    rows = corpus.get(chosen)
    ids = corpus.encode([corpus.passage_text(r) for r in rows])
    same_source = doc_ids_of_sources(corpus, {r["source_id"] for r in rows}) if excluded else {}
    examples = []
    for i, (row, tok_ids) in enumerate(zip(rows, ids)):
        prefix_ids, target_ids = tok_ids[:prefix_tokens], tok_ids[prefix_tokens: prefix_tokens + target_tokens]
        prefix = corpus.decode(prefix_ids)
        meta = {"doc_id": row["doc_id"], "source_id": row["source_id"], "title": row["title"],
                "part": row.get("part", 0), "prefix_ids": prefix_ids, "target_ids": target_ids}
        examples.append(Example(example_id=i, task=task, kind="completion", query=prefix, question="", prefix=prefix,
                                references=[corpus.decode(target_ids)],
                                exclude_doc_ids=same_source.get(row["source_id"], []), meta=meta))
    return examples, {"eligible": int(len(pool)), "min_tokens": min_tokens}


@register("completion")
class Completion(CompletionFamily, Task):
    """Text completion of corpus passages, the source article in the datastore (module doc)."""

    name = "completion"
    source = "corpus"
    cut_at_eos = False  # scored as Score always scored it: the decoders never emit EOS text
    sort_meta = False  # meta in insertion order, as LoadTask always wrote it (same bytes)
    max_new_tokens = 96
    exclude_source = False

    def draw(self, corpus: Corpus, *, n_examples: int, seed: int, prefix_tokens: int = 32, target_tokens: int = 96,
             **options) -> tuple[list[Example], dict[str, Any]]:
        return draw_completion(corpus, self.name, n_examples=n_examples, seed=seed, prefix_tokens=prefix_tokens,
                               target_tokens=target_tokens, excluded=self.exclude_source)

    def score_text(self, text: str, example: Example) -> dict[str, Any]:

        if not example.references:
            return {}
        return {k: 100.0 * v for k, v in rouge(text, example.references[0]).items()}


@register("completion_excluded")
class CompletionExcluded(Completion):
    """The same examples as ``completion``, every passage of the source article excluded from retrieval."""

    name = "completion_excluded"
    exclude_source = True
