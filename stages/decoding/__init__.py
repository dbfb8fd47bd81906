"""The decoding library: base LM, in-context RA, kNN-LM, NEST and RA-NEST with token-level attribution.

    from stages.decoding import Passage, DecodeRequest, Generation, NestConfig, make_decoder
    decoder = make_decoder("nest", model, tokenizer, NestConfig())
    generations = decoder.decode([DecodeRequest(0, "qa", question="...", passages=[Passage(7, ids, "Title", "text")])])

See docs/decoding.md.
"""

from __future__ import annotations

import importlib

# Lazy exports (PEP 562): ``import stages.decoding.config`` (the pipeline does it to compute keys) must not import torch.
_EXPORTS = {
    "BaseDecoder": "base", "Decoder": "base", "RADecoder": "base", "NestConfig": "config",
    "KnnLMDecoder": "knnlm", "NestDecoder": "nest", "RANestDecoder": "nest", "PassageKeyCache": "passage_keys",
    "DecodeRequest": "types", "Generation": "types", "Passage": "types",
}
METHODS = ("base", "ra", "knnlm", "nest", "ra_nest")


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"stages.decoding.{_EXPORTS[name]}"), name)
    if name == "DECODERS":
        from stages.decoding.base import BaseDecoder, RADecoder
        from stages.decoding.knnlm import KnnLMDecoder
        from stages.decoding.nest import NestDecoder, RANestDecoder

        return {cls.method: cls for cls in (BaseDecoder, RADecoder, KnnLMDecoder, NestDecoder, RANestDecoder)}
    raise AttributeError(f"module 'stages.decoding' has no attribute {name!r}")


def make_decoder(method: str, model, tokenizer, config=None, key_cache=None):
    """A decoder for ``method`` in ``base``, ``ra``, ``knnlm``, ``nest``, ``ra_nest``. ``key_cache`` (optional) shares
    passage keys between decoders of the same process (methods that use no token index ignore it)."""
    if method not in METHODS:
        raise ValueError(f"unknown decoding method {method!r}; expected one of {METHODS}")
    return __getattr__("DECODERS")[method](model, tokenizer, config, key_cache=key_cache)


__all__ = ["Passage", "DecodeRequest", "Generation", "NestConfig", "make_decoder", "Decoder", "PassageKeyCache",
           "METHODS"]
