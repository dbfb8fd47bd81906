"""The token index (K', V') of one example (paper §3.1, second stage): one key per passage token that has a next token.

keys [N, d] fp32 (LM states at the key layer), ‖k‖² precomputed, values [N] (the next token), and the key's id as
**two int64 arrays** ``doc_ids`` and ``positions`` (B8: the released code packs ``doc·max_len + pos`` and pads collide
with the neighbour passage; two arrays cannot collide). ``positions[i]`` is the position **of the value token** in its
passage's token ids, so a token copied from key i has source ``(doc_ids[i], positions[i])`` and equals
``passage.token_ids[positions[i]]``. ``valid`` masks keys of spans already used (masking, paper §3.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from stages.decoding.kernels import negative_squared_l2, top_neighbors


@dataclass
class Neighbors:
    """Top-r neighbours of m queries: scores s = −‖q − k‖² [m, r'] (best first) and key rows [m, r']."""

    scores: torch.Tensor
    rows: torch.Tensor


class TokenIndex:
    """Keys, values and ids of one example's retrieved passages, with a validity mask."""

    def __init__(self, passages: Sequence[tuple[int, Sequence[int]]], keys: Sequence[torch.Tensor],
                 first_value_pos: int, device: torch.device | str = "cpu"):
        """``passages``: (doc_id, token_ids) in rank order, doc_ids unique; ``keys[j]`` [m_j, d] for passage j, whose
        key i predicts token ``first_value_pos + i`` (1 without a BOS, 0 with one)."""
        self.first_value_pos = int(first_value_pos)
        self.tokens: dict[int, list[int]] = {}
        self._start: dict[int, int] = {}
        self._count: dict[int, int] = {}
        vals, docs, poss, mats = [], [], [], []
        start = 0
        for (doc_id, toks), k in zip(passages, keys):
            toks = [int(t) for t in toks]
            n = min(int(k.shape[0]), max(len(toks) - self.first_value_pos, 0))
            self.tokens[int(doc_id)] = toks
            self._start[int(doc_id)] = start
            self._count[int(doc_id)] = n
            if n:
                mats.append(k[:n])
                vals.extend(toks[self.first_value_pos:self.first_value_pos + n])
                docs.extend([int(doc_id)] * n)
                poss.extend(range(self.first_value_pos, self.first_value_pos + n))
            start += n
        dim = int(keys[0].shape[1]) if len(keys) else 0
        self.keys = torch.cat(mats).to(device=device, dtype=torch.float32) if mats else \
            torch.zeros((0, dim), device=device)
        self.key_sq_norms = (self.keys * self.keys).sum(-1)
        self.values = torch.tensor(vals, dtype=torch.long, device=device)
        self.doc_ids = torch.tensor(docs, dtype=torch.int64)
        self.positions = torch.tensor(poss, dtype=torch.int64)
        self._docs, self._poss = docs, poss  # python copies: per-token lookups without tensor indexing
        self.valid = torch.ones(len(vals), dtype=torch.bool, device=device)
        self._valid = [True] * len(vals)  # python mirror: per-token checks without a device sync
        self._n_valid = len(vals)

    def __len__(self) -> int:
        return int(self.values.numel())

    @property
    def n_valid(self) -> int:
        return self._n_valid

    def search(self, queries: torch.Tensor, r: int, exclude: Sequence[Sequence[int]] | None = None) -> Neighbors:
        """Top-r valid keys by s = −‖q − k‖² (fp32), r clamped to the number of valid keys (B7).

        ``exclude[i]``: extra key rows query i must not see (keys of draft tokens emitted before that position, so
        that a draft's searches see the masks token-by-token decoding would see). Such slots come back with score
        −inf when fewer than r keys remain for that query."""
        q = queries.to(self.keys.device)
        if self._n_valid == 0:
            empty = q.new_zeros((q.shape[0], 0))
            return Neighbors(empty, empty.long())
        scores = negative_squared_l2(q, self.keys, self.key_sq_norms)
        if exclude is not None:
            qi = [i for i, rows in enumerate(exclude) for _ in rows]
            if qi:
                ki = [k for rows in exclude for k in rows]
                scores[torch.tensor(qi, device=scores.device), torch.tensor(ki, device=scores.device)] = float("-inf")
        valid = None if self._n_valid == len(self) else self.valid
        s, rows = top_neighbors(scores, r, valid)
        return Neighbors(s, rows)

    def source(self, row: int) -> tuple[int, int]:
        """(doc_id, position of the value token) of key ``row``."""
        return self._docs[row], self._poss[row]

    def key_row(self, doc_id: int, position: int) -> int:
        """The key whose value is token ``position`` of passage ``doc_id``; −1 if there is none."""
        start = self._start.get(int(doc_id))
        if start is None:
            return -1
        i = int(position) - self.first_value_pos
        return start + i if 0 <= i < self._count[int(doc_id)] else -1

    def mask(self, doc_id: int, position: int) -> bool:
        """Mark the key of ``(doc_id, position)`` as used; True if it was valid."""
        row = self.key_row(doc_id, position)
        if row < 0 or not self._valid[row]:
            return False
        self.valid[row] = False
        self._valid[row] = False
        self._n_valid -= 1
        return True

    def is_first_key(self, doc_id: int, position: int) -> bool:
        return int(position) - self.first_value_pos == 0

    def continuation(self, doc_id: int, position: int, n: int, stop_at_masked: bool = False) -> list[int]:
        """Up to ``n`` tokens of passage ``doc_id`` from ``position`` on, cut at the passage end (never padded: B6)
        and, with ``stop_at_masked``, before the first token whose key is masked (a corpus token already used)."""
        toks = self.tokens.get(int(doc_id), [])
        if position < 0:
            return []
        out = toks[position:position + max(int(n), 0)]
        if stop_at_masked:
            for i in range(len(out)):
                row = self.key_row(doc_id, position + i)
                if row >= 0 and not self._valid[row]:
                    return out[:i]
        return out
