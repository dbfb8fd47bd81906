"""What NEST copies: on-topic spans and answers that stop, tuned on a dev draw, reported on the eval draw,
on people in no draw, and on QA questions.

    python -m bench.tune_topical                         # bios: dev (seed 1), eval (seed 0), held-out people; NQ, HotpotQA
    python -m bench.tune_topical --n 8 --qa 0            # smaller

Measures that copying the wrong thing cannot pass:

- bio: **topical precision** (copied tokens whose passage is the person's own article, ``meta.doc_ids``), the bios that
  copy nothing off-topic, ROUGE-1 against the person's passages;
- every task: the **chimera rate** (sentences whose copied tokens come from two or more articles,
  :func:`tasks.metrics.chimera_counts`), how the answers ended (stop rule, EOS, the length cap);
- QA (NQ and HotpotQA samples of ``../shared/data`` over the embedded corpus): ALR beside **ALR on the first sentence**.

Draws: ``dev`` = LoadTask seed 1 (the profile was tuned on it), ``eval`` = seed 0 (the report's), ``heldout`` = seed 2
with every person of the two other draws removed (people in no draw). NEST runs with the profile's decoding config
(luigi.cfg ``[decoding]``, the bio task's ``task_config``) and each variant's overrides; passage keys are encoded once
and shared by every variant (this script measures what is copied, not speed: ``make bench`` does speed).
Results: ``bench/results/topical.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHARED = ROOT.parent / "shared" / "data"
QA_FILES = {"nq": SHARED / "nq_open" / "NQ-open.dev.sample.jsonl",
            "hotpotqa": SHARED / "hotpotqa" / "hotpot_dev_v1_simplified.sample.json"}
VARIANTS = {  # name: NestConfig overrides over the profile's
    "nest": {},
    "top1": {"span_start_passages": 1},
    "top2": {"span_start_passages": 2},
    "sentence": {"span_article": "sentence"},
    "top1+sentence": {"span_start_passages": 1, "span_article": "sentence"},
    "top2+sentence": {"span_start_passages": 2, "span_article": "sentence"},
}


def _log(msg: str) -> None:
    print(f"[topical] {msg}", file=sys.stderr, flush=True)


def build_draw(task: str, seed: int, n: int, paper_file: Path | None = None) -> dict:
    """Build one draw's examples and retrievals through the pipeline; its requests, examples and passage titles."""
    from luigi.task_register import Register

    from pipeline import cli, config, dag
    from stages.corpus.passages import PassageReader
    from stages.evaluation.generate import build_requests
    from stages.retrieval.pre_retrieve import read_retrievals
    from stages.lm.pretokenize import TokenLookup
    import pyarrow.parquet as pq

    sets = [f"LoadTask.seed={seed}", f"LoadTask.n_examples={n}"]
    if paper_file is not None:
        sets.append(f"paper_tasks.{task}={paper_file}")
    config.apply_overrides(config.parse_set(sets))
    Register.clear_instance_cache()
    roots = {"lm": dag.PrepareLM(), "passages": dag.ConvertCorpus(), "tokens": dag.PreTokenize(),
             "examples": dag.LoadTask(task=task), "retrievals": dag.PreRetrieve(task=task)}
    code = cli.build(list(roots.values()), profile=None, command=["tune_topical"], quiet=True)
    if code:
        raise SystemExit(f"the pipeline failed to build {task} seed {seed} (exit {code})")
    reader, lookup = PassageReader(roots["passages"].artifact_dir), TokenLookup(roots["tokens"].artifact_dir)
    examples = pq.read_table(Path(roots["examples"].artifact_dir) / "examples.parquet").to_pylist()
    retr = read_retrievals(Path(roots["retrievals"].artifact_dir))
    from tasks.stopping import rule_for

    d = dag.decoding()
    stopping = rule_for(task, lengths=dag._plain(d.lengths), stops=dag._plain(d.stops)).to_dict()
    reqs = build_requests(examples, retr, reader, lookup, n_passages=40, stopping=stopping)
    titles = {p.doc_id: p.title for r in reqs for p in r.passages}
    return {"lm_dir": roots["lm"].artifact_dir, "requests": reqs, "examples": examples, "titles": titles,
            "profile": {**dag._plain(d.config), **dag._plain(d.task_config).get(task, {}),
                        **dag._plain(d.method_config).get("nest", {})}}


