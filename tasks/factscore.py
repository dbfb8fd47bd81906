"""Biographies scored by FactScore (Min et al., 2023) with its length penalty (NEST Table 1, "FS" and "#Facts").

Data: FActScore's entity list, one entity a line (500 unlabeled = NEST's test). Each becomes the question
"Tell me a bio of <entity>." (QA template; generation length 512); the retrieval query is the entity.

Scoring, FActScore-style, with a configurable judge LM:
1. abstentions ("I'm sorry, I don't have information ...") are not scored (FActScore's "respond ratio");
2. the bio is split into sentences and the judge breaks each one into atomic facts (few-shot prompt);
3. for each fact, ``retrieve(entity, fact)`` returns passages of the corpus and the judge answers True/False whether
   they support it (NEST: FActScore's ``retrieval+llama+npm``; the NPM step is not reproduced here);
4. f = supported / facts, multiplied by the length penalty (:func:`length_penalty`, γ = 10).
With no judge (or no retriever) configured, ``score`` returns None values: the report prints "not computed", never a
stand-in number. The judge is duck-typed (:class:`Judge`: ``generate(prompt) -> str``); tests use a fake one.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

from tasks.base import LONGFORM_COLUMNS, Example, Task
from tasks.errors import TaskInputError
from tasks.files import read_lines
from tasks.registry import register
from tasks.prompts import bio_question

GAMMA = 10  # FActScore's length-penalty constant γ
PASSAGES_PER_FACT = 5  # FActScore puts the top-5 passages of the entity's page in the support prompt


class Judge(Protocol):
    """Any LM wrapper that completes a prompt (greedy, short outputs suffice)."""

    def generate(self, prompt: str) -> str: ...


Retriever = Callable[[str, str], Sequence[str]]  # (entity, fact) -> passage texts, best first


def length_penalty(num_facts: int, gamma: float = GAMMA) -> float:
    """FActScore's length penalty (Min et al., 2023, the "γ" variant used for the leaderboard):

        penalty(|A|) = exp(1 − γ / |A|)   if |A| < γ,   else 1,

    with |A| the number of atomic facts of the response. It is continuous at |A| = γ (exp 0 = 1) and tends to 0 for
    few facts, so a model cannot score high by saying one safe thing. |A| = 0 gives 0. γ = 0 disables it.

    >>> round(length_penalty(5), 4)   # exp(1 - 10/5) = e^-1
    0.3679
    """
    if gamma <= 0 or num_facts >= gamma:
        return 1.0
    if num_facts <= 0:
        return 0.0
    return math.exp(1.0 - gamma / num_facts)


# -- abstention -------------------------------------------------------------------------------------------------------
_ABSTAIN = re.compile(
    r"\b(i'?m sorry|i am sorry|i apologi[sz]e|i (?:cannot|can'?t|could not|couldn'?t) find|"
    r"i (?:do not|don'?t) have (?:any |enough )?(?:information|knowledge|details)|"
    r"(?:i'?m|i am) not (?:familiar|aware)|no (?:reliable )?information (?:is )?available|"
    r"there is no (?:information|record)|as an ai)\b", re.IGNORECASE)


def is_abstention(text: str) -> bool:
    """True for an empty response or one that starts (first 2 sentences) with a refusal / "no information" phrase."""
    head = " ".join(split_sentences(text)[:2])
    return not head.strip() or _ABSTAIN.search(head.replace("\u2019", "'")) is not None


# -- atomic facts -----------------------------------------------------------------------------------------------------
_SENT = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (split after . ! ? followed by a capital or digit; newlines also split)."""
    out = []
    for para in text.split("\n"):
        out.extend(s.strip() for s in _SENT.split(para) if s.strip())
    return out


DECOMPOSE_INSTRUCTION = "Please breakdown the following sentence into independent facts: "
DECOMPOSE_DEMOS = (
    ("Marie Curie was a Polish-born physicist and chemist who did pioneering research on radioactivity.",
     ("Marie Curie was a physicist.", "Marie Curie was a chemist.", "Marie Curie was born in Poland.",
      "Marie Curie did pioneering research on radioactivity.")),
    ("In 1903, she shared the Nobel Prize in Physics with Pierre Curie and Henri Becquerel.",
     ("She won the Nobel Prize in Physics.", "She won the Nobel Prize in Physics in 1903.",
      "She shared the Nobel Prize in Physics with Pierre Curie.",
      "She shared the Nobel Prize in Physics with Henri Becquerel.")),
    ("He is best known for his role as a detective in the television series, which ran for five seasons.",
     ("He is best known for his role as a detective.", "His role as a detective was in a television series.",
      "The television series ran for five seasons.")),
)


def decompose_prompt(sentence: str) -> str:
    """Few-shot prompt asking for the atomic facts of one sentence, one ``- fact`` a line."""
    parts = []
    for demo, facts in DECOMPOSE_DEMOS:
        parts.append(DECOMPOSE_INSTRUCTION + demo + "\n" + "\n".join(f"- {f}" for f in facts) + "\n")
    parts.append(DECOMPOSE_INSTRUCTION + sentence.strip() + "\n")
    return "\n".join(parts)


_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s*(.*)$")


