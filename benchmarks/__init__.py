"""Benchmarks: one entry point per measured thing; results and commands in BENCHMARKS.md."""
