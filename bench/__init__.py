"""Benchmarks (`cpt bench`, `make bench`): tables with ratios; speed targets live here, not in tests."""
