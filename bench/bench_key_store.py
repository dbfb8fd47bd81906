"""Key-store benchmark: what fp16 and product-quantized (PQ) passage keys cost against exact fp32 keys.

    python -m bench.run key_store                       # the profile's corpus, 4 + 4 examples
    python -m bench.run --quick key_store               # 300-article corpus, 2 + 2 examples, 16 tokens: a smoke test
    python -m bench.bench_key_store --examples 3 --corpus-limit 3000    # a small run (a few minutes on 2 cores)

Inputs come through the pipeline (PrepareLM, ConvertCorpus, PreTokenize, LoadTask, PreRetrieve) for the tasks
``completion_excluded`` (the source article is not in the datastore) and ``bio``, and so do the key stores:
``EncodePassageKeys(task, scope=retrieved)`` with ``compression`` fp16 and pq (each example's first b passages).
Their build time (the stage's own wall time: LM encoding, PQ training, writing) gives seconds per 1k passages;
their files give bytes per key.

Then, on the same examples, with the real LM and the profile's NEST config (``[decoding] config``):

- ``exact``: keys encoded on the fly in fp32 (the paper's path, no store);
- ``fp16`` and ``pq``: keys read from the store (``PassageKeyCache(store=...)``; a miss would be encoded, and is counted).

Per setting: NEST's and kNN-LM's perplexity of the completion_excluded references in evaluation mode
(:func:`stages.evaluation.perplexity.target_nll`, pooled over tokens), NEST's generations (greedy) with their ROUGE-1 F against the
reference and their attribution ratio (share of generated tokens with a source), the share of generations identical to
the exact ones, and the relative squared error of the stored keys. Goals: PQ's PPL change ≤ 2%,
attribution change ≤ 2 points.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

TASKS = ("completion_excluded", "bio")
SETTINGS = ("exact", "fp16", "pq")
QUICK_STORE = Path.home() / ".cache" / "nest" / "bench-key-store-quick-store"


def _log(msg: str) -> None:
    print(f"[bench key_store] {msg}", file=sys.stderr, flush=True)


def build_inputs(n_examples: int, corpus_limit: int, quick: bool, sets: list[str] | None = None,
                 tasks=TASKS) -> dict:
    """Build (or reuse) the inputs and both key stores through the pipeline; return folders, requests and stats."""
    if quick:
        os.environ.setdefault("NEST_STORE", str(QUICK_STORE))
    from pipeline import cli, config, dag

    extra_sets, sets = sets, [f"LoadTask.n_examples={n_examples}"]
    if corpus_limit:
        sets.append(f"ConvertCorpus.limit={corpus_limit}")
    sets += list(extra_sets or [])
    config.apply_overrides(config.parse_set(sets))
    roots: dict = {"lm": dag.PrepareLM(), "passages": dag.ConvertCorpus(), "tokens": dag.PreTokenize()}
    for t in tasks:
        roots[f"examples/{t}"] = dag.LoadTask(task=t)
        roots[f"retrievals/{t}"] = dag.PreRetrieve(task=t)
        for c in ("fp16", "pq"):
            roots[f"keys/{t}/{c}"] = dag.EncodePassageKeys(task=t, compression=c)
    _log(f"building inputs and key stores through the pipeline (store {os.environ.get('NEST_STORE', 'artifacts')})")
    code = cli.build(list(roots.values()), profile=None, command=["bench", "key_store"], quiet=True)
    if code:
        raise RuntimeError(f"the pipeline failed to build the benchmark's inputs (exit {code})")
    import pyarrow.parquet as pq

    from stages.evaluation.generate import build_requests
    from stages.retrieval.pre_retrieve import read_retrievals
    from stages.corpus.passages import PassageReader
    from stages.lm.pretokenize import TokenLookup

    store = config.get_store()
    nest_cfg = dag._plain(dag.decoding().config)
    reader, lookup = PassageReader(roots["passages"].artifact_dir), TokenLookup(roots["tokens"].artifact_dir)
    out = {"lm_dir": roots["lm"].artifact_dir, "config": nest_cfg, "tasks": {}, "stores": {}}
    for t in tasks:
        examples = pq.read_table(Path(roots[f"examples/{t}"].artifact_dir) / "examples.parquet").to_pylist()
        retrievals = read_retrievals(Path(roots[f"retrievals/{t}"].artifact_dir))
        out["tasks"][t] = {"examples": examples,
                           "requests": build_requests(examples, retrievals, reader, lookup,
                                                      int(nest_cfg.get("passages", 40)))}
        for c in ("fp16", "pq"):
            task = roots[f"keys/{t}/{c}"]
            out["stores"][(t, c)] = {"dir": task.artifact_dir, "stats": store.manifest(task.stage, task.key)["stats"]}
    return out


def _files_bytes(folder: Path, prefix: str) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob(f"{prefix}-*.npy"))


def run_setting(model, tok, inputs: dict, setting: str, max_new: int, scorer) -> dict:
    """NEST/kNN-LM PPL, NEST generations and their quality for one key source (``exact`` = on the fly)."""
    from stages.decoding import NestConfig, make_decoder
    from stages.decoding.attribution import attribution_ratio
    from stages.decoding.key_store import PassageKeyStore
    from stages.decoding.passage_keys import PassageKeyCache
    from stages.evaluation.perplexity import target_nll

    cfg = {**inputs["config"], "max_new_tokens": max_new}
    out = {"ppl": {}, "generations": {}, "cache": {}}
    nll = {"nest": 0.0, "knnlm": 0.0}
    n_tok = 0
    for t in inputs["tasks"]:
        store = None if setting == "exact" else PassageKeyStore.open(inputs["stores"][(t, setting)]["dir"])
        cache = PassageKeyCache(store=store)
        nest = make_decoder("nest", model, tok, NestConfig(**cfg), key_cache=cache)
        knn = make_decoder("knnlm", model, tok, NestConfig(**cfg), key_cache=cache)
        for ex, req in zip(inputs["tasks"][t]["examples"], inputs["tasks"][t]["requests"]):
            target = json.loads(ex.get("meta") or "{}").get("target_ids")
            if ex["kind"] == "completion" and target:
                nll["nest"] += target_nll(nest, req, [int(x) for x in target])
                nll["knnlm"] += target_nll(knn, req, [int(x) for x in target])
                n_tok += len(target)
            t0 = time.perf_counter()
            g = nest.decode([req])[0]
            refs = ex.get("references") or []
            out["generations"][f"{t}/{ex['example_id']}"] = {
                "task": t, "token_ids": g.token_ids, "seconds": time.perf_counter() - t0,
                "attribution": attribution_ratio(g.sources) if g.token_ids else 0.0,
                "rouge1": scorer.score(refs[0], g.text)["rouge1"].fmeasure if refs and t != "bio" else None}
        out["cache"][t] = dict(cache.stats)
        out.setdefault("caches", {})[t] = cache
    out["ppl"] = {m: math.exp(v / n_tok) if n_tok else None for m, v in nll.items()}
    out["ppl_tokens"] = n_tok
    return out


def key_error(inputs: dict, results: dict, reference: str, setting: str) -> float:
    """Σ‖k̂ − k‖² / Σ‖k‖² of the ``setting`` store's keys against the reference keys (``exact``: the fp32 keys the
    exact run encoded, every passage it used; otherwise the reference store's keys of every passage)."""
    from stages.decoding.key_store import PassageKeyStore
    from stages.decoding.passage_keys import PassageKeyCache

    err = norm = 0.0
    for t in inputs["tasks"]:
        store = PassageKeyStore.open(inputs["stores"][(t, setting)]["dir"])
        if reference == "exact":
            pairs = ((PassageKeyCache.parse_key(n)[3], k) for n, k in results["exact"]["caches"][t]._mem.items())
        else:
            ref = PassageKeyStore.open(inputs["stores"][(t, reference)]["dir"])
            pairs = ((d, ref.get_by_digest(d)) for d in list(ref._where))
        for digest, k in pairs:
            got = store.get_by_digest(digest)
            if got is not None:
                err += float(((got - k) ** 2).sum())
                norm += float((k ** 2).sum())
    return err / norm if norm else float("nan")


