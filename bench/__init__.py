"""Benchmarks: scripts that print their figures (BENCHMARKS.md records them)."""
