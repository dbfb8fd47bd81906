"""Benchmarks: each ``bench/bench_<name>.py`` has ``main(argv) -> dict``; ``python -m bench.run`` runs them all."""