def parse_facts(output: str) -> list[str]:
    """The ``- fact`` lines at the start of a judge output; stops at the first other line once facts began (a judge
    LM often goes on with a new "Please breakdown ..." block)."""
    facts: list[str] = []
    for line in output.split("\n"):
        if line.strip().startswith(DECOMPOSE_INSTRUCTION.strip()):
            break
        m = _BULLET.match(line)
        if m:
            if m.group(1).strip():
                facts.append(m.group(1).strip())
        elif facts and line.strip():
            break
        elif facts:  # blank line after the list ends it
            break
    return facts


def atomic_facts(judge: Judge, text: str) -> list[str]:
    """Atomic facts of a response: one judge call per sentence; exact repeats (case-insensitive) counted once, because
    a small judge LM tends to repeat itself and a repeat would weigh one claim twice."""
    seen, out = set(), []
    for sentence in split_sentences(text):
        for fact in parse_facts(judge.generate(decompose_prompt(sentence))):
            key = " ".join(fact.lower().split())
            if key not in seen:
                seen.add(key)
                out.append(fact)
    return out


# -- support ----------------------------------------------------------------------------------------------------------
def support_prompt(entity: str, fact: str, passages: Sequence[str]) -> str:
    """FActScore-style verification prompt: the passages, then ``Input: <fact> True or False?``."""
    context = "\n\n".join(f"Title: {entity}\nText: {p.strip()}" for p in passages)
    return (f"Answer the question about {entity} based on the given context.\n\n{context}\n\n"
            f"Input: {fact.strip()} True or False?\nOutput:")


_VERDICT = re.compile(r"\b(true|false)\b", re.IGNORECASE)


def parse_verdict(output: str) -> bool:
    """Supported when the first "true"/"false" word of the judge's answer is "true"; no such word → not supported."""
    m = _VERDICT.search(output)
    return bool(m) and m.group(1).lower() == "true"


def is_supported(judge: Judge, retrieve: Retriever, entity: str, fact: str, k: int = PASSAGES_PER_FACT) -> bool:
    """Whether the corpus supports ``fact``; with no passage retrieved it is unsupported (nothing to check against)."""
    passages = [p for p in list(retrieve(entity, fact))[:k] if p and p.strip()]
    if not passages:
        return False
    return parse_verdict(judge.generate(support_prompt(entity, fact, passages)))


def factscore(text: str, entity: str, judge: Judge, retrieve: Retriever, gamma: float = GAMMA,
              k: int = PASSAGES_PER_FACT) -> dict[str, Any]:
    """FactScore of one response (fractions; ``Task.score`` reports ×100).

    Returns ``factscore`` (= supported/facts × penalty), ``factscore_no_penalty``, ``num_facts``, ``num_supported``,
    ``abstained``. An abstention gives None scores and facts (left out of means, as FActScore); a response with no
    atomic fact gives 0 (the penalty's limit) and ``factscore_no_penalty`` None.
    """
    if is_abstention(text):
        return {"factscore": None, "factscore_no_penalty": None, "num_facts": None, "num_supported": None,
                "abstained": 1.0}
    facts = atomic_facts(judge, text)
    supported = sum(is_supported(judge, retrieve, entity, f, k) for f in facts)
    raw = supported / len(facts) if facts else None
    return {"factscore": (raw or 0.0) * length_penalty(len(facts), gamma), "factscore_no_penalty": raw,
            "num_facts": len(facts), "num_supported": supported, "abstained": 0.0}


@register("factscore")
class FactScore(Task):
    """``judge`` and ``retrieve`` configure scoring; without them ``score`` returns ``{"factscore": None, ...}``."""

    name = "factscore"
    kind = "qa"
    family = "longform"
    metrics = ("factscore", "num_facts")
    quality_metric = "rouge1_source"
    headline_metrics = ("factscore", "rouge1_source")
    report_columns = LONGFORM_COLUMNS
    topical = True  # each example is about one entity: topical precision of the copied tokens
    uses_judge = True
    data_help = "prompt_entities.txt (one entity a line)"
    max_new_tokens = 512

    def __init__(self, *, judge: Judge | None = None, retrieve: Retriever | None = None, gamma: float = GAMMA,
                 passages_per_fact: int = PASSAGES_PER_FACT, **options):
        super().__init__(**options)
        self.judge, self.retrieve = judge, retrieve
        self.gamma, self.passages_per_fact = float(gamma), int(passages_per_fact)

    @property
    def judged(self) -> bool:
        return self.judge is not None and self.retrieve is not None

    def read(self, path: Path, stats: dict) -> Iterator[Example]:
        lines, _ = read_lines(path)
        stats.setdefault("skipped_blank", 0)
        n = 0
        for i, line in enumerate(lines):
            entity = " ".join(line.split())
            if not entity:
                stats["skipped_blank"] += 1
                continue
            n += 1
            yield entity_example(self.name, entity, line=i + 1)
        if n == 0:
            raise TaskInputError(path, None, "no entities (empty file)")

    def score_text(self, text: str, example: Example) -> dict[str, Any]:
        if not self.judged:
            return {"factscore": None, "num_facts": None}
        entity = example.meta.get("entity") or example.query
        out = factscore(text, entity, self.judge, self.retrieve, self.gamma, self.passages_per_fact)
        for key in ("factscore", "factscore_no_penalty"):
            if out[key] is not None:
                out[key] *= 100.0
        return out


def entity_example(task: str, entity: str, **meta: Any) -> Example:
    """A bio example: question "Tell me a bio of <entity>.", retrieval query = the entity, no text references."""
    return Example(example_id=-1, task=task, kind="qa", query=entity, question=bio_question(entity),
                   references=[], meta={"entity": entity, **meta})
