"""Measurement tools for developers: what BUILD.md's results table comes from.

Why apart from the package: these serve measurement campaigns, not training runs, and some
parse XLA's dump text or jax internals that change between versions. `python -m rmjax.bench`
(the training step against torch, and compiled memory for a target GPU) stays in rmjax.
"""
