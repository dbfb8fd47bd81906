"""FactScore with a fake judge: decomposition, support checks, length penalty, abstentions, and "not computed"."""

from __future__ import annotations

import math

import pytest

from tasks import registry
from tasks.base import Example
from tasks.factscore import (DECOMPOSE_INSTRUCTION, atomic_facts, decompose_prompt, is_abstention, length_penalty,
                             parse_facts, parse_verdict, split_sentences, support_prompt)
from tasks.metrics import format_metric, mean_or_none


class FakeJudge:
    """Answers decomposition prompts from a sentence → facts table and support prompts from a set of true facts."""

    def __init__(self, facts_of: dict[str, list[str]], true_facts: set[str]):
        self.facts_of, self.true_facts, self.prompts = facts_of, true_facts, []

    def generate(self, prompt: str) -> str:
        self.prompts.append(prompt)
        if prompt.startswith(DECOMPOSE_INSTRUCTION):
            sentence = prompt.rstrip("\n").rsplit(DECOMPOSE_INSTRUCTION, 1)[1]
            # a judge LM keeps going with a new block: parse_facts must stop there
            return "\n".join(f"- {f}" for f in self.facts_of.get(sentence, [])) + "\n\n" + DECOMPOSE_INSTRUCTION + "x"
        fact = prompt.rsplit("Input: ", 1)[1].split(" True or False?")[0]
        return "True, the context says so." if fact in self.true_facts else "False."


BIO = "Ada Lovelace was an English mathematician. She worked on the Analytical Engine."
FACTS = {"Ada Lovelace was an English mathematician.": ["Ada Lovelace was English.", "Ada Lovelace was a mathematician."],
         "She worked on the Analytical Engine.": ["She worked on the Analytical Engine."]}
TRUE = {"Ada Lovelace was English.", "She worked on the Analytical Engine."}
EXAMPLE = Example(0, "factscore", "qa", "Ada Lovelace", "Tell me a bio of Ada Lovelace.", meta={"entity": "Ada Lovelace"})


def retrieve(entity, fact):
    return [f"{entity} (1815-1852) was an English mathematician and writer."]


def test_length_penalty_is_fascores_gamma_10():
    assert length_penalty(10) == 1.0 and length_penalty(25) == 1.0
    assert length_penalty(5) == pytest.approx(math.exp(1 - 10 / 5))
    assert length_penalty(3) == pytest.approx(math.exp(-7 / 3))
    assert length_penalty(0) == 0.0 and length_penalty(3, gamma=0) == 1.0


def test_three_facts_two_supported_with_and_without_penalty():
    judge = FakeJudge(FACTS, TRUE)
    plain = registry.get("factscore", judge=judge, retrieve=retrieve, gamma=0).score(BIO, EXAMPLE)
    assert plain["num_facts"] == 3 and plain["num_supported"] == 2
    assert plain["factscore"] == pytest.approx(100 * 2 / 3)
    penalised = registry.get("factscore", judge=FakeJudge(FACTS, TRUE), retrieve=retrieve).score(BIO, EXAMPLE)
    # short output: 3 facts < γ = 10 → × exp(1 - 10/3) = 0.0970
    assert penalised["factscore"] == pytest.approx(100 * 2 / 3 * math.exp(1 - 10 / 3))
    assert penalised["factscore_no_penalty"] == pytest.approx(100 * 2 / 3)
    assert penalised["abstained"] == 0.0


def test_long_output_is_not_penalised():
    sentence = "He did many things."
    facts = [f"He did thing {i}." for i in range(12)]
    judge = FakeJudge({sentence: facts}, set(facts[:9]))
    out = registry.get("factscore", judge=judge, retrieve=retrieve).score(sentence, EXAMPLE)
    assert out["num_facts"] == 12 and out["factscore"] == pytest.approx(75.0)


def test_no_judge_means_not_computed():
    task = registry.get("factscore")
    out = task.score(BIO, EXAMPLE)
    assert out["factscore"] is None
    assert format_metric(mean_or_none([out["factscore"]])) == "not computed"
    assert registry.get("factscore", judge=FakeJudge(FACTS, TRUE)).score(BIO, EXAMPLE)["factscore"] is None


def test_abstention_is_not_scored():
    judge = FakeJudge(FACTS, TRUE)
    out = registry.get("factscore", judge=judge, retrieve=retrieve).score(
        "I'm sorry, but I don't have any information about Ada Lovelace.", EXAMPLE)
    assert out["abstained"] == 1.0 and out["factscore"] is None and judge.prompts == []
    assert is_abstention("") and not is_abstention(BIO)


def test_no_passages_means_unsupported():
    judge = FakeJudge(FACTS, TRUE)
    out = registry.get("factscore", judge=judge, retrieve=lambda e, f: [], gamma=0).score(BIO, EXAMPLE)
    assert out["num_facts"] == 3 and out["factscore"] == 0.0


def test_repeated_facts_count_once():
    judge = FakeJudge({"X is big.": ["X is big."], "X is big!": ["x is  big."]}, set())
    assert atomic_facts(judge, "X is big. X is big!") == ["X is big."]


def test_prompt_and_parsing_helpers():
    assert split_sentences("She was born in 1900. He died in 1980!\nThird") == \
        ["She was born in 1900.", "He died in 1980!", "Third"]
    p = decompose_prompt("She sang.")
    assert p.startswith(DECOMPOSE_INSTRUCTION) and p.endswith(DECOMPOSE_INSTRUCTION + "She sang.\n")
    assert parse_facts("- a.\n* b.\n1. c.\nSome chatter") == ["a.", "b.", "c."]
    assert parse_facts("Sure:\n- a.\n\n- ignored") == ["a."]
    assert parse_verdict("True") and parse_verdict("  true.") and not parse_verdict("False, not true")
    assert not parse_verdict("I cannot tell") and not parse_verdict("untrue")
    sp = support_prompt("Ada", "Ada was English.", ["p1", "p2"])
    assert sp.endswith("Input: Ada was English. True or False?\nOutput:") and "Text: p2" in sp


def test_sentence_split_keeps_closing_quotes():
    assert split_sentences('He said "hi." She left. (Born 1900.) Then X') == \
        ['He said "hi."', "She left.", "(Born 1900.)", "Then X"]
