"""Benchmarks for cgb-worker: ``make bench`` runs :mod:`benchmarks.run` and writes BENCHMARKS.md."""
