"""How an artifact's key is computed: the canonical JSON of ``{stage, stage_version, params, inputs}`` and its sha256.

A parameter enters the key in its *key form* (:func:`key_form`): an :class:`Identified` value by its identity (a digest,
a name: never an absolute path), mappings as dicts, tuples as lists.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import PurePath
from typing import Any, Mapping


class Identified:
    """A parameter whose key form differs from the value handed to the stage.

    ``identity`` goes into the key and the manifest (a digest, a name: never an absolute path); ``value`` is what the
    stage's ``run`` receives (a path, an object). ``value`` may be a zero-argument callable, resolved only when the stage
    runs, so that building the DAG never imports heavy modules.
    """

    __slots__ = ("identity", "_value", "lazy")

    def __init__(self, value: Any, identity: Any, lazy: bool = False):
        self._value = value
        self.identity = identity
        self.lazy = lazy

    @property
    def value(self) -> Any:
        return self._value() if self.lazy else self._value

    def __repr__(self) -> str:
        return f"Identified(identity={self.identity!r})"


def key_form(obj: Any) -> Any:
    """The JSON value of ``obj`` as it enters a key: ``Identified`` → its identity, mappings → dicts, tuples → lists.

    Raw paths are refused: a key must not depend on where a file lives (use ``Identified`` with a digest).
    """
    if isinstance(obj, Identified):
        return key_form(obj.identity)
    if isinstance(obj, PurePath):
        raise TypeError(f"path {str(obj)!r} in a key: wrap it in Identified(path, identity) with a digest")
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"key-form mapping keys must be str, got {k!r}")
            out[k] = key_form(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [key_form(v) for v in obj]
    if isinstance(obj, str):
        if os.path.isabs(obj):
            raise ValueError(f"absolute path {obj!r} in a key: wrap it in Identified(path, identity) with a digest")
        return obj
    if obj is None or isinstance(obj, (bool, int)):
        return obj
    if isinstance(obj, float):
        if obj != obj or obj in (float("inf"), float("-inf")):
            raise ValueError(f"non-finite float {obj!r} in a key")
        return obj
    raise TypeError(f"cannot put {type(obj).__name__} {obj!r} in a key")


def canonical_json(obj: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, UTF-8 text (not escaped), after :func:`key_form`."""
    return json.dumps(key_form(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def content_key(stage: str, version: str, params: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """sha256 hex of the canonical JSON ``{stage, stage_version, params, inputs: {input_name: input_key}}``."""
    doc = {"stage": stage, "stage_version": str(version), "params": dict(params), "inputs": dict(inputs)}
    return hashlib.sha256(canonical_json(doc).encode("utf-8")).hexdigest()
