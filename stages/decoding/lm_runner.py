"""The LM side of decoding: key-layer hooks and a batched KV-cache runner that lets every row advance on its own.

One forward pass per step gives both the logits and the token-index query (captured by a hook at the key layer), so a
NEST step or draft costs exactly one LM pass.

KV cache with holes (the fix for B3 and what makes batches exact): all rows share one cache of S slots. A step appends
L slots to every row (each row's input is right-padded to L); :meth:`BatchedLM.commit` then says how many of its new
slots each row keeps. Slots a row did not keep (rejected draft tokens, padding) become *holes*: a 2-D attention mask
hides them from every later query, and each row gets explicit ``position_ids`` (its own count of kept tokens), so RoPE
positions stay exact. Nothing is ever cropped per row, so a row that accepted 3 of 64 drafted tokens sees exactly the
cache of a fresh forward over its own tokens. Trailing slots that are holes in every row are cropped (so a batch of 1
never has holes), and the cache is compacted (kept slots gathered to the left) when holes dominate.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

try:  # transformers >= 4.36
    from transformers import DynamicCache
except ImportError:  # pragma: no cover
    DynamicCache = None

# Architectures whose logits are exactly lm_head(last_hidden_state): we then run the base model and project only the
# positions we need (a 250-token prefill would otherwise project 250 x V logits to use one row).
_PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "smollm3", "phi3"}


class _StopForward(Exception):
    """Raised by a hook once the key-layer state is captured, to skip the rest of a passage-encoding forward."""


def decoder_layers(model) -> torch.nn.ModuleList:
    """The list of decoder blocks of a HF causal LM (``model.model.layers`` for Llama-like models)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}; the token index needs a "
                         "Llama-like model (model.model.layers)")
    return layers


class KeyLayerCapture:
    """Hooks that capture the token-index key/query state [B, L, d] during a forward pass.

    ``key_layer="paper"``: the output of the last block's ``post_attention_layernorm`` (input of the final feed-forward
    after its layer norm, paper §3.1). ``key_layer="code"``: the input of the last block = ``hidden_states[-2]`` (D1).
    With ``stop=True`` the forward is aborted right after the capture (passage encoding needs nothing after it).
    """

    def __init__(self, model, key_layer: str, stop: bool = False):
        self.value: torch.Tensor | None = None
        self.stop = stop
        last = decoder_layers(model)[-1]
        if key_layer == "paper":
            ln = getattr(last, "post_attention_layernorm", None)
            if ln is None:
                raise ValueError(f"{type(last).__name__} has no post_attention_layernorm; use key_layer='code'")
            self._handle = ln.register_forward_hook(self._on_output)
        elif key_layer == "code":
            self._handle = last.register_forward_pre_hook(self._on_input, with_kwargs=True)
        else:
            raise ValueError(f"unknown key_layer {key_layer!r}")

    def _on_output(self, module, args, output):
        self.value = output
        if self.stop:
            raise _StopForward

    def _on_input(self, module, args, kwargs):
        self.value = args[0] if args else kwargs["hidden_states"]
        if self.stop:
            raise _StopForward

    def remove(self) -> None:
        self._handle.remove()


def _cache_kwarg(fn) -> str:
    """transformers 5.x takes ``cache=`` (``past_key_values=`` is deprecated there, removal planned for 5.40)."""
    params = inspect.signature(fn).parameters
    return "cache" if "cache" in params else "past_key_values"


def context_window(model) -> int:
    """The LM's context window in tokens (``max_position_embeddings``; unbounded when the config does not say)."""
    return int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@dataclass
class RowOutput:
    """What one forward pass gives for one row: logits [len, V] and key-layer queries [len, d] (fp32) for each fed
    token, in order (None when no key layer is captured)."""

    logits: torch.Tensor
    queries: torch.Tensor | None


