"""The stage DAG, wired per concern: config sections, corpus and LM, retrieval, evaluation (pipeline/dag.py re-exports)."""
