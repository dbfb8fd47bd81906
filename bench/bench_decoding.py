"""Decoding benchmark: NEST's speed as a user gets it, every cost counted, against the base LM and HF
prompt lookup, with a 95% confidence interval on every speed-up, and only on a quiet machine.

    python -m bench.run decoding                 # the default size (NEST_BENCH_EXAMPLES=12 timed examples per setting)
    NEST_BENCH_EXAMPLES=20 python -m bench.run decoding      # tighter intervals
    python -m bench.run --quick decoding         # 2 examples, 16/32 new tokens, 300-article corpus (no people in it:
                                                 # the headline settings run on completion_excluded): checks the bench
    NEST_BENCH_ALLOW_BUSY=1 python -m bench.run decoding     # on a busy machine: figures labelled "measured under load"
    python -m bench.run decoding --only bio --min-new-tokens 128     # the bio settings only; equal work at 128..256

**Quiet machine or no headline** (``bench/quiet.py``). Torch runs with its default threads (recorded: ``threads``;
nothing here sets them, and a thread budget the pipeline applied while building the inputs is undone before the timed
part). The 1-minute load average of the other processes (this process's own share subtracted, from its CPU time) is
checked at the start, just before the timed part and just after it: above 0.3 per core, the result is ``refused``
and ``bench/run.py`` writes ``decoding-busy.*`` instead of ``decoding.*`` and exits non-zero (``make bench`` fails).
A busy start refuses at once, before anything is built or timed.

Inputs come through the pipeline (PrepareLM, ConvertCorpus, PreTokenize, LoadTask, PreRetrieve, EncodePassageKeys) with
the profile's settings, and NEST runs with the profile's decoding config (luigi.cfg ``[decoding]``, tuned in
docs/tuning.md) and the task's ``[decoding] task_config``.

**Which people.** Every bio setting runs on a **held-out draw**: LoadTask seed ``HELDOUT_SEED`` (2), with every person
of any seed-0 or seed-1 draw of 1..32 people removed (the report's eval draw is seed 0 with the profile's
``n_examples``; the tuning's dev draw is seed 1 with 8; draws of other sizes are removed too, since a draw of n people
is not a prefix of a draw of n+1). The result's ``heldout`` gives the excluded count and the overlap of the timed
people with the eval draw, the dev draw and the excluded set: 0 each, checked. The completion settings use the
profile's seed-0 draw (the report's examples): they are labelled so.

**What a query costs** (every timed figure): the wall time of the method from the example's retrieved passages to its
last token, plus, for every method that reads passages, the example's share of the retrieval (the ``search_s`` column
of PreRetrieve: a batch's search time divided among its examples) and fetching its passages' token ids and text. So
NEST on the fly pays its passage-key encoding; nothing is prefetched for a timed query. Each NEST row is one stream with
its own key cache that starts empty after the warm-up (an untimed example outside the timed ones): only earlier queries
of the same row warm it, and its hit rate is shown.

**The key-store rows** (``nest_store``) read keys from an EncodePassageKeys artifact (scope ``retrieved``) that an earlier
stage encoded **for these very queries** (the passages PreRetrieve returned for this draw). Its build time is not in any
query's wall time, so beside the row's own speed stands its speed with the store's **per-query share** counted (build
seconds ÷ the queries of the draw it was built for).

**Settings** (one process; per example the methods of a setting run interleaved, the start of their order rotating):
- headline ``bio (held out)@256 equal work``: min = max = 256 new tokens for every method (``--min-new-tokens``;
  NestConfig ``min_new_tokens`` suppresses EOS, the stop rule and the document-end EOS key until then; HF prompt lookup
  gets generate's own ``min_new_tokens``): NEST on the fly ÷ base on the same number of tokens;
- headline ``bio (held out)@256 natural stops``: the same methods stopping where they stop (seconds per query beside);
- ``bio (held out)@96``: the b = 10/20/40 passages trade-off (paper Fig. 4) and HF prompt lookup (best of 10/20);
- ``completion_excluded@96`` (eval draw; the source article's passages are excluded from retrieval);
- ``completion@96``, the **upper bound**: the source article is in the datastore, so NEST copies the answer.

Methods: ``base`` (our greedy loop, plain prompt), ``pld10``/``pld20`` (HF ``generate(prompt_lookup_num_tokens=k)``
with the same top passages in its prompt as RA), ``nest`` (on the fly, the profile's b), ``nest_bf16`` (the same with
its passage keys encoded under bf16 autocast, ``key_precision``: an option, not the profile's default), ``nest_b20``/``nest_b40``,
``nest_store`` (keys from the store).

Speed-ups are **pooled** (Σ tokens / Σ seconds of the method ÷ the same for the base LM, on the same examples of the
same run) with a **95% paired bootstrap interval** over examples (the resampling of tasks.metrics.paired_bootstrap:
10,000 resamples of the examples, seed 0, the method and the base resampled together); medians of the per-example
ratios stand beside them. The targets table is computed from the measured numbers. A "stream" section gives
the key-cache hit rate a stream of NEST_BENCH_STREAM (200) bio prompts would get over the embedded corpus (exact: the
passages each prompt retrieves that an earlier prompt already retrieved).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

from bench import quiet
from pipeline import dag
from pipeline.engine import config
from pipeline.engine.params import plain
from pipeline.engine.runner import build
from stages.corpus.passages import PassageReader
from stages.decoding import NestConfig, PassageKeyCache, make_decoder
from stages.decoding.config import config_fields
from stages.decoding.key_store import PassageKeyStore
from stages.decoding.types import MEASURED_COMPONENTS
from stages.evaluation.generate import build_requests
from stages.evaluation.load_task import CorpusView
from stages.lm.load import load_lm
from stages.lm.pretokenize import TokenLookup
from stages.retrieval.pre_retrieve import read_retrievals, read_search_seconds
from tasks.bio import draw_bios, is_person
from tasks.metrics import attribution_stats

ROOT = Path(__file__).resolve().parents[1]
QUICK_STORE = Path.home() / ".cache" / "nest" / "bench-decoding-quick-store"
UPPER_BOUND = "completion"
GOALS = {"store_over_base": 3.0, "store_over_pld": 1.2, "otf_over_base_96": 1.0, "otf_over_base_long": 1.5,
         "knn_over_lm": 0.10}
HELDOUT_SEED = 2           # the held-out bio draw's LoadTask seed
EXCLUDED_SEEDS = (0, 1)    # the report's eval draw (0) and the tuning's dev draw (1)
EXCLUDED_MAX_SIZE = 32     # every draw of those seeds of 1..32 people is excluded
DEV_DRAW_SIZE = 8          # bench.tune_generation --n (docs/tuning.md)
BOOTSTRAP = {"resamples": 10_000, "seed": 0, "level": 0.95}
TASK_LABEL = {"bio": "bio (held out)", "completion_excluded": "completion_excluded", "completion": "completion"}


def _log(msg: str) -> None:
    print(f"[bench decoding] {msg}", file=sys.stderr, flush=True)


def settings(max_new: int, long_new: int, min_new: int | None = None, quick: bool = False) -> list[dict]:
    """The timed settings: name, task, new tokens (max, min), methods, what the figure is (``label``), headline or not.
    ``quick``: the corpus has no people, so the headline settings run on completion_excluded and bio@96 is left out."""
    head = "completion_excluded" if quick else "bio"
    hl = TASK_LABEL[head]
    min_new = long_new if min_new is None else min_new
    out = [
        {"name": f"{hl}@{long_new} equal work (min {min_new})", "task": head, "max_new": long_new, "min_new": min_new,
         "methods": ["base", "nest", "nest_bf16", "nest_store"], "headline": "equal",
         "label": (f"HEADLINE: every method writes exactly {long_new} new tokens" if min_new == long_new else
                   f"HEADLINE: every method writes at least {min_new} and at most {long_new} new tokens")
                  + f" (EOS, the stop rule and the document-end key suppressed until {min_new}): NEST on the fly ÷ "
                    f"base on equal work"
                  + ("" if quick else "; people in no eval/dev draw")},
        {"name": f"{hl}@{long_new} natural stops", "task": head, "max_new": long_new, "min_new": 0,
         "methods": ["base", "nest", "nest_bf16", "nest_store"], "headline": "natural",
         "label": f"HEADLINE: at most {long_new} new tokens, each method stops where it stops (EOS, stop rule): the "
                  f"speed a user gets; seconds per query beside"},
        {"name": f"{TASK_LABEL['bio']}@{max_new}", "task": "bio", "max_new": max_new, "min_new": 0,
         "methods": ["base", "pld10", "pld20", "nest", "nest_b20", "nest_b40", "nest_store"],
         "label": "the b = 10/20/40 passages trade-off (paper Fig. 4) and HF prompt lookup (best of 10/20); natural "
                  "stops; held-out people"},
        {"name": f"completion_excluded@{max_new}", "task": "completion_excluded", "max_new": max_new, "min_new": 0,
         "methods": ["base", "pld10", "pld20", "nest", "nest_store"],
         "label": "the eval draw (seed 0); the source article's passages excluded from retrieval; natural stops"},
        {"name": f"completion@{max_new} (upper bound)", "task": UPPER_BOUND, "max_new": max_new, "min_new": 0,
         "methods": ["base", "nest"],
         "label": "UPPER BOUND, not a speed-up to expect: the source article is in the datastore, so NEST copies the "
                  "reference; eval draw (seed 0)"},
    ]
    if quick:
        out = [s for s in out if s["task"] != "bio"]
    return out


def min_new_supported() -> bool:
    """Whether this build's NestConfig has ``min_new_tokens`` (the equal-work setting needs it)."""

    return "min_new_tokens" in config_fields()


