"""Task registry: ``get(name, **options) -> Task``, ``names()``, ``spec(name)``, ``register(name)``.

Every task, built-in (drawn from the corpus) or paper benchmark (read from its file), registers itself in its own
module under ``tasks/`` with the decorator ``@register("name")``. The registry imports every module of the ``tasks``
package the first time it is asked (:data:`DISCOVERS`), so adding a task is one new file: LoadTask, Score, the report
and the DAG find it here (docs/extending.md, "A task").

Options go to the task's constructor, e.g. ``get("wikitext", tokenizer=tok)``, ``get("nq", max_new_tokens=256)``,
``get("factscore", judge=j, retrieve=r)``, ``get("hotpotqa", sample_size=None)``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from tasks.base import Task

#: The package whose every module is imported to find the registrations (also read by pipeline.stage_versions: a stage
#: that imports this registry depends on every task module).
DISCOVERS = "tasks"

_FACTORIES: dict[str, Callable[..., Task]] = {}
_discovered = False


def _discover() -> None:
    """Import every module of :data:`DISCOVERS` once (each registers its tasks on import)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module(DISCOVERS)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "registry":
            importlib.import_module(f"{DISCOVERS}.{info.name}")


def names(source: str | None = None) -> tuple[str, ...]:
    """Registered task names, sorted; ``source`` (``file`` | ``corpus``) keeps the tasks of that source only."""
    _discover()
    return tuple(sorted(n for n in _FACTORIES if source is None or spec(n).source == source))


def spec(name: str) -> type[Task]:
    """The task's class: its declarations (family, source, metrics, report columns, ...) without building it.
    Unknown names raise ``KeyError`` listing the known ones."""
    _discover()
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(names())}") from None
    return factory if isinstance(factory, type) else getattr(factory, "task_class", Task)


def get(name: str, **options) -> Task:
    """A new task instance; unknown names raise ``KeyError`` listing the known ones."""
    spec(name)  # the one error for unknown names
    task = _FACTORIES[name](**options)
    task.name = name  # the registered name is what examples.parquet's `task` column holds
    return task


def register(name: str, factory: Callable[..., Task] | None = None, *, replace: bool = False):
    """Register a task: ``register("nq", NaturalQuestions)``, or as a class decorator ``@register("nq")``.

    ``factory`` is a :class:`Task` subclass (or a callable with a ``task_class`` attribute naming one, so that its
    declarations can be read without building it). A name registered twice raises unless ``replace``.
    """
    def add(f: Callable[..., Task]):
        if name in _FACTORIES and not replace:
            raise ValueError(f"task {name!r} is already registered")
        _FACTORIES[name] = f
        return f

    return add if factory is None else add(factory)


def unregister(name: str) -> None:
    """Remove a task (tests that register a toy task clean up with this)."""
    _FACTORIES.pop(name, None)
