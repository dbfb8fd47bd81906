"""The decoding library's data types: what goes in (passages, requests) and what comes out (generations)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

# Latency components of one query, in seconds, in the paper's Fig. 2a order (docs/decoding.md). lm_forward: the
# generating LM's own forward passes (prefill and steps: the base LM has only this); passage_search: retrieving the
# passages and fetching their token ids (booked by the caller, who retrieves); passage_encoding: the LM encoding
# passages into keys (0 when the keys come from a key store or an earlier query); token_index_build: building the
# query's token index from keys (reading them from the store or cache included); token_search: k-NN search + mixture;
# verification: drafting and acceptance bookkeeping; other: total minus the rest. This module imports no torch, so
# Score, the report and the benches read the tuple from here.
LATENCY_COMPONENTS = ("lm_forward", "passage_search", "passage_encoding", "token_index_build", "token_search",
                      "verification", "other")
MEASURED_COMPONENTS = LATENCY_COMPONENTS[:-1]  # the measured parts ("other" is the remainder of the total)


@dataclass
class Passage:
    """One retrieved passage: its corpus id and its token ids (from PreTokenize, no special tokens).

    ``title``/``text`` are only used for the in-context RA prompt and for the demo's source list.
    """

    doc_id: int
    token_ids: Sequence[int]
    title: str = ""
    text: str = ""
    ends_document: bool = False  # the last passage of its source article (NestConfig.document_end)

    def display_text(self) -> str:
        """``"{title}. {text}"`` as the RA background (the PreTokenize template), or the text alone."""
        if self.title and self.text:
            return f"{self.title}. {self.text}"
        return self.text or self.title


@dataclass
class DecodeRequest:
    """One example to decode.

    ``kind`` selects the prompt family (``completion`` or ``qa``, see :mod:`tasks.prompts`); ``passages`` are ranked,
    best first (the token index uses all of them, the RA prompt the top 3). ``prefix_ids`` keeps a completion prefix cut
    at a token boundary exactly as cut; ``prompt_ids`` bypasses the prompt templates entirely (tests, PPL-style use).
    ``max_new_tokens`` overrides the config's budget for this example; ``stop`` is its task family's stop rule
    (:data:`tasks.stopping.STOP_RULES`: ``"none"``, ``"paragraph"``, ``"blank_line"``, ``"sentence"``).
    """

    example_id: int
    kind: str = "completion"
    question: str = ""
    prefix: str = ""
    passages: list[Passage] = field(default_factory=list)
    prefix_ids: Sequence[int] | None = None
    prompt_ids: Sequence[int] | None = None
    max_new_tokens: int | None = None
    stop: str = "none"


@dataclass
class Generation:
    """The output of one example.

    ``token_ids`` are the generated tokens (EOS and anything after it are never included, B9); ``sources[i]`` is the
    ``(doc_id, position)`` of token ``i`` in its passage's token ids when the token was **copied** (emitted from an
    accepted draft or a streamed continuation), else None; ``supported[i]`` is the neighbour's ``(doc_id, position)``
    when token ``i`` was produced one at a time (token mode) and its value occurs among the neighbours, else None (at
    most one of the two is set; empty list: not recorded). ``spans`` are the copied runs ``(start, length, doc_id)`` over
    ``sources`` (see :func:`tasks.metrics.attribution_runs`); ``counters`` and ``timings`` (seconds) are described in
    ``docs/decoding.md``.
    """

    example_id: int
    text: str
    token_ids: list[int]
    sources: list[tuple[int, int] | None]
    spans: list[tuple[int, int, int]]
    counters: dict
    timings: dict
    supported: list[tuple[int, int] | None] = field(default_factory=list)

    def to_row(self) -> dict:
        """A JSON/Parquet-friendly dict (sources and supported sources as parallel lists with -1 for "none")."""
        supported = self.supported or [None] * len(self.token_ids)
        return {
            "example_id": int(self.example_id),
            "text": self.text,
            "token_ids": [int(t) for t in self.token_ids],
            "source_doc_ids": [-1 if s is None else int(s[0]) for s in self.sources],
            "source_positions": [-1 if s is None else int(s[1]) for s in self.sources],
            "supported_doc_ids": [-1 if s is None else int(s[0]) for s in supported],
            "supported_positions": [-1 if s is None else int(s[1]) for s in supported],
            "spans": [list(map(int, s)) for s in self.spans],
            "counters": dict(self.counters),
            "timings": dict(self.timings),
        }