def summarise(results: dict, inputs: dict, dim: int, settings=SETTINGS) -> dict:
    """One row per setting: PPL, ROUGE-1, attribution and their changes against ``exact``; bytes and build time."""
    ref_name = settings[0]
    exact = results[ref_name]
    rows = {}
    for s in settings:
        r = results[s]
        gens = r["generations"]
        rouge = [g["rouge1"] for g in gens.values() if g["rouge1"] is not None]
        attr = statistics.mean(g["attribution"] for g in gens.values()) if gens else 0.0
        same = sum(g["token_ids"] == exact["generations"][k]["token_ids"] for k, g in gens.items())
        row = {"ppl_nest": r["ppl"]["nest"], "ppl_knnlm": r["ppl"]["knnlm"], "rouge1": statistics.mean(rouge) if rouge
               else None, "attribution_ratio": attr, "identical_generations": f"{same}/{len(gens)}",
               "misses": sum(c["misses"] for c in r["cache"].values()),
               "store_hits": sum(c["store_hits"] for c in r["cache"].values())}
        if s == "exact":
            row["bytes_per_key"] = 4 * dim
            row["key_rel_sq_error"] = 0.0
        else:
            tasks = list(inputs["tasks"])
            stats = [inputs["stores"][(t, s)]["stats"] for t in tasks]
            keys = sum(x["keys"] for x in stats)
            prefix = "codes" if s == "pq" else "keys"
            row["bytes_per_key"] = sum(x["key_bytes"] for x in stats) / keys  # the keys' payload
            row["file_bytes_per_key"] = sum(_files_bytes(inputs["stores"][(t, s)]["dir"], prefix)
                                            for t in tasks) / keys  # + the .npy headers
            row["build_s_per_1k_passages"] = 1000 * sum(x["seconds"] for x in stats) / sum(x["passages"] for x in stats)
            row["store_keys"] = keys
            row["store_passages"] = sum(x["passages"] for x in stats)
            row["key_rel_sq_error"] = results.get(f"{s}_key_error", 0.0)
        if exact["ppl"]["nest"]:
            row["ppl_nest_change_pct"] = 100 * (r["ppl"]["nest"] / exact["ppl"]["nest"] - 1)
            row["ppl_knnlm_change_pct"] = 100 * (r["ppl"]["knnlm"] / exact["ppl"]["knnlm"] - 1)
        row["attribution_change_points"] = 100 * (attr - rows.get(ref_name, row)["attribution_ratio"]) \
            if s != ref_name else 0.0
        if rouge and s != ref_name:
            row["rouge1_change"] = row["rouge1"] - rows[ref_name]["rouge1"]
        rows[s] = row
    return rows


