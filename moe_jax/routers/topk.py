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
  num_tokens = logits.shape[0]
  k = cfg.top_k
  probs = jax.nn.softmax(logits, axis=-1)
  weights, index = jax.lax.top_k(probs, k)
  if cfg.renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  index = index.astype(jnp.int32)
  mask = jnp.ones(index.shape, jnp.bool_)
  return Routing(
      expert_index=index,
      combine_weight=weights,
      mask=mask,
      router_probs=probs,
      aux_losses=base.logit_aux_losses(logits, probs, index, mask),
      metrics={},
      max_assignments=num_tokens * k,
      nominal_k=float(k),
  )


ROUTER = base.register(base.Router(
    name="topk", config=TopkConfig, route=route, aux_losses=base.LOGIT_AUX_LOSSES,
    doc="softmax top-k (Switch k=1, GShard k=2)"))
