"""Benchmark suite: ``pytest bench/ --benchmark-only`` (see bench/conftest.py)."""
