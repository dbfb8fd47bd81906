"""Load the LM folder written by PrepareLM: ``load_lm(lm_dir) -> (model, tokenizer)`` in evaluation mode.

Attention: ``flash_attention_2`` when the ``flash_attn`` package imports, the device is CUDA and the dtype is 16-bit
(its kernels support nothing else); ``sdpa`` otherwise. Default dtype: bfloat16 on CUDA, float32 on CPU.
"""

from __future__ import annotations

from pathlib import Path

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}


def torch_dtype(dtype):
    """``"bf16"``/``"bfloat16"``/``torch.bfloat16``/... → ``torch.dtype``."""
    # lazy: torch takes seconds to import
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(set(_DTYPES))}")
    return getattr(torch, name)


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:  # not installed, or built for another torch/CUDA
        return False
    return True


def attention_implementation(device, dtype) -> str:
    # lazy: torch takes seconds to import
    import torch

    sixteen_bit = dtype in (torch.bfloat16, torch.float16)
    if torch.device(device).type == "cuda" and sixteen_bit and flash_attn_available():
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(lm_dir: str | Path):
    """The LM folder's (fast) tokenizer."""
    # lazy: transformers takes seconds to import
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(lm_dir))


def load_lm(lm_dir: str | Path, device="cpu", dtype=None):
    """``(model, tokenizer)`` from a PrepareLM folder, on ``device``, in eval mode (bf16 on CUDA, fp32 on CPU by default)."""
    # lazy: torch and transformers take seconds to import
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    dtype = torch_dtype(dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(lm_dir), dtype=dtype,
                                                 attn_implementation=attention_implementation(device, dtype))
    model.to(device).eval()
    return model, load_tokenizer(lm_dir)
