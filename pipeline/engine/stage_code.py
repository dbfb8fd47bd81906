"""A stage's declared version and the hash of its code, read from the sources without importing them.

Pure functions over files (``ast``): ``pipeline.engine.task`` reads a stage's version here to compute a key, and the review guard
(``pipeline.stage_versions``) hashes a stage's code here. This module imports nothing of the pipeline, so neither side
imports the other through it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path


def module_files(module: str, whole_package: bool = True) -> list[Path]:
    """Source files of ``module`` (one file, or every ``.py`` of a package unless ``whole_package`` is False: then its
    ``__init__.py``), found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"stage module {module} not found")
    origin = Path(spec.origin)
    if spec.submodule_search_locations and whole_package:  # a package stage: all its sources
        return sorted(p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*.py"))
    return [origin]


def is_plugin_folder(module: str) -> bool:
    """Whether ``module`` is a package whose ``__init__`` declares ``PLUGIN_FOLDER = True``: a registry's folder, whose
    modules are found at run time rather than imported by name, so whoever imports the package depends on all of them
    (e.g. ``stages.decoding.methods``)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations or not spec.origin:
        return False
    for node in _parse(Path(spec.origin)).body:
        if (_is_version_assign(node, frozenset({"PLUGIN_FOLDER"})) and isinstance(node.value, ast.Constant)
                and node.value.value is True):
            return True
    return False


def _is_version_assign(node: ast.stmt, attrs: frozenset[str]) -> str | None:
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        if node.targets[0].id in attrs:
            return node.targets[0].id
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in attrs:
        return node.target.id
    return None


def _parse(path: Path) -> ast.Module:
    return _parse_text(path.read_text(encoding="utf-8"), str(path))


@lru_cache(maxsize=256)
def _parse_text(text: str, filename: str) -> ast.Module:
    return ast.parse(text, filename=filename)


def declared_versions(module: str, attrs: tuple[str, ...] = ("VERSION",)) -> dict[str, str]:
    """``{attr: value}`` for the top-level string constants ``attrs`` of ``module`` (its ``__init__`` for a package)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"stage module {module} not found")
    wanted = frozenset(attrs)
    out = {}
    for node in _parse(Path(spec.origin)).body:
        name = _is_version_assign(node, wanted)
        if name and isinstance(node.value, ast.Constant):
            out[name] = str(node.value.value)
    return out


def read_version(module: str, attr: str = "VERSION") -> str:
    """The declared version of a stage, by parsing its source (importing it could take seconds: torch)."""
    got = declared_versions(module, (attr,))
    if attr not in got:
        raise AttributeError(f"{module} declares no top-level {attr} = \"...\" string constant")
    return got[attr]


LOCAL_PACKAGES = ("stages", "tasks")


def _local_imports(tree: ast.Module, package: str | None) -> set[str]:
    """Project modules (``stages.*``, ``tasks.*``) imported anywhere in ``tree`` (lazy imports inside functions too)."""
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level and package:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] in LOCAL_PACKAGES:
                try:
                    if importlib.util.find_spec(name) is not None:
                        found.add(name)
                except (ModuleNotFoundError, ValueError):
                    continue
    return found


def _discovered(tree: ast.Module) -> set[str]:
    """The modules of the package a registry imports by discovery at run time (a top-level ``DISCOVERS = "package"``,
    as in ``tasks/registry.py`` and ``stages/retrieval/searchers.py``): code the importing stage runs, though no import
    statement names it. (``PLUGIN_FOLDER = True`` in a package's ``__init__`` says the same from the package's side.)"""
    found = set()
    for node in tree.body:
        if _is_version_assign(node, frozenset({"DISCOVERS"})) and isinstance(node.value, ast.Constant):
            spec = importlib.util.find_spec(str(node.value.value))
            for loc in (spec.submodule_search_locations or []) if spec else []:
                found |= {f"{node.value.value}.{p.stem}" for p in Path(loc).glob("*.py") if p.stem != "__init__"}
    return found


def dependencies(module: str) -> list[str]:
    """``module`` and every project module it imports, transitively (their code changes a stage's output too)."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        spec = importlib.util.find_spec(m)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        package = m if spec.submodule_search_locations else m.rpartition(".")[0]
        for path in module_files(m, whole_package=(m == module or is_plugin_folder(m))):
            tree = _parse(path)
            todo.extend((_local_imports(tree, package) | _discovered(tree)) - seen)
    return sorted(seen)


def code_parts(module: str, attrs: tuple[str, ...] = ("VERSION",)) -> dict[str, str]:
    """sha256 of the AST (comments and layout ignored) of each source file the stage runs, named ``module:file``: the
    module and the project modules it imports, the module's own version assignments left out. A file in a plugin folder
    or a discovered package is its own part, so a new method or task file shows as an added part."""
    wanted = frozenset(attrs)
    parts = {}
    for dep in dependencies(module):
        for path in module_files(dep, whole_package=(dep == module or is_plugin_folder(dep))):
            tree = _parse(path)
            body = [n for n in tree.body if not (dep == module and _is_version_assign(n, wanted))]
            parts[f"{dep}:{path.name}"] = hashlib.sha256(ast.dump(ast.Module(body=body, type_ignores=[])).encode()).hexdigest()
    return parts


def code_hash(module: str, attrs: tuple[str, ...] = ("VERSION",)) -> str:
    """One sha256 over :func:`code_parts`."""
    h = hashlib.sha256()
    for name, digest in sorted(code_parts(module, attrs).items()):
        h.update(f"{name}={digest};".encode())
    return h.hexdigest()
