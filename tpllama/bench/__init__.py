"""Benchmark helpers: random-weight models of named shapes."""
