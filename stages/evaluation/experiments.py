"""The paper's experiments as data: which variants of a method the report compares, and how each one's decoding config
is made. The grid (``pipeline/wiring/experiments.py``) builds its runs from these declarations and the report
(``stages/evaluation/report.py``) reads its Table 3 and γ-sweep rows back by the same names, so a variant is stated
once.

- ``main``: every method on every task.
- ``gamma=<γ>``: :data:`SWEEP_METHOD` at each leniency γ of ``[decoding] gammas`` (the paper's Fig. 2b).
- ``ablation:<step>``: Table 3, :data:`ABLATION_STEPS` in order: ``knnlm`` (fixed λ) → ``rrc`` (kNN-LM with the
  Relative Retrieval Confidence λ_t, one token per step) → ``span`` (+ dynamic span selection, spans copied with
  verification all but switched off: γ = 1e-9) → ``nest`` (+ relaxed speculative decoding at the main γ).

Imports nothing: the pipeline computes keys from it without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAIN = "main"
SWEEP_METHOD = "nest"  # the method whose leniency γ the sweep varies
SWEEP_PREFIX = "gamma="
ABLATION_PREFIX = "ablation:"


@dataclass(frozen=True)
class AblationStep:
    """One row of Table 3: ``method`` run with its config plus ``overrides``."""

    name: str
    method: str
    label: str
    overrides: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def variant(self) -> str:
        return ABLATION_PREFIX + self.name


ABLATION_STEPS = (
    AblationStep("knnlm", "knnlm", "kNN-LM (two-stage, fixed λ)"),
    AblationStep("rrc", "knnlm", "+ Relative Retrieval Confidence", {"knnlm_lambda_mode": "rrc"}),
    AblationStep("span", "nest", "+ Dynamic span selection", {"gamma": 1e-9}),
    AblationStep("nest", "nest", "+ Relaxed speculative decoding (= NEST)"),
)
FULL_ABLATION = ABLATION_STEPS[-1].variant  # the last step: the method itself, at its main config


def sweep_variant(gamma: float) -> str:
    """``gamma=<γ>``, γ in the shortest form (``gamma=0.001``)."""
    return f"{SWEEP_PREFIX}{float(gamma):g}"


def is_sweep(variant: str) -> bool:
    return variant.startswith(SWEEP_PREFIX)


def merge_config(*layers: dict | None) -> dict:
    """One decoding config from override layers, later layers winning, keys sorted (a run's key never depends on the
    order the options were written in). The one precedence of the project, for the grid and ``nest generate`` alike:
    the profile's ``[decoding] config`` → the task's ``task_config`` → the method's ``method_config`` → a variant's
    overrides (γ of the sweep, an ablation step) or the command line's flags."""
    out: dict = {}
    for layer in layers:
        out.update(layer or {})
    return dict(sorted(out.items()))
