"""The demo's output format: [n] markers after copied runs, numbered sources, options."""

import pytest

from decoding_tiny import TinyTokenizer
from stages.decoding import Generation, Passage
from pipeline.demo import format_attributed, split_options


def test_markers_after_copied_runs_and_numbered_sources():
    tok = TinyTokenizer()
    ids = [10, 11, 12, 13, 14, 15, 16]
    text = tok.decode(ids)
    sources = [(5, 0), (5, 1), None, (7, 3), (7, 4), (5, 2), None]
    gen = Generation(0, text, ids, sources, [], {"lm_forward_passes": 3}, {"total": 1.25})
    passages = [Passage(7, [1, 2, 3, 13, 14], "Seven", "The seventh passage " * 20), Passage(5, [10, 11, 15], "Five",
                                                                                          "Short text.")]
    out = format_attributed(gen, tok, passages)
    first = out.splitlines()[0]
    assert first == f"{text[:2]} [1]{text[2:5]} [2]{text[5]} [1]{text[6]}"
    assert "[1] Five (doc 5): Short text." in out
    seven = next(line for line in out.splitlines() if line.startswith("[2] Seven (doc 7): "))
    assert seven.endswith("…") and len(seven) < 200  # the snippet is cut
    assert "7 tokens, 71% copied from the corpus, 3 LM passes, 1.2 s" in out
    # runs shorter than min_span_tokens get no marker and no source line
    out = format_attributed(gen, tok, passages, min_span_tokens=2, summary=False)
    assert out.splitlines()[0] == f"{text[:2]} [1]{text[2:5]} [2]{text[5:]}"
    assert out.count("\n[") == 2
    # nothing copied: the text alone
    plain = Generation(0, text, ids, [None] * 7, [], {}, {})
    assert format_attributed(plain, tok, passages, summary=False) == text
    # supported tokens (produced one at a time, value among the neighbours) get no marker, only a count
    knn = Generation(0, text, ids, [None] * 7, [], {"lm_forward_passes": 7}, {"total": 2.0},
                     supported=[(5, 0), None, (7, 3), (7, 4), None, None, None])
    out = format_attributed(knn, tok, passages)
    assert out.splitlines()[0] == text and "Sources:" not in out
    assert "(7 tokens, 0% copied from the corpus, 3 more produced by the LM but carried by a neighbour" in out


def test_split_options():
    cfg, extra = split_options({"gamma": 0.5, "kind": "completion", "span_length": None})
    assert cfg["gamma"] == 0.5 and cfg["max_new_tokens"] == 128 and "span_length" not in cfg
    assert extra == {"kind": "completion"}
    with pytest.raises(ValueError, match="unknown demo option 'gama'"):
        split_options({"gama": 0.5})


def test_a_bio_request_is_retrieved_by_its_entity_and_decoded_as_a_bio():
    from pipeline.demo import demo_query

    assert demo_query("Tell me a bio of Ada Lovelace.") == ("Ada Lovelace", "bio")
    assert demo_query("  tell me a biography of Marie Curie ") == ("Marie Curie", "bio")
    assert demo_query("Question: Tell me a bio of Taral Hicks.") == ("Taral Hicks", "bio")
    assert demo_query("Who wrote On Crimes and Punishments?") == ("Who wrote On Crimes and Punishments?", None)


def test_the_demo_merges_configs_as_the_grid_does():
    """base → task → method → command line (stages.evaluation.experiments.merge_config), for the grid and the demo."""
    from decoding_tiny import TinyTokenizer, tiny_llama
    from pipeline.demo import DemoSession
    from pipeline.wiring.experiments import grid
    from stages.decoding.config import NestConfig

    base, task_config, method_config = {"gamma": 0.05}, {"bio": {"gamma": 0.01, "passages": 3}}, {"nest": {"gamma": 0.2}}
    run = next(r for r in grid(["bio"], ["nest"], base, method_config, [], [], [], task_config) if r.variant == "main")
    assert run.config == {"gamma": 0.2, "passages": 3}  # the method's γ wins over the task's
    session = DemoSession(tiny_llama(), TinyTokenizer(), "nest", NestConfig(gamma=0.2), task_config=task_config,
                          pinned={"gamma": 0.2})
    cfg = session.decoder_for("bio").config
    assert (cfg.gamma, cfg.passages) == (0.2, 3)
    flags = DemoSession(tiny_llama(), TinyTokenizer(), "nest", NestConfig(gamma=0.7), task_config=task_config,
                        pinned={"gamma": 0.7})  # --gamma 0.7 on the command line wins over everything
    assert flags.decoder_for("bio").config.gamma == 0.7
