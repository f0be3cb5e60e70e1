"""Benchmark scripts, run as `python -m benchmarks.<name>`; commands and figures in RESULTS.md."""
