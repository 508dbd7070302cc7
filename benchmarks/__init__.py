"""Benchmarks: ``python -m benchmarks.run [NAME ...]``. They report numbers; tests assert behaviour."""