# --- inputs -----------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def config_overrides(items: list[str]):
    """``Section.option=value`` overrides for the block, then the previous values; Luigi's instance cache is cleared
    on both sides, so a task made inside (``PreRetrieve(task=bio)``) is not one made before with other inputs."""
    from luigi.task_register import Register


    cfg = config.config()
    parsed = config.parse_set(items)
    before = {(sec, opt): (cfg.get(sec, opt) if cfg.has_option(sec, opt) else None)
              for sec, opts in parsed.items() for opt in opts}
    config.apply_overrides(parsed)
    Register.clear_instance_cache()
    try:
        yield
    finally:
        for (sec, opt), value in before.items():
            if value is None:
                cfg.remove_option(sec, opt)
            else:
                cfg.set(sec, opt, value)
        Register.clear_instance_cache()


def bio_people(corpus) -> list[str]:
    """The bio task's people (source ids) in corpus order: the list :func:`tasks.bio.draw_bios` draws from."""
    import json


    people, seen = [], set()
    for batch in corpus.iter_batches(["source_id", "title", "meta"]):
        for source_id, meta in zip(batch.column("source_id").to_pylist(), batch.column("meta").to_pylist()):
            if source_id in seen or not meta:
                continue
            seen.add(source_id)
            if is_person(json.loads(meta)):
                people.append(source_id)
    return people


def draw_indices(n_people: int, n: int, seed: int) -> list[int]:
    """The indices :func:`tasks.bio.draw_bios` picks for ``n`` examples with ``seed`` (checked against it at run time
    by :func:`excluded_people`)."""
    import numpy as np  # lazy: start-up time

    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n_people, size=min(n, n_people), replace=False).tolist())


def excluded_people(corpus, people: list[str], profile_n: int, max_size: int = EXCLUDED_MAX_SIZE) -> dict:
    """The people of every seed-0/seed-1 draw of 1..``max_size`` (and of the profile's size) and the two real draws
    (eval: seed 0 × ``profile_n``; dev: seed 1 × 8) as :func:`tasks.bio.draw_bios` makes them: a check that
    :func:`draw_indices` still follows the task's rule."""

    sizes = sorted(set(range(1, max_size + 1)) | {profile_n, DEV_DRAW_SIZE})
    excluded = {people[i] for s in EXCLUDED_SEEDS for n in sizes for i in draw_indices(len(people), n, s)}
    real = {}
    for name, seed, n in (("eval", 0, profile_n), ("dev", 1, DEV_DRAW_SIZE)):
        examples, _ = draw_bios(corpus, "bio", n_examples=n, seed=seed)
        real[name] = {e.meta["source_id"] for e in examples}
        ours = {people[i] for i in draw_indices(len(people), n, seed)}
        if real[name] != ours:
            raise RuntimeError(f"the bench's copy of the bio draw no longer matches tasks.bio.draw_bios ({name} draw, "
                               f"seed {seed}, n {n}): update bench_decoding.draw_indices")
    return {"excluded": excluded, "eval": real["eval"], "dev": real["dev"], "sizes": [sizes[0], sizes[-1]]}


