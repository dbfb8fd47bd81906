"""The base LM: greedy decoding (or sampling with ``do_sample``), one LM pass per token; no retrieval."""

from __future__ import annotations

import torch

from stages.decoding.base import Clock, Decoder, Row
from stages.decoding.lm_runner import BatchedLM
from stages.decoding.registry import register
from stages.decoding.types import Generation


@register
class BaseDecoder(Decoder):
    """The base LM: greedy decoding (or sampling with ``do_sample``), one LM pass per token, stops at EOS."""

    method = "base"
    label = "Base LM"
    reads = ("generation", "sampling")
    retrieves = False
    uses_token_index = False
    perplexity = True
    order = 10

    def _pick(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        cfg = self.config
        if any(r.min_new > len(r.tokens) for r in rows):  # NestConfig.min_new_tokens: no EOS yet
            logits = torch.cat([self.suppress_eos(r, lg[None], float("-inf")) for r, lg in zip(rows, logits)])
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
