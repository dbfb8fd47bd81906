"""NestConfig options for small corpora (docs/tuning.md): ``document_end`` and ``sink_keys``, on the tiny model."""

import torch

from stages.decoding import DecodeRequest, NestConfig, Passage, make_decoder
from stages.decoding.knn import KnnRow as NestRow
from stages.decoding.base import Clock
from decoding_tiny import EOS, TinyTokenizer, random_passages, tiny_llama


def _decoder(**cfg):
    return make_decoder("nest", tiny_llama(), TinyTokenizer(), NestConfig(max_new_tokens=12, **cfg))


def test_document_end_appends_eos_only_to_the_last_passage_of_an_article():
    dec = _decoder(document_end="eos")
    last, middle = Passage(1, [5, 6, 7], ends_document=True), Passage(2, [5, 6, 7], ends_document=False)
    assert dec.index_tokens(last) == [5, 6, 7, EOS]
    assert dec.index_tokens(middle) == [5, 6, 7]
    assert _decoder().index_tokens(last) == [5, 6, 7]  # "none" (the paper): nothing added
    assert dec.index_tokens(last, max_tokens=3) == [5, 6, 7]  # a passage cut to the window ends no article


def _index(dec, passages):
    row = dec.new_row(dec._prepare(DecodeRequest(0, "completion", prefix="ab", passages=passages)))
    with torch.inference_mode():
        dec.build_indexes([row], Clock(torch.device("cpu")))
    return row.index


def test_document_end_key_predicts_eos():
    passages = [Passage(7, [9, 10, 11, 12], ends_document=True)]
    idx = _index(_decoder(document_end="eos"), passages)
    # no BOS: key i predicts token i + 1, so the key of the last real token (12) has the value EOS
    assert idx.values.tolist()[-1] == EOS and len(idx) == 4
    assert len(_index(_decoder(), passages)) == 3


def test_sink_keys_drop_masks_each_passage_first_key_and_nothing_else():
    passages = random_passages(3, 4)
    keep, drop = _index(_decoder(), passages), _index(_decoder(sink_keys="drop"), passages)
    assert bool(keep.valid.all())
    first_rows = [drop.key_row(p.doc_id, drop.first_value_pos) for p in passages]
    assert all(r >= 0 and not bool(drop.valid[r]) for r in first_rows)
    assert int((~drop.valid).sum()) == len(passages)


def test_sink_keys_drop_changes_no_token_when_lambda_is_forced_to_the_lm():
    # with λ = 1 the mixture is p_LM alone, so which keys exist cannot change the tokens
    req = DecodeRequest(0, "completion", prefix="abc", passages=random_passages(5, 3))
    a = _decoder(force_lambda=1.0).decode([req])[0].token_ids
    b = _decoder(force_lambda=1.0, sink_keys="drop").decode([req])[0].token_ids
    assert a == b and len(a) > 0


class _Reader:
    """A PassageReader stand-in: doc_id → source_id."""

    def __init__(self, sources):
        self.sources = sources

    def __len__(self):
        return len(self.sources)

    def get(self, doc_ids, columns=None):
        return [{"doc_id": d, "source_id": self.sources[d]} for d in doc_ids]


def test_ends_document_from_consecutive_doc_ids():
    from stages.corpus.passages import ends_document

    reader = _Reader(["a", "a", "b", "c", "c"])
    ids = [0, 1, 2, 3, 4]
    assert ends_document(reader, ids, reader.get(ids)) == [False, True, True, False, True]
    assert ends_document(reader, [4, 0], reader.get([4, 0])) == [True, False]