def heldout_size(people: list[str], excluded: set[str], needed: int, seed: int = HELDOUT_SEED) -> int:
    """The smallest draw size of ``seed`` that holds ``needed`` people outside ``excluded``."""
    for m in range(needed, len(people) + 1):
        if sum(people[i] not in excluded for i in draw_indices(len(people), m, seed)) >= needed:
            return m
    raise RuntimeError(f"only {len(set(people) - excluded)} people outside the excluded draws; {needed} needed")


def heldout_plan(passages_dir, lm_dir, needed: int, profile_n: int) -> dict:
    """The held-out bio draw: LoadTask seed ``HELDOUT_SEED`` of ``drawn`` people, of which the first ``needed`` outside
    every excluded draw are used."""

    corpus = CorpusView(Path(passages_dir), Path(lm_dir))
    people = bio_people(corpus)
    ex = excluded_people(corpus, people, profile_n)
    return {"people": len(people), "excluded": ex["excluded"], "eval": ex["eval"], "dev": ex["dev"],
            "sizes": ex["sizes"], "drawn": heldout_size(people, ex["excluded"], needed), "needed": needed}


def heldout_rows(examples: list[dict], plan: dict) -> tuple[list[dict], dict]:
    """The examples of the held-out draw outside the excluded people (the first ``needed``) and the proof: overlaps."""
    import json

    def sid(e):
        return json.loads(e.get("meta") or "{}").get("source_id")

    kept = [e for e in examples if sid(e) not in plan["excluded"]][: plan["needed"]]
    ids = {sid(e) for e in kept}
    info = {"seed": HELDOUT_SEED, "drawn": len(examples), "used": len(kept), "people": plan["people"],
            "excluded_people": len(plan["excluded"]),
            "excluded_rule": f"every draw of seed {' or '.join(map(str, EXCLUDED_SEEDS))} of "
                             f"{plan['sizes'][0]}..{plan['sizes'][1]} people",
            "overlap_with_eval_draw": len(ids & plan["eval"]), "overlap_with_dev_draw": len(ids & plan["dev"]),
            "overlap_with_excluded": len(ids & plan["excluded"])}
    info["overlap"] = info["overlap_with_eval_draw"] + info["overlap_with_dev_draw"] + info["overlap_with_excluded"]
    if info["overlap"] or len(kept) < plan["needed"]:
        raise RuntimeError(f"held-out bio draw is not held out: {info}")
    return kept, info


def load_inputs(tasks, n_examples: int, quick: bool, key_store=True) -> dict:
    """Build (or reuse) the pipeline artifacts; per task: n_examples timed requests + one warm-up request, their
    references, each example's retrieval cost (PreRetrieve's search share + fetching its passages), and the key store
    built for the task's draw (``key_store``: True, False, or the tasks that need one). ``bio`` is the held-out draw
    (its own LoadTask seed and size)."""
    if quick:
        os.environ.setdefault("NEST_STORE", str(QUICK_STORE))

    if quick:
        config.apply_overrides(config.parse_set(["ConvertCorpus.limit=300"]))
    profile_n = int(config.config().get("LoadTask", "n_examples", "8"))
    needed = n_examples + 1
    default_sets = [f"LoadTask.n_examples={needed}"] if needed > profile_n or quick else []
    shared = {"lm": dag.PrepareLM(), "passages": dag.ConvertCorpus(), "tokens": dag.PreTokenize()}
    _log(f"building inputs through the pipeline (store {os.environ.get('NEST_STORE', 'artifacts')})")
    if build(list(shared.values()), profile=None, command=["bench", "decoding"], quiet=True):
        raise RuntimeError("the pipeline failed to build the benchmark's inputs (LM, corpus, tokens)")
    import pyarrow.parquet as pq  # lazy: start-up time


    reader, lookup = PassageReader(shared["passages"].artifact_dir), TokenLookup(shared["tokens"].artifact_dir)
    d = dag.decoding()
    nest_cfg = {**plain(d.config), **plain(d.method_config).get("nest", {})}
    task_cfg = {t: {**plain(d.config), **plain(d.task_config).get(t, {}),
                    **plain(d.method_config).get("nest", {})} for t in tasks}
    out = {"lm_dir": shared["lm"].artifact_dir, "tasks": {}, "nest_config": nest_cfg, "task_nest_config": task_cfg,
           "key_store": {}, "draws": {}}
    for t in tasks:
        sets, plan = list(default_sets), None
        if t == "bio":
            plan = heldout_plan(shared["passages"].artifact_dir, shared["lm"].artifact_dir, needed, profile_n)
            sets = [f"LoadTask.seed={HELDOUT_SEED}", f"LoadTask.n_examples={plan['drawn']}"]
        with config_overrides(sets):
            jobs = {"examples": dag.LoadTask(task=t), "retrievals": dag.PreRetrieve(task=t)}
            if build(list(jobs.values()), profile=None, command=["bench", "decoding", t], quiet=True):
                raise RuntimeError(f"the pipeline failed to build the benchmark's inputs for {t}")
            ex_dir, retr_dir = Path(jobs["examples"].artifact_dir), Path(jobs["retrievals"].artifact_dir)
            if key_store is True or (key_store and t in key_store):
                out["key_store"][t] = build_key_store(dag, t, task_cfg[t])
        examples = pq.read_table(ex_dir / "examples.parquet").to_pylist()
        if plan is not None:
            examples, out["draws"][t] = heldout_rows(examples, plan)
        else:
            out["draws"][t] = {"seed": int(config.config().get("LoadTask", "seed", "0")), "drawn": len(examples),
                               "used": min(len(examples), needed), "note": "the eval draw (the report's examples)"}
        retrievals, search = read_retrievals(retr_dir), read_search_seconds(retr_dir)
        rows = []
        for ex in examples[:needed]:
            t0 = time.perf_counter()
            req = build_requests([ex], retrievals, reader, lookup, n_passages=40)[0]
            fetch = time.perf_counter() - t0
            ref = " ".join(ex["references"]) if t == "bio" else ex["references"][0]
            rows.append({"request": req, "reference": ref,
                         "retrieval_s": search.get(int(ex["example_id"]), 0.0) + fetch})
        if len(rows) < 2:
            raise RuntimeError(f"task {t}: {len(rows)} examples; the bench needs at least 2 (one is the warm-up)")
        out["tasks"][t] = {"timed": rows[:-1], "warmup": rows[-1], "search_column": bool(search)}
    return out


