"""Task registry: ``get(name, **options) -> Task``, ``names()``, ``register(name, factory)``.

Options go to the task's constructor, e.g. ``get("wikitext", tokenizer=tok)``, ``get("nq", max_new_tokens=256)``,
``get("factscore", judge=j, retrieve=r)``, ``get("hotpotqa", sample_size=None)``.
"""

from __future__ import annotations

from typing import Callable

from tasks.base import Task
from tasks.factscore import FactScore
from tasks.hotpotqa import HotpotQA
from tasks.medmcqa import MedMCQA
from tasks.nq import NaturalQuestions
from tasks.triviaqa import TriviaQA
from tasks.truthfulqa import TruthfulQA
from tasks.wikitext import WikiText

_FACTORIES: dict[str, Callable[..., Task]] = {
    "wikitext": WikiText,
    "nq": NaturalQuestions,
    "triviaqa": TriviaQA,
    "hotpotqa": HotpotQA,
    "medmcqa": MedMCQA,
    "truthfulqa": TruthfulQA,
    "factscore": FactScore,
}


def names() -> tuple[str, ...]:
    """Registered task names, sorted."""
    return tuple(sorted(_FACTORIES))


def get(name: str, **options) -> Task:
    """A new task instance; unknown names raise ``KeyError`` listing the known ones."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(names())}") from None
    task = factory(**options)
    task.name = name  # the registered name is what examples.parquet's `task` column holds
    return task


def register(name: str, factory: Callable[..., Task], *, replace: bool = False) -> None:
    """Add a task (e.g. the embedded corpus's completion / bio tasks, built from ``CompletionTask`` / ``FactScore``)."""
    if name in _FACTORIES and not replace:
        raise ValueError(f"task {name!r} is already registered")
    _FACTORIES[name] = factory
