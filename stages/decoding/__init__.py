"""The decoding library: base LM, in-context RA, kNN-LM, NEST and RA-NEST with token-level attribution.

    from stages.decoding import Passage, DecodeRequest, Generation, NestConfig, make_decoder
    decoder = make_decoder("nest", model, tokenizer, NestConfig())
    generations = decoder.decode([DecodeRequest(0, "qa", question="...", passages=[Passage(7, ids, "Title", "text")])])

The methods are the files of ``stages/decoding/methods/``, found by :mod:`stages.decoding.registry` (a new method is one
new file: docs/extending.md). See docs/decoding.md.
"""

from __future__ import annotations

import importlib
from stages.decoding.registry import decoder_class
from stages.decoding.registry import decoder_class, method_names
from stages.decoding.registry import method_names

# Lazy exports (PEP 562): ``import stages.decoding.config`` (the pipeline does it to compute keys) must not import torch.
_EXPORTS = {
    "Decoder": "base", "NestConfig": "config", "PassageKeyCache": "passage_keys",
    "DecodeRequest": "types", "Generation": "types", "Passage": "types",
    "BaseDecoder": "methods.base_lm", "RADecoder": "methods.ra", "KnnLMDecoder": "methods.knnlm",
    "NestDecoder": "methods.nest", "RANestDecoder": "methods.ra_nest",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"stages.decoding.{_EXPORTS[name]}"), name)
    if name == "METHODS":  # the registered methods' names, in the report's order (torch-free)

        return method_names()
    if name == "DECODERS":

        return {m: decoder_class(m) for m in method_names()}
    raise AttributeError(f"module 'stages.decoding' has no attribute {name!r}")


def make_decoder(method: str, model, tokenizer, config=None, key_cache=None):
    """A decoder for a registered ``method`` (``base``, ``ra``, ``knnlm``, ``nest``, ``ra_nest``, or any file of
    ``stages/decoding/methods/``). ``key_cache`` (optional) shares passage keys between decoders of the same process
    (methods that use no token index ignore it). A config option the method cannot honour raises ValueError."""

    return decoder_class(method)(model, tokenizer, config, key_cache=key_cache)


__all__ = ["Passage", "DecodeRequest", "Generation", "NestConfig", "make_decoder", "Decoder", "PassageKeyCache",
           "METHODS"]