def build_key_store(dag, task: str, cfg: dict | None = None) -> dict:
    """Build the passage-key store (EncodePassageKeys) of ``task``'s draw (the config overrides in force) BEFORE the
    timed run: ``{'dir', 'build_s', 'queries', 'share_s', 'scope'}`` or ``{'note'}``. ``queries``: the examples of the
    PreRetrieve it encoded (the store holds their passages); ``share_s`` = ``build_s`` ÷ ``queries``."""
    cls = getattr(dag, "EncodePassageKeys", None)
    if cls is None:
        return {"note": "no EncodePassageKeys stage in pipeline.dag: the nest_store rows are skipped"}
    try:
        make = getattr(dag, "passage_keys_task", None)
        job = None
        if make is not None and cfg:  # the store of the NEST row's own settings (b, layer, document end)
            job = make(task, "nest", cfg)
        if job is None:
            job = cls(scope="retrieved", task=task)
        t0 = time.perf_counter()
        code = build([job], profile=None, command=["bench", "decoding", "keys", task], quiet=True)
        wall = time.perf_counter() - t0
        if code:
            return {"note": f"EncodePassageKeys failed (exit {code}): the nest_store rows are skipped"}
        m = job.store.manifest(job.stage, job.key) or {}  # the artifact's own build time (maybe an earlier run's)
        build_s = float((m.get("timings") or {}).get("build_s", 0.0))
        scope = getattr(job, "scope", "retrieved")
        queries = None
        if scope == "retrieved":
            queries = len(read_retrievals(Path(job.inputs()["retrievals"].artifact_dir)))
        return {"dir": str(job.artifact_dir), "scope": scope, "build_s": round(build_s, 2), "queries": queries,
                "share_s": round(build_s / queries, 4) if queries else None,
                "build_wall_s_this_run": round(wall, 2)}
    except Exception as e:  # an API this bench does not know yet: say so, time the rest
        return {"note": f"key store not usable here ({type(e).__name__}: {e}): the nest_store rows are skipped"}


# --- one timed call per method ----------------------------------------------------------------------------------------

def _hf_tokens(out_ids, prompt_len: int, eos_ids: set[int]) -> list[int]:
    gen = out_ids[prompt_len:]
    for i, t in enumerate(gen):
        if t in eos_ids:
            return gen[:i]
    return gen


def new_key_cache(key_store_dir: str | None):
    """An empty key cache (the on-the-fly rows) or one that reads the prebuilt key store first."""

    if key_store_dir is None:
        return PassageKeyCache()

    return PassageKeyCache(store=PassageKeyStore.open(key_store_dir))


class Method:
    """One row of a setting: ``run(row) -> record`` (the timed call), ``reset()`` empties its key cache. ``min_new``
    > 0: every method writes at least that many tokens (NestConfig ``min_new_tokens``; HF generate's own
    ``min_new_tokens`` for prompt lookup)."""

    def __init__(self, name: str, model, tok, max_new: int, nest_cfg: dict, key_store_dir: str | None = None,
                 min_new: int = 0):
        self.name, self.model, self.tok, self.max_new, self.min_new = name, model, tok, max_new, int(min_new)
        self.key_store_dir = key_store_dir
        self.uses_passages = name != "base"
        self.dec = None
        self.pld_k = int(name[3:]) if name.startswith("pld") else None
        lengths = {"max_new_tokens": max_new, **({"min_new_tokens": self.min_new} if self.min_new else {})}
        if name == "base":
            self.dec = make_decoder("base", model, tok, NestConfig(**lengths))
        elif self.pld_k:
            self.ra = make_decoder("ra", model, tok, NestConfig(**lengths))
        else:
            cfg = {**nest_cfg, **lengths}
            if name == "nest_bf16":  # keys encoded under bf16 autocast (NestConfig.key_precision, docs/decoding.md)
                cfg["key_precision"] = "bf16"
            elif name.startswith("nest_b"):
                cfg["passages"] = int(name[len("nest_b"):])
            self.dec = make_decoder("nest", model, tok, NestConfig(**cfg), key_cache=new_key_cache(key_store_dir))

    def reset(self) -> None:
        if self.dec is not None and self.dec.method == "nest":
            self.dec.key_cache = new_key_cache(self.key_store_dir)

    def request(self, row: dict):
        """The example's request at the setting's lengths (every method the same)."""
        req = row["request"]
        changes = {"max_new_tokens": self.max_new}
        if self.min_new and "min_new_tokens" in {f.name for f in dataclasses.fields(req)}:
            changes["min_new_tokens"] = self.min_new
        return dataclasses.replace(req, **changes)

    def run(self, row: dict) -> dict:
        import torch  # lazy: start-up time

        req = self.request(row)
        t0 = time.perf_counter()
        if self.pld_k:
            ids = torch.tensor([self.ra.prompt_ids(req)])
            eos = self.ra.eos_ids
            extra = {"min_new_tokens": self.min_new} if self.min_new else {}
            with torch.inference_mode():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=self.max_new, prompt_lookup_num_tokens=self.pld_k,
                                          pad_token_id=self.tok.pad_token_id if self.tok.pad_token_id is not None
                                          else min(eos), **extra)[0].tolist()
            toks = _hf_tokens(out, ids.shape[1], eos)
            text, sources, counters, timings = self.tok.decode(toks, skip_special_tokens=True), None, {}, {}
        else:
            g = self.dec.decode([req])[0]
            toks, text, sources, counters, timings = g.token_ids, g.text, g.sources, g.counters, dict(g.timings)
        secs = time.perf_counter() - t0
        if self.uses_passages:  # the example's share of the retrieval and fetching its passages
            secs += row["retrieval_s"]
            timings["passage_search"] = timings.get("passage_search", 0.0) + row["retrieval_s"]
        return {"seconds": secs, "tokens": len(toks), "text": text, "sources": sources, "counters": counters,
                "timings": timings}


# --- aggregation ------------------------------------------------------------------------------------------------------



