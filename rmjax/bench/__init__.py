"""Throughput benchmark: rmjax's training step against a PyTorch/transformers/peft reference.

Why it exists: the speed claims in BUILD.md must come from one reproducible command,
`python -m rmjax.bench`, that runs both implementations on the same model shape, the same
synthetic batches and the same head, and scores them with the same FLOP arithmetic
(`common.py`). `jax_impl.py` times rmjax's real train step; `torch_ref.py` is the reference.
"""
