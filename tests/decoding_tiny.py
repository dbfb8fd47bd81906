"""Tiny, download-free fixtures for the decoding tests: a seeded random Llama (vocab 64, 2 layers, hidden 32) and a
character-level tokenizer with the duck-typed surface that ``tasks.prompts`` and the decoders use."""

from __future__ import annotations

import random

import torch

VOCAB = 64
EOS = 1
PAD = 0


class TinyTokenizer:
    """Characters → ids 4..63; id 1 is EOS, 0 is padding, 2 is BOS (never added by default)."""

    eos_token_id = EOS
    pad_token_id = PAD
    bos_token_id = 2
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [4 + (ord(c) % 60) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        special = {EOS, PAD, 2, 3}
        return "".join(chr(48 + (int(i) % 60)) for i in ids if not (skip_special_tokens and int(i) in special))


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 32, max_pos: int = 512, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                      eos_token_id=EOS, pad_token_id=PAD, bos_token_id=2, attn_implementation=attn)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger logits than the default init, so that greedy choices are far from ties
        model.lm_head.weight.mul_(8.0)
    return model


def random_passages(seed: int, n: int, lo: int = 12, hi: int = 40, first_doc: int = 100):
    """n passages of random lengths; token ids in 4..63 (never EOS, PAD or BOS)."""
    from stages.decoding import Passage

    rng = random.Random(seed)
    return [Passage(first_doc + i, [rng.randrange(4, VOCAB) for _ in range(rng.randrange(lo, hi))], f"T{i}", "")
            for i in range(n)]


def mixed_requests(n_new: int = 24):
    """Three examples with different prompt lengths, kinds and passages (the decoding tests' common batch)."""
    from stages.decoding.types import DecodeRequest

    return [
        DecodeRequest(0, "completion", prefix="the cat sat on the", passages=random_passages(10, 6),
                      max_new_tokens=n_new),
        DecodeRequest(1, "qa", question="who?", passages=random_passages(11, 4, first_doc=200), max_new_tokens=n_new),
        DecodeRequest(2, "completion", prefix="a", passages=random_passages(12, 8, lo=4, hi=9, first_doc=300),
                      max_new_tokens=n_new - 5),
    ]
