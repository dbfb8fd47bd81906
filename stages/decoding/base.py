"""The decoder interface every method implements (the methods themselves: ``stages/decoding/methods/``).

``Decoder.decode(requests)`` validates every request first (bad input raises :class:`stages.errors.InputError` before
any compute), splits them into batches of ``config.batch_size`` and decodes each batch; every row is exact on its own
(a batch gives the same tokens as each example alone, see :mod:`stages.decoding.lm_runner`).
``Decoder.target_logprobs(request, target_ids)`` is the evaluation mode (perplexity) of the methods that have one.
"""

from __future__ import annotations

import time
import weakref
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import torch

from stages.decoding.config import MODE_SWITCHES, NestConfig, expand_reads
from stages.decoding.lm_runner import BatchedLM, context_window, model_device
from stages.decoding.types import LATENCY_COMPONENTS, MEASURED_COMPONENTS, DecodeRequest, Generation, Passage
from stages.errors import InputError
from tasks.metrics import attribution_runs
from tasks.prompts import KINDS, format_background, render_prompt_ids
from tasks.sentences import ends_sentence
from tasks.stopping import SENTENCE_MIN_WORDS, STOP_RULES, stop_reached

# the timings of one query: the latency components (stages.decoding.types) and total, everything the query cost
TIMING_KEYS = LATENCY_COMPONENTS + ("total",)
COMPONENT_KEYS = MEASURED_COMPONENTS


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
    min_new: int = 0  # EOS, the stop rule and the document-end EOS are suppressed until this many tokens
    tokens: list[int] = field(default_factory=list)
    sources: list = field(default_factory=list)  # copied tokens' (doc_id, position), else None
    supported: list = field(default_factory=list)  # token-mode tokens whose value a neighbour carries, else None
    done: bool = False
    eos: bool = False
    stop: str = "none"  # the task family's stop rule (tasks.stopping)
    stopped: bool = False  # the stop rule ended the row
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


_TOKEN_CLASSES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_ERRORS = (IndexError, KeyError, OverflowError, TypeError, ValueError)
_SENTENCE_PUNCT = ".!?"
_CLOSERS = "\"'”’)]"


@dataclass(frozen=True)
class TokenClasses:
    """Ids of the vocabulary by what their text, decoded alone, can do to a stop rule: ``newline`` (holds a line
    break: can complete ``paragraph``/``blank_line``), ``space_start`` (starts with whitespace, or with the tokenizer's
    word-start marker: can begin the next sentence) and ``sentence_punct`` (ends with ``.``, ``!`` or ``?``, closing
    quotes allowed: can end a sentence)."""

    newline: frozenset
    space_start: frozenset
    sentence_punct: frozenset


def _decoded_alone(tokenizer, vocab_size: int) -> list[str]:
    ids = [[i] for i in range(vocab_size)]
    batch = getattr(tokenizer, "batch_decode", None)
    try:
        return batch(ids) if batch is not None else [tokenizer.decode(x) for x in ids]
    except _ERRORS:  # ids past the tokenizer's vocabulary: one at a time
        texts = []
        for x in ids:
            try:
                texts.append(tokenizer.decode(x))
            except _ERRORS:
                texts.append("")
        return texts


def token_classes(tokenizer, vocab_size: int) -> TokenClasses:
    """The :class:`TokenClasses` of ``range(vocab_size)`` (cached per tokenizer object: about 0.5 s for a 49k
    vocabulary, once)."""
    try:
        cached = _TOKEN_CLASSES.get(tokenizer, {})
    except TypeError:  # not weak-referenceable: no cache
        cached = {}
    if vocab_size in cached:
        return cached[vocab_size]
    texts = _decoded_alone(tokenizer, vocab_size)
    pieces: list = [None] * vocab_size
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if convert is not None:
        try:
            pieces = list(convert(list(range(vocab_size))))
        except _ERRORS:
            pass
    newline, space, punct = set(), set(), set()
    for i, t in enumerate(texts):
        if t and "\n" in t:
            newline.add(i)
        piece = pieces[i] if i < len(pieces) else None
        if (t and t[0].isspace()) or (isinstance(piece, str) and piece[:1] in ("Ġ", "▁")):
            space.add(i)
        core = (t or "").rstrip().rstrip(_CLOSERS)
        if core and core[-1] in _SENTENCE_PUNCT:
            punct.add(i)
    found = TokenClasses(frozenset(newline), frozenset(space), frozenset(punct))
    try:
        _TOKEN_CLASSES.setdefault(tokenizer, {})[vocab_size] = found
    except TypeError:
        pass
    return found


