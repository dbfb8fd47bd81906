"""Passage keys: each passage encoded alone by the LM (paper §3.1), and a cache of those keys shared across queries,
methods and processes (beyond the paper: keys depend only on the passage tokens and the LM, not on the query).

Cache layout on disk: ``<dir>/<lm_identity>/<layer>-bos<0|1>/<sha[:2]>/<sha>.npy`` where ``sha`` is the sha1 of the
passage's token ids: content-addressed, so a doc_id can never point at another corpus's keys. ``lm_identity`` is the
keys' identity (:func:`key_identity`): the LM's fingerprint, plus ``+bf16`` for keys encoded under bf16 arithmetic
(``NestConfig.key_precision``), so keys of the two precisions never share a folder or a store. Files are written to a
temp name and renamed (atomic), so several processes can share one folder.

A :class:`~stages.decoding.key_store.PassageKeyStore` (the ``EncodePassageKeys`` artifact, built offline) can sit in
front of the folder: it answers first for the keys of its LM identity, layer and BOS rule, and its hits are never
re-encoded (``stats["store_hits"]``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from stages.decoding.key_store import PassageKeyStore
from stages.decoding.lm_runner import KeyLayerCapture, _StopForward, context_window, model_device


def passage_digest(token_ids: Sequence[int]) -> str:
    """sha1 of the token ids as little-endian int32."""
    return hashlib.sha1(np.asarray(token_ids, dtype="<i4").tobytes()).hexdigest()


def lm_fingerprint(model, sample: int = 1024) -> str:
    """A short identity for the LM's weights and dtype (keys from another LM or dtype must never be reused).

    Hashes the config, and for **every** named parameter its name, shape, dtype and a strided sample of about
    ``sample`` of its values (first element included): a change of any layer's weights that reaches a sampled value, of
    any shape or of the dtype gives another identity. Cheap: about ``sample`` values per tensor (a few hundred thousand
    values for a 135M LM), never a full pass over the weights."""
    h = hashlib.sha256()
    h.update(model.config.to_json_string(use_diff=False).encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        h.update(flat[:: max(1, flat.numel() // sample)].float().cpu().numpy().tobytes())
    return f"{type(model).__name__}-{h.hexdigest()[:16]}"


def key_identity(lm_identity: str, precision: str = "fp32") -> str:
    """The identity of keys encoded by the LM ``lm_identity`` at ``precision`` (``NestConfig.key_precision``): the LM's
    own identity for fp32 (so the paper's keys keep the names they always had), ``<lm_identity>+bf16`` otherwise."""
    return lm_identity if precision == "fp32" else f"{lm_identity}+{precision}"


def passage_bos_id(tokenizer, rule: str = "auto") -> int | None:
    """The BOS id prepended to a passage encoded alone (``NestConfig.passage_bos``), or None: ``"yes"`` the tokenizer's
    BOS, ``"no"`` none, ``"auto"`` only when the tokenizer itself prepends BOS to text (Llama-2 does, SmolLM2 does not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if rule == "yes":
        return bos
    if rule == "no" or bos is None:
        return None
    probe = tokenizer("a")["input_ids"] if callable(tokenizer) else []
    return bos if probe and probe[0] == bos else None


def max_index_tokens(model) -> int:
    """The most tokens one passage puts in the token index: its encoding must fit the context window."""
    return max(context_window(model) - 1, 2)


def min_index_tokens(bos_id: int | None) -> int:
    """The fewest tokens a passage needs to give one key: 1 with a BOS before it (the BOS position's key predicts the
    first token), else 2."""
    return 1 if bos_id is not None else 2


def index_tokens(token_ids: Sequence[int], max_tokens: int, *, ends_document: bool = False,
                 document_end: str = "none", eos_id: int | None = None) -> list[int]:
    """The token ids a passage contributes to the token index: its tokens cut to ``max_tokens``, plus EOS after the
    last token of an article when ``document_end = "eos"`` (``NestConfig.document_end``: the key of that last token then
    says "stop"). The decoder's on-the-fly keys and the EncodePassageKeys store both use this, so their keys agree."""
    toks = [int(t) for t in token_ids]
    if document_end == "eos" and ends_document and eos_id is not None and len(toks) < max_tokens:
        toks.append(int(eos_id))
    return toks[:max_tokens]


def _precision_context(device: torch.device, precision: str):
    """``"fp32"``: the model's own arithmetic; ``"bf16"``: torch autocast, so matmuls run in bf16 while weights, the
    residual stream and the norms stay fp32 (more accurate than a bf16 copy of the model, and no second copy)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"key precision {precision!r}; expected 'fp32' or 'bf16'")


@torch.inference_mode()
def encode_passages(model, token_lists: Sequence[Sequence[int]], key_layer: str, bos_id: int | None,
                    batch_size: int = 16, precision: str = "fp32") -> list[torch.Tensor]:
    """Keys of each passage encoded alone: for passage tokens (t_0..t_{m−1}), the key-layer state at every position
    that has a next token, i.e. ``[m − 1, d]`` fp32 on CPU (``[m, d]`` with a BOS first: the BOS state predicts t_0).
    Passages are batched (sorted by length, right-padded); the forward stops at the key layer. ``precision``
    (``NestConfig.key_precision``) sets the forward's arithmetic only: the keys come back as fp32 either way.
    """
    prefix = [] if bos_id is None else [int(bos_id)]
    order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
    out: list[torch.Tensor | None] = [None] * len(token_lists)
    device = model_device(model)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        seqs = [prefix + list(token_lists[i]) for i in chunk]
        L = max(len(x) for x in seqs)
        ids = torch.zeros((len(seqs), L), dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for j, x in enumerate(seqs):
            ids[j, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[j, :len(x)] = 1
        capture = KeyLayerCapture(model, key_layer, stop=True)
        try:
            with _precision_context(device, precision):
                base(input_ids=ids.to(device), attention_mask=mask.to(device) if not bool(mask.all()) else None,
                     use_cache=False)
        except _StopForward:
            pass
        finally:
            capture.remove()
        states = capture.value
        for j, i in enumerate(chunk):
            n_keys = max(len(seqs[j]) - 1, 0)
            out[i] = states[j, :n_keys].float().cpu()
    return out  # type: ignore[return-value]


class PassageKeyCache:
    """Passage keys by ``(LM identity, layer, BOS, token-ids digest)``: an LRU in memory (``max_bytes``) over an
    optional prebuilt key store (``store``: consulted before the folder, only for keys of its own LM identity, layer
    and BOS rule) and an optional shared folder. ``stats`` counts hits (memory, store, disk), misses, and the encoding
    time the hits saved (estimated from the measured encoding time per token of the misses)."""

    def __init__(self, directory: str | Path | None = None, max_bytes: int = 2 << 30, store=None):
        self.directory = Path(directory) if directory else None
        self.max_bytes = int(max_bytes)
        self.store = store
        self._mem: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.stats = {"memory_hits": 0, "store_hits": 0, "disk_hits": 0, "misses": 0, "encoded_tokens": 0,
                      "encode_seconds": 0.0, "hit_tokens": 0, "saved_seconds_est": 0.0}

    @staticmethod
    def key(lm_identity: str, layer: str, bos: bool, digest: str) -> str:
        return f"{lm_identity}/{layer}-bos{int(bos)}/{digest[:2]}/{digest}"

    @staticmethod
    def parse_key(key: str) -> tuple[str, str, bool, str]:
        """Inverse of :meth:`key`: ``(lm_identity, layer, bos, digest)`` (the identity may itself contain ``/``)."""
        identity, layer_bos, _, digest = key.rsplit("/", 3)
        layer, bos = layer_bos.rsplit("-bos", 1)
        return identity, layer, bos == "1", digest

    def _from_store(self, key: str) -> torch.Tensor | None:
        if self.store is None:
            return None
        identity, layer, bos, digest = self.parse_key(key)
        if not self.store.matches(identity, layer, bos):
            return None
        return self.store.get_by_digest(digest)

    def _path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{key}.npy"

    def _remember(self, key: str, keys: torch.Tensor) -> None:
        if key in self._mem:
            self._mem.move_to_end(key)
            return
        size = keys.numel() * keys.element_size()
        if size > self.max_bytes:
            return
        self._mem[key] = keys
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._mem.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()

    def get(self, key: str) -> torch.Tensor | None:
        hit = self._mem.get(key)
        if hit is not None:
            self._mem.move_to_end(key)
            self.stats["memory_hits"] += 1
            return hit
        stored = self._from_store(key)
        if stored is not None:
            self.stats["store_hits"] += 1
            self._remember(key, stored)
            return stored
        path = self._path(key)
        if path is not None and path.exists():
            try:
                arr = torch.from_numpy(np.load(path))
            except (OSError, ValueError):  # a foreign or damaged file: treat as a miss, it is rewritten
                return None
            self.stats["disk_hits"] += 1
            self._remember(key, arr)
            return arr
        return None

    def put(self, key: str, keys: torch.Tensor) -> None:
        keys = keys.detach().float().cpu().contiguous()
        self._remember(key, keys)
        path = self._path(key)
        if path is None or path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npy")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, keys.numpy())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def record_hit(self, n_tokens: int) -> None:
        self.stats["hit_tokens"] += n_tokens
        per_token = self.stats["encode_seconds"] / self.stats["encoded_tokens"] if self.stats["encoded_tokens"] else 0.0
        self.stats["saved_seconds_est"] = self.stats["hit_tokens"] * per_token

    def record_encoding(self, n_tokens: int, seconds: float) -> None:
        self.stats["misses"] += 1
        self.stats["encoded_tokens"] += n_tokens
        self.stats["encode_seconds"] += seconds
        self.record_hit(0)

    def clear_memory(self) -> None:
        self._mem.clear()
        self._bytes = 0


def open_key_cache(config, passage_keys: str | Path | None = None, *, on_disk: bool = True) -> "PassageKeyCache":
    """The one factory of the decoders' key caches: ``config`` (a NestConfig) gives the memory budget
    (``key_cache_max_bytes``) and, when ``on_disk``, the shared folder (``key_cache_dir``); the key store
    ``passage_keys`` (an EncodePassageKeys folder), if given, answers first. ``on_disk=False`` is Generate's and the
    demo's cache: in-process and empty at the start, so a query's time never depends on what ran before the run."""
    store = PassageKeyStore.open(passage_keys) if passage_keys else None
    return PassageKeyCache(config.key_cache_dir if on_disk else None, config.key_cache_max_bytes, store=store)


def lookup_or_encode(cache: PassageKeyCache, model, token_lists: Sequence[Sequence[int]], *, lm_identity: str,
                     key_layer: str, bos_id: int | None, batch_size: int, precision: str = "fp32"
                     ) -> tuple[list[torch.Tensor], list[bool], float, float]:
    """Keys for every passage, from the cache or freshly encoded (misses are deduplicated and encoded together).
    ``lm_identity`` is the keys' identity (:func:`key_identity` of the LM and ``precision``), ``precision`` the
    arithmetic of the encoding of the misses.

    Returns (keys per passage, hit flag per passage, lookup seconds, encoding seconds)."""
    t0 = time.perf_counter()
    names = [PassageKeyCache.key(lm_identity, key_layer, bos_id is not None, passage_digest(t)) for t in token_lists]
    found: list[torch.Tensor | None] = [cache.get(n) for n in names]
    lookup_s = time.perf_counter() - t0
    missing: dict[str, int] = {}
    for i, (n, k) in enumerate(zip(names, found)):
        if k is None and n not in missing:
            missing[n] = i
    encode_s = 0.0
    fresh: dict[str, torch.Tensor] = {}
    if missing:
        t1 = time.perf_counter()
        idx = list(missing.values())
        keys = encode_passages(model, [token_lists[i] for i in idx], key_layer, bos_id, batch_size, precision)
        encode_s = time.perf_counter() - t1
        total_tokens = sum(len(token_lists[i]) for i in idx) or 1
        for i, k in zip(idx, keys):
            fresh[names[i]] = k
            cache.put(names[i], k)
            cache.record_encoding(len(token_lists[i]), encode_s * len(token_lists[i]) / total_tokens)
    hits = [k is not None for k in found]
    for k, toks in zip(found, token_lists):
        if k is not None:
            cache.record_hit(len(toks))
    out = [k if k is not None else fresh[n] for n, k in zip(names, found)]
    return out, hits, lookup_s, encode_s
