"""The decoding benchmark's aggregation: pooled ratios, medians beside them, and targets judged on the numbers."""

from bench import bench_decoding as bd


def _rec(tokens, seconds, rouge=0.5, counters=None, timings=None, sources=None):
    return {"tokens": tokens, "seconds": seconds, "rouge1": rouge, "counters": counters or {},
            "timings": timings or {}, "sources": sources}


def test_pooled_ratio_median_and_components():
    base = bd.summarise([_rec(10, 1.0), _rec(10, 1.0), _rec(10, 1.0)])
    # one slow example: the pooled ratio falls, the median ratio does not
    nest = bd.summarise([_rec(10, 0.5, counters={"key_cache_hits": 0, "key_cache_misses": 4, "knn_searches": 3},
                              timings={"lm_forward": 0.2, "token_search": 0.01, "passage_encoding": 0.2}),
                         _rec(10, 0.5, counters={"key_cache_hits": 4, "key_cache_misses": 0},
                              timings={"lm_forward": 0.2, "token_search": 0.01}),
                         _rec(10, 5.0, counters={"key_cache_hits": 2, "key_cache_misses": 2},
                              timings={"lm_forward": 0.2, "token_search": 0.01})])
    pooled, median = bd.ratio(nest, base)
    assert pooled == round((30 / 6.0) / (30 / 3.0), 3) and median == 2.0
    assert nest["key_hit_rate"] == 0.5
    assert nest["knn_over_lm"] == 0.05
    comp = nest["components_s_per_query"]
    assert abs(sum(comp.values()) - nest["s_per_query"]) < 1e-3 and comp["passage_encoding"] == round(0.2 / 3, 4)


def _result(store_speed, otf_speed, long_speed, note=None):
    base = bd.summarise([_rec(10, 1.0, rouge=0.3)])
    table = {"base": base, "pld10": bd.summarise([_rec(10, 0.5)]), "pld20": bd.summarise([_rec(10, 0.4)]),
             "nest": bd.summarise([_rec(10, 10 / otf_speed, rouge=0.3)])}
    if store_speed:
        table["nest_store"] = bd.summarise([_rec(10, 10 / store_speed, rouge=0.35)])
    settings = {"completion_excluded@96": dict(table), "bio@96": dict(table),
                "bio@256": {"base": base, "nest": bd.summarise([_rec(10, 10 / long_speed)])}}
    return {"settings": settings, "key_store": {"note": note} if note else {"build_s": 1.0}}


def test_targets_pass_and_fail_from_the_numbers():
    t = {x["figure"]: x for x in bd.check_targets(_result(40.0, 9.0, 20.0), 96, 256)}
    store = t["NEST + key store ÷ base, pooled tok/s, bio@96, quality ≥ base"]
    assert store["measured"] == 4.0 and store["pass"] is True
    vs_pld = t["NEST + key store ÷ best HF prompt lookup (10/20), bio@96"]
    assert vs_pld["measured"] == 1.6 and vs_pld["pass"] is True  # best prompt lookup: 25 tok/s
    assert t["NEST end to end on the fly ÷ base, every cost counted, bio@96"]["pass"] is False  # 0.9×
    assert t["NEST end to end on the fly ÷ base, every cost counted, bio@256"]["pass"] is True  # 2.0×
    # without a key store the rows say so instead of passing or failing
    t = {x["figure"]: x for x in bd.check_targets(_result(None, 12.0, 20.0, note="absent"), 96, 256)}
    row = t["NEST + key store ÷ base, pooled tok/s, bio@96, quality ≥ base"]
    assert row["pass"] is None and row["note"] == "absent"
    assert t["NEST end to end on the fly ÷ base, every cost counted, bio@96"]["pass"] is True
    text = bd.markdown({**_result(None, 12.0, 20.0, note="absent"), "quick": True, "n_examples": 1, "threads": 2,
                        "load_before": [1], "load_after": [1], "nest_config": {},
                        "targets": bd.check_targets(_result(None, 12.0, 20.0, note="absent"), 96, 256)})
    assert "| not measured | absent |" in text and "## bio@256" in text
