"""Passage-key encoding on the fly: what batch size, length sorting (padding) and thread count cost.

    python -m bench.run encoding            # the passages of NEST_BENCH_ENCODING_EXAMPLES (2) bio examples' top-40
    python -m bench.run --quick encoding    # 1 completion example, 300-article corpus

Encodes the same passages (each alone, stopping at the key layer, as NEST does) under each setting, in one process,
settings interleaved over NEST_BENCH_ENCODING_REPEATS (2) rounds; reports seconds per 1k passage tokens (median over
rounds) and the padding share. Every setting gives the same keys up to float noise: the largest absolute difference
from the reference setting (batch 16, sorted) is reported, and must stay below 1e-4 for a setting to be "kept".
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

SETTINGS = [  # (label, batch size, sort by length, threads: None = torch's default)
    ("batch 16, sorted (default)", 16, True, None),
    ("batch 1", 1, True, None),
    ("batch 4, sorted", 4, True, None),
    ("batch 8, sorted", 8, True, None),
    ("batch 32, sorted", 32, True, None),
    ("batch 16, unsorted", 16, False, None),
    ("batch 16, sorted, 1 thread", 16, True, 1),
]
TOLERANCE = 1e-4


def _encode(model, passages, key_layer, batch, sort):
    from stages.decoding.passage_keys import encode_passages

    if sort:
        return encode_passages(model, passages, key_layer, None, batch)
    out = []  # unsorted: batches in retrieval order (each batch padded to its own longest passage)
    for s in range(0, len(passages), batch):
        chunk = passages[s:s + batch]
        keys = [None] * len(chunk)
        # encode_passages sorts inside its call; one call per batch keeps the retrieval-order grouping
        for i, k in enumerate(encode_passages(model, chunk, key_layer, None, len(chunk))):
            keys[i] = k
        out.extend(keys)
    return out


def _padding(passages, batch, sort) -> float:
    lens = [len(p) for p in passages]
    order = sorted(lens, reverse=True) if sort else lens
    padded = sum(max(order[s:s + batch]) * len(order[s:s + batch]) for s in range(0, len(order), batch))
    return 1 - sum(lens) / padded


def main(argv: list[str] | None = None, quick: bool = False) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv or [])
    quick = quick or args.quick
    n = 1 if quick else int(os.environ.get("NEST_BENCH_ENCODING_EXAMPLES", "2"))
    repeats = 1 if quick else int(os.environ.get("NEST_BENCH_ENCODING_REPEATS", "2"))
    for var, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(var, value)
    import torch

    from bench.bench_decoding import load_inputs
    from stages.decoding import NestConfig
    from stages.lm.load import load_lm

    task = "completion_excluded" if quick else "bio"  # the quick 300-article corpus holds no people
    inputs = load_inputs([task], n, quick)
    model, _ = load_lm(inputs["lm_dir"])
    key_layer = NestConfig(**{k: v for k, v in inputs["nest_config"].items()
                              if k in NestConfig.__dataclass_fields__}).key_layer
    passages = [list(p.token_ids) for row in inputs["tasks"][task]["timed"] for p in row["request"].passages]
    tokens = sum(len(p) for p in passages)
    default_threads = torch.get_num_threads()
    with torch.inference_mode():
        _encode(model, passages[:4], key_layer, 4, True)  # warm-up
        reference = _encode(model, passages, key_layer, 16, True)
        times = {s[0]: [] for s in SETTINGS}
        diffs = {}
        for r in range(repeats):
            order = SETTINGS[r % len(SETTINGS):] + SETTINGS[:r % len(SETTINGS)]
            for label, batch, sort, threads in order:
                torch.set_num_threads(threads or default_threads)
                t0 = time.perf_counter()
                keys = _encode(model, passages, key_layer, batch, sort)
                times[label].append(time.perf_counter() - t0)
                torch.set_num_threads(default_threads)
                diffs[label] = max(float((a - b).abs().max()) for a, b in zip(keys, reference))
            print(f"[bench encoding] round {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    rows = []
    for label, batch, sort, threads in SETTINGS:
        med = statistics.median(times[label])
        rows.append({"setting": label, "s_per_1k_tokens": round(1000 * med / tokens, 4), "seconds": round(med, 3),
                     "padding_share": round(_padding(passages, batch, sort), 4), "max_abs_key_diff": diffs[label],
                     "threads": threads or default_threads})
    result = {"quick": quick, "passages": len(passages), "tokens": tokens, "repeats": repeats,
              "default_threads": default_threads, "key_layer": key_layer, "rows": rows}
    best = min(rows, key=lambda x: x["s_per_1k_tokens"])
    lines = [f"# Passage-key encoding on the fly{' (quick: numbers not meaningful)' if quick else ''}", "",
             f"{len(passages)} passages ({tokens} tokens) of the bio examples' top-40, each encoded alone up to the key "
             f"layer `{key_layer}`; median of {repeats} interleaved rounds; torch threads {default_threads} unless "
             "stated.", "", "| setting | s per 1k tokens | s | padding share | max abs key diff vs default |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['s_per_1k_tokens']} | {r['seconds']} | {r['padding_share']} | "
              f"{r['max_abs_key_diff']:.2e} |" for r in rows]
    lines += ["", f"Fastest: {best['setting']} (keys within {TOLERANCE:g} of the default: "
                  f"{'yes' if best['max_abs_key_diff'] <= TOLERANCE else 'NO'})."]
    result["markdown"] = "\n".join(lines)
    return result


if __name__ == "__main__":
    res = main(sys.argv[1:])
    print(res.pop("markdown"))
