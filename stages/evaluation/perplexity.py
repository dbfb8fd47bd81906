"""Perplexity stage: evaluation mode of Table 1 (the PPL columns).

For each completion example the reference continuation is scored token by token under the method's next-token
distribution, teacher-forced after the method's prompt (the paper: prefix 128, target 256; the embedded profile: the
LoadTask's prefix and target lengths):

- ``base``: p_LM = softmax(logits) (T = 1, the plain LM);
- ``ra``: the same with the top-3 passages in the prompt;
- ``knnlm``: p_M = λ·p_LM + (1 − λ)·p_kNN, fixed λ (0.7);
- ``nest``: p_M with the Relative Retrieval Confidence λ_t (Eq. 4); NEST stops at Eq. 4 in evaluation mode (paper §3.2),
  so no spans, drafts or masking enter;
- ``ra_nest``: NEST's mixture after the RA prompt.

p_LM inside a mixture uses ``lm_temperature`` (paper 1.0; the released code 0.7, D2). One LM pass scores the whole target
(``BatchedLM.prefill`` + one ``step``); each target position gets its own kNN search over the example's token index.
Output ``perplexity.parquet``: ``example_id, num_tokens, nll_sum, ppl`` (natural log).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from stages.evaluation.generate import build_requests
from stages.evaluation.method_run import open_method_run
from stages.progress import iterate

VERSION = "2"

SCHEMA = pa.schema([("example_id", pa.int64()), ("num_tokens", pa.int32()), ("nll_sum", pa.float64()),
                    ("ppl", pa.float64())])


def target_nll(decoder, request, target_ids: list[int]) -> float:
    """Σ −log p(target_t | prompt, target_<t) under ``decoder``'s distribution (its evaluation mode,
    :meth:`stages.decoding.base.Decoder.target_logprobs`; see the module docstring)."""
    if not target_ids:
        return 0.0
    return float(-decoder.target_logprobs(request, target_ids).sum())


def run(out_dir: Path, *, examples: Path, passages: Path, tokens: Path, lm: Path, retrievals: Path | None = None,
        method: str, config: dict | None = None, device: str = "cpu", dtype: str | None = None,
        passage_keys: Path | None = None, start: int = 0, end: int | None = None) -> dict:
    """NLL of each completion example's reference under ``method`` (keys from the key store ``passage_keys`` if
    given, else encoded on the fly into this run's in-memory cache; nothing is cached on disk outside the store);
    examples ``[start, end)`` (a shard of the sharded stage; :func:`merge`)."""
    # lazy: torch takes seconds to import
    import torch

    # lazy: torch and transformers take seconds to import
    from stages.decoding.passage_keys import open_key_cache

    mr = open_method_run(method, config, examples=examples, passages=passages, tokens=tokens, lm=lm,
                         retrievals=retrievals, device=device, dtype=dtype,
                         key_cache=lambda cfg: open_key_cache(cfg, passage_keys), evaluation=True)
    cfg, rows, decoder, reader, lookup, retr = mr.config, mr.rows, mr.decoder, mr.reader, mr.lookup, mr.retrievals
    out, skipped = [], 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        # a bar on a terminal, a line every few seconds in a log (stages/progress.py)
        for ex in iterate(rows[start:end], f"Perplexity {method}", len(rows[start:end]), "examples"):
            meta = json.loads(ex.get("meta") or "{}")
            target = meta.get("target_ids")
            if ex["kind"] != "completion" or not target:
                skipped += 1
                continue
            req = build_requests([ex], retr, reader, lookup, cfg.passages)[0]
            nll = target_nll(decoder, req, [int(t) for t in target])
            out.append({"example_id": int(ex["example_id"]), "num_tokens": len(target), "nll_sum": nll,
                        "ppl": math.exp(nll / len(target))})
    _write(out_dir, out)
    total_nll = sum(r["nll_sum"] for r in out)
    total_tok = sum(r["num_tokens"] for r in out)
    return {"examples": len(out), "skipped_not_completion": skipped,
            "ppl": math.exp(total_nll / total_tok) if total_tok else None,
            "seconds": round(time.perf_counter() - t0, 3)}


def _write(out_dir: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), Path(out_dir) / "perplexity.parquet", compression="zstd")


def merge(out_dir: Path, *, shards: list[Path], **_params) -> dict:
    """The shards of a sharded Perplexity (example ranges, in order) → the ``perplexity.parquet`` of one run, byte
    for byte: each example is scored alone, so its NLL does not depend on the range it was scored in (for the methods
    that read passage keys: when they come from a key store, the default, not from keys encoded on the fly)."""
    rows: list[dict] = []
    for s in shards:
        rows.extend(pq.read_table(Path(s) / "perplexity.parquet").to_pylist())
    _write(out_dir, rows)
    total_nll = sum(r["nll_sum"] for r in rows)
    total_tok = sum(r["num_tokens"] for r in rows)
    return {"examples": len(rows), "ppl": math.exp(total_nll / total_tok) if total_tok else None,
            "merged_shards": len(shards)}
