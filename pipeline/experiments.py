"""The experiment grid of a profile: which (task, method, variant, decoding config) runs the report needs.

The variants and the config precedence are declared in :mod:`stages.evaluation.experiments` (read by the report too):
``main`` runs every method on every task; ``gamma=<γ>`` the sweep method on the sweep tasks at each γ of ``[decoding]
gammas``; ``ablation:<step>`` the steps of Table 3 on the ablation tasks. A run's config is
:func:`~stages.evaluation.experiments.merge_config` of the profile's ``[decoding] config``, the task's overrides
(``[decoding] task_config``; e.g. ``document_end`` for the long-form bios), the method's (``[decoding] method_config``;
e.g. RA-NEST's larger γ, as the paper's 5e-1) and the variant's.

A run's Generate key depends on its decoding config only, never on the variant's name, so a variant whose config equals
another's (the sweep's main γ, the ablation's kNN-LM and NEST steps) reuses that artifact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stages.evaluation.experiments import ABLATION_STEPS, MAIN, SWEEP_METHOD, merge_config, sweep_variant


@dataclass(frozen=True)
class Run:
    task: str
    method: str
    variant: str
    config: dict = field(default_factory=dict, hash=False, compare=False)


def grid(tasks: list[str], methods: list[str], base_config: dict, method_config: dict, gammas: list[float],
         sweep_tasks: list[str], ablation_tasks: list[str], task_config: dict | None = None) -> list[Run]:
    task_config = task_config or {}

    def config_of(t: str, m: str, variant: dict | None = None) -> dict:
        return merge_config(base_config, task_config.get(t), method_config.get(m), variant)

    runs = [Run(t, m, MAIN, config_of(t, m)) for t in tasks for m in methods]
    runs += [Run(t, SWEEP_METHOD, sweep_variant(g), config_of(t, SWEEP_METHOD, {"gamma": float(g)}))
             for t in sweep_tasks for g in gammas]
    runs += [Run(t, step.method, step.variant, config_of(t, step.method, step.overrides))
             for t in ablation_tasks for step in ABLATION_STEPS]
    return runs
