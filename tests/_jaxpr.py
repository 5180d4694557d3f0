"""Walking a jaxpr, for tests that check what a traced program computes (shapes, primitives)."""

from __future__ import annotations

from typing import Iterator

import jax
import jax.extend


def equations(jaxpr: jax.extend.core.Jaxpr) -> Iterator[jax.extend.core.JaxprEqn]:
  """Every equation of a jaxpr, those of nested jaxprs (jit, scan, remat, custom_vjp) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from equations(sub)
