"""The experiment grid of a profile: which (task, method, variant, decoding config) runs the report needs.

- ``main``: every method on every task, with the profile's decoding config (``[decoding] config``), each task's
  overrides (``[decoding] task_config``; e.g. ``document_end`` for the long-form bios) and each method's overrides
  (``[decoding] method_config``; e.g. RA-NEST's larger γ, as the paper's 5e-1), merged in that order.
- ``gamma=<γ>``: NEST on the sweep tasks at each γ of ``[decoding] gammas`` (the paper's Fig. 2b).
- ``ablation:<step>``: the paper's Table 3 on the ablation tasks: ``knnlm`` (fixed λ) → ``rrc`` (kNN-LM with the
  Relative Retrieval Confidence λ_t, one token per step) → ``span`` (+ dynamic span selection, spans copied with
  verification all but switched off: γ = 1e-9) → ``nest`` (+ relaxed speculative decoding at the main γ).

A run's Generate key depends on its decoding config only, never on the variant's name, so a variant whose config equals
another's (the sweep's main γ, the ablation's kNN-LM and NEST steps) reuses that artifact.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Run:
    task: str
    method: str
    variant: str
    config: dict = field(default_factory=dict, hash=False, compare=False)


def merged(*dicts: dict) -> dict:
    out: dict = {}
    for d in dicts:
        out.update({k: v for k, v in (d or {}).items()})
    return dict(sorted(out.items()))


def grid(tasks: list[str], methods: list[str], base_config: dict, method_config: dict, gammas: list[float],
         sweep_tasks: list[str], ablation_tasks: list[str], task_config: dict | None = None) -> list[Run]:
    task_config = task_config or {}
    runs: list[Run] = []

    def config_of(t: str, m: str) -> dict:
        return merged(base_config, task_config.get(t, {}), method_config.get(m, {}))

    for t in tasks:
        for m in methods:
            runs.append(Run(t, m, "main", config_of(t, m)))
    for t in sweep_tasks:
        for g in gammas:
            runs.append(Run(t, "nest", f"gamma={g:g}", merged(config_of(t, "nest"), {"gamma": float(g)})))
    for t in ablation_tasks:
        knn_cfg, nest_cfg = config_of(t, "knnlm"), config_of(t, "nest")
        runs += [Run(t, "knnlm", "ablation:knnlm", knn_cfg),
                 Run(t, "knnlm", "ablation:rrc", merged(knn_cfg, {"knnlm_lambda_mode": "rrc"})),
                 Run(t, "nest", "ablation:span", merged(nest_cfg, {"gamma": 1e-9})),
                 Run(t, "nest", "ablation:nest", nest_cfg)]
    return runs
