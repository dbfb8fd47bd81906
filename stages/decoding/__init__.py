"""The decoding library: base LM, in-context RA, kNN-LM, NEST and RA-NEST with token-level attribution.

    from stages.decoding import Passage, DecodeRequest, Generation, NestConfig, make_decoder
    decoder = make_decoder("nest", model, tokenizer, NestConfig())
    generations = decoder.decode([DecodeRequest(0, "qa", question="...", passages=[Passage(7, ids, "Title", "text")])])

See docs/decoding.md.
"""

from __future__ import annotations

from stages.decoding.base import BaseDecoder, Decoder, RADecoder
from stages.decoding.config import NestConfig
from stages.decoding.knnlm import KnnLMDecoder
from stages.decoding.nest import NestDecoder, RANestDecoder
from stages.decoding.passage_keys import PassageKeyCache
from stages.decoding.types import DecodeRequest, Generation, Passage

DECODERS = {cls.method: cls for cls in (BaseDecoder, RADecoder, KnnLMDecoder, NestDecoder, RANestDecoder)}
METHODS = tuple(DECODERS)


def make_decoder(method: str, model, tokenizer, config: NestConfig | None = None,
                 key_cache: PassageKeyCache | None = None) -> Decoder:
    """A decoder for ``method`` in ``base``, ``ra``, ``knnlm``, ``nest``, ``ra_nest``. ``key_cache`` (optional) shares
    passage keys between decoders of the same process (methods that use no token index ignore it)."""
    if method not in DECODERS:
        raise ValueError(f"unknown decoding method {method!r}; expected one of {METHODS}")
    return DECODERS[method](model, tokenizer, config, key_cache=key_cache)


__all__ = ["Passage", "DecodeRequest", "Generation", "NestConfig", "make_decoder", "Decoder", "PassageKeyCache",
           "METHODS"]