def score(task: str, gens, examples, titles, tok) -> dict:
    from bench.tune_generation import title_runs
    from tasks.metrics import alr, alr_first_sentence, chimera_counts, rouge

    copied = on_topic = tokens = passes = sentences = chimeras = 0
    clean, rouges, alrs, firsts, detail = 0, [], [], [], []
    ends = {"stopped_by_stop_rule": 0, "stopped_by_eos": 0, "stopped_by_length": 0}
    for g, ex in zip(gens, examples):
        meta = json.loads(ex["meta"] or "{}")
        srcs = [s for s in g.sources if s is not None]
        tokens += len(g.token_ids)
        passes += int(g.counters.get("lm_forward_passes", g.counters.get("generated_tokens", len(g.token_ids))))
        copied += len(srcs)
        for k in ends:
            ends[k] += int(g.counters.get(k, 0))
        char_ends = [len(tok.decode(g.token_ids[:i + 1], skip_special_tokens=True)) for i in range(len(g.token_ids))]
        n_s, n_c = chimera_counts(g.text, g.sources, char_ends, lambda d: titles.get(int(d)) or int(d))
        sentences, chimeras = sentences + n_s, chimeras + n_c
        refs = list(ex["references"] or [])
        if task == "bio":
            own = {int(d) for d in meta.get("doc_ids", [])}
            mine = sum(1 for d, _ in srcs if int(d) in own)
            on_topic += mine
            clean += int(mine == len(srcs))
            rouges.append(100 * rouge(g.text, " ".join(refs), ("rouge1",))["rouge1"])
        else:
            alrs.append(100 * alr(g.text, refs))
            firsts.append(100 * alr_first_sentence(g.text, refs))
        detail.append({"topic": meta.get("title") or ex.get("question"), "text": g.text,
                       "runs": [r for r in title_runs(g.sources, titles) if r[0] != "-"]})
    n = len(gens)
    row = {"examples": n, "tokens": tokens, "mean_tokens": tokens / max(n, 1),
           "copied_pct": 100 * copied / max(tokens, 1), "tokens_per_pass": tokens / max(passes, 1),
           "chimera_rate": 100 * chimeras / sentences if sentences else None, "sentences": sentences,
           **{k: 100 * v / max(n, 1) for k, v in ends.items()}, "detail": detail}
    if task == "bio":
        row.update(topical_precision=100 * on_topic / copied if copied else None, clean=f"{clean}/{n}",
                   rouge1=sum(rouges) / max(n, 1))
    else:
        row.update(alr=sum(alrs) / max(n, 1), alr_first_sentence=sum(firsts) / max(n, 1))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=12, help="bios per draw")
    ap.add_argument("--qa", type=int, default=40, help="questions per QA task (0: no QA)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--draws", nargs="+", default=["dev", "eval", "heldout"])
    ap.add_argument("--out", default=str(RESULTS / "topical"))
    args = ap.parse_args(argv)
    for var, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(var, value)
    seeds = {"dev": 1, "eval": 0, "heldout": 2}
    draws: dict[str, dict] = {}
    for name in args.draws:
        draws[f"bio/{name}"] = build_draw("bio", seeds[name], args.n if name != "heldout" else 3 * args.n)
    if "heldout" in args.draws:  # people in no draw: the other draws' people removed
        taken = {json.loads(e["meta"])["source_id"] for k, d in draws.items() if k != "bio/heldout"
                 for e in d["examples"]}
        if len(taken) < 2 * args.n:  # the other draws were not built: build them to know their people
            for s in (0, 1):
                taken |= {json.loads(e["meta"])["source_id"] for e in build_draw("bio", s, args.n)["examples"]}
        d = draws["bio/heldout"]
        keep = [i for i, e in enumerate(d["examples"]) if json.loads(e["meta"])["source_id"] not in taken][: args.n]
        d["examples"], d["requests"] = [d["examples"][i] for i in keep], [d["requests"][i] for i in keep]
        d["overlap_with_other_draws"] = 0
    if args.qa:
        for task, path in QA_FILES.items():
            if path.exists():
                draws[task] = build_draw(task, 0, args.qa, path)
            else:
                _log(f"{task}: {path} absent, skipped")
    import torch

    from stages.decoding import NestConfig, PassageKeyCache, make_decoder
    from stages.lm.load import load_lm

    first = next(iter(draws.values()))
    model, tok = load_lm(first["lm_dir"])
    cache = PassageKeyCache(None, 8 << 30)
    rows = []
    t_start = time.perf_counter()
    for name, d in draws.items():
        task = name.split("/")[0]
        reqs, exs = d["requests"], d["examples"]
        _log(f"{name}: {len(reqs)} examples")
        base = make_decoder("base", model, tok, NestConfig(max_new_tokens=128)).decode(reqs)
        rows.append({"draw": name, "variant": "base", **score(task, base, exs, d["titles"], tok)})
        _log(f"{name} base: {json.dumps({k: v for k, v in rows[-1].items() if k != 'detail'})}")
        variants = dict(args.variants and {v: VARIANTS[v] for v in args.variants})
        if task != "bio":  # the paper's QA rule beside the sentence rule
            variants = {"nest (paragraph stop)": {"_stop": "paragraph"}, **variants}
        for v, over in variants.items():
            over = dict(over)
            stop = over.pop("_stop", None)
            cfg = NestConfig(**{**d["profile"], **over})
            dec = make_decoder("nest", model, tok, cfg, key_cache=cache)
            rq = reqs if stop is None else [type(r)(**{**r.__dict__, "stop": stop}) for r in reqs]
            gens = dec.decode(rq)
            rows.append({"draw": name, "variant": v, "config": over, **score(task, gens, exs, d["titles"], tok)})
            _log(f"{name} {v}: {json.dumps({k: x for k, x in rows[-1].items() if k != 'detail'})}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows,
                                                    "seconds": round(time.perf_counter() - t_start, 1)}, indent=1))
    out.with_suffix(".md").write_text(markdown(rows, args))
    _log(f"wrote {out.with_suffix('.md')}")
    return 0


