"""RA-NEST: NEST with the top ``ra_passages`` passages also in the prompt (the token index still uses all b)."""

from __future__ import annotations

from stages.decoding.methods.nest import NestDecoder
from stages.decoding.registry import register


@register
class RANestDecoder(NestDecoder):
    """RA-NEST: NEST after the in-context RA prompt."""

    method = "ra_nest"
    label = "+RA-NEST"
    reads = ("generation", "token_index", "mixture", "spans", "ra_passages")
    retrieves = True
    uses_token_index = True
    perplexity = True
    order = 50
    ra_prompt = True