def _fmt(v, nd=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown(rows: dict, meta: dict) -> str:
    pq_row = rows.get("pq") or {"attribution_change_points": float("nan"), "bytes_per_key": float("nan")}
    ppl_ok = abs(pq_row.get("ppl_nest_change_pct", 0.0)) <= 2.0
    attr_ok = abs(pq_row["attribution_change_points"]) <= 2.0
    lines = [
        "# Key-store benchmark: fp16 and PQ keys against exact fp32 keys",
        "",
        f"{meta['machine']}; {meta['date']}. Command: `{meta['command']}`. Corpus: {meta['corpus']}; examples: "
        f"{meta['examples']} per task ({', '.join(meta['tasks'])}), b = {meta['passages']} passages each, "
        f"{meta['max_new_tokens']} new tokens; reference keys: {meta['reference']}; NEST config {json.dumps(meta['config'], sort_keys=True)}. "
        f"PQ: M = {meta['pq_m']} subquantizers × 8 bits, trained on the store's own keys (in-sample; a corpus store "
        f"trains on a sample). PPL: the completion_excluded references ({meta['ppl_tokens']} tokens), evaluation mode.",
        "",
        "| keys | bytes/key (files) | build s / 1k passages | key rel. sq. error | PPL NEST | Δ PPL NEST | PPL kNN-LM | "
        "Δ PPL kNN-LM | ROUGE-1 | attribution | Δ attribution (points) | identical generations | "
        "store hits / misses |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in rows:
        r = rows[s]
        lines.append(
            f"| {s if s != 'exact' else 'exact fp32 (on the fly)'} | {_fmt(r['bytes_per_key'], 0)} "
            f"({_fmt(r.get('file_bytes_per_key', r['bytes_per_key']), 2)}) | "
            f"{_fmt(r.get('build_s_per_1k_passages'), 1)} | {_fmt(r.get('key_rel_sq_error'), 5)} | "
            f"{_fmt(r['ppl_nest'])} | {_fmt(r.get('ppl_nest_change_pct'), 2)}% | {_fmt(r['ppl_knnlm'])} | "
            f"{_fmt(r.get('ppl_knnlm_change_pct'), 2)}% | {_fmt(r['rouge1'], 4)} | {_fmt(r['attribution_ratio'], 4)} | "
            f"{_fmt(r['attribution_change_points'], 2)} | {r['identical_generations']} | "
            f"{r['store_hits']} / {r['misses']} |")
    lines += [
        "",
        "| goal | measured | met |",
        "|---|---|---|",
        f"| PQ keys: NEST PPL change ≤ 2% | {_fmt(pq_row.get('ppl_nest_change_pct'), 2)}% | "
        f"{'yes' if ppl_ok else 'no'} |",
        f"| PQ keys: attribution change ≤ 2 points | {_fmt(pq_row['attribution_change_points'], 2)} | "
        f"{'yes' if attr_ok else 'no'} |",
        f"| PQ keys: ≤ 64 bytes per key | {_fmt(pq_row['bytes_per_key'], 0)} | "
        f"{'yes' if pq_row['bytes_per_key'] <= 64 else 'no'} |",
        "",
        "Build time is the EncodePassageKeys stage's wall time (LM encoding on this CPU, PQ training, writing) over the "
        "passages of the tasks' stores. Store misses would be encoded on the fly and are counted; 0 means every key "
        "came from the store. Attribution ratio here = tokens with a source ÷ generated tokens (the decoder's own "
        "definition at the time of the run). bytes/key: the keys' payload (in parentheses: the shard files, `.npy` header "
        "included).",
        "",
        f"Sample size: {meta['examples']} example(s) per task and {meta['ppl_tokens']} reference tokens for PPL; with so "
        "few examples a ROUGE-1 or attribution difference is one or two generations diverging (see 'identical "
        "generations'), not an estimate with an interval.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None, quick: bool = False) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--examples", type=int, default=0, help="examples per task (default 4; quick 2)")
    ap.add_argument("--corpus-limit", type=int, default=0, help="ConvertCorpus.limit (0: the profile's; quick 300)")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="default: the profile's (quick 16)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                    help="key sources; the first is the reference (default: exact fp32 keys encoded on the fly)")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N examples of each task")
    ap.add_argument("--set", action="append", default=[], metavar="TASK.PARAM=VALUE",
                    help="more pipeline overrides, e.g. PreRetrieve.mode=bm25 (no dense index to build)")
    args = ap.parse_args(argv or [])
    quick = quick or args.quick
    for var, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(var, value)
    import torch
    from rouge_score import rouge_scorer

    from stages.lm.load import load_lm

    if args.threads:
        torch.set_num_threads(args.threads)
    n_examples = args.examples or (2 if quick else 4)
    corpus_limit = args.corpus_limit or (300 if quick else 0)
    t0 = time.perf_counter()
    inputs = build_inputs(n_examples, corpus_limit, quick, args.set, args.tasks)
    inputs_s = time.perf_counter() - t0
    max_new = args.max_new_tokens or (16 if quick else int(inputs["config"].get("max_new_tokens", 96)))
    model, tok = load_lm(inputs["lm_dir"])
    dim = int(model.config.hidden_size)
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    results = {}
    settings = list(args.settings)
    if args.limit:
        for t in inputs["tasks"].values():
            t["examples"], t["requests"] = t["examples"][:args.limit], t["requests"][:args.limit]
    for s in settings:
        _log(f"setting {s}")
        results[s] = run_setting(model, tok, inputs, s, max_new, scorer)
    for s in settings[1:]:
        results[f"{s}_key_error"] = key_error(inputs, results, settings[0], s)
    rows = summarise(results, inputs, dim, settings)
    from stages.decoding.key_store import pq_subquantizers

    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
                       f"({torch.get_num_threads()} threads)",
            "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "command": "python -m bench.run key_store " + " ".join(argv or []),
            "corpus": (f"embedded, ConvertCorpus.limit={corpus_limit}" if corpus_limit else "embedded (all)")
                      + "".join(f", {s}" for s in args.set),
            "examples": args.limit or n_examples, "tasks": list(args.tasks),
            "reference": "exact fp32, encoded on the fly" if settings[0] == "exact" else
                         f"the {settings[0]} store (the goals are stated against exact fp32 keys; fp16 rounding is "
                         f"the store's only change to them)", "passages": int(inputs["config"].get("passages", 40)), "max_new_tokens": max_new,
            "config": inputs["config"], "pq_m": pq_subquantizers(dim, 64), "ppl_tokens": results[settings[0]]["ppl_tokens"],
            "inputs_seconds": round(inputs_s, 1)}
    return {"meta": meta, "rows": rows, "markdown": markdown(rows, meta),
            "cache_stats": {s: results[s]["cache"] for s in settings},
            "generations": {s: {k: {kk: vv for kk, vv in g.items() if kk != "token_ids"}
                                for k, g in results[s]["generations"].items()} for s in settings}}


if __name__ == "__main__":
    res = main(sys.argv[1:])
    print(res.pop("markdown"))
