"""Which decoding options enter which method's Generate/Perplexity key (so a γ change reruns only what it affects)."""

import dataclasses
import sys

import pytest

from stages.decoding.config import IRRELEVANT, NestConfig, relevant_config, relevant_for_perplexity

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
    fields = {f.name for f in dataclasses.fields(NestConfig)}
    for method, drop in IRRELEVANT.items():
        assert drop <= fields, (method, drop - fields)
    with pytest.raises(ValueError):
        relevant_config("beam", CFG)


def test_importing_the_config_does_not_import_torch():
    import subprocess

    code = "import sys, stages.decoding.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
