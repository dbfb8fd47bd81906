"""The configuration a command runs under: the profile and ``--set`` overrides, checked as a whole before any task is
built (``nest all``/``run``/``status``/``push``/``pull``/``generate`` start here)."""

from __future__ import annotations

from typing import Sequence

import pipeline.dag  # registers the task and config classes the check reads
from pipeline.engine import config
from pipeline.engine.params import check_config
from pipeline.engine.task import check_needs


def setup(profile: str | None, sets: Sequence[str] = ()) -> None:
    """Apply the profile and ``--set`` overrides, then check the whole configuration (names and values) before any
    task is built: a misspelt section/option or a bad value is one line (exit 2)."""
    if profile:
        config.apply_profile(profile)
    if sets:
        config.apply_overrides(config.parse_set(list(sets)))
    check_config(extra_sections=config.PROFILES)
    pipeline.dag.check_decoding()  # the keys inside [decoding]'s dicts, NestConfig's own validation of each merged config
    check_needs()  # [stage_resources] needs: known stages, whole amounts
    config.get_store().check_root()
