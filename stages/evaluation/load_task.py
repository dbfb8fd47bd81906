"""LoadTask (minimal): the embedded tasks, built from the corpus itself, as ``examples.parquet``.

Tasks (``task`` parameter):

- ``completion``: text completion, the paper's WikiText setting with the source article *in* the datastore. Each
  passage's ``"{title}. {text}"`` is tokenized (batched, fast tokenizer, no special tokens); the eligible passages are
  those with at least ``prefix_tokens + target_tokens`` tokens (if fewer than ``n_examples`` are, those with at least
  ``prefix_tokens + 32``). From that list, sorted by ``doc_id``, ``n_examples`` are drawn without replacement with
  ``numpy.random.default_rng(seed)`` and kept in ``doc_id`` order. ``prefix`` = decode(first ``prefix_tokens`` ids),
  ``references`` = [decode(the next ≤ ``target_tokens`` ids)], ``query`` = the prefix, ``exclude_doc_ids`` = [].
- ``completion_excluded``: the *same* examples, with ``exclude_doc_ids`` = every passage of the same source article
  (same ``source_id``), so retrieval can never return the article being continued.
- ``bio``: biographies of the corpus's people. A person is a source whose ``meta`` has ``topic == "People"`` (the ovos
  corpus's category) and whose ``description`` does not name a group (band, group, duo, brothers, family, team, ...; see
  :data:`GROUP_WORDS`). On the embedded corpus that is 1,806 of the 1,828 "People" entries; the 22 left out are all
  bands, duos, families or teams ("The Doors", "Laurel and Hardy"). People filed under other topics ("Augustus" is in
  "Uncategorized") are not used.
  ``n_examples`` people are drawn with the seed from the list in corpus order. ``question`` = "Tell me a bio of
  {title}.", ``query`` = the title, ``references`` = the person's passage texts in order, ``exclude_doc_ids`` = [].

``meta`` (JSON) holds the source (``doc_id``, ``source_id``, ``title``, ``doc_ids``, ovos ``description``/``topic``) and,
for completion, the exact token ids: ``prefix_ids`` (feed these to the LM rather than re-tokenizing ``prefix``, whose
text may re-tokenize differently) and ``target_ids``.

Memory: one pass over the passages in batches; 8 bytes per eligible passage are kept.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from stages.errors import InputError
from stages.corpus.passages import PassageReader
from stages.lm.pretokenize import DEFAULT_TEMPLATE, encode_texts, fill_template

VERSION = "1"

TASKS = ("completion", "completion_excluded", "bio")
EXAMPLES_FILE = "examples.parquet"
FALLBACK_TARGET_TOKENS = 32
BIO_QUESTION = "Tell me a bio of {title}."
GROUP_WORDS = re.compile(r"\b(band|group|duo|trio|quartet|quintet|ensemble|orchestra|choir|troupe|brothers|sisters|"
                         r"siblings|family|couple|team)\b", re.I)


def examples_schema():
    import pyarrow as pa

    return pa.schema([("example_id", pa.int64()), ("task", pa.string()), ("kind", pa.string()), ("query", pa.string()),
                      ("question", pa.string()), ("prefix", pa.string()), ("references", pa.list_(pa.string())),
                      ("exclude_doc_ids", pa.list_(pa.int64())), ("meta", pa.string())])


def is_person(meta: dict) -> bool:
    """The bio task's rule: ovos topic "People" and a description that does not name a group."""
    return meta.get("topic") == "People" and not GROUP_WORDS.search(str(meta.get("description", "")))


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _doc_ids_of_sources(reader: PassageReader, sources: set[str]) -> dict[str, list[int]]:
    """``{source_id: [doc_id, ...]}`` for the given sources, in one streaming pass over two columns."""
    import pyarrow as pa
    import pyarrow.compute as pc

    found: dict[str, list[int]] = {s: [] for s in sources}
    value_set = pa.array(sorted(sources), type=pa.string())
    for batch in reader.iter_batches(["doc_id", "source_id"]):
        mask = pc.is_in(batch.column("source_id"), value_set=value_set)
        hit = batch.filter(mask)
        for doc_id, source_id in zip(hit.column("doc_id").to_pylist(), hit.column("source_id").to_pylist()):
            found[source_id].append(doc_id)
    return found


def _completion(reader, tokenizer, n_examples, seed, prefix_tokens, target_tokens, excluded: bool):
    strict, relaxed = prefix_tokens + target_tokens, prefix_tokens + FALLBACK_TARGET_TOKENS
    pools: dict[int, list[np.ndarray]] = {strict: [], relaxed: []}
    for batch in reader.iter_batches(["doc_id", "title", "text"], 2_000):
        lengths = np.fromiter(map(len, encode_texts(tokenizer, fill_template(batch, DEFAULT_TEMPLATE))), dtype=np.int64)
        doc_ids = batch.column("doc_id").to_numpy()
        for need, chunks in pools.items():
            chunks.append(doc_ids[lengths >= need])
    pool_strict, pool_relaxed = (np.concatenate(pools[k]) for k in (strict, relaxed))
    pool, min_tokens = (pool_strict, strict) if len(pool_strict) >= n_examples else (pool_relaxed, relaxed)
    if len(pool) == 0:
        raise InputError(reader.folder, None, f"no passage has the {relaxed} tokens the completion task needs "
                                              f"(prefix_tokens={prefix_tokens} + {FALLBACK_TARGET_TOKENS})")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(pool, size=min(n_examples, len(pool)), replace=False)).tolist()
    rows = reader.get(chosen)
    ids = encode_texts(tokenizer, [DEFAULT_TEMPLATE.format(**r) for r in rows])
    same_source = _doc_ids_of_sources(reader, {r["source_id"] for r in rows}) if excluded else {}
    examples = []
    for row, tok_ids in zip(rows, ids):
        prefix_ids, target_ids = tok_ids[:prefix_tokens], tok_ids[prefix_tokens: prefix_tokens + target_tokens]
        prefix = _decode(tokenizer, prefix_ids)
        meta = {"doc_id": row["doc_id"], "source_id": row["source_id"], "title": row["title"],
                "part": row.get("part", 0), "prefix_ids": prefix_ids, "target_ids": target_ids}
        examples.append({"kind": "completion", "query": prefix, "question": "", "prefix": prefix,
                         "references": [_decode(tokenizer, target_ids)],
                         "exclude_doc_ids": same_source.get(row["source_id"], []), "meta": meta})
    return examples, {"eligible": int(len(pool)), "min_tokens": min_tokens}