class BatchedLM:
    """A batch of rows decoding together over one shared KV cache with holes (see module docstring).

    Usage: ``prefill(prompts)``, then repeatedly ``step(inputs)`` + ``commit(kept)``; ``keep_rows(rows)`` drops
    finished rows. ``forward_passes`` counts LM passes.
    """

    def __init__(self, model, key_layer: str | None = None, compact_min_slots: int = 256,
                 compact_hole_fraction: float = 0.5):
        self.model = model
        self.device = model_device(model)
        self.key_layer = key_layer
        self.compact_min_slots = compact_min_slots
        self.compact_hole_fraction = compact_hole_fraction
        cfg = model.config
        self.plain_head = getattr(cfg, "model_type", None) in _PLAIN_HEAD_TYPES and hasattr(model, "model") \
            and model.get_output_embeddings() is not None
        fn = model.model.forward if self.plain_head else model.forward
        self._cache_kw = _cache_kwarg(fn)
        # padding slots of a ragged step may run past the window: clamp (they are masked; valid positions never do)
        self.max_position = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30) - 1
        self.cache = None
        self.slot_valid: torch.Tensor | None = None  # [B, S] bool, False = hole
        self.next_pos: list[int] = []  # per row: tokens kept so far = RoPE position of the next token
        self._pending: list[int] | None = None  # input lengths of the last uncommitted step
        self._has_holes = False
        self.forward_passes = 0
        self.compactions = 0

    # ------------------------------------------------------------------ forward
    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 rows: torch.Tensor, cols: torch.Tensor, counts: list[int]) -> list[RowOutput]:
        """One LM pass; outputs (logits, queries) only at the (rows, cols) positions, split into per-row groups."""
        capture = KeyLayerCapture(self.model, self.key_layer) if self.key_layer else None
        kwargs = {self._cache_kw: self.cache, "use_cache": True, "position_ids": position_ids,
                  "attention_mask": attention_mask}
        try:
            if self.plain_head:
                hidden = self.model.model(input_ids=input_ids, **kwargs).last_hidden_state
                logits = self.model.get_output_embeddings()(hidden[rows, cols])
            else:
                logits = self.model(input_ids=input_ids, **kwargs).logits[rows, cols]
        finally:
            if capture is not None:
                capture.remove()
        self.forward_passes += 1
        queries = capture.value[rows, cols].float() if capture is not None else None
        out, start = [], 0
        for n in counts:
            out.append(RowOutput(logits[start:start + n], None if queries is None else queries[start:start + n]))
            start += n
        return out

    def _new_cache(self):
        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # pragma: no cover - older transformers
            return DynamicCache()

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> list[RowOutput]:
        """Encode the prompts (right-padded); returns, per row, the outputs at its **last** prompt token only."""
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        self.cache = self._new_cache()
        B, L = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros((B, L), dtype=torch.long)
        valid = torch.zeros((B, L), dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
            valid[i, :len(p)] = True
        ids, valid = ids.to(self.device), valid.to(self.device)
        pos = torch.arange(L, device=self.device)[None, :].expand(B, L).clamp(max=self.max_position)
        self._has_holes = not bool(valid.all())
        mask = valid.long() if self._has_holes else None
        lengths = [len(p) for p in prompts]
        # Only the last prompt position is needed: project just it (not L x V logits).
        rows = torch.arange(B, device=self.device)
        last = torch.tensor([n - 1 for n in lengths], device=self.device)
        out = self._forward(ids, pos, mask, rows, last, [1] * B)
        self.slot_valid = valid
        self.next_pos = lengths[:]
        self._crop_trailing_holes()
        return out

    @torch.inference_mode()
    def step(self, inputs: list[list[int]]) -> list[RowOutput]:
        """Feed ``inputs[i]`` (≥ 1 token) to row i after its kept tokens; returns outputs for every fed token.
        Must be followed by :meth:`commit`."""
        assert self._pending is None, "commit() the previous step first"
        lengths = [len(x) for x in inputs]
        if len(inputs) != len(self.next_pos) or min(lengths) < 1:
            raise ValueError("step() needs one non-empty input per row")
        B, L = len(inputs), max(lengths)
        ids = torch.zeros((B, L), dtype=torch.long)
        for i, x in enumerate(inputs):
            ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        ids = ids.to(self.device)
        base = torch.tensor(self.next_pos, device=self.device)
        pos = (base[:, None] + torch.arange(L, device=self.device)[None, :]).clamp_(max=self.max_position)
        new_valid = torch.arange(L, device=self.device)[None, :] < torch.tensor(lengths, device=self.device)[:, None]
        ragged = not bool(new_valid.all())
        mask = None
        if self._has_holes or ragged:
            mask = torch.cat([self.slot_valid, new_valid], dim=1).long()
        self._pending = lengths
        rows = torch.repeat_interleave(torch.arange(B, device=self.device), torch.tensor(lengths, device=self.device))
        cols = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        return self._forward(ids, pos, mask, rows, cols, lengths)

    def commit(self, kept: list[int]) -> None:
        """Row i keeps the first ``kept[i]`` tokens it was fed in the last step; its other new slots become holes."""
        lengths = self._pending
        assert lengths is not None, "commit() without step()"
        self._pending = None
        if any(k < 0 or k > n for k, n in zip(kept, lengths)):
            raise ValueError(f"kept {kept} out of range for inputs of lengths {lengths}")
        L = max(lengths)
        new_valid = torch.arange(L, device=self.device)[None, :] < torch.tensor(kept, device=self.device)[:, None]
        self.slot_valid = torch.cat([self.slot_valid, new_valid], dim=1)
        self.next_pos = [p + k for p, k in zip(self.next_pos, kept)]
        if not bool(new_valid.all()):
            self._has_holes = True
        self._crop_trailing_holes()
        self._maybe_compact()

    # ------------------------------------------------------------------ cache surgery
    def _layers(self):
        layers = getattr(self.cache, "layers", None)
        if layers is None:  # pragma: no cover - transformers 4.x
            raise RuntimeError("this transformers version's DynamicCache has no .layers; use transformers >= 5")
        return layers

    def cache_length(self) -> int:
        return 0 if self.slot_valid is None else int(self.slot_valid.shape[1])

    def _crop_trailing_holes(self) -> None:
        any_valid = self.slot_valid.any(0)
        S = any_valid.numel()
        nz = torch.nonzero(any_valid)
        keep = int(nz[-1, 0]) + 1 if nz.numel() else 0
        if keep < S:
            self.cache.crop(-(S - keep))  # transformers 5.24: a negative count of slots to remove
            self.slot_valid = self.slot_valid[:, :keep]
        self._has_holes = not bool(self.slot_valid.all())

    def _maybe_compact(self) -> None:
        S = self.cache_length()
        if S < self.compact_min_slots or not self._has_holes:
            return
        holes = 1.0 - float(self.slot_valid.float().mean())
        if holes >= self.compact_hole_fraction:
            self.compact()

    def compact(self) -> None:
        """Gather each row's kept slots to the left (K/V carry their RoPE positions already: moving them is exact)."""
        counts = self.slot_valid.sum(1)
        S_new = int(counts.max())
        B, S = self.slot_valid.shape
        # stable order: kept slots first in their original order, holes after
        order = torch.argsort((~self.slot_valid).to(torch.int8), dim=1, stable=True)[:, :S_new]
        for layer in self._layers():
            if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                continue
            H, D = layer.keys.shape[1], layer.keys.shape[3]
            idx = order[:, None, :, None].expand(B, H, S_new, D)
            layer.keys = layer.keys.gather(2, idx)
            layer.values = layer.values.gather(2, order[:, None, :, None].expand(B, layer.values.shape[1], S_new,
                                                                              layer.values.shape[3]))
        self.slot_valid = torch.arange(S_new, device=self.device)[None, :] < counts[:, None]
        self._has_holes = not bool(self.slot_valid.all())
        self.compactions += 1

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), e.g. after some rows hit EOS."""
        if rows == list(range(len(self.next_pos))):
            return
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(idx)
        self.slot_valid = self.slot_valid[idx]
        self.next_pos = [self.next_pos[i] for i in rows]
        if rows:
            self._crop_trailing_holes()
            self._maybe_compact()
