"""Decoding methods as a registry: a method is one file, and the grid, the keys, the DAG, perplexity and the
report find it; options a method cannot honour raise; kNN-LM and NEST share a component, not an inheritance line."""

import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stages.decoding import DecodeRequest, NestConfig, make_decoder, registry
from stages.decoding.registry import relevant_config, relevant_for_perplexity
from decoding_tiny import TinyTokenizer, random_passages, tiny_llama

# The worked example of docs/extending.md, "A decoding method": greedy decoding that never emits the same token twice
# in a row (a toy, one file).
TOY = '''
"""No-repeat greedy: the base LM's argmax, except the token just emitted (a toy)."""

import torch

from stages.decoding.methods.base_lm import BaseDecoder
from stages.decoding.registry import register


@register
class NoRepeatDecoder(BaseDecoder):
    method = "no_repeat"
    label = "+No-repeat"
    reads = ("generation",)
    retrieves = False
    uses_token_index = False
    perplexity = False
    order = 60

    def _pick(self, rows, logits):
        picks = []
        for row, lg in zip(rows, logits):
            if row.tokens:
                lg = lg.clone()
                lg[row.tokens[-1]] = float("-inf")
            picks.append(int(torch.argmax(lg)))
        return picks
'''


@pytest.fixture
def toy_method(tmp_path, monkeypatch):
    """The toy method's file in a folder of its own, added to the registry's folders."""
    folder = tmp_path / "my_methods"
    folder.mkdir()
    (folder / "no_repeat.py").write_text(TOY)
    monkeypatch.setattr(registry, "FOLDERS", registry.FOLDERS + (folder,))
    yield folder
    registry._CLASSES.pop("no_repeat", None)


def test_the_built_in_methods_in_report_order_with_labels():
    # at least the built-ins, in this order among themselves (a method file added later may sit anywhere)
    built_in = ["base", "ra", "knnlm", "nest", "ra_nest"]
    infos = {m: i for m, i in registry.methods().items() if m in built_in}
    assert list(infos) == built_in
    assert [i.label for i in infos.values()] == ["Base LM", "+RA", "+kNN-LM", "+NEST", "+RA-NEST"]
    assert [m for m, i in infos.items() if i.uses_token_index] == ["knnlm", "nest", "ra_nest"]
    assert [m for m, i in infos.items() if not i.retrieves] == ["base"]
    assert all(i.perplexity for i in infos.values())


def test_a_toy_method_file_is_a_method(toy_method):
    info = registry.method_info("no_repeat")
    assert info.label == "+No-repeat" and list(registry.methods())[-1] == "no_repeat"
    # its key holds what it reads, nothing else
    cfg = {"gamma": 0.05, "max_new_tokens": 9, "temperature": 2.0, "passages": 10}
    assert relevant_config("no_repeat", cfg) == {"max_new_tokens": 9}
    assert relevant_for_perplexity("no_repeat", cfg) == {}
    # it decodes, and differs from the base LM exactly by never repeating the last token
    model, tok = tiny_llama(), TinyTokenizer()
    req = DecodeRequest(0, prompt_ids=[5, 9, 17], max_new_tokens=12)
    toy = make_decoder("no_repeat", model, tok, NestConfig()).decode([req])[0].token_ids
    assert len(toy) == 12 and all(a != b for a, b in zip(toy, toy[1:]))
    # no evaluation mode declared: perplexity refuses it
    with pytest.raises(ValueError, match="has no evaluation mode"):
        make_decoder("no_repeat", model, tok, NestConfig()).target_logprobs(req, [4, 5])


def test_a_toy_method_joins_the_grid_and_the_dag(toy_method):
    from luigi.task_register import Register

    from pipeline import dag

    Register.clear_instance_cache()
    try:
        runs = dag.experiment_runs()
        assert {r.method for r in runs if r.variant == "main"} >= {"base", "nest", "no_repeat"}
        gen = dag.Generate(task="completion", method="no_repeat", config={"gamma": 0.05, "max_new_tokens": 9})
        assert gen.key_params["config"] == {"max_new_tokens": 9}
        inputs = gen.requires()
        assert "retrievals" not in inputs and "passage_keys" not in inputs  # it retrieves nothing
        assert {"retrievals", "passage_keys"} <= set(dag.Generate(task="completion", method="knnlm").requires())
        score = dag.Score(task="completion", method="no_repeat")
        assert "perplexity" not in score.requires()  # no evaluation mode: no Perplexity stage
        assert "perplexity" in dag.Score(task="completion", method="knnlm").requires()
        assert any(name.startswith("completion/no_repeat/") for name in dag.Report().runs())
    finally:
        Register.clear_instance_cache()


