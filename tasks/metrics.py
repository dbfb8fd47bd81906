"""Reference definitions of every metric (pure functions; exact definitions in ``docs/metrics.md``).

Scales: the functions here return natural units (ALR 0/1, ROUGE F and attribution ratio in [0, 1], BLEU in sacrebleu's
0–100 points, PPL, seconds); ``Task.score`` converts to the paper's table scale. ``None`` means "undefined / not
computed" and is left out of means (:func:`mean_or_none`); :func:`format_metric` prints it as "not computed".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence
from tasks.sentences import first_sentence
from tasks.sentences import sentence_spans

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


# -- attribution (Table 2) ---------------------------------------------------------------------------------
# ``sources[i]`` is the (doc_id, position) a generated token was COPIED from (an accepted draft or a streamed
# continuation), else None. A token produced one at a time whose value merely occurs among the neighbours is not copied:
# the decoder records it in a separate, parallel list ``supported`` (docs/metrics.md, "Copied and supported tokens").
Run = tuple[int, int, int]  # (start token, length, doc_id)


def attribution_runs(sources: Sequence[Source], same_doc_only: bool = False) -> list[Run]:
    """The maximal runs ``(start, length, doc_id)`` of consecutive generated tokens copied from one place of the corpus.

    Default: a run continues while the next token has the same ``doc_id`` AND the next position (``pos + 1``), i.e. a
    contiguous span of one passage. ``same_doc_only=True``: the same ``doc_id`` is enough (positions may jump), the
    looser reading of the paper's "consecutive spans taken from the same document". Tokens without a source end runs.
    No source at all (or no token): ``[]``.

    >>> attribution_runs([(3, 10), (3, 11), (3, 20), None, (5, 0)])
    [(0, 2, 3), (2, 1, 3), (4, 1, 5)]
    >>> attribution_runs([(3, 10), (3, 11), (3, 20), None, (5, 0)], same_doc_only=True)
    [(0, 3, 3), (4, 1, 5)]
    """
    runs: list[list[int]] = []
    prev: tuple[int, int] | None = None
    for i, s in enumerate(sources):
        if s is None:
            prev = None
            continue
        doc, pos = int(s[0]), int(s[1])
        if prev is not None and doc == prev[0] and (same_doc_only or pos == prev[1] + 1):
            runs[-1][1] += 1
        else:
            runs.append([i, 1, doc])
        prev = (doc, pos)
    return [(a, n, d) for a, n, d in runs]


def attribution_ratio(sources: Sequence[Source]) -> float | None:
    """Share of generated tokens that were copied (carry a source); None for an empty generation.

    >>> attribution_ratio([(3, 10), (3, 11), None, (5, 0)])
    0.75
    """
    if len(sources) == 0:
        return None
    return sum(s is not None for s in sources) / len(sources)


def attribution_span_length(sources: Sequence[Source], same_doc_only: bool = False) -> float | None:
    """Mean length (tokens) of the runs of :func:`attribution_runs`; None when no token was copied."""
    runs = attribution_runs(sources, same_doc_only)
    return sum(r[1] for r in runs) / len(runs) if runs else None


def attribution_stats(sources: Sequence[Source], supported: Sequence[Source] | None = None
                      ) -> dict[str, float | int | None]:
    """Per-generation attribution numbers, with the counts a report needs to pool over examples
    (pooled ratio = Σ copied_tokens / Σ tokens; pooled length = Σ copied_tokens / Σ runs; pooled supported ratio =
    Σ supported_tokens / Σ tokens). ``supported``: the parallel list of token-mode sources (None: none recorded)."""
    runs = attribution_runs(sources)
    runs_doc = attribution_runs(sources, same_doc_only=True)
    copied = sum(r[1] for r in runs)
    n_sup = sum(s is not None for s in supported) if supported is not None else 0
    n = len(sources)
    return {"tokens": n, "copied_tokens": copied, "supported_tokens": n_sup, "runs": len(runs),
            "runs_same_doc": len(runs_doc), "attribution_ratio": copied / n if n else None,
            "supported_ratio": n_sup / n if n else None,
            "attribution_span_length": copied / len(runs) if runs else None,
            "attribution_span_length_same_doc": copied / len(runs_doc) if runs_doc else None}


# -- topical attribution precision (bio, FactScore) ----------------------------------------------------------
def normalize_title(title: str | None) -> str:
    """A title compared case-insensitively, spaces collapsed, a trailing parenthesised qualifier dropped
    ("Ada Lovelace (mathematician)" → "ada lovelace"), underscores read as spaces (Wikipedia ids).

    >>> normalize_title("  Ada_Lovelace (mathematician) ")
    'ada lovelace'
    """
    t = " ".join(str(title or "").replace("_", " ").split())
    if t.endswith(")") and " (" in t:
        t = t[: t.rindex(" (")]
    return t.casefold()


@dataclass(frozen=True)
class Topic:
    """What an example is about: the passages of its entity (``doc_ids``), its source article (``source_id``) and its
    title. A copied passage is **on topic** when (a) its doc_id is one of ``doc_ids``, or (b) its source_id equals
    ``source_id``, or (c) its normalised title equals the normalised ``title`` (:func:`normalize_title`). (c) is the
    fallback for tasks that know only the entity's name (FactScore's prompt entities)."""

    doc_ids: frozenset[int] = frozenset()
    source_id: str | None = None
    title: str | None = None

    @classmethod
    def from_meta(cls, meta: dict, query: str = "") -> "Topic | None":
        """The topic of an example from its ``meta`` (bio: ``doc_ids``, ``source_id``, ``title``; FactScore:
        ``entity``); None when nothing is known."""
        doc_ids = frozenset(int(d) for d in (meta.get("doc_ids") or []))
        title = meta.get("title") or meta.get("entity") or None
        source_id = meta.get("source_id") or None
        if not doc_ids and not title and not source_id:
            return None
        return cls(doc_ids, None if source_id is None else str(source_id), title)

    def covers(self, doc_id: int, passage: dict | None = None) -> bool:
        """Is passage ``doc_id`` (with its ``{"title", "source_id"}`` when known) about this topic?"""
        if int(doc_id) in self.doc_ids:
            return True
        if passage:
            if self.source_id is not None and passage.get("source_id") is not None \
                    and str(passage["source_id"]) == self.source_id:
                return True
            if self.title and passage.get("title") and normalize_title(passage["title"]) == normalize_title(self.title):
                return True
        return False


def topical_counts(sources: Sequence[Source], topic: Topic, passages: dict[int, dict] | None = None
                   ) -> tuple[int, int, dict[int, int]]:
    """``(copied tokens, on-topic copied tokens, {off-topic doc_id: copied tokens})`` of one generation; ``passages``:
    ``{doc_id: {"title", "source_id"}}`` of the copied passages (for rules (b) and (c) of :class:`Topic`)."""
    passages = passages or {}
    copied = on = 0
    off: dict[int, int] = {}
    for s in sources:
        if s is None:
            continue
        copied += 1
        doc = int(s[0])
        if topic.covers(doc, passages.get(doc)):
            on += 1
        else:
            off[doc] = off.get(doc, 0) + 1
    return copied, on, off


def topical_precision(sources: Sequence[Source], topic: Topic, passages: dict[int, dict] | None = None
                      ) -> float | None:
    """Topical attribution precision: on-topic copied tokens / copied tokens; None when nothing was copied.

    >>> topical_precision([(7, 0), (7, 1), (9, 4), None], Topic(frozenset({7})))
    0.6666666666666666
    """
    copied, on, _ = topical_counts(sources, topic, passages)
    return on / copied if copied else None


# -- QA: is the answer inside a copied span? ---------------------------------------------------------------
def token_char_spans(char_ends: Sequence[int]) -> list[tuple[int, int]]:
    """``[(start, end)]`` character range of each token in the decoded text, from the end offsets of the growing
    prefixes (``char_ends[i]`` = len(decode(ids[:i+1]))); made non-decreasing, so a token that adds no character (a
    partial UTF-8 byte) has an empty range."""
    spans, prev = [], 0
    for e in char_ends:
        e = max(int(e), prev)
        spans.append((prev, e))
        prev = e
    return spans


def copied_char_ranges(sources: Sequence[Source], char_ends: Sequence[int]) -> list[tuple[int, int]]:
    """The character range ``[start, end)`` of every copied run (contiguous runs of :func:`attribution_runs`) in the
    generation's text."""
    if len(char_ends) != len(sources):
        raise ValueError(f"{len(char_ends)} character offsets for {len(sources)} tokens")
    spans = token_char_spans(char_ends)
    return [(spans[a][0], spans[a + n - 1][1]) for a, n, _ in attribution_runs(sources)]