def newline_token_ids(tokenizer, vocab_size: int) -> frozenset[int]:
    """Ids in ``range(vocab_size)`` whose text, decoded alone, holds a line break (cached per tokenizer object)."""
    return token_classes(tokenizer, vocab_size).newline


class Decoder(ABC):
    """One decoding method. Subclasses implement :meth:`_decode_batch`; a method file in ``stages/decoding/methods/``
    registers one (:func:`stages.decoding.registry.register`) and declares, in its class body, what the pipeline must
    know of it without importing it (its name, label, the NestConfig fields it reads, ...; see the registry)."""

    method = ""
    label = ""
    reads: tuple[str, ...] = ()
    retrieves = False
    uses_token_index = False
    perplexity = False
    order = 100
    ra_prompt = False  # put the top ``config.ra_passages`` passages into the prompt

    def __init__(self, model, tokenizer, config: NestConfig | None = None, key_cache=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config if config is not None else NestConfig()
        self.config.validate()
        self.check_options()
        self.device = model_device(model)
        self.eos_ids = eos_token_ids(model, tokenizer)
        head = model.get_output_embeddings()
        self.vocab_size = int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)
        self.window = context_window(model)
        self.key_cache = key_cache
        self.last_stats: dict = {}
        self._token_classes: TokenClasses | None = None

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

    def check_options(self) -> None:
        """Refuse a behaviour this method cannot give (a mode switch of the config it does not read, e.g.
        ``do_sample=True`` for NEST): one-line ValueError, as HF's ``generate`` refuses flags it cannot honour."""
        reads = expand_reads(self.reads)
        for name in MODE_SWITCHES:
            value, default = getattr(self.config, name), NestConfig.__dataclass_fields__[name].default
            if name not in reads and value != default:
                raise ValueError(f"decoding method {self.method!r} does not support {name}={value!r} (it reads "
                                 f"{name} only at its default, {default!r})")

    def target_logprobs(self, request: DecodeRequest, target_ids: Sequence[int]) -> torch.Tensor:
        """Evaluation mode: ``log p(target_t | prompt, target_<t)`` for each target token (shape ``[len(target)]``),
        teacher-forced after the method's prompt in one LM pass. Here the LM's own distribution at T = 1;
        methods with a mixture override :meth:`_target_logprobs`."""
        if not self.perplexity:
            raise ValueError(f"decoding method {self.method!r} has no evaluation mode (perplexity)")
        if not len(target_ids):
            return torch.zeros(0)
        row = self._prepare(request)
        with torch.inference_mode():
            lm = BatchedLM(self.model, key_layer=self.config.key_layer if self.uses_token_index else None)
            first = lm.prefill([row.prompt])[0]
            logits, queries = [first.logits], [first.queries]
            if len(target_ids) > 1:
                rest = lm.step([list(target_ids[:-1])])[0]
                lm.commit([len(target_ids) - 1])
                logits.append(rest.logits)
                queries.append(rest.queries)
            logits = torch.cat(logits).float()
            target = torch.tensor(list(target_ids), dtype=torch.long, device=logits.device)
            return self._target_logprobs(row, logits, queries, target)

    def _target_logprobs(self, row: Row, logits: torch.Tensor, queries: list, target: torch.Tensor) -> torch.Tensor:
        """log p of each target token from the teacher-forced ``logits`` (and key-layer ``queries``)."""
        return torch.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1)

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
        stop = req.stop or "none"
        if stop not in STOP_RULES:
            raise _bad(req.example_id, f"unknown stop rule {stop!r}; expected one of {STOP_RULES}")
        counters = {"prompt_tokens": len(prompt), "prompt_truncated": 0, "max_new_tokens": budget}
        if len(prompt) >= self.window:
            if self.config.prompt_overflow == "error":
                raise _bad(req.example_id, f"prompt has {len(prompt)} tokens, which fills the LM's context window of "
                                           f"{self.window} tokens (use prompt_overflow='truncate_left' to keep its end)")
            keep = max(1, self.window - max(1, min(budget, self.window // 2)))
            counters["prompt_truncated"] = len(prompt) - keep
            prompt = prompt[-keep:]
        max_new = min(budget, self.window - len(prompt))
        min_new = min(int(self.config.min_new_tokens), max_new)
        counters["min_new_tokens"] = min_new
        row = Row(req=req, prompt=prompt, max_new=max_new, min_new=min_new, counters=counters, stop=stop)
        row.counters["stopped_at_context_window"] = int(max_new < budget)
        row.done = max_new == 0
        return row

    # ---------------------------------------------------------------- emission and output
    def emit(self, row: Row, token: int, source: tuple[int, int] | None = None,
             supported: tuple[int, int] | None = None) -> bool:
        """Append a token to the row's output (True if appended); EOS ends the row and is never emitted (B9); the
        row's stop rule ends it after the token that completes the stop (checked only when that token holds a line
        break, so the text is decoded only then), or, for ``sentence``, before a token that starts with whitespace
        right after a sentence end (that token would begin the next sentence: it is not emitted); the length ends it
        last. Before ``row.min_new`` tokens no stop rule fires (the pickers never choose EOS then:
        :meth:`suppress_eos`). ``source``: where a copied token was copied from; ``supported``: the neighbour that
        carries a token produced one at a time (never both)."""
        if row.done:
            return False
        if self.config.stop_at_eos and token in self.eos_ids:
            row.done = row.eos = True
            return False
        can_stop = row.stop != "none" and len(row.tokens) >= row.min_new
        if (can_stop and row.stop == "sentence" and row.tokens and int(token) in self.token_classes().space_start
                and row.tokens[-1] in self.token_classes().sentence_punct
                and ends_sentence(self.tokenizer.decode(row.tokens, skip_special_tokens=True), SENTENCE_MIN_WORDS)):
            row.done = row.stopped = True
            return False
        row.tokens.append(int(token))
        row.sources.append(source)
        row.supported.append(supported)
        if can_stop and int(token) in self.token_classes().newline and stop_reached(
                row.stop, self.tokenizer.decode(row.tokens, skip_special_tokens=True)):
            row.done = row.stopped = True
        elif len(row.tokens) >= row.max_new:
            row.done = True
        return True

    def suppress_eos(self, row: Row, dist: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``dist`` (``[k, V]``: probabilities, or logits with ``fill=-inf``) at k consecutive positions of ``row``,
        position j choosing the row's token number ``len(row.tokens) + j``, with EOS set to ``fill`` wherever that
        token comes before ``row.min_new`` (``NestConfig.min_new_tokens``); ``dist`` itself when nothing is
        suppressed."""
        early = row.min_new - len(row.tokens)
        if early <= 0 or not self.eos_ids:
            return dist
        eos = [i for i in self.eos_ids if 0 <= i < dist.shape[-1]]
        dist = dist.clone()
        dist[:early, eos] = fill
        return dist

    def token_classes(self) -> TokenClasses:
        """:func:`token_classes` of this decoder's tokenizer (shared by its decoders; a caller that times queries
        calls this at start-up)."""
        if self._token_classes is None:
            self._token_classes = token_classes(self.tokenizer, self.vocab_size)
        return self._token_classes

    def newline_ids(self) -> frozenset[int]:
        """Token ids whose text holds a line break (the tokens that can complete a line-break stop rule)."""
        return self.token_classes().newline

    def finish(self, row: Row) -> Generation:
        row.counters["generated_tokens"] = len(row.tokens)
        row.counters["eos"] = int(row.eos)
        # which rule ended the row: EOS, the task family's stop rule, or the length (incl. the context window)
        row.counters["stopped_by_eos"] = int(row.eos)
        row.counters["stopped_by_stop_rule"] = int(row.stopped and not row.eos)
        row.counters["stopped_by_length"] = int(not row.eos and not row.stopped)
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True) if row.tokens else ""
        return Generation(example_id=row.req.example_id, text=text, token_ids=list(row.tokens),
                          sources=list(row.sources), spans=attribution_runs(row.sources), counters=dict(row.counters),
                          timings={k: float(v) for k, v in row.timings.items()}, supported=list(row.supported))
