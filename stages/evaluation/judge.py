"""The FactScore judge: a local HF chat LM that decomposes bios into atomic facts and checks each against passages
retrieved from the corpus (``tasks.factscore``). Configured by ``[factscore] judge_lm`` (a HF folder); with none, the
report prints FactScore as "not computed"."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence
from stages.corpus.passages import PassageReader
from stages.lm.load import load_lm
from stages.retrieval.bm25 import BM25Searcher


class HFJudge:
    """``generate(prompt) -> str``: greedy, through the model's chat template when it has one (tasks.factscore.Judge)."""

    def __init__(self, lm_dir: str | Path, max_new_tokens: int = 192, device: str = "cpu"):

        self.model, self.tokenizer = load_lm(lm_dir, device=device)
        self.max_new_tokens = int(max_new_tokens)

    def generate(self, prompt: str) -> str:
        # lazy: torch takes seconds to import
        import torch

        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
        else:
            text = prompt
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.model.device)
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_new_tokens,
                                      do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def bm25_retriever(bm25_dir: str | Path, passages_dir: str | Path, k: int = 5) -> Callable[[str, str], Sequence[str]]:
    """``retrieve(entity, fact)``: the texts of the top-k BM25 passages for "entity fact" (FActScore retrieves from the
    entity's own page; a BM25 query led by the entity name is the corpus-wide stand-in)."""

    searcher, reader = BM25Searcher(bm25_dir), PassageReader(passages_dir)

    def retrieve(entity: str, fact: str) -> list[str]:
        hits = searcher.search([f"{entity} {fact}"], k)[0]
        rows = reader.get([d for d, _ in hits])
        return [f"{r.get('title', '')}. {r.get('text', '')}" for r in rows]

    return retrieve