def answer_occurrences(text: str, answers: Sequence[str]) -> list[tuple[int, int]]:
    """Every ``[start, end)`` where a gold alias occurs in ``text``, case-insensitively (overlaps included); empty
    aliases ignored. The matches ALR counts (:func:`alr`)."""
    import re

    out = []
    for a in answers:
        a = a.strip()
        if not a:
            continue
        pat = re.compile(re.escape(a), re.IGNORECASE)
        m = pat.search(text)
        while m is not None:
            out.append((m.start(), m.end()))
            m = pat.search(text, m.start() + 1)
    return sorted(set(out))


def answer_in_copied_span(text: str, answers: Sequence[str], sources: Sequence[Source], char_ends: Sequence[int]
                          ) -> float | None:
    """1.0 when the answer is correct (ALR hit) and some occurrence of a gold alias lies wholly inside the character
    range of ONE copied run; 0.0 when it is correct but no occurrence does; None when it is not correct (the share is
    taken over correct answers only).

    >>> answer_in_copied_span("it is Paris.", ["paris"], [None, None, (4, 7), None], [2, 5, 11, 12])
    1.0
    """
    if not alr(text, answers):
        return None
    occ = answer_occurrences(text, answers)
    if not occ:  # ALR hit by lower-casing that changes lengths (rare Unicode): no offsets to check
        return 0.0
    ranges = copied_char_ranges(sources, char_ends)
    return float(any(s <= a and b <= e for a, b in occ for s, e in ranges))