def _bio(reader, n_examples, seed):
    people: list[tuple[str, str, dict]] = []  # (source_id, title, meta) in corpus order
    seen: set[str] = set()
    for batch in reader.iter_batches(["source_id", "title", "meta"]):
        for source_id, title, meta in zip(*(batch.column(c).to_pylist() for c in ("source_id", "title", "meta"))):
            if source_id in seen or not meta:
                continue
            seen.add(source_id)  # one decision per source (its parts share the meta)
            m = json.loads(meta)
            if is_person(m):
                people.append((source_id, title, m))
    if not people:
        raise InputError(reader.folder, None, "no people in this corpus (the bio task needs ovos-style "
                                              "topic/description metadata)")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(people), size=min(n_examples, len(people)), replace=False).tolist())
    picked = [people[i] for i in chosen]
    doc_ids = _doc_ids_of_sources(reader, {p[0] for p in picked})
    examples = []
    for source_id, title, m in picked:
        texts = [r["text"] for r in reader.get(doc_ids[source_id], ("text",))]
        meta = {"source_id": source_id, "title": title, "doc_ids": doc_ids[source_id],
                "description": m.get("description", ""), "topic": m.get("topic", "")}
        examples.append({"kind": "qa", "query": title, "question": BIO_QUESTION.format(title=title), "prefix": "",
                         "references": texts, "exclude_doc_ids": [], "meta": meta})
    return examples, {"eligible": len(people)}


def run_paper_task(out_dir: Path, *, lm: Path, task: str, data: Path, n_examples: int, seed: int) -> dict:
    """A paper benchmark (``tasks.registry``) from its official file: the seeded subsample of ``n_examples``."""
    import pyarrow.parquet as pq

    from stages.errors import InputError
    from tasks import registry
    from tasks.base import examples_to_table
    from tasks.errors import TaskInputError

    options = {}
    if task == "wikitext":
        from stages.lm.load import load_tokenizer

        options["tokenizer"] = load_tokenizer(lm)
    try:
        examples, stats = registry.get(task, **options).load_with_stats(data, limit=n_examples, seed=seed)
    except TaskInputError as e:
        raise InputError(e.path, e.line, e.message) from None
    if not examples:
        raise InputError(data, None, f"no usable {task} examples in this file")
    tmp = Path(out_dir) / f".{EXAMPLES_FILE}.tmp"
    pq.write_table(examples_to_table(examples), tmp, compression="zstd")
    os.replace(tmp, Path(out_dir) / EXAMPLES_FILE)
    return {"task": task, "num_examples": len(examples), **stats}


def run(out_dir: Path, *, passages: Path, lm: Path, task: str, n_examples: int = 16, seed: int = 0,
        prefix_tokens: int = 32, target_tokens: int = 96, data: Path | None = None) -> dict:
    """Write ``examples.parquet`` for one ``task`` (schema in docs/architecture.md): an embedded task drawn from the
    corpus, or a paper benchmark of ``tasks.registry`` read from its official file ``data``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if data is not None:
        return run_paper_task(out_dir, lm=lm, task=task, data=Path(data), n_examples=n_examples, seed=seed)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; LoadTask knows {', '.join(TASKS)} (paper tasks need a data file)")
    if n_examples < 1 or prefix_tokens < 1 or target_tokens < 1:
        raise ValueError("n_examples, prefix_tokens and target_tokens must be >= 1")
    out_dir = Path(out_dir)
    reader = PassageReader(passages)
    if task == "bio":
        examples, stats = _bio(reader, n_examples, seed)
    else:
        from stages.lm.load import load_tokenizer

        examples, stats = _completion(reader, load_tokenizer(lm), n_examples, seed, prefix_tokens, target_tokens,
                                      excluded=task == "completion_excluded")
    columns = {name: [] for name in examples_schema().names}
    for i, ex in enumerate(examples):
        columns["example_id"].append(i)
        columns["task"].append(task)
        for key in ("kind", "query", "question", "prefix", "references", "exclude_doc_ids"):
            columns[key].append(ex[key])
        columns["meta"].append(json.dumps(ex["meta"], ensure_ascii=False))
    table = pa.table(columns, schema=examples_schema())
    tmp = out_dir / f".{EXAMPLES_FILE}.tmp"
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, out_dir / EXAMPLES_FILE)
    return {"task": task, "num_examples": len(examples), **stats}
