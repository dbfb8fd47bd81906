"""Task families: how long each task generates and what ends an answer (docs/tasks.md, "Length and stopping").

Every task belongs to one family (its class declares it: ``Task.family``); the family sets the generation length and
the stop rule of its examples:

| family | tasks | length (new tokens) | stop rule |
|---|---|---|---|
| ``completion`` | completion, completion_excluded, wikitext | the example's reference continuation (``meta["target_ids"]``) | ``none`` |
| ``qa`` | nq, triviaqa, hotpotqa, truthfulqa | 128 (the paper's QA length), a cap | ``sentence`` |
| ``multiple_choice`` | medmcqa (asked as open QA) | 128, a cap | ``sentence`` |
| ``longform`` | bio, factscore | 512 (the paper's FactScore length) | ``none`` |

Stop rules (EOS always ends a generation as well, and is never emitted):

- ``none``: the length and EOS only;
- ``paragraph``: the answer ends at the first line break that follows non-blank answer text (leading line breaks do not
  count): a short answer is one paragraph, and what an LM adds after it ("Explanation: ...", a copied second article)
  is not part of it;
- ``blank_line``: the answer ends at the first blank line (two line breaks with only spaces between them) after
  non-blank text;
- ``sentence`` (the QA default, beyond the paper): the answer ends with its first sentence of at least
  :data:`SENTENCE_MIN_WORDS` words (:mod:`tasks.sentences`), or at a line break as ``paragraph``. Copied Wikipedia text
  has no line breaks, so under ``paragraph`` NEST ran to the 128-token cap in 36 of 40 multi-hop answers and stitched
  articles into false statements; a sentence end fires on copied text as on generated text. The token that
  would start the next sentence (it begins with whitespace) is not emitted. ``stops = {"qa": "paragraph"}`` restores
  the paper's rule.

The token that completes a stop (the line break) is kept in the output and ends the generation. A run overrides a
family's length or stop rule with ``[decoding] lengths`` / ``stops`` (luigi.cfg); a length of ``None`` means the
decoding config's ``max_new_tokens`` (also used for a completion example that has no reference ids).

Torch-free and imports nothing from ``stages`` or ``pipeline``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Mapping
from tasks import registry
from tasks.sentences import sentence_ends

FAMILIES = ("completion", "qa", "multiple_choice", "longform")
STOP_RULES = ("none", "paragraph", "blank_line", "sentence")
SENTENCE_MIN_WORDS = 2  # "William Shakespeare." ends an answer; "1." opening a list does not
REFERENCE = "reference"  # length = the example's reference continuation

DEFAULT_LENGTHS: dict[str, int | str | None] = {"completion": REFERENCE, "qa": 128, "multiple_choice": 128,
                                                "longform": 512}
DEFAULT_STOPS = {"completion": "none", "qa": "sentence", "multiple_choice": "sentence", "longform": "none"}

KIND_FAMILIES = {"completion": "completion", "qa": "qa"}

_BLANK_LINE = re.compile(r"\n[ \t\r]*\n")


def family_of(task: str, kind: str | None = None) -> str:
    """The family of a task: what its registered class declares (``Task.family``, :mod:`tasks.registry`); a task that
    is not registered, by its prompt kind."""

    if task in registry.names():
        return registry.spec(task).family
    if kind in KIND_FAMILIES:
        return KIND_FAMILIES[kind]
    raise ValueError(f"task {task!r} has no family (known tasks: {', '.join(registry.names())}; "
                     f"or give its kind, one of {tuple(KIND_FAMILIES)})")


def _check_length(value: Any, where: str) -> int | str | None:
    if value is None or value == REFERENCE:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: a length must be a positive integer, {REFERENCE!r} or null, got {value!r}")
    return int(value)


def _check_overrides(overrides: Mapping[str, Any] | None, name: str) -> dict[str, Any]:
    out = dict(overrides or {})
    unknown = sorted(set(out) - set(FAMILIES))
    if unknown:
        raise ValueError(f"[decoding] {name}: unknown task famil{'y' if len(unknown) == 1 else 'ies'} "
                         f"{', '.join(map(repr, unknown))}; expected some of {FAMILIES}")
    return out


@dataclass(frozen=True)
class StopRule:
    """A family's generation length (int, ``"reference"``, or None = the decoding config's) and stop rule."""

    family: str
    max_new_tokens: int | str | None
    stop: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StopRule":
        rule = cls(str(d["family"]), d.get("max_new_tokens"), str(d.get("stop", "none")))
        rule.validate()
        return rule

    def validate(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown task family {self.family!r}; expected one of {FAMILIES}")
        _check_length(self.max_new_tokens, f"family {self.family}")
        if self.stop not in STOP_RULES:
            raise ValueError(f"family {self.family}: unknown stop rule {self.stop!r}; expected one of {STOP_RULES}")

    def length_for(self, meta: Mapping[str, Any] | None) -> int | None:
        """The example's length: the family's, its reference's (``meta["target_ids"]``), or None (config fallback)."""
        if self.max_new_tokens == REFERENCE:
            n = len((meta or {}).get("target_ids") or [])
            return n or None
        return self.max_new_tokens  # type: ignore[return-value]


def rule_for(task: str, kind: str | None = None, lengths: Mapping[str, Any] | None = None,
             stops: Mapping[str, Any] | None = None) -> StopRule:
    """The stop rule of ``task``: its family's defaults with the run's ``lengths``/``stops`` overrides (by family)."""
    lengths, stops = _check_overrides(lengths, "lengths"), _check_overrides(stops, "stops")
    family = family_of(task, kind)
    rule = StopRule(family, lengths.get(family, DEFAULT_LENGTHS[family]), str(stops.get(family,
                                                                                      DEFAULT_STOPS[family])))
    rule.validate()
    return rule


def stop_reached(rule: str, text: str) -> bool:
    """Whether ``text`` (the generation so far) has reached the end that ``rule`` defines (``sentence``: a line break
    after the answer, or a sentence end followed by whitespace; the decoder stops one token earlier, before the
    whitespace token, with :func:`tasks.sentences.ends_sentence`)."""
    if rule == "none":
        return False
    body = text.lstrip()
    if rule == "paragraph":
        return "\n" in body
    if rule == "sentence":

        return "\n" in body or bool(sentence_ends(body, SENTENCE_MIN_WORDS))
    if rule == "blank_line":
        return _BLANK_LINE.search(body) is not None
    raise ValueError(f"unknown stop rule {rule!r}; expected one of {STOP_RULES}")
