"""Decoding benchmark (issue 7 §1, §3, §5): NEST's speed counted end to end, against the base LM and HF prompt lookup.

    python -m bench.run decoding                 # the default size (NEST_BENCH_EXAMPLES=4 per setting, ≤ 15 min on 2 cores)
    NEST_BENCH_EXAMPLES=12 python -m bench.run decoding      # larger
    python -m bench.run --quick decoding         # 2 examples, 16 new tokens, 300-article corpus (no people in it: no
                                                 # bio settings): checks the bench

Inputs come through the pipeline (PrepareLM, ConvertCorpus, PreTokenize, LoadTask, PreRetrieve) with the profile's
settings, and NEST runs with the profile's decoding config (luigi.cfg ``[decoding]``, tuned in docs/tuning.md).

**What a query costs** (every timed figure): the wall time of the method from the example's retrieved passages to its
last token, plus, for every method that reads passages, the example's share of the retrieval (the ``search_s`` column
of PreRetrieve: a batch's search time divided among its examples) and fetching its passages' token ids and text. So
NEST on the fly pays its passage-key encoding; nothing is prefetched for a timed query. Each NEST row is one stream with
its own key cache that starts empty after the warm-up (an untimed example outside the timed ones): only earlier queries
of the same row warm it, and its hit rate is shown. The key-store row reads keys from an EncodePassageKeys artifact
built **before** the timed run (its build time is reported apart); that row is skipped with a note when the key store
is not in this build.

**Settings** (one process; per example the methods run interleaved, the start of their order rotating):
- ``completion_excluded`` at 96 new tokens (the source article's passages are excluded from retrieval);
- ``bio`` at 96 and at 256 new tokens (the b = 10/20/40 passages trade-off, paper Fig. 4, at 96);
- ``completion`` at 96, the **upper bound**: the source article is in the datastore, so NEST copies the answer.

Methods: ``base`` (our greedy loop, plain prompt), ``pld10``/``pld20`` (HF ``generate(prompt_lookup_num_tokens=k)``
with the same top passages in its prompt as RA), ``nest`` (on the fly, the profile's b), ``nest_b20``/``nest_b40``, ``nest_store``. NEST on a task uses the profile's
decoding config with that task's ``[decoding] task_config`` (the bios end with their article).

Speed-ups are **pooled** (Σ tokens / Σ seconds of the method ÷ the same for the base LM, on the same examples of the
same run); medians of the per-example ratios stand beside them. The targets table (issue 7 §5) is computed from the
measured numbers. A "stream" section gives the key-cache hit rate a stream of NEST_BENCH_STREAM (200) bio prompts would
get over the embedded corpus (exact: the passages each prompt retrieves that an earlier prompt already retrieved).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICK_STORE = Path.home() / ".cache" / "nest" / "bench-decoding-quick-store"
UPPER_BOUND = "completion"
GOALS = {"store_over_base": 3.0, "store_over_pld": 1.2, "otf_over_base_96": 1.0, "otf_over_base_long": 1.5,
         "knn_over_lm": 0.10}


def _log(msg: str) -> None:
    print(f"[bench decoding] {msg}", file=sys.stderr, flush=True)


def settings(max_new: int, long_new: int) -> list[dict]:
    """The timed settings: (name, task, new tokens, methods)."""
    return [
        {"name": f"completion_excluded@{max_new}", "task": "completion_excluded", "max_new": max_new,
         "methods": ["base", "pld10", "pld20", "nest", "nest_store"]},
        {"name": f"bio@{max_new}", "task": "bio", "max_new": max_new,
         "methods": ["base", "pld10", "pld20", "nest", "nest_b20", "nest_b40", "nest_store"]},
        {"name": f"bio@{long_new}", "task": "bio", "max_new": long_new, "methods": ["base", "nest"]},
        {"name": f"completion@{max_new} (upper bound)", "task": UPPER_BOUND, "max_new": max_new,
         "methods": ["base", "nest"]},
    ]


# --- inputs -----------------------------------------------------------------------------------------------------------

def load_inputs(tasks, n_examples: int, quick: bool) -> dict:
    """Build (or reuse) the pipeline artifacts; per task: n_examples timed requests + one warm-up request, their
    references, and each example's retrieval cost (PreRetrieve's search share + fetching its passages)."""
    if quick:
        os.environ.setdefault("NEST_STORE", str(QUICK_STORE))
    from pipeline import cli, config, dag

    overrides = ["ConvertCorpus.limit=300"] if quick else []
    profile_n = int(config.config().get("LoadTask", "n_examples", "8"))
    if n_examples + 1 > profile_n or quick:
        overrides.append(f"LoadTask.n_examples={n_examples + 1}")
    if overrides:
        config.apply_overrides(config.parse_set(overrides))
    roots = {"lm": dag.PrepareLM(), "passages": dag.ConvertCorpus(), "tokens": dag.PreTokenize()}
    for t in tasks:
        roots[f"examples/{t}"] = dag.LoadTask(task=t)
        roots[f"retrievals/{t}"] = dag.PreRetrieve(task=t)
    _log(f"building inputs through the pipeline (store {os.environ.get('NEST_STORE', 'artifacts')})")
    code = cli.build(list(roots.values()), profile=None, command=["bench", "decoding"], quiet=True)
    if code:
        raise RuntimeError(f"the pipeline failed to build the benchmark's inputs (exit {code})")
    import pyarrow.parquet as pq

    from stages.evaluation.generate import build_requests, read_retrievals, read_search_seconds
    from stages.corpus.passages import PassageReader
    from stages.lm.pretokenize import TokenLookup

    reader, lookup = PassageReader(roots["passages"].artifact_dir), TokenLookup(roots["tokens"].artifact_dir)
    d = dag.decoding()
    nest_cfg = {**dag._plain(d.config), **dag._plain(d.method_config).get("nest", {})}
    task_cfg = {t: {**dag._plain(d.config), **dag._plain(d.task_config).get(t, {}),
                    **dag._plain(d.method_config).get("nest", {})} for t in tasks}
    out = {"lm_dir": roots["lm"].artifact_dir, "tasks": {}, "nest_config": nest_cfg, "task_nest_config": task_cfg,
           "key_store": build_key_store(cli, dag, tasks, task_cfg)}
    for t in tasks:
        examples = pq.read_table(Path(roots[f"examples/{t}"].artifact_dir) / "examples.parquet").to_pylist()
        retr_dir = Path(roots[f"retrievals/{t}"].artifact_dir)
        retrievals, search = read_retrievals(retr_dir), read_search_seconds(retr_dir)
        rows = []
        for ex in examples[: n_examples + 1]:
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


def build_key_store(cli, dag, tasks, task_cfg: dict | None = None) -> dict:
    """Build the passage-key store (EncodePassageKeys) BEFORE the timed run; {'dir', 'build_s'} or {'note'}."""
    try:
        from stages.decoding.key_store import PassageKeyStore  # noqa: F401  (present after the key-store merge)
    except ImportError:
        return {"note": "key store absent in this build (stages.decoding.key_store): the nest_store rows are skipped"}
    cls = getattr(dag, "EncodePassageKeys", None)
    if cls is None:
        return {"note": "no EncodePassageKeys stage in pipeline.dag: the nest_store rows are skipped"}
    try:
        names = set(cls.get_param_names())
        make = getattr(dag, "passage_keys_task", None)
        if make is not None and task_cfg:  # the store of the NEST row's own settings (b, layer, document end)
            jobs = [make(t, "nest", task_cfg[t]) for t in tasks]
        else:
            jobs = [cls(task=t) for t in tasks] if "task" in names else [cls()]
        t0 = time.perf_counter()
        code = cli.build(jobs, profile=None, command=["bench", "decoding", "keys"], quiet=True)
        wall = time.perf_counter() - t0
        if code:
            return {"note": f"EncodePassageKeys failed (exit {code}): the nest_store rows are skipped"}
        build_s = 0.0
        for job in jobs:  # the artifact's own build time (it may have been built by an earlier run)
            m = job.store.manifest(job.stage, job.key) or {}
            build_s += float((m.get("timings") or {}).get("build_s", 0.0))
        return {"dirs": {t: str((jobs[i] if len(jobs) > 1 else jobs[0]).artifact_dir) for i, t in enumerate(tasks)},
                "build_s": round(build_s, 2), "build_wall_s_this_run": round(wall, 2)}
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
    from stages.decoding import PassageKeyCache

    if key_store_dir is None:
        return PassageKeyCache()
    from stages.decoding.key_store import PassageKeyStore

    return PassageKeyCache(store=PassageKeyStore.open(key_store_dir))


class Method:
    """One row of a setting: ``run(row) -> record`` (the timed call), ``reset()`` empties its key cache."""

    def __init__(self, name: str, model, tok, max_new: int, nest_cfg: dict, key_store_dir: str | None = None):
        from stages.decoding import NestConfig, make_decoder

        self.name, self.model, self.tok, self.max_new = name, model, tok, max_new
        self.key_store_dir = key_store_dir
        self.uses_passages = name != "base"
        self.dec = None
        self.pld_k = int(name[3:]) if name.startswith("pld") else None
        if name == "base":
            self.dec = make_decoder("base", model, tok, NestConfig(max_new_tokens=max_new))
        elif self.pld_k:
            self.ra = make_decoder("ra", model, tok, NestConfig(max_new_tokens=max_new))
        else:
            cfg = {**nest_cfg, "max_new_tokens": max_new}
            if name.startswith("nest_b"):
                cfg["passages"] = int(name[len("nest_b"):])
            self.dec = make_decoder("nest", model, tok, NestConfig(**cfg), key_cache=new_key_cache(key_store_dir))

    def reset(self) -> None:
        if self.dec is not None and self.dec.method == "nest":
            self.dec.key_cache = new_key_cache(self.key_store_dir)

    def run(self, row: dict) -> dict:
        import torch

        import dataclasses

        req = dataclasses.replace(row["request"], max_new_tokens=self.max_new)  # the setting's length, every method
        t0 = time.perf_counter()
        if self.pld_k:
            ids = torch.tensor([self.ra.prompt_ids(req)])
            eos = self.ra.eos_ids
            with torch.inference_mode():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=self.max_new, prompt_lookup_num_tokens=self.pld_k,
                                          pad_token_id=self.tok.pad_token_id if self.tok.pad_token_id is not None
                                          else min(eos))[0].tolist()
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

COMPONENTS = ("lm_forward", "passage_search", "passage_encoding", "token_index_build", "token_search", "verification")


def summarise(records: list[dict]) -> dict:
    from tasks.metrics import attribution_stats

    secs = sum(r["seconds"] for r in records)
    toks = sum(r["tokens"] for r in records)
    n = len(records)
    out = {"examples": n, "tokens": toks, "seconds": round(secs, 3),
           "tok_per_s": round(toks / secs, 3) if secs else 0.0,
           "tok_per_s_median": round(statistics.median(r["tokens"] / r["seconds"] for r in records), 3),
           "rouge1": round(statistics.mean(r["rouge1"] for r in records), 4),
           "per_example_tok_per_s": [round(r["tokens"] / r["seconds"], 3) for r in records],
           "s_per_query": round(secs / n, 3)}
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
    if any(r["timings"] for r in records):
        comp = {c: sum(r["timings"].get(c, 0.0) for r in records) / n for c in COMPONENTS}
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


def check_targets(result: dict, max_new: int, long_new: int) -> list[dict]:
    """Issue 7 §5, each goal judged on this run's pooled figures (None: not measured in this run)."""
    tables = result["settings"]
    out = []

    def add(figure, goal, value, ok, note=""):
        out.append({"figure": figure, "goal": goal, "measured": value, "pass": ok, "note": note})

    for name in (f"completion_excluded@{max_new}", f"bio@{max_new}"):
        t = tables.get(name, {})
        base, store = t.get("base"), t.get("nest_store")
        plds = [t[k] for k in ("pld10", "pld20") if k in t]
        if base and store:
            r = ratio(store, base)[0]
            quality = store["rouge1"] >= base["rouge1"]
            add(f"NEST + key store ÷ base, pooled tok/s, {name}, quality ≥ base", f"≥ {GOALS['store_over_base']}×",
                r, r >= GOALS["store_over_base"] and quality,
                f"ROUGE-1 {store['rouge1']} vs base {base['rouge1']}")
            if plds:
                best = max(plds, key=lambda p: p["tok_per_s"])
                r2 = round(store["tok_per_s"] / best["tok_per_s"], 3)
                add(f"NEST + key store ÷ best HF prompt lookup (10/20), {name}", f"≥ {GOALS['store_over_pld']}×", r2,
                    r2 >= GOALS["store_over_pld"], f"prompt lookup {best['tok_per_s']} tok/s")
        else:
            note = result["key_store"].get("note", "no key-store row")
            add(f"NEST + key store ÷ base, pooled tok/s, {name}, quality ≥ base", f"≥ {GOALS['store_over_base']}×",
                None, None, note)
            add(f"NEST + key store ÷ best HF prompt lookup (10/20), {name}", f"≥ {GOALS['store_over_pld']}×", None,
                None, note)
    for name, goal in ((f"bio@{max_new}", GOALS["otf_over_base_96"]), (f"bio@{long_new}", GOALS["otf_over_base_long"])):
        t = tables.get(name, {})
        if "base" in t and "nest" in t:
            r = ratio(t["nest"], t["base"])[0]
            add(f"NEST end to end on the fly ÷ base, every cost counted, {name}", f"≥ {goal}×", r, r >= goal,
                f"key hit rate {t['nest'].get('key_hit_rate')}")
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
    from pipeline import cli, config, dag

    before = config.config().get("LoadTask", "n_examples", None)
    config.apply_overrides(config.parse_set([f"LoadTask.n_examples={n}"]))
    try:
        job = dag.PreRetrieve(task="bio")
        if cli.build([job, dag.PreTokenize()], profile=None, command=["bench", "decoding", "stream"], quiet=True):
            return {"note": "the stream's retrieval failed to build"}
        from stages.decoding.passage_keys import passage_digest
        from stages.evaluation.generate import read_retrievals, read_search_seconds
        from stages.lm.pretokenize import TokenLookup

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
    finally:  # the timed settings' example count again (for a later benchmark of the same process)
        if before is None:
            config.config().remove_option("LoadTask", "n_examples")
        else:
            config.apply_overrides(config.parse_set([f"LoadTask.n_examples={before}"]))


