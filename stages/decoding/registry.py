"""The registry of decoding methods: one file per method in ``stages/decoding/methods/``, found there, never listed.

A method file defines a :class:`~stages.decoding.base.Decoder` subclass decorated with :func:`register`, whose class
body declares, as literals (docs/extending.md, "A decoding method")::

    method = "toy"                   # its name: Generate's ``method`` parameter, ``make_decoder("toy", ...)``
    label = "+Toy"                   # its row in the report's tables
    reads = ("generation", "alpha")  # the NestConfig field groups / fields it reads: exactly what enters its key
    retrieves = True                 # reads the pre-retrieved passages (PreRetrieve runs before it)
    uses_token_index = False         # reads passage keys (EncodePassageKeys runs before it)
    perplexity = True                # has an evaluation mode: ``Decoder.target_logprobs`` (the PPL column)
    order = 60                       # its place among the rows of the report (the built-ins: 10-50)

The pipeline reads these declarations from the file's source (:mod:`ast`) without importing it, so building the DAG,
computing keys and ``nest status`` never import torch. The class itself is imported only to decode
(:func:`decoder_class`); :func:`register` then checks that the class declares every attribute in its own body, so the
static reading and the class cannot disagree.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import stages.decoding.methods  # noqa: F401  (the methods folder: every file in it is a dependency of its users)
from stages.decoding.config import NOT_IN_EVALUATION, config_fields, expand_reads

PACKAGE = "stages.decoding.methods"
FOLDERS: tuple[Path, ...] = (Path(__file__).resolve().parent / "methods",)  # tests add a folder of their own
DECLARED = ("method", "label", "reads", "retrieves", "uses_token_index", "perplexity", "order")
_TYPES = {"method": str, "label": str, "reads": (tuple, list), "retrieves": bool, "uses_token_index": bool,
          "perplexity": bool, "order": int}

_CLASSES: dict[str, type] = {}  # method name -> registered class (filled when a method file is imported)


@dataclass(frozen=True)
class MethodInfo:
    """What the pipeline knows of a method without importing it."""

    name: str
    label: str
    reads: frozenset[str]
    retrieves: bool
    uses_token_index: bool
    perplexity: bool
    order: int
    class_name: str
    path: Path


def register(cls: type) -> type:
    """Class decorator: make ``cls`` the decoder of ``cls.method``. Every attribute of :data:`DECLARED` must be
    assigned in the class body itself (inherited values are invisible to the pipeline's static reading)."""
    missing = [a for a in DECLARED if a not in vars(cls)]
    if missing:
        raise TypeError(f"{cls.__name__}: a registered decoder declares {', '.join(missing)} in its own class body")
    _CLASSES[cls.method] = cls
    return cls


def _is_register(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id == "register") or (
        isinstance(node, ast.Attribute) and node.attr == "register")


def declarations(path: Path) -> list[MethodInfo]:
    """The methods a file declares (its ``@register`` classes), read from its source."""
    path = Path(path)
    return list(_declarations(path, path.stat().st_mtime_ns))


@lru_cache(maxsize=256)
def _declarations(path: Path, _mtime: int) -> tuple[MethodInfo, ...]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in tree.body:
        if not (isinstance(node, ast.ClassDef) and any(_is_register(d) for d in node.decorator_list)):
            continue
        values = {}
        for stmt in node.body:
            if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                    and stmt.targets[0].id in DECLARED):
                name = stmt.targets[0].id
                try:
                    values[name] = ast.literal_eval(stmt.value)
                except ValueError:
                    raise ValueError(f"{path}:{stmt.lineno}: {node.name}.{name} must be a literal (the pipeline reads "
                                     f"it without importing the file)") from None
                if not isinstance(values[name], _TYPES[name]):
                    raise ValueError(f"{path}:{stmt.lineno}: {node.name}.{name} = {values[name]!r} is not a "
                                     f"{_TYPES[name]}")
        missing = [a for a in DECLARED if a not in values]
        if missing:
            raise ValueError(f"{path}:{node.lineno}: {node.name} declares no {', '.join(missing)}")
        found.append(MethodInfo(name=values["method"], label=values["label"], reads=expand_reads(values["reads"]),
                                retrieves=values["retrieves"], uses_token_index=values["uses_token_index"],
                                perplexity=values["perplexity"], order=values["order"], class_name=node.name,
                                path=path))
    return tuple(found)


def methods() -> dict[str, MethodInfo]:
    """Every registered method, in the report's order (``order``, then name)."""
    found: dict[str, MethodInfo] = {}
    for folder in FOLDERS:
        for path in sorted(Path(folder).glob("*.py")):
            if path.name.startswith("_"):
                continue
            for info in declarations(path):
                if info.name in found:
                    raise ValueError(f"decoding method {info.name!r} is declared twice: {found[info.name].path} and "
                                     f"{path}")
                found[info.name] = info
    return dict(sorted(found.items(), key=lambda kv: (kv[1].order, kv[0])))


def method_names() -> tuple[str, ...]:
    return tuple(methods())


def method_info(name: str) -> MethodInfo:
    """The declaration of method ``name``; a ValueError naming the known ones otherwise."""
    known = methods()
    if name not in known:
        raise ValueError(f"unknown decoding method {name!r}; expected one of {tuple(known)}")
    return known[name]


def decoder_class(name: str) -> type:
    """The decoder class of method ``name`` (imports its file: torch)."""
    info = method_info(name)
    if name not in _CLASSES:
        _import(info.path)
    if name not in _CLASSES:
        raise ValueError(f"{info.path} declares method {name!r} but registered no class for it")
    return _CLASSES[name]


def _import(path: Path) -> None:
    if path.parent == FOLDERS[0]:
        importlib.import_module(f"{PACKAGE}.{path.stem}")
        return
    name = f"_nest_methods_{abs(hash(str(path.parent)))}.{path.stem}"  # a method file outside the package
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


# ---- what enters a method's Generate/Perplexity key (the NestConfig field groups it reads) ----------------------------

def relevant_config(method: str, overrides: dict) -> dict:
    """The NestConfig overrides that can change ``method``'s tokens: the fields the method reads (unknown fields are
    kept: NestConfig rejects them)."""
    reads, fields = method_info(method).reads, set(config_fields())
    return {k: v for k, v in sorted(overrides.items()) if k in reads or k not in fields}


def relevant_for_perplexity(method: str, overrides: dict) -> dict:
    """The overrides that change ``method``'s scores in evaluation mode: NEST stops at Eq. 4 there (paper §3.2), so span
    selection, γ and generation lengths do not enter."""
    return {k: v for k, v in relevant_config(method, overrides).items() if k not in NOT_IN_EVALUATION}