def summarise(records: list[dict], share_s: float | None = None) -> dict:
    """A method's row: pooled and median speed, quality, attribution, counters, components; ``share_s``: the key
    store's per-query build share, counted in ``*_with_share`` (the row's own figures stay without it)."""

    secs = sum(r["seconds"] for r in records)
    toks = sum(r["tokens"] for r in records)
    n = len(records)
    out = {"examples": n, "tokens": toks, "seconds": round(secs, 3),
           "tok_per_s": round(toks / secs, 3) if secs else 0.0,
           "tok_per_s_median": round(statistics.median(r["tokens"] / r["seconds"] for r in records), 3),
           "rouge1": round(statistics.mean(r["rouge1"] for r in records), 4),
           "per_example_tok_per_s": [round(r["tokens"] / r["seconds"], 3) for r in records],
           "per_example_tokens": [int(r["tokens"]) for r in records],
           "per_example_seconds": [round(r["seconds"], 4) for r in records],
           "s_per_query": round(secs / n, 3), "tokens_per_query": round(toks / n, 1)}
    if share_s is not None:
        out["store_share_s"] = share_s
        out["s_per_query_with_share"] = round(secs / n + share_s, 3)
        out["tok_per_s_with_share"] = round(toks / (secs + n * share_s), 3) if secs + n * share_s else 0.0
    with_src = [r for r in records if r["sources"] is not None]
    if with_src:
        # pooled over examples: Σ copied tokens / Σ tokens, Σ copied tokens / Σ copied runs (tasks.metrics)
        st = [attribution_stats(r["sources"]) for r in with_src]
        copied, n_tok, n_runs = (sum(x[k] for x in st) for k in ("copied_tokens", "tokens", "runs"))
        out["attribution_ratio"] = round(copied / n_tok, 4) if n_tok else 0.0
        out["attribution_length"] = round(copied / n_runs, 3) if n_runs else 0.0
    passes = sum(r["counters"].get("lm_forward_passes", 0) for r in records)
    if passes:
        out["passes_per_token"] = round(passes / max(toks, 1), 4)
    drafted = sum(r["counters"].get("drafted", 0) for r in records)
    if drafted:
        out["acceptance"] = round(sum(r["counters"].get("accepted", 0) for r in records) / drafted, 4)
    hits = sum(r["counters"].get("key_cache_hits", 0) for r in records)
    looked = hits + sum(r["counters"].get("key_cache_misses", 0) for r in records)
    if looked:
        out["key_hit_rate"] = round(hits / looked, 4)
    stops = {k: sum(r["counters"].get(f"stopped_by_{k}", 0) for r in records) for k in ("eos", "stop_rule", "length")}
    if any(stops.values()):
        out["stops"] = stops
    if any(r["timings"] for r in records):
        comp = {c: sum(r["timings"].get(c, 0.0) for r in records) / n for c in MEASURED_COMPONENTS}
        comp["other"] = max(secs / n - sum(comp.values()), 0.0)
        out["components_s_per_query"] = {k: round(v, 4) for k, v in comp.items()}
        lm = sum(r["timings"].get("lm_forward", 0.0) for r in records)
        if lm and any(r["counters"].get("knn_searches", 0) for r in records):
            out["knn_over_lm"] = round(sum(r["timings"].get("token_search", 0.0) for r in records) / lm, 4)
    return out


def ratio(row: dict, base: dict) -> tuple[float, float]:
    """(pooled ratio of tokens/s, median over examples of the per-example ratio) of ``row`` over ``base``."""
    pooled = row["tok_per_s"] / base["tok_per_s"] if base["tok_per_s"] else float("nan")
    med = statistics.median(a / b for a, b in zip(row["per_example_tok_per_s"], base["per_example_tok_per_s"]))
    return round(pooled, 3), round(med, 3)


def pooled_ratio_ci(tok_m, sec_m, tok_b, sec_b, resamples: int = BOOTSTRAP["resamples"],
                    seed: int = BOOTSTRAP["seed"], level: float = BOOTSTRAP["level"]) -> dict:
    """Paired bootstrap of the pooled speed ratio (Σ tok_m / Σ sec_m) ÷ (Σ tok_b / Σ sec_b) over examples: the
    resampling of :func:`tasks.metrics.paired_bootstrap` (``resamples`` draws of n examples with replacement from
    ``numpy.random.default_rng(seed)``, the method's and the base's values of an example drawn together; the interval
    is the (1−level)/2 and (1+level)/2 percentiles). ``{ratio, low, high, n}``."""
    import numpy as np  # lazy: start-up time

    n = len(tok_m)
    if n != len(sec_m) or n != len(tok_b) or n != len(sec_b):
        raise ValueError("pooled_ratio_ci needs paired values of the same examples")
    if n == 0:
        return {"ratio": None, "low": None, "high": None, "n": 0}
    tm, sm, tb, sb = (np.asarray(x, dtype=np.float64) for x in (tok_m, sec_m, tok_b, sec_b))
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // n)
    ratios = []
    for i in range(0, int(resamples), chunk):
        idx = rng.integers(0, n, size=(min(chunk, int(resamples) - i), n))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios.append((tm[idx].sum(1) / sm[idx].sum(1)) / (tb[idx].sum(1) / sb[idx].sum(1)))
    r = np.concatenate(ratios)
    low, high = np.nanpercentile(r, [50 * (1 - level), 50 * (1 + level)])
    point = (tm.sum() / sm.sum()) / (tb.sum() / sb.sum())
    return {"ratio": round(float(point), 3), "low": round(float(low), 3), "high": round(float(high), 3), "n": n}


def row_ci(row: dict, base: dict, with_share: bool = False) -> dict:
    """The 95% interval of ``row``'s pooled speed over ``base``'s; ``with_share``: the key store's per-query share
    added to each of the row's examples."""
    extra = row.get("store_share_s", 0.0) if with_share else 0.0
    return pooled_ratio_ci(row["per_example_tokens"], [s + extra for s in row["per_example_seconds"]],
                           base["per_example_tokens"], base["per_example_seconds"])


def add_intervals(table: dict) -> None:
    """Each row's ``ci_over_base`` (and ``ci_over_base_with_share`` for a key-store row) against the setting's base."""
    base = table.get("base")
    if not base:
        return
    for m, row in table.items():
        if m == "base":
            continue
        row["ci_over_base"] = row_ci(row, base)
        if "store_share_s" in row:
            row["ci_over_base_with_share"] = row_ci(row, base, with_share=True)