# -- QA: the first sentence, and sentences stitched from several articles -------------------------------------
def alr_first_sentence(prediction: str, answers: Sequence[str]) -> float:
    """ALR of the prediction's first sentence only (:func:`tasks.sentences.first_sentence`): an answer that runs on
    past its first sentence cannot score with text copied after it.

    >>> alr_first_sentence("It is Rome. Paris is in France.", ["paris"])
    0.0
    """

    return alr(first_sentence(prediction), answers)


def chimera_counts(text: str, sources: Sequence[Source], char_ends: Sequence[int], article_of) -> tuple[int, int]:
    """(sentences, chimera sentences) of a generation: a sentence is a **chimera** when its copied tokens come from two
    or more articles (``article_of(doc_id)``: the article of a passage, e.g. its source id), i.e. one statement
    stitched from different articles. A token belongs to the sentence (:func:`tasks.sentences.sentence_spans`) where
    its last character falls; tokens that add no character belong nowhere.

    >>> chimera_counts("Ab cd. Ef gh.", [(1, 0), (1, 1), (2, 5), (2, 6)], [3, 6, 10, 13], {1: "A", 2: "B"}.get)
    (2, 0)
    >>> chimera_counts("Ab cd. Ef gh.", [(1, 0), (2, 1), None, None], [3, 6, 10, 13], {1: "A", 2: "B"}.get)
    (2, 1)
    """

    if len(char_ends) != len(sources):
        raise ValueError(f"{len(char_ends)} character offsets for {len(sources)} tokens")
    sentences = sentence_spans(text)
    articles: list[set] = [set() for _ in sentences]
    j = 0
    for (start, end), src in zip(token_char_spans(char_ends), sources):
        if src is None or end <= start:
            continue
        while j < len(sentences) - 1 and end > sentences[j][1]:
            j += 1
        if sentences and sentences[j][0] < end <= sentences[j][1]:
            articles[j].add(article_of(int(src[0])))
    return len(sentences), sum(len(a) >= 2 for a in articles)


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


# -- significance -----------------------------------------------------------------------------------------
def paired_bootstrap(method: Sequence[float], base: Sequence[float], resamples: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float | int | bool | None]:
    """Paired bootstrap of the mean difference ``method − base`` over the same examples (``method[i]`` and ``base[i]``
    belong to example i).

    ``resamples`` times, n examples are drawn with replacement (``numpy.random.default_rng(seed)``) and the mean of
    their differences taken; the interval is the (1−level)/2 and (1+level)/2 percentiles of those means (linear
    interpolation). ``significant`` = the interval excludes 0. Returns ``{diff, low, high, n, significant}``; with no
    example every value is None (``n`` = 0, ``significant`` False).

    >>> r = paired_bootstrap([2, 3, 4], [1, 2, 3])  # every difference is 1: the interval is [1, 1]
    >>> (r["diff"], r["low"], r["high"], r["significant"])
    (1.0, 1.0, 1.0, True)
    """
    import numpy as np

    if len(method) != len(base):
        raise ValueError(f"paired bootstrap needs paired values: {len(method)} against {len(base)}")
    n = len(method)
    if n == 0:
        return {"diff": None, "low": None, "high": None, "n": 0, "significant": False}
    d = np.asarray(method, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // n)  # bounded memory: resample in chunks
    means = np.concatenate([d[rng.integers(0, n, size=(min(chunk, int(resamples) - i), n))].mean(axis=1)
                            for i in range(0, int(resamples), chunk)])
    low, high = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    low, high = float(low), float(high)
    return {"diff": float(d.mean()), "low": low, "high": high, "n": n, "significant": bool(low > 0 or high < 0)}


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