def test_a_toy_method_appears_in_the_report_tables_with_its_label(toy_method, tmp_path):
    from stages.evaluation import report

    rows = [{"task": "completion", "method": m, "variant": "main", "metric": metric, "value": v, "n": 2}
            for m, r1 in (("base", 20.0), ("no_repeat", 23.5), ("nest", 30.0))
            for metric, v in (("rouge1", r1), ("seconds_per_query", 1.0))]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "summary.parquet")
    out = tmp_path / "out"
    out.mkdir()
    report.run(out, summaries=[tmp_path])
    text = (out / "report.md").read_text()
    table1 = text.split("## Table 1")[1].split("##")[0]
    assert table1.index("| Base LM |") < table1.index("| +NEST |") < table1.index("| +No-repeat | not computed | 23.5 |")
    latency = text.split("## Latency breakdown")[1]
    assert "| completion | +No-repeat | 1.00 |" in latency


def test_options_a_method_cannot_honour_raise():
    model, tok = tiny_llama(), TinyTokenizer()
    for method in ("knnlm", "nest", "ra_nest"):
        with pytest.raises(ValueError, match=rf"^decoding method '{method}' does not support do_sample=True"):
            make_decoder(method, model, tok, NestConfig(do_sample=True))
    make_decoder("base", model, tok, NestConfig(do_sample=True))  # the LM-only methods sample
    make_decoder("ra", model, tok, NestConfig(do_sample=True))


def test_knnlm_and_nest_share_the_token_index_not_an_inheritance_line():
    from stages.decoding.knn import TokenIndexDecoder
    from stages.decoding.methods.knnlm import KnnLMDecoder
    from stages.decoding.methods.nest import NestDecoder

    assert not issubclass(KnnLMDecoder, NestDecoder)
    assert issubclass(KnnLMDecoder, TokenIndexDecoder) and issubclass(NestDecoder, TokenIndexDecoder)
    model, tok = tiny_llama(), TinyTokenizer()
    assert make_decoder("knnlm", model, tok).drafter is None  # one token per step
    assert make_decoder("nest", model, tok).drafter is not None


def test_perplexity_is_the_decoders_public_evaluation_mode():
    """target_logprobs: per-token log p; λ = 1 makes kNN-LM's mixture the LM at T = 1, i.e. the base LM's scores."""
    model, tok = tiny_llama(), TinyTokenizer()
    req = DecodeRequest(0, prompt_ids=[5, 9, 17, 33], passages=random_passages(1, 3))
    target = [40, 41, 7, 19]
    base = make_decoder("base", model, tok).target_logprobs(req, target)
    knn = make_decoder("knnlm", model, tok, NestConfig(force_lambda=1.0)).target_logprobs(req, target)
    assert base.shape == (4,) and bool((base < 0).all())
    assert torch.allclose(base, knn, atol=1e-5)
    assert make_decoder("base", model, tok).target_logprobs(req, []).numel() == 0


def _method_file(tmp_path, body: str):
    folder = tmp_path / "m"
    folder.mkdir(exist_ok=True)
    (folder / "bad.py").write_text(textwrap.dedent(body))
    return folder


def test_declarations_must_be_literals_and_complete(tmp_path, monkeypatch):
    attrs = ('    label = "+X"\n    retrieves = False\n    uses_token_index = False\n    perplexity = False\n'
             '    order = 70\n')
    folder = _method_file(tmp_path, "@register\nclass X(BaseDecoder):\n    method = 'x'\n    reads = GENERATION\n"
                          + attrs)
    monkeypatch.setattr(registry, "FOLDERS", registry.FOLDERS + (folder,))
    with pytest.raises(ValueError, match=r"X\.reads must be a literal"):
        registry.methods()
    _method_file(tmp_path, "@register\nclass X(BaseDecoder):\n    method = 'x'\n    reads = ('gama',)\n" + attrs)
    with pytest.raises(ValueError, match="'gama' is neither a NestConfig field nor a field group"):
        registry.methods()
    _method_file(tmp_path, "@register\nclass X(BaseDecoder):\n    method = 'x'\n    reads = ()\n")
    with pytest.raises(ValueError, match="X declares no label"):
        registry.methods()
    _method_file(tmp_path, "@register\nclass X(BaseDecoder):\n    method = 'nest'\n    reads = ()\n" + attrs)
    with pytest.raises(ValueError, match="'nest' is declared twice"):
        registry.methods()


def test_register_refuses_inherited_declarations():
    from stages.decoding.methods.nest import NestDecoder

    class Quiet(NestDecoder):
        method = "quiet"

    with pytest.raises(TypeError, match="declares label, reads"):
        registry.register(Quiet)


def test_the_dag_keys_and_registry_need_no_torch():
    code = ("import sys; from pipeline import dag; "
            "from stages.decoding.registry import method_names; "
            "ks = [dag.Generate(task='completion', method=m).key_params for m in method_names()]; "
            "print(len(ks), len(method_names()), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    n_keys, n_methods, torch_loaded = out.stdout.split()[-3:]
    assert n_keys == n_methods and int(n_methods) >= 5 and torch_loaded == "False"
