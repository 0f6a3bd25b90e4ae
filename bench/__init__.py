"""Benchmarks against in-process baselines and the peers (TRL); `python -m bench` runs them all."""
