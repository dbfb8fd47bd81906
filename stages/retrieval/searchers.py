"""The retrievers PreRetrieve can fuse: a searcher interface and the registry of its implementations.

A retriever is a name, the stage that builds its artifact (BM25: ``stages.retrieval.bm25``; dense:
``stages.retrieval.dense``) and a searcher class over that artifact::

    searcher = Cls.from_artifact(path, **options)        # options: the run parameters it declares (dense: encoder)
    searcher.size                                        # documents it can return (candidates are clamped to it)
    searcher.search(queries, k) -> [[(doc_id, score), ...], ...]   # per query, best first, higher is better

``register(name, "module:Class", options=(...))`` adds one (the class is imported on first use, so naming a retriever
costs no import of torch or the JVM). A module of this package that declares, as literals, ``RETRIEVER = "<name>"`` and
``SEARCHER = "<Class>"`` (and ``SEARCHER_OPTIONS = (...)`` if it takes run options) is registered on import of this
module without being imported (:func:`declared`): a new retriever is its own stage module plus its index task. Its name is its input name in PreRetrieve and its score column in
``retrievals.parquet`` (docs/extending.md, "A retriever").
"""

from __future__ import annotations

import ast
import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

#: The package whose modules the registry imports by name at run time (read by pipeline.stage_versions: a stage that
#: uses this registry depends on the code of every searcher in it).
DISCOVERS = "stages.retrieval"

Hit = tuple[int, float]
RESERVED = ("example_id", "rank", "doc_id", "fused", "search_s")  # retrievals.parquet's own columns


class Searcher(Protocol):
    """What PreRetrieve needs of a retriever's searcher."""

    size: int

    @classmethod
    def from_artifact(cls, path: Path, **options: Any) -> "Searcher":
        """Open the searcher over the artifact folder ``path`` (its build stage's output)."""

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """Top-``k`` ``(doc_id, score)`` per query, best first (higher is better); fewer when the index has fewer."""


@dataclass(frozen=True)
class Retriever:
    """A registered retriever: its name, its searcher class (or ``"module:Class"``) and the run options it takes."""

    name: str
    searcher: Any
    options: tuple[str, ...] = ()

    def searcher_class(self):
        if isinstance(self.searcher, str):
            module, _, attr = self.searcher.partition(":")
            return getattr(importlib.import_module(module), attr)
        return self.searcher

    def open(self, path: Path, **options: Any) -> Searcher:
        """The searcher over ``path``, given the options it declares (others are ignored)."""
        mine = {k: v for k, v in options.items() if k in self.options}
        return self.searcher_class().from_artifact(Path(path), **mine)


_REGISTRY: dict[str, Retriever] = {}


def register(name: str, searcher: Any, *, options: Sequence[str] = (), replace: bool = False) -> Retriever:
    """Add a retriever. ``name`` becomes an input name and a column name: a lower-case identifier, not one of
    :data:`RESERVED`. A name registered twice raises unless ``replace``."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in RESERVED or name == "hybrid":
        raise ValueError(f"retriever name {name!r}: expected a lower-case identifier, not one of "
                         f"{', '.join(RESERVED)} or 'hybrid'")
    if name in _REGISTRY and not replace:
        raise ValueError(f"retriever {name!r} is already registered")
    _REGISTRY[name] = Retriever(name, searcher, tuple(options))
    return _REGISTRY[name]


def unregister(name: str) -> None:
    """Remove a retriever (tests that register a toy one clean up with this)."""
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """Registered retriever names, in registration order (the built-ins first: bm25, dense)."""
    return tuple(_REGISTRY)


def get(name: str) -> Retriever:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown retriever {name!r}; known: {', '.join(_REGISTRY)}") from None


register("bm25", "stages.retrieval.bm25:BM25Searcher")
register("dense", "stages.retrieval.dense:DenseSearcher", options=("encoder",))


def declared(folder: Path = Path(__file__).resolve().parent) -> list[tuple[str, str, tuple[str, ...]]]:
    """``(name, "module:Class", options)`` of every module of ``folder`` that declares ``RETRIEVER`` and ``SEARCHER``
    as top-level literals, in module order, read from the sources (importing them could load torch or the JVM)."""
    found = []
    for path in sorted(folder.glob("*.py")):
        values = {}
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id in ("RETRIEVER", "SEARCHER", "SEARCHER_OPTIONS")):
                values[node.targets[0].id] = ast.literal_eval(node.value)
        if "RETRIEVER" in values and "SEARCHER" in values:
            found.append((str(values["RETRIEVER"]), f"{DISCOVERS}.{path.stem}:{values['SEARCHER']}",
                          tuple(values.get("SEARCHER_OPTIONS", ()))))
    return found


for _name, _searcher, _options in declared():
    if _name not in _REGISTRY:
        register(_name, _searcher, options=_options)
