"""The errors a user can fix: bad input prints one line (``path:line: message``) and exits with status 2.

They are raised across the project (``stages.errors.InputError``, ``tasks.errors.TaskInputError``, a bad profile, a bad
parameter value, a store that cannot be used); the CLI prints them, and the run log marks a stage that failed on one
(also in a Luigi worker process). Both read the list here, so the engine never asks the CLI.
"""

from __future__ import annotations

from pipeline.engine.config import ProfileError
from pipeline.engine.params import ConfigError
from pipeline.storage.store import StoreError
from stages.errors import InputError
from tasks.errors import TaskInputError

EXIT_INPUT = 2  # the exit status of bad input


class CliError(Exception):
    """A one-line user-facing error (exit status 2)."""


INPUT_ERRORS: tuple[type[BaseException], ...] = (InputError, TaskInputError, ProfileError, ConfigError, StoreError,
                                                 CliError, FileNotFoundError)


def is_input_error(exc: BaseException) -> bool:
    """Bad input (one line, exit 2), or a failure that a worker process reported as such."""
    return isinstance(exc, INPUT_ERRORS) or bool(getattr(exc, "input_error", False))
