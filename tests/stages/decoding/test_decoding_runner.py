"""BatchedLM: the shared KV cache with holes gives, for every row, the logits of a fresh forward over its own tokens
(B3: after a partial acceptance the cache must hold exactly the accepted tokens), in batches (B5-style row
independence), after compaction and after dropping rows."""

import torch

from decoding_tiny import tiny_llama
from stages.decoding.lm_runner import BatchedLM, KeyLayerCapture


def fresh_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


def close(a, b):
    return torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_partial_acceptance_then_correction_matches_fresh_forward_b3():
    model = tiny_llama(seed=1)
    prompt = [5, 9, 12, 40, 41, 7]
    lm = BatchedLM(model)
    lm.prefill([prompt])
    draft = [20, 21, 22, 23, 24]
    lm.step([draft])
    lm.commit([2])  # accepted 20, 21; 22..24 rejected
    out = lm.step([[33]])  # the correction token
    lm.commit([1])
    assert close(out[0].logits[0], fresh_logits(model, prompt + [20, 21, 33]))
    # the released code's off-by-one keeps one rejected token: that cache gives different logits (the bug is visible)
    assert not close(out[0].logits[0], fresh_logits(model, prompt + [20, 21, 22, 33]))
    # batch 1 never keeps holes: rejected slots were cropped
    assert lm.cache_length() == len(prompt) + 3 and bool(lm.slot_valid.all())


def test_rows_advance_independently_in_a_batch():
    model = tiny_llama(seed=2)
    a, b = [5, 6, 7, 8, 9, 10, 11], [30, 31, 32]
    lm = BatchedLM(model, key_layer="paper")
    out = lm.prefill([a, b])
    assert close(out[0].logits[0], fresh_logits(model, a)) and close(out[1].logits[0], fresh_logits(model, b))
    out = lm.step([[40, 41, 42, 43], [50]])  # row 0 a draft, row 1 one token (padded)
    assert out[0].logits.shape[0] == 4 and out[1].logits.shape[0] == 1
    assert close(out[0].logits[3], fresh_logits(model, a + [40, 41, 42, 43]))
    lm.commit([1, 1])  # row 0 keeps only 40
    out = lm.step([[44], [51, 52]])
    lm.commit([1, 2])
    assert close(out[0].logits[0], fresh_logits(model, a + [40, 44]))
    assert close(out[1].logits[1], fresh_logits(model, b + [50, 51, 52]))
    # queries come from the same pass: equal to the key-layer state of a fresh forward
    cap = KeyLayerCapture(model, "paper")
    with torch.no_grad():
        model(torch.tensor([b + [50, 51, 52]]))
    cap.remove()
    assert torch.allclose(out[1].queries[1], cap.value[0, -1].float(), atol=1e-5)
    # compaction and dropping a row keep every row exact
    lm.compact()
    assert bool(lm.slot_valid[1].sum() == len(b) + 3)
    out = lm.step([[45], [53]])
    lm.commit([1, 1])
    assert close(out[0].logits[0], fresh_logits(model, a + [40, 44, 45]))
    assert close(out[1].logits[0], fresh_logits(model, b + [50, 51, 52, 53]))
    lm.keep_rows([1])
    out = lm.step([[54]])
    lm.commit([1])
    assert close(out[0].logits[0], fresh_logits(model, b + [50, 51, 52, 53, 54]))
    assert lm.forward_passes == 5


def test_key_layers_paper_and_code_d1():
    model = tiny_llama(seed=3)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    cap_code = KeyLayerCapture(model, "code")
    cap_paper = KeyLayerCapture(model, "paper")
    mlp_in = {}
    h = model.model.layers[-1].mlp.register_forward_pre_hook(lambda mod, args: mlp_in.setdefault("x", args[0]))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    for c in (cap_code, cap_paper):
        c.remove()
    h.remove()
    # code: hidden_states[-2] is the input of the last block
    assert torch.equal(cap_code.value, out.hidden_states[-2])
    # paper: "the input to the final layer's feed-forward network after layer normalization"
    assert torch.equal(cap_paper.value, mlp_in["x"])
    assert not torch.allclose(cap_paper.value, cap_code.value)
