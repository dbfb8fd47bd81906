"""The experiment grid: per-task and per-method decoding overrides merge in that order, and only where they apply."""

from pipeline.wiring.experiments import grid


def _runs(**kw):
    args = dict(tasks=["bio", "completion"], methods=["base", "nest", "ra_nest"], base_config={"gamma": 0.05, "passages": 10},
                method_config={"ra_nest": {"gamma": 0.5}}, gammas=[0.5, 0.005], sweep_tasks=["bio"],
                ablation_tasks=["bio"], task_config={"bio": {"document_end": "eos", "gamma": 0.01}})
    args.update(kw)
    return grid(**args)


def test_task_overrides_apply_to_their_task_only_and_methods_win():
    runs = {(r.task, r.method, r.variant): r.config for r in _runs()}
    assert runs[("bio", "nest", "main")] == {"document_end": "eos", "gamma": 0.01, "passages": 10}
    assert runs[("bio", "ra_nest", "main")]["gamma"] == 0.5  # the method's override comes last
    assert runs[("bio", "ra_nest", "main")]["document_end"] == "eos"
    assert "document_end" not in runs[("completion", "nest", "main")]
    assert runs[("completion", "nest", "main")]["gamma"] == 0.05


def test_sweep_and_ablation_carry_the_task_overrides():
    runs = {(r.task, r.method, r.variant): r.config for r in _runs()}
    assert runs[("bio", "nest", "gamma=0.005")] == {"document_end": "eos", "gamma": 0.005, "passages": 10}
    assert runs[("bio", "knnlm", "ablation:knnlm")]["document_end"] == "eos"
    assert runs[("bio", "nest", "ablation:nest")] == runs[("bio", "nest", "main")]


def test_without_task_config_the_grid_is_unchanged():
    a = [(r.task, r.method, r.variant, tuple(sorted(r.config.items()))) for r in _runs(task_config=None)]
    b = [(r.task, r.method, r.variant, tuple(sorted(r.config.items()))) for r in _runs(task_config={})]
    assert a == b and all("document_end" not in dict(x[3]) for x in a)
