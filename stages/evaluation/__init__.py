"""Evaluation half: load a task, generate and score each method, perplexity, the judge, and the report."""
