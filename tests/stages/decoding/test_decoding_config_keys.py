"""Which decoding options enter which method's Generate/Perplexity key (so a γ change reruns only what it affects)."""

import dataclasses
import sys

import pytest

from stages.decoding.config import FIELD_GROUPS, IMPLEMENTATION, NestConfig, config_fields
from stages.decoding.registry import methods, relevant_config, relevant_for_perplexity

# The central deny-list this project keyed Generate/Perplexity on before the methods declared what they read
# kept here verbatim, so that the declared ``reads`` are proven to give byte-identical keys.
_IMPL = {"passage_batch_size", "key_cache_dir", "key_cache_max_bytes", "lm_identity", "compact_min_slots",
         "compact_hole_fraction"}
# (key_precision joined later, as a token-index field like sink_keys and document_end)
_TOKEN_INDEX = {"passages", "neighbors", "key_layer", "passage_bos", "document_end", "sink_keys", "key_precision",
                "alpha", "tau", "lm_temperature", "force_lambda", "knnlm_lambda", "knnlm_lambda_mode", "mu"}
_SPANS = {"delta", "span_length", "span_start", "gamma", "acceptance", "streaming", "masking", "token_mode_attribution",
          "span_start_passages", "span_article"}  # the last two: the on-topic span options, read where spans are
_SAMPLING = {"do_sample", "temperature", "top_k", "top_p", "seed"}
IRRELEVANT = {
    "base": _IMPL | _TOKEN_INDEX | _SPANS | {"ra_passages"},
    "ra": _IMPL | (_TOKEN_INDEX - {"passages"}) | _SPANS,
    "knnlm": _IMPL | _SPANS | _SAMPLING | {"ra_passages"},
    "nest": _IMPL | _SAMPLING | {"knnlm_lambda", "knnlm_lambda_mode", "ra_passages"},
    "ra_nest": _IMPL | _SAMPLING | {"knnlm_lambda", "knnlm_lambda_mode"},
}


def _old_relevant(method, overrides):
    return {k: v for k, v in sorted(overrides.items()) if k not in IRRELEVANT[method]}


def _old_for_perplexity(method, overrides):
    # min_new_tokens is a generation length like max_new_tokens: never in evaluation mode
    drop = _SPANS | _SAMPLING | {"max_new_tokens", "min_new_tokens", "stop_at_eos", "batch_size"}
    return {k: v for k, v in _old_relevant(method, overrides).items() if k not in drop}


# every field overridden (and one unknown field, which NestConfig rejects later: it must stay in the key dict)
EVERY = {f.name: f"v_{f.name}" for f in dataclasses.fields(NestConfig)} | {"not_a_field": 1}


@pytest.mark.parametrize("method", sorted(IRRELEVANT))
def test_declared_reads_give_the_same_key_dicts_as_before(method):
    import json

    for overrides in (EVERY, CFG, {}):
        assert json.dumps(relevant_config(method, overrides)) == json.dumps(_old_relevant(method, overrides))
        assert json.dumps(relevant_for_perplexity(method, overrides)) == json.dumps(_old_for_perplexity(method,
                                                                                                       overrides))

CFG = {"gamma": 0.05, "max_new_tokens": 96, "mu": 0.5, "alpha": 0.2, "knnlm_lambda": 0.7, "ra_passages": 3,
       "key_cache_dir": "/tmp/x"}


def test_gamma_enters_only_the_span_methods():
    assert "gamma" not in relevant_config("base", CFG)
    assert "gamma" not in relevant_config("ra", CFG)
    assert "gamma" not in relevant_config("knnlm", CFG)
    assert relevant_config("nest", CFG)["gamma"] == 0.05
    assert relevant_config("ra_nest", CFG)["gamma"] == 0.05


def test_every_method_keeps_generation_length_and_drops_resources():
    for method in IRRELEVANT:
        kept = relevant_config(method, CFG)
        assert kept["max_new_tokens"] == 96 and "key_cache_dir" not in kept


def test_mixture_options_enter_knnlm_and_nest_but_not_base():
    assert relevant_config("knnlm", CFG)["mu"] == 0.5 and relevant_config("nest", CFG)["alpha"] == 0.2
    assert "mu" not in relevant_config("base", CFG) and "knnlm_lambda" not in relevant_config("nest", CFG)
    assert relevant_config("ra", CFG)["ra_passages"] == 3 and "ra_passages" not in relevant_config("nest", CFG)


def test_perplexity_ignores_span_and_length_options():
    kept = relevant_for_perplexity("nest", CFG)
    assert "gamma" not in kept and "max_new_tokens" not in kept and kept["mu"] == 0.5


def test_every_config_field_is_classified():
    """A new NestConfig field must join a group (or be an implementation resource, or be read by a method by name):
    otherwise it would silently enter no key."""
    grouped = {f for g in FIELD_GROUPS.values() for f in g} | set(IMPLEMENTATION)
    read = {f for m in methods().values() for f in m.reads}
    assert set(config_fields()) <= grouped | read
    assert not set(IMPLEMENTATION) & read  # resources never enter a key
    with pytest.raises(ValueError, match="unknown decoding method 'beam'"):
        relevant_config("beam", CFG)


def test_importing_the_config_does_not_import_torch():
    import subprocess

    code = ("import sys, stages.decoding.config, stages.decoding.registry as r; r.methods(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
