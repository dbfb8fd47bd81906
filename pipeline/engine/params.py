"""What each configuration value accepts, declared beside the Luigi parameter, and the check of the whole configuration.

A parameter declares its valid values once, where it is defined::

    b = accepts(luigi.IntParameter(default=40), at_least(1))

The same declaration serves three checks, all done before the first stage runs:

- :func:`check_config`: every ``[Section] option`` of Luigi's configuration (``luigi.cfg``, ``$LUIGI_CONFIG_PATH``,
  ``--set``): a section no task or config class declares, or an option its class does not have, is an error (with the
  closest name, so ``PreRetreive.b`` says "did you mean PreRetrieve?"); a value that does not parse, or that its
  check refuses, is an error naming the option and what it accepts.
- :func:`check_task`: the values of a task instance (also from the command line), called by ``NestTask.__init__``.

Errors are :class:`ConfigError`: one line, exit status 2, no traceback.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import luigi
from luigi.task_register import Register


class ConfigError(ValueError):
    """A configuration value or name is not valid (one line: the option and what it accepts)."""


@dataclass(frozen=True)
class Accepts:
    """A check of a parsed value and the words that say what passes it ("an integer >= 1")."""

    what: str
    ok: Callable[[Any], bool]

    def __call__(self, value: Any) -> bool:
        try:
            return bool(self.ok(value))
        except (TypeError, ValueError):
            return False


def at_least(lo: float, kind: str = "an integer") -> Accepts:
    return Accepts(f"{kind} >= {lo:g}", lambda v: _finite(v) and v >= lo)


def between(lo: float, hi: float, kind: str = "a number") -> Accepts:
    return Accepts(f"{kind} in [{lo:g}, {hi:g}]", lambda v: _finite(v) and lo <= v <= hi)


def finite(kind: str = "a finite number") -> Accepts:
    return Accepts(kind, _finite)


def one_of(*choices: str) -> Accepts:
    return Accepts("one of " + ", ".join(choices), lambda v: v in choices)


def each_one_of(choices: Callable[[], Iterable[str]] | Iterable[str], what: str = "") -> Accepts:
    """A list whose every item is one of ``choices`` (a callable is asked only when checking: lazy imports)."""
    def ok(v) -> bool:
        allowed = set(choices() if callable(choices) else choices)
        return isinstance(v, (list, tuple)) and all(x in allowed for x in v)
    return Accepts(what or "a list of known names", ok)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def accepts(param: luigi.Parameter, check: Accepts) -> luigi.Parameter:
    """Attach ``check`` to ``param`` (the one place a parameter's valid values are declared); returns ``param``."""
    param._nest_accepts = check
    return param


def _kind(param: luigi.Parameter) -> str:
    """What a parameter parses, in words (for a value that does not parse)."""
    if isinstance(param, luigi.BoolParameter):
        return "true or false"
    if isinstance(param, luigi.ChoiceParameter):
        return "one of " + ", ".join(sorted(map(str, param._choices)))
    if isinstance(param, luigi.IntParameter):
        return "an integer"
    if isinstance(param, luigi.FloatParameter):
        return "a number"
    if isinstance(param, luigi.DictParameter):
        return "a JSON object"
    if isinstance(param, luigi.ListParameter):
        return "a JSON list"
    return "a string"


def _what(param: luigi.Parameter) -> str:
    check = getattr(param, "_nest_accepts", None)
    return check.what if check is not None else _kind(param)


def check_value(section: str, name: str, param: luigi.Parameter, value: Any, *, raw: bool) -> Any:
    """Parse (``raw``: a config string) and check one value; raise :class:`ConfigError` naming the option."""
    shown = value if isinstance(value, str) else json.dumps(value, default=str)
    if raw:
        try:
            value = param.parse(value)
            value = param.normalize(value)
        except Exception:  # luigi raises ValueError, TypeError, json errors...: all "does not parse"
            raise ConfigError(f"{section}.{name} = {shown!r}: expected {_what(param)}") from None
        if isinstance(param, luigi.FloatParameter) and not math.isfinite(value) \
                and getattr(param, "_nest_accepts", None) is None:
            raise ConfigError(f"{section}.{name} = {shown!r}: expected a finite number")
    check = getattr(param, "_nest_accepts", None)
    if check is not None and not check(plain(value)):
        raise ConfigError(f"{section}.{name} = {shown!r}: expected {check.what}")
    return value


def plain(obj):
    """Luigi's frozen dicts/tuples → plain JSON values (dict keys as strings)."""
    if hasattr(obj, "items"):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def check_task(task: luigi.Task) -> None:
    """Check every declared parameter value of a task instance (from config, command line or code)."""
    for name, param in task.get_params():
        check = getattr(param, "_nest_accepts", None)
        value = getattr(task, name, None)
        if isinstance(param, luigi.FloatParameter) and isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{task.get_task_family()}.{name} = {value!r}: expected {_what(param)}")
        if check is not None and not check(plain(value)):
            raise ConfigError(f"{task.get_task_family()}.{name} = {value!r}: expected {check.what}")


# Sections of Luigi's configuration that no registered class declares but that are not mistakes.
LUIGI_SECTIONS = {"core", "worker", "scheduler", "retcode", "logging", "email", "smtp", "sendgrid", "batch_email",
                  "execution_summary", "task_history", "hadoop", "hdfs", "hive", "spark", "resources", "elasticsearch",
                  "postgres", "mysql", "redshift", "s3", "gcs", "bigquery", "cron", "webhdfs", "kubernetes", "docker",
                  "ecs", "batch", "sge", "lsf", "pig", "scalding", "datadog", "prometheus", "config_parser",
                  "retcode", "task_history"}


def _registered() -> dict[str, dict[str, luigi.Parameter]]:
    """{section: {option: parameter}} of every registered task and config class (Luigi's names)."""

    out: dict[str, dict[str, luigi.Parameter]] = {}
    for cls in Register._get_reg().values():
        if not isinstance(cls, type):
            continue
        out.setdefault(cls.get_task_family(), {}).update(dict(cls.get_params()))
    return out


def check_config(cfg=None, extra_sections: Iterable[str] = ()) -> None:
    """Check Luigi's whole configuration against the registered classes (see the module docstring)."""
    if cfg is None:
        cfg = luigi.configuration.get_config()
    known = _registered()
    allowed_free = LUIGI_SECTIONS | set(extra_sections)
    for section in cfg.sections():
        if section in allowed_free:
            continue
        if section not in known:
            close = difflib.get_close_matches(section, list(known), n=1, cutoff=0.6)
            hint = f"; did you mean [{close[0]}]?" if close else ""
            raise ConfigError(f"unknown config section [{section}]{hint} (from luigi.cfg or --set)")
        params = known[section]
        for option in cfg.options(section) if hasattr(cfg, "options") else cfg[section]:
            name = option.replace("-", "_")
            if _is_default_only(cfg, section, option):
                continue
            if name not in params:
                close = difflib.get_close_matches(name, list(params), n=1, cutoff=0.5)
                hint = f"; did you mean {section}.{close[0]}?" if close else ""
                accepted = ", ".join(sorted(params)) or "none"
                raise ConfigError(f"unknown option {section}.{option}{hint} (it has: {accepted})")
            check_value(section, name, params[name], cfg.get(section, option), raw=True)


def _is_default_only(cfg, section: str, option: str) -> bool:
    """An option inherited from ``[DEFAULT]`` (configparser copies it into every section): not the section's own."""
    try:
        return option in cfg.defaults() and not cfg._sections.get(section, {}).get(option)
    except AttributeError:
        return False
