"""One source of defaults: an option that the project's luigi.cfg sets has no default in its class, and every option of
a config section is given somewhere (class default or luigi.cfg), so that the DAG and the file can never disagree."""

from __future__ import annotations

import configparser

import luigi
from luigi.parameter import _no_value
from luigi.task_register import Register

import pipeline.dag  # noqa: F401  (defines the tasks and config sections)
import pipeline.engine.scheduling  # noqa: F401
from pipeline.engine.config import PROJECT_CFG

LUIGI_OWN = {"core", "worker", "scheduler", "resources", "retcode", "email", "smtp"}


def _file() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None)
    cp.read(PROJECT_CFG)
    return cp


def _classes() -> dict[str, type]:
    return {c.get_task_family(): c for c in Register._get_reg().values()
            if isinstance(c, type) and c.__module__.startswith("pipeline.")}


def _declares_default(param) -> bool:
    """A default in the class. luigi gives every BoolParameter an implicit False, which is not a second source."""
    if isinstance(param, luigi.BoolParameter):
        return param._default is not False
    return param._default is not _no_value


def test_an_option_of_luigi_cfg_has_no_second_default_in_its_class():
    cp, classes = _file(), _classes()
    both = []
    for section in cp.sections():
        cls = classes.get(section)
        if cls is None:
            continue
        params = dict(cls.get_params())
        both += [f"[{section}] {opt}" for opt in cp[section] if opt in params and _declares_default(params[opt])]
    assert both == [], "set in luigi.cfg and defaulted in the class (keep one): " + ", ".join(both)


def test_every_section_and_option_of_luigi_cfg_is_known():
    cp, classes = _file(), _classes()
    unknown = [s for s in cp.sections() if s not in classes and s not in LUIGI_OWN and s != "full"]
    assert unknown == []
    for section in cp.sections():
        if section in classes:
            params = dict(classes[section].get_params())
            assert [o for o in cp[section] if o not in params] == [], section


def test_every_config_option_has_a_value_somewhere():
    cp = _file()
    missing = []
    for name, cls in _classes().items():
        if not issubclass(cls, luigi.Config):
            continue
        for opt, param in cls.get_params():
            if param._default is _no_value and not (cp.has_section(name) and cp.has_option(name, opt)):
                missing.append(f"[{name}] {opt}")
    assert missing == []


def test_the_embedded_values_are_the_ones_a_run_uses():
    """The values a task reads are the file's (e.g. LoadTask.n_examples, [decoding] sweep_tasks, which once differed)."""
    cp = _file()
    assert pipeline.dag.LoadTask(task="completion").n_examples == cp.getint("LoadTask", "n_examples")
    assert list(pipeline.dag.decoding().sweep_tasks) == __import__("json").loads(cp.get("decoding", "sweep_tasks"))
