"""NEST (paper Alg. 1): the RRC mixture (Eq. 4), dynamic span selection (the span drafter), relaxed speculative
decoding and streaming (the verify loop), masking of used spans. Every released-code deviation is a NestConfig option."""

from __future__ import annotations

import torch

from stages.decoding.drafter import SpanDrafter
from stages.decoding.kernels import relative_retrieval_confidence
from stages.decoding.registry import register
from stages.decoding.verify import VerifyingDecoder


@register
class NestDecoder(VerifyingDecoder):
    """NEST with the paper's defaults: the span drafter's drafts, verified with p_M under the RRC λ_t."""

    method = "nest"
    label = "+NEST"
    reads = ("generation", "token_index", "mixture", "spans")
    retrieves = True
    uses_token_index = True
    perplexity = True
    order = 40

    def __init__(self, model, tokenizer, config=None, key_cache=None):
        super().__init__(model, tokenizer, config, key_cache)
        self.drafter = SpanDrafter(self.config, self.mu, self.span_start_docs)

    def lambdas(self, nb_scores: torch.Tensor) -> torch.Tensor:
        """λ_t per position: RRC (Eq. 4) unless ``force_lambda`` is set."""
        if self.config.force_lambda is not None:
            return torch.full((nb_scores.shape[0],), float(self.config.force_lambda), device=nb_scores.device)
        return relative_retrieval_confidence(nb_scores, self.config.alpha, self.config.tau)