def _f(v, d=1) -> str:
    return "–" if v is None else f"{v:.{d}f}"


def markdown(rows, args) -> str:
    lines = ["# What NEST copies: on-topic spans and answers that stop", "",
             f"`python -m bench.tune_topical --n {args.n} --qa {args.qa}`: SmolLM2-135M, the embedded corpus, the "
             "profile's decoding config plus each variant's options (`top1`/`top2`: `span_start_passages`, "
             "`sentence`: `span_article`). Bios: dev = seed 1 (tuning), eval = seed 0, heldout = people in no draw. "
             "QA: the NQ and HotpotQA samples of ../shared/data over the embedded corpus.", ""]
    bio = [r for r in rows if r["draw"].startswith("bio/")]
    if bio:
        lines += ["## Bios", "", "| draw | variant | topical precision % | bios with no off-topic copy | copied % | "
                  "chimera sentences % | RG-1 vs source | mean tokens | tokens/pass |", "|---|---|---|---|---|---|---|---|---|"]
        for r in bio:
            lines.append(f"| {r['draw'][4:]} | {r['variant']} | {_f(r.get('topical_precision'))} | "
                         f"{r.get('clean', '')} | {_f(r['copied_pct'])} | {_f(r['chimera_rate'])} | "
                         f"{_f(r.get('rouge1'))} | {_f(r['mean_tokens'])} | {_f(r['tokens_per_pass'], 2)} |")
        lines.append("")
    qa = [r for r in rows if not r["draw"].startswith("bio/")]
    if qa:
        lines += ["## QA", "", "| task | variant | ALR % | ALR first sentence % | ended by rule % | EOS % | "
                  "length cap % | chimera sentences % | copied % | mean tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in qa:
            lines.append(f"| {r['draw']} | {r['variant']} | {_f(r['alr'])} | {_f(r['alr_first_sentence'])} | "
                         f"{_f(r['stopped_by_stop_rule'])} | {_f(r['stopped_by_eos'])} | "
                         f"{_f(r['stopped_by_length'])} | {_f(r['chimera_rate'])} | {_f(r['copied_pct'])} | "
                         f"{_f(r['mean_tokens'])} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
