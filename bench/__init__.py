"""Benchmarks: `python -m bench NAME [--quick] [--out DIR]`."""
