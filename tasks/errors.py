"""Bad-input error of the task loaders.

``tasks/`` may not import ``stages``, so this is the base class of ``stages.errors.InputError``, with the constructor
``(path, line, message)``, the same attributes and the same one-line ``str()``: ``"path:line: message"`` (``line``
omitted when unknown). Callers in ``stages`` convert it losslessly with ``InputError(e.path, e.line, e.message)``, or
catch both: both derive from ``ValueError``.
"""

from __future__ import annotations

from pathlib import Path


class TaskInputError(ValueError):
    """A task file that cannot be read as its format: ``str(err)`` is ``"path:line: message"``."""

    def __init__(self, path: str | Path | None, line: int | None, message: str):
        self.path = str(path) if path is not None else None
        self.line = line
        self.message = message
        where = self.path or "<input>"
        if line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # picklable across worker processes despite the 3-argument constructor
        return (type(self), (self.path, self.line, self.message))
