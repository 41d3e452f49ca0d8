"""Runnable examples for optax-gc (``python -m examples.<name>.<script>``)."""
