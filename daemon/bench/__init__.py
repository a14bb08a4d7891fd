"""Benchmarks: each compares against its baseline measured in the same run and prints ratios."""
