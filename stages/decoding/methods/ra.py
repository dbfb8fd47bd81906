"""In-context retrieval augmentation (RA): the base LM with the top ``ra_passages`` passages in the prompt."""

from __future__ import annotations

from stages.decoding.methods.base_lm import BaseDecoder
from stages.decoding.registry import register


@register
class RADecoder(BaseDecoder):
    """In-context retrieval augmentation: the base LM with the top-3 passages in the prompt (paper App. B templates)."""

    method = "ra"
    label = "+RA"
    reads = ("generation", "sampling", "passages", "ra_passages")
    retrieves = True
    uses_token_index = False
    perplexity = True
    order = 20
    ra_prompt = True
