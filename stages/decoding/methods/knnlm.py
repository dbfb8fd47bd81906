"""The two-stage kNN-LM baseline (paper App. B): the token index over the example's retrieved passages, one token per
step, p_M = λ·p_LM + (1 − λ)·p_kNN with a fixed λ = 0.7 (or the RRC λ_t with ``knnlm_lambda_mode="rrc"``: the
ablation "kNN-LM + Relative Retrieval Confidence" of Table 3, and the token-by-token reference of invariant (b))."""

from __future__ import annotations

import torch

from stages.decoding.kernels import relative_retrieval_confidence
from stages.decoding.registry import register
from stages.decoding.verify import VerifyingDecoder


@register
class KnnLMDecoder(VerifyingDecoder):
    """Greedy kNN-LM: always token mode (no drafter), no spans, no masking."""

    method = "knnlm"
    label = "+kNN-LM"
    reads = ("generation", "token_index", "mixture", "knnlm_lambda")
    retrieves = True
    uses_token_index = True
    perplexity = True
    order = 30

    def __init__(self, model, tokenizer, config=None, key_cache=None):
        super().__init__(model, tokenizer, config, key_cache)
        self.config = self.config.replace(masking="off")

    def lambdas(self, nb_scores: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.force_lambda is not None:
            return torch.full((nb_scores.shape[0],), float(cfg.force_lambda), device=nb_scores.device)
        if cfg.knnlm_lambda_mode == "rrc":
            return relative_retrieval_confidence(nb_scores, cfg.alpha, cfg.tau)
        return torch.full((nb_scores.shape[0],), float(cfg.knnlm_lambda), device=nb_scores.device)
