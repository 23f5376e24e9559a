"""Softmax top-k token-choice router (Switch for k=1, GShard for k=2).

Each token takes the k experts with the highest softmax probability; its
combine weights are those k probabilities, renormalised to sum to 1 when
``renormalize``. With k=1 and renormalisation the single weight is the
constant 1 and the router gets no gradient from the task loss (only from the
auxiliary losses); Switch-style k=1 training wants ``renormalize=False``.
Jitter is applied by the layer to the router input, not here.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.routers import base
from moe_jax.routing import RouterInputs, Routing


@dataclasses.dataclass(frozen=True)
class TopkConfig(base.TokenChoiceConfig):
  renormalize: bool = True              # renormalise the k weights to sum to 1


def route(inputs: RouterInputs, cfg: TopkConfig, rng: Optional[jax.Array],
          train: bool) -> Routing:
  del rng, train  # deterministic
  logits = base.logits_f32(inputs, "topk")
  probs = jax.nn.softmax(logits, axis=-1)
  weights, index = jax.lax.top_k(probs, cfg.top_k)
  if cfg.renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return base.top_k_routing(logits, probs, weights, index)

ROUTER = base.register(base.Router(
    name="topk", config=TopkConfig, route=route, aux_losses=base.LOGIT_AUX_LOSSES,
    doc="softmax top-k (Switch k=1, GShard k=2)"))
