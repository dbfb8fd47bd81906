"""NestConfig: every hyperparameter of the decoders, with the paper's defaults and the released code's
deviations D1-D4 as options (:meth:`NestConfig.released_code`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

KEY_LAYERS = ("paper", "code")
SPAN_STARTS = ("paper", "code")
SPAN_ARTICLES = ("any", "sentence")
MASKINGS = ("paper", "code", "off")
ACCEPTANCES = ("relaxed", "strict")
KNN_LAMBDAS = ("fixed", "rrc")
OVERFLOWS = ("error", "truncate_left")
DOCUMENT_ENDS = ("none", "eos")
KEY_PRECISIONS = ("fp32", "bf16")


@dataclass
class NestConfig:
    """Decoding hyperparameters. Symbols as in the paper (NEST, Li et al. 2024).

    Retrieval / token index
        passages (b): passages per example used for the token index (the caller retrieves them; extra ones are ignored).
        neighbors (r): tokens retrieved per query, clamped to the number of valid keys (B7).
        key_layer: ``"paper"`` = input of the last layer's feed-forward after its layer norm (output of
            ``post_attention_layernorm``); ``"code"`` = ``hidden_states[-2]``, the input of the last block (D1).
        passage_bos: prepend the tokenizer's BOS when encoding a passage alone: ``"auto"`` (if the tokenizer adds one by
            default), ``"yes"``, ``"no"``.
        key_precision: the arithmetic of the passage-key encoding (beyond the paper): ``"fp32"`` (paper, default: the LM
            in its own dtype, fp32 on CPU) or ``"bf16"`` (the forward up to the key layer under bf16 autocast: 1.4-1.6x
            the keys/s on an AVX512-BF16 CPU; keys are still stored as fp32 and stay within the project's tolerance of
            ≤ 2% relative PPL, docs/decoding.md "Key precision"). It enters the keys' identity (key cache folder, key
            store): bf16 keys are never mixed with fp32 ones.
    Mixture and RRC (Eq. 2-4)
        alpha (α), tau (τ): λ_t = σ((d_min/d_max − α)/τ).
        mu (µ): p_kNN ∝ exp(µ·s); None = the paper's 1/√d. (With a small LM the paper's µ can make p_kNN nearly flat:
            see docs/decoding.md, "Notes on small LMs".)
        lm_temperature (T): p_LM = softmax(logits/T) inside the mixture; paper 1.0, released code 0.7 (D2).
        force_lambda: use this λ for every step instead of RRC (ablations; invariant (a) uses 1.0).
        knnlm_lambda, knnlm_lambda_mode: the kNN-LM baseline's fixed λ (0.7) or ``"rrc"`` (the ablation "kNN-LM + RRC").
    Span selection and relaxed speculative decoding (Eq. 5-7)
        delta (δ): token mode when λ_t > δ, else span mode.
        span_length (n): draft length.
        span_start: ``"paper"`` = the nearest neighbour whose value is argmax p_M; ``"code"`` = the neighbour maximising
            λ·p_LM(v_i) + 1e-6·w_i (D3).
        gamma (γ, leniency): accept draft token w iff p_M(w) > 0.5·γ·max p_M (greedy Eq. 7).
        acceptance: ``"relaxed"`` (Eq. 7) or ``"strict"`` (accept only argmax p_M: lossless w.r.t. token-by-token p_M).
        streaming: after a fully accepted draft, draft the next n tokens of the same passage (still verified).
        span_start_passages (beyond the paper; 0 = off, the paper): a span may start only in the articles of the
            top-``span_start_passages`` retrieved passages (every retrieved passage of those articles; the token index
            still holds all b passages for p_kNN and RRC). A span start neighbour from another article is never
            chosen: the step is token mode instead. Against copying a namesake's article (a bio of Stefan Banach
            opening with Henryk Sienkiewicz's "was a Polish ...").
        span_article (beyond the paper): ``"any"`` (paper) or ``"sentence"``: within one sentence, a span may start
            only in an article the sentence has already copied from (the first span of a sentence is free), so that no
            sentence is stitched from two articles (a *chimera*, :func:`tasks.metrics.chimera_counts`). Articles are
            told apart by the passages' titles.
        masking: ``"paper"`` = every emitted corpus token's key is masked; ``"code"`` = only the first emitted key of a
            step, never a passage's first key (D4); ``"off"``.
        token_mode_attribution: a token-mode token whose value equals the selected neighbour's is recorded as
            *supported* by that neighbour (never as copied: ``Generation.supported``), and masking masks that key.
        sink_keys: ``"keep"`` (paper) or ``"drop"``: leave out each passage's first key, the state of the attention sink
            (the first position; a BOS when there is one), whose norm is ~3x the others' on SmolLM2. Once r covers every
            key (few passages: r is clamped to the valid keys, B7), those outliers set d_max for every query, so RRC's
            d_min/d_max falls to ~0.04 and λ_t stays near σ(−α/τ): span mode at every step, whatever the retrieval
            confidence (docs/tuning.md).
        document_end: ``"none"`` (paper and released code: a passage's last token has no key, so nothing in the
            datastore says "the article ends here") or ``"eos"`` (beyond the paper: the last token of a passage that ends
            its source article gets a key whose value is EOS, so a generation that has copied an article to its end is
            told to stop there instead of stitching another article on; docs/decoding.md, "Ending with the article").
    Generation
        max_new_tokens (the fallback for a request that sets none: the Generate stage sets each example's length and stop
        rule from its task family, tasks/stopping.py), min_new_tokens (EOS, the document-end key's EOS and the stop rule
        are suppressed until this many tokens are written, capped by the example's length: with min = max every method
        writes exactly that many tokens, so speeds compare equal work; 0 = off), stop_at_eos (B9: text after EOS is never emitted), batch_size, do_sample/temperature/top_k/top_p
        and seed (base and RA only), ra_passages (top-3 in the prompt), prompt_overflow (``"error"`` or
        ``"truncate_left"`` for prompts that leave no room in the context window).
    Implementation
        passage_batch_size: passages per LM batch when encoding keys. key_cache_dir: optional on-disk passage-key cache
        shared across processes. key_cache_max_bytes: in-memory cache budget. lm_identity: name for the LM in the key
        cache (default: a fingerprint of the weights). compact_min_slots/compact_hole_fraction: when the shared KV cache
        is compacted (rejected draft slots are masked "holes" until then).
    """

    # retrieval / token index
    passages: int = 40
    neighbors: int = 1024
    key_layer: str = "paper"
    passage_bos: str = "auto"
    # mixture and RRC
    alpha: float = 0.3
    tau: float = 0.1
    mu: float | None = None
    lm_temperature: float = 1.0
    force_lambda: float | None = None
    knnlm_lambda: float = 0.7
    knnlm_lambda_mode: str = "fixed"
    # span selection and relaxed speculative decoding
    delta: float = 0.5
    span_length: int = 64
    span_start: str = "paper"
    gamma: float = 5e-4
    acceptance: str = "relaxed"
    streaming: bool = True
    masking: str = "paper"
    token_mode_attribution: bool = True
    document_end: str = "none"
    sink_keys: str = "keep"
    span_start_passages: int = 0
    span_article: str = "any"
    key_precision: str = "fp32"
    # generation
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    stop_at_eos: bool = True
    batch_size: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    ra_passages: int = 3
    prompt_overflow: str = "error"
    # implementation
    passage_batch_size: int = 16
    key_cache_dir: str | None = None
    key_cache_max_bytes: int = 2 << 30
    lm_identity: str | None = None
    compact_min_slots: int = 256
    compact_hole_fraction: float = 0.5

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad option."""
        choices = {"key_layer": KEY_LAYERS, "span_start": SPAN_STARTS, "masking": MASKINGS,
                   "acceptance": ACCEPTANCES, "knnlm_lambda_mode": KNN_LAMBDAS, "prompt_overflow": OVERFLOWS,
                   "passage_bos": ("auto", "yes", "no"), "document_end": DOCUMENT_ENDS,
                   "sink_keys": ("keep", "drop"), "span_article": SPAN_ARTICLES, "key_precision": KEY_PRECISIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"NestConfig.{name}={getattr(self, name)!r}; expected one of {allowed}")
        positive = ("passages", "neighbors", "span_length", "batch_size", "passage_batch_size")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"NestConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if int(self.min_new_tokens) < 0:
            raise ValueError(f"NestConfig.min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if int(self.span_start_passages) < 0:
            raise ValueError(f"NestConfig.span_start_passages must be >= 0, got {self.span_start_passages}")
        if self.max_new_tokens < 0:
            raise ValueError(f"NestConfig.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.mu is not None and not self.mu > 0:
            raise ValueError(f"NestConfig.mu (µ) must be > 0, got {self.mu}")
        if not self.tau > 0:
            raise ValueError(f"NestConfig.tau (τ) must be > 0, got {self.tau}")
        if not self.lm_temperature > 0 or not self.temperature > 0:
            raise ValueError("NestConfig temperatures must be > 0")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"NestConfig.gamma (γ) must be in (0, 1], got {self.gamma}")
        for name in ("knnlm_lambda", "force_lambda"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 1:
                raise ValueError(f"NestConfig.{name} must be in [0, 1], got {v}")

    @classmethod
    def released_code(cls, **overrides) -> "NestConfig":
        """The released code's behaviour (docs/decoding.md, "Bugs and deviations"): key layer ``hidden_states[-2]``
        (D1), p_LM at T = 0.7 (D2), span start by λ·p_LM(v_i) (D3), one masked key per step (D4). The bugs B1-B12 are
        not reproduced."""
        base = dict(key_layer="code", lm_temperature=0.7, span_start="code", masking="code")
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes) -> "NestConfig":
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The NestConfig fields by what they tune. A decoding method declares the groups (and single fields) it reads
# (``Decoder.reads``, stages/decoding/registry.py): those, and only those, enter its Generate/Perplexity key, so that
# changing γ reruns NEST and RA-NEST but not the base LM, RA or kNN-LM.
GENERATION = ("max_new_tokens", "min_new_tokens", "stop_at_eos", "batch_size", "prompt_overflow")
SAMPLING = ("do_sample", "temperature", "top_k", "top_p", "seed")
TOKEN_INDEX = ("passages", "neighbors", "key_layer", "passage_bos", "document_end", "sink_keys", "key_precision")
MIXTURE = ("alpha", "tau", "mu", "lm_temperature", "force_lambda")
KNNLM_LAMBDA = ("knnlm_lambda", "knnlm_lambda_mode")
SPANS = ("delta", "span_length", "span_start", "gamma", "acceptance", "streaming", "masking", "token_mode_attribution",
         "span_start_passages", "span_article")
# resources: never change a token, never in a key
IMPLEMENTATION = ("passage_batch_size", "key_cache_dir", "key_cache_max_bytes", "lm_identity", "compact_min_slots",
                  "compact_hole_fraction")
FIELD_GROUPS = {"generation": GENERATION, "sampling": SAMPLING, "token_index": TOKEN_INDEX, "mixture": MIXTURE,
                "knnlm_lambda": KNNLM_LAMBDA, "spans": SPANS}
# evaluation mode (perplexity) stops at the mixture (paper §3.2): spans, γ, sampling and lengths do not enter it
NOT_IN_EVALUATION = frozenset(SPANS + SAMPLING + ("max_new_tokens", "min_new_tokens", "stop_at_eos", "batch_size"))
# options that switch a behaviour on: a method that does not read one refuses a non-default value (as HF's generate
# refuses flags it cannot honour) instead of silently decoding otherwise
MODE_SWITCHES = ("do_sample",)


def config_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(NestConfig))


def expand_reads(names) -> frozenset[str]:
    """The NestConfig fields named by ``names``: group names of :data:`FIELD_GROUPS` and single field names."""
    fields, out = set(config_fields()), set()
    for name in names:
        if name in FIELD_GROUPS:
            out.update(FIELD_GROUPS[name])
        elif name in fields:
            out.add(name)
        else:
            raise ValueError(f"{name!r} is neither a NestConfig field nor a field group {tuple(FIELD_GROUPS)}")
    return frozenset(out)
