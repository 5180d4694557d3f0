"""rmjax: train step-level confidence models (process reward models) in JAX.

A decoder LLM reads a problem and its reasoning steps; a `<CONFIDENCE>` marker token follows
every step and an MLP head on the marker's hidden state predicts the probability that the step
is correct. See BUILD.md for the architecture.
"""

__version__ = "0.1.0"
MARKER_TOKEN = "<CONFIDENCE>"
