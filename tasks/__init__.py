"""Evaluation tasks of the NEST reproduction: loaders, prompts, references, metrics (see docs/tasks.md).

Entry points: ``tasks.registry.get(name, **options)``, ``tasks.base.Example``, ``tasks.metrics``, ``tasks.prompts``.
Imports nothing from ``stages`` or ``pipeline``.
"""
