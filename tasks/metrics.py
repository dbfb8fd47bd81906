"""Reference definitions of every metric (pure functions; exact definitions in ``docs/metrics.md``).

Scales: the functions here return natural units (ALR 0/1, ROUGE F and attribution ratio in [0, 1], BLEU in sacrebleu's
0–100 points, PPL, seconds); ``Task.score`` converts to the paper's table scale. ``None`` means "undefined / not
computed" and is left out of means (:func:`mean_or_none`); :func:`format_metric` prints it as "not computed".
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Iterable, Sequence

# End-of-sequence markers of the LMs we run (Llama-2 ``</s>``, SmolLM2/ChatML ``<|im_end|>``, GPT-2 style
# ``<|endoftext|>``, Llama-3 ``<|eot_id|>``). Generations are cut at the first one before scoring (bug B9).
EOS_STRINGS = ("</s>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>")

Source = tuple[int, int] | None  # (doc_id, key position) of a generated token, or None when not from the corpus


# -- text cleanup ------------------------------------------------------------------------------------------------------
def truncate_at_eos(text: str, eos: Sequence[str] = EOS_STRINGS) -> str:
    """``text`` up to (not including) the first EOS marker (B9: the released ``eval.py`` scored text after ``</s>``)."""
    cut = len(text)
    for marker in eos:
        i = text.find(marker)
        if 0 <= i < cut:
            cut = i
    return text[:cut]


def truncate_ids_at_eos(token_ids: Sequence[int], eos_ids: Iterable[int]) -> list[int]:
    """Token ids up to (not including) the first EOS id."""
    stop = set(int(e) for e in eos_ids)
    out = []
    for t in token_ids:
        if int(t) in stop:
            break
        out.append(int(t))
    return out


# -- answer-level recall -----------------------------------------------------------------------------------------------
def alr(prediction: str, answers: Sequence[str]) -> float:
    """Answer-level recall (Hit@1): 1.0 when the lower-cased ``prediction`` contains ANY gold alias lower-cased as a
    substring, else 0.0. Empty aliases are ignored. (Bug B2 fixed: the released code stops after the first alias.)

    >>> alr("it is paris", ["london", "paris"])
    1.0
    """
    text = prediction.lower()
    return float(any(a.strip().lower() in text for a in answers if a.strip()))


def alr_first_only(prediction: str, answers: Sequence[str]) -> float:
    """The released code's ALR (bug B2): only the FIRST gold alias is checked. For comparison with its numbers.

    >>> alr_first_only("it is paris", ["london", "paris"])
    0.0
    """
    first = next((a for a in answers if a.strip()), None)
    return float(first is not None and first.strip().lower() in prediction.lower())


# -- ROUGE and BLEU ----------------------------------------------------------------------------------------------------
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@lru_cache(maxsize=4)
def _rouge_scorer(types: tuple[str, ...]):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(types), use_stemmer=True)


def rouge(prediction: str, references: Sequence[str] | str, types: Sequence[str] = ROUGE_TYPES,
          measure: str = "fmeasure") -> dict[str, float]:
    """ROUGE F-measures in [0, 1] (``rouge-score``, Porter stemmer, its default tokenizer: lower-case, alphanumeric
    tokens). With several references, the best value per type. Argument order is ``score(target, prediction)`` as the
    library defines it (bug B10: the released code swapped them; F is symmetric, P and R are not: ``measure`` =
    ``"precision"`` / ``"recall"`` exposes them)."""
    if measure not in ("fmeasure", "precision", "recall"):
        raise ValueError(f"unknown ROUGE measure {measure!r}")
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("rouge needs at least one reference")
    scorer = _rouge_scorer(tuple(types))
    best = {t: 0.0 for t in types}
    for ref in refs:
        scores = scorer.score(ref, prediction)
        for t in types:
            best[t] = max(best[t], getattr(scores[t], measure))
    return best


def bleu(prediction: str, references: Sequence[str] | str) -> float:
    """BLEU of one prediction in sacrebleu points (0–100), with the settings of t5 ``metrics.bleu`` that TruthfulQA
    (Lin et al., 2022) uses: ``tokenize="intl"``, ``smooth_method="exp"``, no effective order, case-sensitive. Several
    references are scored jointly (multi-reference BLEU)."""
    import sacrebleu

    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("bleu needs at least one reference")
    return float(sacrebleu.corpus_bleu([prediction], [[r] for r in refs], smooth_method="exp", smooth_value=0.0,
                                       force=False, lowercase=False, tokenize="intl",
                                       use_effective_order=False).score)


def truthfulqa_deltas(prediction: str, true_refs: Sequence[str], false_refs: Sequence[str]) -> dict[str, float | None]:
    """TruthfulQA generation metrics as Lin et al. (2022): each reference is scored separately, then

    ``bleu_max`` = max BLEU over true refs, ``bleu_diff`` (the paper's ∆BLEU) = that minus max BLEU over false refs,
    ``bleu_acc`` = 1 if the true max is strictly larger; the same with ROUGE-1 F ×100 (``rouge1_*``; ∆RG-1).
    ``true_refs`` should already hold "I have no comment." (the task adds it). An empty prediction is skipped as in
    Lin et al.: every value None.
    """
    keys = ("bleu_max", "bleu_diff", "bleu_acc", "rouge1_max", "rouge1_diff", "rouge1_acc")
    if not prediction.strip():
        return dict.fromkeys(keys)
    if not true_refs or not false_refs:
        raise ValueError("truthfulqa_deltas needs true and false references")
    b_true = max(bleu(prediction, r) for r in true_refs)
    b_false = max(bleu(prediction, r) for r in false_refs)
    r_true = max(100.0 * rouge(prediction, r, ("rouge1",))["rouge1"] for r in true_refs)
    r_false = max(100.0 * rouge(prediction, r, ("rouge1",))["rouge1"] for r in false_refs)
    return {"bleu_max": b_true, "bleu_diff": b_true - b_false, "bleu_acc": float(b_true > b_false),
            "rouge1_max": r_true, "rouge1_diff": r_true - r_false, "rouge1_acc": float(r_true > r_false)}


# -- attribution (Table 2) ---------------------------------------------------------------------------------------------
def attribution_ratio(sources: Sequence[Source]) -> float | None:
    """Share of generated tokens that carry a corpus source (``not None``); None for an empty generation.

    >>> attribution_ratio([(3, 10), (3, 11), None, (5, 0)])
    0.75
    """
    if len(sources) == 0:
        return None
    return sum(s is not None for s in sources) / len(sources)


def attribution_runs(sources: Sequence[Source], same_doc_only: bool = False) -> list[int]:
    """Lengths of the maximal runs of consecutive generated tokens copied from one place of the corpus.

    Default: a run continues while the next token has the same ``doc_id`` AND the next position (``pos + 1``), i.e. a
    contiguous span of one passage. ``same_doc_only=True``: the same ``doc_id`` is enough (positions may jump), the
    looser reading of the paper's "consecutive spans taken from the same document". Tokens without a source end runs.

    >>> attribution_runs([(3, 10), (3, 11), (3, 20), None, (5, 0)])
    [2, 1, 1]
    >>> attribution_runs([(3, 10), (3, 11), (3, 20), None, (5, 0)], same_doc_only=True)
    [3, 1]
    """
    runs: list[int] = []
    prev: Source = None
    for s in sources:
        if s is None:
            prev = None
            continue
        doc, pos = int(s[0]), int(s[1])
        if prev is not None and doc == prev[0] and (same_doc_only or pos == prev[1] + 1):
            runs[-1] += 1
        else:
            runs.append(1)
        prev = (doc, pos)
    return runs


def attribution_span_length(sources: Sequence[Source], same_doc_only: bool = False) -> float | None:
    """Mean length (tokens) of the runs of :func:`attribution_runs`; None when no token has a source."""
    runs = attribution_runs(sources, same_doc_only)
    return sum(runs) / len(runs) if runs else None


def attribution_stats(sources: Sequence[Source]) -> dict[str, float | int | None]:
    """Per-generation attribution numbers, with the counts a report needs to pool over examples
    (pooled ratio = Σ attributed_tokens / Σ tokens; pooled length = Σ attributed_tokens / Σ runs)."""
    runs = attribution_runs(sources)
    runs_doc = attribution_runs(sources, same_doc_only=True)
    return {"tokens": len(sources), "attributed_tokens": sum(runs), "runs": len(runs), "runs_same_doc": len(runs_doc),
            "attribution_ratio": attribution_ratio(sources),
            "attribution_span_length": sum(runs) / len(runs) if runs else None,
            "attribution_span_length_same_doc": sum(runs_doc) / len(runs_doc) if runs_doc else None}


# -- perplexity --------------------------------------------------------------------------------------------------------
def perplexity(token_logprobs: Sequence[float]) -> float:
    """exp(mean negative log-likelihood) over the target tokens; log-probs in nats (natural log).

    >>> round(perplexity([math.log(0.5), math.log(0.25)]), 6)  # NLL mean = 1.5 ln 2
    2.828427
    """
    if len(token_logprobs) == 0:
        raise ValueError("perplexity of zero tokens is undefined")
    return math.exp(-math.fsum(token_logprobs) / len(token_logprobs))


def pooled_perplexity(per_example_logprobs: Iterable[Sequence[float]]) -> float:
    """Corpus perplexity: exp(Σ NLL / Σ tokens) over all target tokens of all examples (token-weighted, the usual
    definition of a dataset's PPL; not the mean of per-example PPLs)."""
    total, count = 0.0, 0
    for lps in per_example_logprobs:
        total += math.fsum(lps)
        count += len(lps)
    if count == 0:
        raise ValueError("perplexity of zero tokens is undefined")
    return math.exp(-total / count)


# -- latency -----------------------------------------------------------------------------------------------------------
def latency_per_token(seconds: Sequence[float], num_tokens: Sequence[int]) -> float | None:
    """Pooled seconds per generated token: Σ seconds / Σ tokens (None if no tokens)."""
    if len(seconds) != len(num_tokens):
        raise ValueError("seconds and num_tokens differ in length")
    tokens = sum(int(n) for n in num_tokens)
    return math.fsum(seconds) / tokens if tokens else None


def latency_per_query(seconds: Sequence[float]) -> float | None:
    """Mean wall-clock seconds per query (None for no queries)."""
    return math.fsum(seconds) / len(seconds) if len(seconds) else None


def speedup(base_latency: float | None, method_latency: float | None) -> float | None:
    """base / method latency (same examples, same unit): > 1 means the method is faster (the paper's "1.8×")."""
    if base_latency is None or method_latency is None or method_latency <= 0:
        return None
    return base_latency / method_latency


# -- aggregation and printing ------------------------------------------------------------------------------------------
def mean_or_none(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None (NaN counts as None); None when nothing is left."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return math.fsum(vals) / len(vals) if vals else None


def format_metric(value: float | None, digits: int = 1) -> str:
    """A table cell: the number rounded, or ``"not computed"`` for None (never a stand-in number)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not computed"
    return f"{value:.{digits}f}"