def check_targets(result: dict, max_new: int, long_new: int) -> list[dict]:
    """The targets, each goal judged on this run's pooled figures (None: not measured in this run)."""
    tables = result["settings"]
    out = []

    def add(figure, goal, value, ok, note=""):
        out.append({"figure": figure, "goal": goal, "measured": value, "pass": ok, "note": note})

    for name, task in ((f"completion_excluded@{max_new}", "completion_excluded"),
                       (f"{TASK_LABEL['bio']}@{max_new}", "bio")):
        t = tables.get(name, {})
        base, store = t.get("base"), t.get("nest_store")
        plds = [t[k] for k in ("pld10", "pld20") if k in t]
        if base and store:
            r = ratio(store, base)[0]
            quality = store["rouge1"] >= base["rouge1"]
            share = ""
            if "tok_per_s_with_share" in store:
                share = (f"; with the key store's per-query build share counted: "
                         f"{round(store['tok_per_s_with_share'] / base['tok_per_s'], 3)}×")
            add(f"NEST + key store ÷ base, pooled tok/s, {name}, quality ≥ base", f"≥ {GOALS['store_over_base']}×",
                r, r >= GOALS["store_over_base"] and quality,
                f"ROUGE-1 {store['rouge1']} vs base {base['rouge1']}; keys encoded for these queries by an earlier "
                f"stage{share}")
            if plds:
                best = max(plds, key=lambda p: p["tok_per_s"])
                r2 = round(store["tok_per_s"] / best["tok_per_s"], 3)
                add(f"NEST + key store ÷ best HF prompt lookup (10/20), {name}", f"≥ {GOALS['store_over_pld']}×", r2,
                    r2 >= GOALS["store_over_pld"], f"prompt lookup {best['tok_per_s']} tok/s")
        elif name in tables or not tables:
            note = (result.get("key_store", {}).get(task) or {}).get("note", "no key-store row")
            add(f"NEST + key store ÷ base, pooled tok/s, {name}, quality ≥ base", f"≥ {GOALS['store_over_base']}×",
                None, None, note)
            add(f"NEST + key store ÷ best HF prompt lookup (10/20), {name}", f"≥ {GOALS['store_over_pld']}×", None,
                None, note)
    otf = [(f"{TASK_LABEL['bio']}@{max_new}", GOALS["otf_over_base_96"])]
    otf += [(name, GOALS["otf_over_base_long"]) for name, info in result.get("setting_info", {}).items()
            if info.get("headline")]
    for name, goal in otf:
        t = tables.get(name, {})
        if "base" in t and "nest" in t:
            r = ratio(t["nest"], t["base"])[0]
            ci = t["nest"].get("ci_over_base") or {}
            add(f"NEST end to end on the fly ÷ base, every cost counted, {name}", f"≥ {goal}×", r, r >= goal,
                f"95% CI [{ci.get('low')}, {ci.get('high')}]; key hit rate {t['nest'].get('key_hit_rate')}")
    add("PQ keys against exact keys: PPL change; attribution change", "≤ 2%; ≤ 2 points", None, None,
        "measured by the key-store bench (docs/scale.md), not here")
    knn = [(f"{s}/{m}", row["knn_over_lm"]) for s, t in tables.items() for m, row in t.items() if "knn_over_lm" in row]
    if knn:
        worst = max(knn, key=lambda x: x[1])
        add("k-NN search + mixture ÷ LM forward (worst NEST row)", f"≤ {GOALS['knn_over_lm']}", worst[1],
            worst[1] <= GOALS["knn_over_lm"], worst[0])
    return out


def stream_hit_rate(n: int, quick: bool) -> dict:
    """The key-cache hit rate of a stream of ``n`` bio prompts over the corpus: each prompt's passages (by token-ids
    digest, as the cache keys them) already met by an earlier prompt, over all passages looked up. Exact for an
    unbounded cache; the in-memory LRU (2 GiB ≈ 10k passages) holds such a stream whole."""

    with config_overrides([f"LoadTask.n_examples={n}"]):  # a fresh PreRetrieve task: the timed draws' are cached
        job = dag.PreRetrieve(task="bio")
        if build([job, dag.PreTokenize()], profile=None, command=["bench", "decoding", "stream"], quiet=True):
            return {"note": "the stream's retrieval failed to build"}
        from stages.decoding.passage_keys import passage_digest  # lazy: start-up time (torch)

        retr = read_retrievals(Path(job.artifact_dir))
        lookup = TokenLookup(dag.PreTokenize().artifact_dir)
        seen: set[str] = set()
        hits = total = 0
        b = int(config.config().get("PreRetrieve", "b", "40"))
        for eid in sorted(retr):
            digests = {passage_digest(t) for t in lookup.get(retr[eid][:b])}
            hits += len(digests & seen)
            total += len(digests)
            seen |= digests
        search = read_search_seconds(Path(job.artifact_dir))
        return {"prompts": len(retr), "passages_looked_up": total, "distinct_passages": len(seen),
                "hit_rate": round(hits / total, 4) if total else None,
                "search_s_per_prompt": round(sum(search.values()) / len(search), 4) if search else None}


# --- report -----------------------------------------------------------------------------------------------------------

def _fmt(v) -> str:
    return "–" if v is None or v == "" else str(v)


def _ci(ci: dict | None) -> str:
    return "–" if not ci or ci.get("low") is None else f"{ci['ratio']} [{ci['low']}, {ci['high']}]"


def key_store_line(task: str, ks: dict, row: dict | None = None, base: dict | None = None) -> str:
    """One markdown line on a task's key store: what it is, its build seconds, its per-query share, and the key-store
    row's speed with that share counted beside the speed without."""
    if "note" in ks:
        return f"- {TASK_LABEL.get(task, task)}: {ks['note']}"
    if ks.get("scope") != "retrieved":
        what = f"keys of the whole corpus (scope {ks.get('scope')}), encoded once by an earlier stage for any query"
    else:
        what = (f"`retrieved` keys: encoded by an earlier stage (EncodePassageKeys) for these very queries, the "
                f"passages PreRetrieve returned for this draw's {ks['queries']} queries")
    line = f"- {TASK_LABEL.get(task, task)}: {what}; build {ks['build_s']} s"
    if ks.get("share_s") is not None:
        line += f", {ks['share_s']} s per query"
    if row and "tok_per_s_with_share" in row:
        line += (f"; nest_store {row['tok_per_s_with_share']} tok/s with that share counted, {row['tok_per_s']} "
                 f"without")
        if base:
            line += (f" ({_ci(row.get('ci_over_base_with_share'))} × base with it, {_ci(row.get('ci_over_base'))} "
                     f"without)")
    return line + "."


