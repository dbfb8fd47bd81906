"""One error type for bad input, printed as one line that names the file and the line."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad user input: ``str(err)`` is ``"path:line: message"`` (``line`` omitted when unknown)."""

    def __init__(self, path: str | Path | None, line: int | None, message: str):
        self.path = str(path) if path is not None else None
        self.line = line
        self.message = message
        where = self.path or "<input>"
        if line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {message}")
