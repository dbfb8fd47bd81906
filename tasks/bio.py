"""The embedded ``bio`` task: biographies of the corpus's people, drawn from the corpus.

A person is a source whose ``meta`` has ``topic == "People"`` (the ovos corpus's category) and whose ``description``
does not name a group (band, group, duo, brothers, family, team, ...; :data:`GROUP_WORDS`). On the embedded corpus that
is 1,806 of the 1,828 "People" entries; the 22 left out are all bands, duos, families or teams ("The Doors", "Laurel
and Hardy"). People filed under other topics ("Augustus" is in "Uncategorized") are not used.

``n_examples`` people are drawn with the seed from the list in corpus order. ``question`` = "Tell me a bio of
{title}.", ``query`` = the title, ``references`` = the person's passage texts in order, ``exclude_doc_ids`` = [];
``meta`` keeps ``source_id``, ``title``, ``doc_ids`` and the ovos ``description``/``topic``.

Scored as FactScore (with a judge, ``[factscore] judge_lm``; else "not computed") plus ``rouge1_source``: ROUGE-1
against the person's passages (a proxy).
"""

from __future__ import annotations

import json
import re
from typing import Any

from tasks.base import Example, Task
from tasks.corpus import Corpus, doc_ids_of_sources
from tasks.errors import TaskInputError
from tasks.factscore import FactScore
from tasks.metrics import rouge
from tasks.registry import register

BIO_QUESTION = "Tell me a bio of {title}."
GROUP_WORDS = re.compile(r"\b(band|group|duo|trio|quartet|quintet|ensemble|orchestra|choir|troupe|brothers|sisters|"
                         r"siblings|family|couple|team)\b", re.I)


def is_person(meta: dict) -> bool:
    """The bio task's rule: ovos topic "People" and a description that does not name a group."""
    return meta.get("topic") == "People" and not GROUP_WORDS.search(str(meta.get("description", "")))


def draw_bios(corpus: Corpus, task: str, *, n_examples: int, seed: int) -> tuple[list[Example], dict[str, Any]]:
    """The bio examples of ``corpus`` and their counts (``eligible``: the people found)."""
    import numpy as np

    people: list[tuple[str, str, dict]] = []  # (source_id, title, meta) in corpus order
    seen: set[str] = set()
    for batch in corpus.iter_batches(["source_id", "title", "meta"]):
        for source_id, title, meta in zip(*(batch.column(c).to_pylist() for c in ("source_id", "title", "meta"))):
            if source_id in seen or not meta:
                continue
            seen.add(source_id)  # one decision per source (its parts share the meta)
            m = json.loads(meta)
            if is_person(m):
                people.append((source_id, title, m))
    if not people:
        raise TaskInputError(corpus.folder, None, "no people in this corpus (the bio task needs ovos-style "
                                                  "topic/description metadata)")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(people), size=min(n_examples, len(people)), replace=False).tolist())
    picked = [people[i] for i in chosen]
    doc_ids = doc_ids_of_sources(corpus, {p[0] for p in picked})
    examples = []
    for i, (source_id, title, m) in enumerate(picked):
        texts = [r["text"] for r in corpus.get(doc_ids[source_id], ("text",))]
        meta = {"source_id": source_id, "title": title, "doc_ids": doc_ids[source_id],
                "description": m.get("description", ""), "topic": m.get("topic", "")}
        examples.append(Example(example_id=i, task=task, kind="qa", query=title,
                                question=BIO_QUESTION.format(title=title), prefix="", references=texts,
                                exclude_doc_ids=[], meta=meta))
    return examples, {"eligible": len(people)}


@register("bio")
class Bio(FactScore):
    """Bios of the corpus's people: FactScore (judged when a judge is given) and ROUGE-1 against their passages."""

    name = "bio"
    source = "corpus"
    sort_meta = False  # meta in insertion order, as LoadTask always wrote it (same bytes)
    data_help = ""
    read = Task.read  # drawn from the corpus, never read from a file

    def draw(self, corpus: Corpus, *, n_examples: int, seed: int, **options) -> tuple[list[Example], dict[str, Any]]:
        return draw_bios(corpus, self.name, n_examples=n_examples, seed=seed)

    def score(self, generation_text: str, example: Example) -> dict[str, Any]:
        """FactScore's metrics (text cut at EOS) and ``rouge1_source`` (the whole text) against the passages."""

        out = dict(super().score(generation_text, example))
        out.setdefault("num_facts", None)
        if example.references:
            out["rouge1_source"] = 100.0 * rouge(generation_text, " ".join(example.references), ("rouge1",))["rouge1"]
        return out