def headline_rows(result: dict) -> list[str]:
    """The headline table: NEST on the fly (and with the key store, its share counted) ÷ base, with intervals."""
    rows = []
    for name, info in result.get("setting_info", {}).items():
        t = result["settings"].get(name, {})
        if not info.get("headline") or "base" not in t or "nest" not in t:
            continue
        base, nest, store = t["base"], t["nest"], t.get("nest_store")
        rows.append("| " + " | ".join(_fmt(c) for c in (
            name, _ci(nest.get("ci_over_base")),
            _ci(store.get("ci_over_base_with_share")) if store else None,
            _ci(store.get("ci_over_base")) if store else None,
            base["s_per_query"], nest["s_per_query"], store.get("s_per_query_with_share") if store else None,
            base["tokens_per_query"], nest["tokens_per_query"], nest.get("key_hit_rate"), base["examples"])) + " |")
    if not rows:
        return []
    return ["| setting | NEST on the fly ÷ base [95% CI] | NEST + key store ÷ base, build share counted [95% CI] | "
            "NEST + key store ÷ base, share not counted [95% CI] | base s/query | NEST s/query | NEST + store "
            "s/query (share counted) | base tokens/query | NEST tokens/query | NEST key hit rate | examples |",
            "|---" * 11 + "|"] + rows


def markdown(result: dict) -> str:
    q = result.get("quiet") or {}
    busy = bool(q.get("busy"))
    title = "# Decoding benchmark"
    if result.get("refused"):
        title += ": REFUSED (machine busy, not headline figures)"
    elif busy:
        title += " (measured under load: not headline figures)"
    if result.get("quick"):
        title += " (quick: numbers not meaningful)"
    lines = [title, ""]
    if q.get("line"):
        lines += [q["line"], ""]
    if not result.get("settings"):
        return "\n".join(lines + [f"Nothing timed: {result.get('refused') or 'no setting ran'}."])
    th = result.get("threads_info") or {}
    lines += [f"{result['n_examples']} timed examples per setting (one more for the untimed warm-up), batch 1, greedy; "
              f"torch threads {result['threads']} of {th.get('cpus', '?')} CPUs (torch's default"
              + (f"; OMP_NUM_THREADS={th['omp_num_threads']}" if th.get("omp_num_threads") else "") + "). "
              "Every figure counts everything a query cost: its retrieval share, fetching passages, key encoding "
              "(on the fly), index building, search and decoding. Speed-ups are pooled (Σ tokens ÷ Σ seconds, same "
              "examples, same run) with a 95% paired bootstrap interval over examples in brackets; medians of the "
              "per-example ratios beside them.", "",
              f"NEST config (the profile's): `{result['nest_config']}`.", ""]
    ho = (result.get("draws") or {}).get("bio")
    if ho and "overlap" in ho:
        lines += [f"Bio people: a held-out draw (LoadTask seed {ho['seed']}, {ho['drawn']} drawn, the first "
                  f"{ho['used']} outside the {ho['excluded_people']} people of {ho['excluded_rule']}): overlap with "
                  f"the eval draw {ho['overlap_with_eval_draw']}, with the dev draw {ho['overlap_with_dev_draw']}, "
                  f"with any excluded draw {ho['overlap_with_excluded']}.", ""]
    for note in result.get("notes", []):
        lines += [f"Note: {note}", ""]
    head = headline_rows(result)
    if head:
        lines += ["## Headline: NEST ÷ base LM", ""] + head + [""]
    lines += ["## Key stores (the nest_store rows)", ""]
    for task, ks in (result.get("key_store") or {}).items():
        first = next(((name, t) for name, t in result["settings"].items()
                      if result.get("setting_info", {}).get(name, {}).get("task") == task and t.get("nest_store")),
                     (None, {}))
        lines.append(key_store_line(task, ks, first[1].get("nest_store"), first[1].get("base"))
                     + (f" (speeds from {first[0]})" if first[0] else ""))
    lines.append("")
    cols = ("tok/s (pooled)", "× base (pooled) [95% CI]", "tok/s (median)", "× base (median)", "s/query",
            "tokens/query", "ROUGE-1", "attr. ratio", "attr. length", "passes/tok", "accept", "key hit rate", "kNN/LM",
            "tok/s with store share", "× base with store share [95% CI]")
    for name, table in result["settings"].items():
        info = result.get("setting_info", {}).get(name, {})
        lines += [f"## {name}", ""]
        if info.get("label"):
            lines += [f"What it is: {info['label']}.", ""]
        lines += ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        base = table.get("base")
        for m, row in table.items():
            r = ratio(row, base) if base else (None, None)
            pooled = _ci(row.get("ci_over_base")) if m != "base" else r[0]
            cells = [row["tok_per_s"], pooled, row["tok_per_s_median"], r[1], row["s_per_query"],
                     row.get("tokens_per_query"), row["rouge1"], row.get("attribution_ratio"),
                     row.get("attribution_length"), row.get("passes_per_token"), row.get("acceptance"),
                     row.get("key_hit_rate"), row.get("knn_over_lm"), row.get("tok_per_s_with_share"),
                     _ci(row.get("ci_over_base_with_share")) if "store_share_s" in row else None]
            lines.append(f"| {m} | " + " | ".join(_fmt(c) for c in cells) + " |")
        comp_rows = [(m, row["components_s_per_query"]) for m, row in table.items() if "components_s_per_query" in row]
        if comp_rows:
            keys = list(comp_rows[0][1])
            lines += ["", "Seconds per query by component:", "", "| method | " + " | ".join(keys) + " |",
                      "|---" * (len(keys) + 1) + "|"]
            lines += [f"| {m} | " + " | ".join(_fmt(c[k]) for k in keys) + " |" for m, c in comp_rows]
        stops = [(m, row["stops"]) for m, row in table.items() if "stops" in row]
        if stops:
            lines += ["", "Stopped by (examples): " + "; ".join(
                f"{m} " + ", ".join(f"{k} {v}" for k, v in s.items()) for m, s in stops) + "."]
        lines.append("")
    lines += ["## Targets, judged on this run", "", "| figure | goal | measured | pass | note |",
              "|---|---|---|---|---|"]
    for t in result["targets"]:
        verdict = "not measured" if t["pass"] is None else ("pass" if t["pass"] else "FAIL")
        lines.append(f"| {t['figure']} | {t['goal']} | {_fmt(t['measured'])} | {verdict} | {t['note']} |")
    st = result.get("stream")
    if st:
        lines += ["", "## Key reuse on a stream of bio prompts", ""]
        lines.append(st.get("note") or (
            f"{st['prompts']} bio prompts over the corpus: {st['passages_looked_up']} passages looked up, "
            f"{st['distinct_passages']} distinct: a key cache that keeps the stream's keys hits "
            f"{st['hit_rate']:.1%} of them (retrieval {st['search_s_per_prompt']} s per prompt)."))
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------------------------------

