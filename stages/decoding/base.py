"""The decoder interface and the two prompt-only methods: the base LM and in-context retrieval augmentation (RA).

``Decoder.decode(requests)`` validates every request first (bad input raises :class:`stages.errors.InputError` before
any compute), splits them into batches of ``config.batch_size`` and decodes each batch; every row is exact on its own
(a batch gives the same tokens as each example alone, see :mod:`stages.decoding.lm_runner`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import torch

from stages.decoding.attribution import attribution_runs
from stages.decoding.config import NestConfig
from stages.decoding.lm_runner import BatchedLM, model_device
from stages.decoding.types import DecodeRequest, Generation, Passage
from stages.errors import InputError
from tasks.prompts import KINDS, format_background, render_prompt_ids

# Latency components of one query (seconds; docs/decoding.md). lm_forward: the generating LM's own forward passes
# (prefill and steps: the base LM has only this); passage_search: retrieving the passages and fetching their token ids
# (booked by the caller, who retrieves); passage_encoding: the LM encoding passages into keys (0 when the keys come
# from a key store or an earlier query); token_index_build: building the query's token index from keys (reading them
# from the store or cache included); token_search: k-NN search + mixture; verification: drafting and acceptance
# bookkeeping; other: total minus the rest; total: everything the query cost.
TIMING_KEYS = ("lm_forward", "passage_search", "passage_encoding", "token_index_build", "token_search", "verification",
               "other", "total")
COMPONENT_KEYS = TIMING_KEYS[:-2]  # the measured parts ("other" is the remainder of "total")


def settle_other(timings: dict) -> dict:
    """Set ``other`` = total − the measured components (never below 0); returns ``timings``."""
    measured = sum(float(timings.get(k, 0.0)) for k in COMPONENT_KEYS)
    timings["other"] = max(float(timings.get("total", 0.0)) - measured, 0.0)
    return timings


def add_passage_search(timings: dict, seconds: float) -> dict:
    """Book ``seconds`` of retrieval (done outside the decoder) into ``passage_search`` and ``total``."""
    timings["passage_search"] = float(timings.get("passage_search", 0.0)) + float(seconds)
    timings["total"] = float(timings.get("total", 0.0)) + float(seconds)
    return settle_other(timings)


def _bad(example_id, message: str) -> InputError:
    return InputError(None, None, f"example {example_id}: {message}")


@dataclass
class Row:
    """Decoding state of one example."""

    req: DecodeRequest
    prompt: list[int]
    max_new: int
    tokens: list[int] = field(default_factory=list)
    sources: list = field(default_factory=list)
    done: bool = False
    eos: bool = False
    counters: dict = field(default_factory=dict)
    timings: dict = field(default_factory=lambda: dict.fromkeys(TIMING_KEYS, 0.0))
    rng: torch.Generator | None = None

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n


class Clock:
    """Wall time per component, shared equally among the rows that took part (a batched pass serves all of them)."""

    def __init__(self, device: torch.device):
        self.sync = device.type == "cuda"

    @contextmanager
    def time(self, component: str, rows: Sequence[Row]):
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            share = (time.perf_counter() - t0) / max(len(rows), 1)
            for r in rows:
                r.timings[component] += share


def eos_token_ids(model, tokenizer) -> set[int]:
    """EOS ids from the tokenizer and the model's generation config (chat models often have several)."""
    ids: set[int] = set()
    for src in (getattr(tokenizer, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if src is None:
            continue
        ids.update(int(x) for x in (src if isinstance(src, (list, tuple)) else [src]))
    return ids


class Decoder(ABC):
    """One decoding method. Subclasses implement :meth:`_decode_batch`; ``method`` names them in :func:`make_decoder`."""

    method = "base"
    ra_prompt = False  # put the top ``config.ra_passages`` passages into the prompt

    def __init__(self, model, tokenizer, config: NestConfig | None = None, key_cache=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config if config is not None else NestConfig()
        self.config.validate()
        self.device = model_device(model)
        self.eos_ids = eos_token_ids(model, tokenizer)
        head = model.get_output_embeddings()
        self.vocab_size = int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)
        self.window = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.key_cache = key_cache
        self.last_stats: dict = {}

    # ---------------------------------------------------------------- public API
    def decode(self, requests: Sequence[DecodeRequest]) -> list[Generation]:
        """Decode every request (in order); raises InputError on bad input before any compute."""
        requests = list(requests)
        t0 = time.perf_counter()
        prepared = [self._prepare(req) for req in requests]
        prepare_s = (time.perf_counter() - t0) / max(len(prepared), 1)  # prompt rendering: part of each query's "other"
        out: list[Generation] = []
        bs = self.config.batch_size
        with torch.inference_mode():
            for s in range(0, len(prepared), bs):
                t0 = time.perf_counter()
                gens = self._decode_batch(prepared[s:s + bs])
                for g in gens:  # the batch's wall time, shared equally
                    g.timings["total"] = (time.perf_counter() - t0) / len(gens) + prepare_s
                    settle_other(g.timings)
                out.extend(gens)
        return out

    @abstractmethod
    def _decode_batch(self, rows: list[Row]) -> list[Generation]:
        """Decode prepared rows together."""

    # ---------------------------------------------------------------- prompts and validation
    def _passage_text(self, p: Passage) -> str:
        """The passage as RA background: ``"{title}. {text}"``, or its decoded token ids when the text is missing."""
        if not p.text and len(p.token_ids):
            return self.tokenizer.decode(list(p.token_ids), skip_special_tokens=True)
        return p.display_text()

    def prompt_ids(self, req: DecodeRequest) -> list[int]:
        """The prompt token ids of a request (paper templates through the chat template; RA adds the background)."""
        if req.prompt_ids is not None:
            return [int(t) for t in req.prompt_ids]
        if req.kind not in KINDS:
            raise _bad(req.example_id, f"unknown kind {req.kind!r}; expected one of {KINDS}")
        if req.kind == "qa" and not req.question.strip():
            raise _bad(req.example_id, "empty question")
        background = None
        if self.ra_prompt:
            texts = [self._passage_text(p) for p in req.passages[: self.config.ra_passages]]
            texts = [t for t in texts if t.strip()]
            if texts:
                background = format_background(texts, k=self.config.ra_passages)
        return render_prompt_ids(self.tokenizer, req.kind, question=req.question, background=background,
                                 prefix=req.prefix, prefix_ids=req.prefix_ids)

    def _prepare(self, req: DecodeRequest) -> Row:
        prompt = self.prompt_ids(req)
        if not prompt:
            raise _bad(req.example_id, "empty prompt (no token ids)")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise _bad(req.example_id, f"prompt token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        for p in req.passages:
            bad = [t for t in p.token_ids if not 0 <= int(t) < self.vocab_size]
            if bad:
                raise _bad(req.example_id, f"passage {p.doc_id} has token id {bad[0]} outside the vocabulary "
                                           f"[0, {self.vocab_size})")
        budget = self.config.max_new_tokens if req.max_new_tokens is None else int(req.max_new_tokens)
        if budget < 0:
            raise _bad(req.example_id, f"max_new_tokens must be >= 0, got {budget}")
        counters = {"prompt_tokens": len(prompt), "prompt_truncated": 0}
        if len(prompt) >= self.window:
            if self.config.prompt_overflow == "error":
                raise _bad(req.example_id, f"prompt has {len(prompt)} tokens, which fills the LM's context window of "
                                           f"{self.window} tokens (use prompt_overflow='truncate_left' to keep its end)")
            keep = max(1, self.window - max(1, min(budget, self.window // 2)))
            counters["prompt_truncated"] = len(prompt) - keep
            prompt = prompt[-keep:]
        max_new = min(budget, self.window - len(prompt))
        row = Row(req=req, prompt=prompt, max_new=max_new, counters=counters)
        row.counters["stopped_at_context_window"] = int(max_new < budget)
        row.done = max_new == 0
        return row

    # ---------------------------------------------------------------- emission and output
    def emit(self, row: Row, token: int, source: tuple[int, int] | None = None) -> bool:
        """Append a token to the row's output (True if appended); EOS ends the row and is never emitted (B9)."""
        if row.done:
            return False
        if self.config.stop_at_eos and token in self.eos_ids:
            row.done = row.eos = True
            return False
        row.tokens.append(int(token))
        row.sources.append(source)
        if len(row.tokens) >= row.max_new:
            row.done = True
        return True

    def finish(self, row: Row) -> Generation:
        row.counters["generated_tokens"] = len(row.tokens)
        row.counters["eos"] = int(row.eos)
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True) if row.tokens else ""
        return Generation(example_id=row.req.example_id, text=text, token_ids=list(row.tokens),
                          sources=list(row.sources), spans=attribution_runs(row.sources), counters=dict(row.counters),
                          timings={k: float(v) for k, v in row.timings.items()})


class BaseDecoder(Decoder):
    """The base LM: greedy decoding (or sampling with ``do_sample``), one LM pass per token, stops at EOS."""

    method = "base"

    def _pick(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        cfg = self.config
        if not cfg.do_sample:
            return logits.argmax(-1).tolist()
        picks = []
        for row, lg in zip(rows, logits.float()):
            lg = lg / cfg.temperature
            if cfg.top_k > 0:
                kth = torch.topk(lg, min(cfg.top_k, lg.numel())).values[-1]
                lg = lg.masked_fill(lg < kth, float("-inf"))
            probs = torch.softmax(lg, -1)
            if cfg.top_p < 1.0:
                sp, si = torch.sort(probs, descending=True)
                drop = sp.cumsum(-1) - sp > cfg.top_p
                sp[drop] = 0
                probs = torch.zeros_like(probs).scatter_(0, si, sp)
            if row.rng is None:  # one generator per example: sampling does not depend on the batch
                row.rng = torch.Generator(device=lg.device).manual_seed(int(cfg.seed) * 1_000_003 +
                                                                        int(row.req.example_id))
            picks.append(int(torch.multinomial(probs, 1, generator=row.rng)))
        return picks

    def _decode_batch(self, rows: list[Row]) -> list[Generation]:
        clock = Clock(self.device)
        live = [r for r in rows if not r.done]
        if live:
            lm = BatchedLM(self.model, key_layer=None, compact_min_slots=self.config.compact_min_slots,
                           compact_hole_fraction=self.config.compact_hole_fraction)
            with clock.time("lm_forward", live):
                outs = lm.prefill([r.prompt for r in live])
            nxt = self._pick(live, torch.cat([o.logits for o in outs]))
            for r in live:
                r.count("lm_forward_passes")
            while True:
                for r, t in zip(live, nxt):
                    self.emit(r, t)
                keep = [i for i, r in enumerate(live) if not r.done]
                if not keep:
                    break
                if len(keep) < len(live):
                    lm.keep_rows(keep)
                    live = [live[i] for i in keep]
                with clock.time("lm_forward", live):
                    outs = lm.step([[r.tokens[-1]] for r in live])
                    lm.commit([1] * len(live))
                for r in live:
                    r.count("lm_forward_passes")
                nxt = self._pick(live, torch.cat([o.logits for o in outs]))
        return [self.finish(r) for r in rows]


class RADecoder(BaseDecoder):
    """In-context retrieval augmentation: the base LM with the top-3 passages in the prompt (paper App. B templates)."""

    method = "ra"
    ra_prompt = True
