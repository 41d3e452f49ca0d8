"""Benchmarks and the evidence study for optax-gc (run as ``python -m benchmarks.<name>``)."""
