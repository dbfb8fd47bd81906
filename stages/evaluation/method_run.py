"""The setup Generate and Perplexity share: one decoding method, loaded once, over a task's examples and the passages
retrieved for them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow.parquet as pq
from stages.corpus.passages import PassageReader
from stages.decoding import NestConfig, make_decoder
from stages.decoding.registry import method_info
from stages.lm.load import load_lm
from stages.lm.pretokenize import TokenLookup
from stages.retrieval.pre_retrieve import read_retrievals


@dataclass
class MethodRun:
    """A method ready to run: its config, the examples, the decoder (and its LM), the passage readers and the
    retrievals (empty for a method that retrieves nothing)."""

    method: str
    config: Any  # NestConfig
    rows: list[dict]
    model: Any
    tokenizer: Any
    decoder: Any
    reader: Any  # PassageReader
    lookup: Any  # TokenLookup
    retrievals: dict[int, list[int]]


def open_method_run(method: str, config: dict | None, *, examples: Path, passages: Path, tokens: Path, lm: Path,
                    retrievals: Path | None, device: str, dtype: str | None, key_cache: Callable,
                    evaluation: bool = False) -> MethodRun:
    """Load ``method``'s decoder with ``NestConfig(**config)`` (``key_cache(config)`` gives its passage-key cache: the
    run's own, in memory, in front of a key store; never a folder outside the artifact store). ``evaluation``: the run scores targets, so the method must have an evaluation mode."""

    info = method_info(method)
    if evaluation and not info.perplexity:
        raise ValueError(f"decoding method {method!r} has no evaluation mode (perplexity)")
    cfg = NestConfig(**(config or {}))
    cfg.key_cache_dir = None  # a stage's timings and outputs never depend on what earlier processes left on disk
    rows = pq.read_table(Path(examples) / "examples.parquet").to_pylist()
    retr = read_retrievals(retrievals) if info.retrieves else {}
    model, tokenizer = load_lm(lm, device=device, dtype=dtype)
    decoder = make_decoder(method, model, tokenizer, cfg, key_cache=key_cache(cfg))
    return MethodRun(method, cfg, rows, model, tokenizer, decoder, PassageReader(passages), TokenLookup(tokens), retr)
