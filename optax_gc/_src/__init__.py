"""Implementation of optax_gc; import the public names from ``optax_gc``."""
