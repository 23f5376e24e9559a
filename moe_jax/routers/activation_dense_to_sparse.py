"""Dense-to-sparse gate with an activation before the temperature softmax.

From "Is Temperature Sample Efficient for Softmax Gaussian Mixture of
Experts?" (ICML 2024): the linear router output goes through an activation
(``activation``) before g = softmax(act(logits) / tau). Everything else
(temperature schedule, Gumbel noise in training, threshold, hard top-1)
is the dense-to-sparse gate of ``dense_to_sparse.py``. A bounded activation
such as tanh limits how peaked g can get at a given tau.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from moe_jax.config_fields import one_of
from moe_jax.routers import base, dense_to_sparse
from moe_jax.routing import RouterInputs, Routing

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


@dataclasses.dataclass(frozen=True)
class ActivationDenseToSparseConfig(dense_to_sparse.DenseToSparseConfig):
  activation: str = "tanh"              # applied to the logits before the softmax

  def validate(self) -> None:
    super().validate()
    one_of("activation", self.activation, sorted(ACTIVATIONS))


def route(inputs: RouterInputs, cfg: ActivationDenseToSparseConfig,
          rng: Optional[jax.Array], train: bool) -> Routing:
  logits = base.logits_f32(inputs, _NAME)
  scores = ACTIVATIONS[cfg.activation](logits)
  return dense_to_sparse.gate_routing(
      scores, logits, inputs, cfg, rng, train, _NAME)


ROUTER = base.register(base.Router(
    name=_NAME, config=ActivationDenseToSparseConfig, route=route,
    inputs=frozenset({"logits", "step"}), aux_losses=base.LOGIT_AUX_LOSSES,
    doc="dense-to-sparse gate with an activation before the temperature softmax "
        "(ICML 2024)"))
