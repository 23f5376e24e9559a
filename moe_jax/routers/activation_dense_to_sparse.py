"""Dense-to-sparse gate with an activation before the temperature softmax.

From "Is Temperature Sample Efficient for Softmax Gaussian Mixture of
Experts?" (ICML 2024): the linear router output goes through an activation
(``cfg.activation``) before g = softmax(act(logits) / tau). Everything else
(temperature schedule, Gumbel noise in training, threshold, hard top-1)
is the dense-to-sparse gate of ``dense_to_sparse.py``. A bounded activation
such as tanh limits how peaked g can get at a given tau.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from moe_jax.routers import _common, dense_to_sparse
from moe_jax.routing import (
    RouterConfig, RouterDef, RouterInputs, Routing, register_router)

_NAME = "activation_dense_to_sparse"

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "gelu": jax.nn.gelu,
    "relu": jax.nn.relu,
    "softplus": jax.nn.softplus,
    "silu": jax.nn.silu,
    "identity": lambda x: x,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(
        f"model.moe.router.activation={name!r} is not a known activation; "
        f"allowed: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def validate(cfg: RouterConfig) -> None:
  dense_to_sparse.validate(cfg)
  get_activation(cfg.activation)


def route(inputs: RouterInputs, cfg: RouterConfig, rng: Optional[jax.Array],
          train: bool) -> Routing:
  validate(cfg)
  logits = _common.logits_f32(inputs, _NAME)
  scores = get_activation(cfg.activation)(logits)
  return dense_to_sparse.gate_routing(
      scores, logits, inputs, cfg, rng, train, _NAME)


register_router(_NAME, RouterDef(
    fn=route, validate=validate,
    doc="dense-to-sparse gate with an activation before the temperature "
        "softmax (ICML 2024)"))