# --- report -----------------------------------------------------------------------------------------------------------

def _fmt(v) -> str:
    return "–" if v is None or v == "" else str(v)


def markdown(result: dict) -> str:
    lines = [f"# Decoding benchmark{' (quick: numbers not meaningful)' if result['quick'] else ''}", "",
             f"{result['n_examples']} timed examples per setting (one more for the untimed warm-up), batch 1, greedy; "
             f"torch threads {result['threads']}; load average {result['load_before']} → {result['load_after']}. "
             "Every figure counts everything a query cost: its retrieval share, fetching passages, key encoding "
             "(on the fly), index building and decoding. Speed-ups are pooled (Σ tokens ÷ Σ seconds, same examples, "
             "same run); medians of the per-example ratios beside them.", "",
             f"NEST config (the profile's): `{result['nest_config']}`.", ""]
    ks = result["key_store"]
    lines.append(f"Key store: {ks['note']}" if "note" in ks else
                 f"Key store built before the timed run: build time {ks['build_s']} s (not in any query's time).")
    lines.append("")
    cols = ("tok/s (pooled)", "× base (pooled)", "tok/s (median)", "× base (median)", "s/query", "ROUGE-1",
            "attr. ratio", "attr. length", "passes/tok", "accept", "key hit rate", "kNN/LM")
    for name, table in result["settings"].items():
        lines += [f"## {name}", "", "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        base = table.get("base")
        for m, row in table.items():
            r = ratio(row, base) if base else (None, None)
            cells = [row["tok_per_s"], r[0], row["tok_per_s_median"], r[1], row["s_per_query"], row["rouge1"],
                     row.get("attribution_ratio"), row.get("attribution_length"), row.get("passes_per_token"),
                     row.get("acceptance"), row.get("key_hit_rate"), row.get("knn_over_lm")]
            lines.append(f"| {m} | " + " | ".join(_fmt(c) for c in cells) + " |")
        comp_rows = [(m, row["components_s_per_query"]) for m, row in table.items() if "components_s_per_query" in row]
        if comp_rows:
            keys = list(comp_rows[0][1])
            lines += ["", "Seconds per query by component:", "", "| method | " + " | ".join(keys) + " |",
                      "|---" * (len(keys) + 1) + "|"]
            lines += [f"| {m} | " + " | ".join(_fmt(c[k]) for k in keys) + " |" for m, c in comp_rows]
        lines.append("")
    lines += ["## Targets (issue 7 §5), judged on this run", "", "| figure | goal | measured | pass | note |",
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

def main(argv: list[str] | None = None, quick: bool = False) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--examples", type=int, default=None,
                    help="timed examples per setting (default NEST_BENCH_EXAMPLES or 4; quick 2)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 96; quick 16")
    ap.add_argument("--long-new-tokens", type=int, default=None, help="the long bio setting; default 256; quick 32")
    ap.add_argument("--stream", type=int, default=None,
                    help="bio prompts of the key-reuse stream (default NEST_BENCH_STREAM or 200; quick 0; 0 = skip)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--only", nargs="+", default=None, metavar="TASK",
                    help="time only the settings of these tasks (completion_excluded, bio, completion)")
    args = ap.parse_args(argv or [])
    quick = quick or args.quick
    n_examples = args.examples or (2 if quick else int(os.environ.get("NEST_BENCH_EXAMPLES", "4")))
    max_new = args.max_new_tokens or (16 if quick else 96)
    long_new = args.long_new_tokens or (32 if quick else 256)
    n_stream = args.stream if args.stream is not None else (0 if quick else int(os.environ.get("NEST_BENCH_STREAM",
                                                                                                "200")))
    for var, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(var, value)
    import torch
    from rouge_score import rouge_scorer

    from stages.lm.load import load_lm

    if args.threads:
        torch.set_num_threads(args.threads)
    only = args.only or (["completion_excluded", "completion"] if quick else None)  # the quick corpus has no people
    plan = [s for s in settings(max_new, long_new) if not only or s["task"] in only]
    tasks = sorted({s["task"] for s in plan})
    inputs = load_inputs(tasks, n_examples, quick)
    model, tok = load_lm(inputs["lm_dir"])
    store_dirs = inputs["key_store"].get("dirs")
    methods: dict[str, dict[str, Method]] = {}
    for s in plan:
        names = [m for m in s["methods"] if m != "nest_store" or store_dirs]
        methods[s["name"]] = {m: Method(m, model, tok, s["max_new"],
                                        inputs.get("task_nest_config", {}).get(s["task"], inputs["nest_config"]),
                                        store_dirs.get(s["task"]) if m == "nest_store" else None) for m in names}
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    _log("warm-up: one untimed call of every method on an example outside the timed ones")
    for s in plan:
        for m in methods[s["name"]].values():
            m.run(inputs["tasks"][s["task"]]["warmup"])
            m.reset()  # the timed stream starts with an empty key cache
    load_before = [round(x, 2) for x in os.getloadavg()]
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
        _log(f"example {i + 1}/{n_examples} done in every setting")
    result = {"quick": quick, "n_examples": n_examples, "max_new_tokens": max_new, "long_new_tokens": long_new,
              "threads": torch.get_num_threads(), "nest_config": inputs["nest_config"],
              "key_store": {k: v for k, v in inputs["key_store"].items() if k != "dirs"},
              "search_column": {t: v["search_column"] for t, v in inputs["tasks"].items()},
              "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
              "settings": {s["name"]: {m: summarise(recs) for m, recs in records[s["name"]].items()} for s in plan}}
    result["targets"] = check_targets(result, max_new, long_new)
    if n_stream:
        _log(f"key reuse on a stream of {n_stream} bio prompts (retrieval only)")
        result["stream"] = stream_hit_rate(n_stream, quick)
    result["markdown"] = markdown(result)
    return result


if __name__ == "__main__":
    import json

    res = main(sys.argv[1:])
    print(res.pop("markdown"))
    print(json.dumps(res["targets"], indent=1))
