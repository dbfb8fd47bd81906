"""One error type for bad input, printed as one line that names the file and the line."""

from __future__ import annotations

from tasks.errors import TaskInputError


class InputError(TaskInputError):
    """Bad user input: ``str(err)`` is ``"path:line: message"`` (``line`` omitted when unknown).

    The stages' error is the task loaders' one (``tasks/`` may not import ``stages``, so the base class lives there):
    the CLI prints either as one line, and a loader's error passes through a stage unchanged in meaning.
    """