def _refused_result(quick: bool, verdict: dict, before: dict, after: dict | None, threads: int) -> dict:
    res = {"quick": quick, "refused": verdict["refused"], "threads": threads, "load_before": before,
           "load_after": after, "quiet": {**verdict, "line": quiet.describe(verdict, before, after)}, "settings": {}}
    res["markdown"] = markdown(res)
    return res


def main(argv: list[str] | None = None, quick: bool = False) -> dict:
    monitor = quiet.LoadMonitor()  # this process's own CPU from here on: subtracted from the load average
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--examples", type=int, default=None,
                    help="timed examples per setting (default NEST_BENCH_EXAMPLES or 12; quick 2)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 96; quick 16")
    ap.add_argument("--long-new-tokens", type=int, default=None,
                    help="the headline settings' max new tokens; default 256; quick 32")
    ap.add_argument("--min-new-tokens", type=int, default=None,
                    help="the equal-work headline setting's min new tokens, every method (default: = "
                         "--long-new-tokens, min = max; 0 leaves the equal-work setting out)")
    ap.add_argument("--stream", type=int, default=None,
                    help="bio prompts of the key-reuse stream (default NEST_BENCH_STREAM or 200; quick 0; 0 = skip)")
    ap.add_argument("--only", nargs="+", default=None, metavar="TASK",
                    help="time only the settings of these tasks (completion_excluded, bio, completion)")
    args = ap.parse_args(argv or [])
    quick = quick or args.quick
    n_examples = args.examples or (2 if quick else int(os.environ.get("NEST_BENCH_EXAMPLES", "12")))
    max_new = args.max_new_tokens or (16 if quick else 96)
    long_new = args.long_new_tokens or (32 if quick else 256)
    min_new = long_new if args.min_new_tokens is None else args.min_new_tokens
    n_stream = args.stream if args.stream is not None else (0 if quick else int(os.environ.get("NEST_BENCH_STREAM",
                                                                                                "200")))
    for var, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(var, value)
    import torch  # lazy: start-up time

    default_threads = torch.get_num_threads()  # torch's default, before the pipeline may apply a thread budget
    start = monitor.sample("at the start")
    verdict = quiet.judge(start)
    if verdict["refused"]:  # busy already: refuse before building or timing anything (bench/run.py says why)
        return _refused_result(quick, verdict, start, None, default_threads)

    from rouge_score import rouge_scorer


    only = args.only
    notes = []
    plan = [s for s in settings(max_new, long_new, min_new, quick) if not only or s["task"] in only]
    if min_new <= 0:
        plan = [s for s in plan if s.get("headline") != "equal"]
    elif not min_new_supported():
        notes.append("NestConfig has no min_new_tokens in this build: the equal-work setting is left out")
        plan = [s for s in plan if s.get("headline") != "equal"]
    tasks = sorted({s["task"] for s in plan})
    inputs = load_inputs(tasks, n_examples, quick, key_store={s["task"] for s in plan if "nest_store" in s["methods"]})
    model, tok = load_lm(inputs["lm_dir"])
    stores = inputs["key_store"]
    methods: dict[str, dict[str, Method]] = {}
    for s in plan:
        names = [m for m in s["methods"] if m != "nest_store" or "dir" in stores.get(s["task"], {})]
        methods[s["name"]] = {m: Method(m, model, tok, s["max_new"],
                                        inputs.get("task_nest_config", {}).get(s["task"], inputs["nest_config"]),
                                        stores[s["task"]]["dir"] if m == "nest_store" else None, s["min_new"])
                              for m in names}
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    if torch.get_num_threads() != default_threads:  # a thread budget applied while building: torch's default again
        torch.set_num_threads(default_threads)
    _log("warm-up: one untimed call of every method on an example outside the timed ones")
    for s in plan:
        for m in methods[s["name"]].values():
            m.run(inputs["tasks"][s["task"]]["warmup"])
            m.reset()  # the timed stream starts with an empty key cache
            monitor.mark()
    before = monitor.sample("before the timed part")
    verdict = quiet.judge(before)
    if verdict["refused"]:
        return _refused_result(quick, verdict, before, None, torch.get_num_threads())
    records = {s["name"]: {m: [] for m in methods[s["name"]]} for s in plan}
    step = 0
    for i in range(n_examples):
        for s in plan:
            row = inputs["tasks"][s["task"]]["timed"][i]
            names = list(methods[s["name"]])
            order = names[step % len(names):] + names[:step % len(names)]
            step += 1
            for m in order:
                rec = methods[s["name"]][m].run(row)
                rec["rouge1"] = scorer.score(row["reference"], rec.pop("text"))["rouge1"].fmeasure
                records[s["name"]][m].append(rec)
                monitor.mark()
        _log(f"example {i + 1}/{n_examples} done in every setting")
    after = monitor.sample("after the timed part")
    verdict = quiet.judge(before, after)
    tables = {}
    for s in plan:
        share = (stores.get(s["task"]) or {}).get("share_s")
        tables[s["name"]] = {m: summarise(recs, share if m == "nest_store" else None)
                             for m, recs in records[s["name"]].items()}
        add_intervals(tables[s["name"]])
    result = {"quick": quick, "n_examples": n_examples, "max_new_tokens": max_new, "long_new_tokens": long_new,
              "min_new_tokens": min_new, "threads": torch.get_num_threads(),
              "threads_info": {"torch_default": default_threads, "cpus": os.cpu_count(),
                               "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
              "refused": verdict["refused"], "quiet": {**verdict, "line": quiet.describe(verdict, before, after)},
              "load_before": before, "load_after": after, "notes": notes,
              "nest_config": inputs["nest_config"], "draws": inputs["draws"],
              "key_store": {t: {k: v for k, v in ks.items() if k != "dir"} for t, ks in stores.items()},
              "search_column": {t: v["search_column"] for t, v in inputs["tasks"].items()},
              "setting_info": {s["name"]: {k: s.get(k) for k in ("task", "max_new", "min_new", "headline", "label")}
                               for s in plan},
              "settings": tables}
    result["targets"] = check_targets(result, max_new, long_new)
    if n_stream and "bio" in tasks:
        _log(f"key reuse on a stream of {n_stream} bio prompts (retrieval only)")
        result["stream"] = stream_hit_rate(n_stream, quick)
    result["markdown"] = markdown(result)
    return result


if __name__ == "__main__":
    import json

    res = main(sys.argv[1:])
    print(res.pop("markdown"))
    print(json.dumps(res.get("targets"), indent=1))
    sys.exit(1 if res.get("refused") else 0)
