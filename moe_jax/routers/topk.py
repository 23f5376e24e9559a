"""Softmax top-k token-choice router (Switch for k=1, GShard for k=2).

Each token takes the k experts with the highest softmax probability; its
combine weights are those k probabilities, renormalised to sum to 1 when
``cfg.renormalize``. With k=1 and renormalisation the single weight is the
constant 1 and the router gets no gradient from the task loss (only from the
auxiliary losses); Switch-style k=1 training wants ``renormalize=False``.
Jitter is applied by the layer to the router input, not here.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.routers import _common
from moe_jax.routing import (
    RouterConfig, RouterDef, RouterInputs, Routing, register_router)


def validate(cfg: RouterConfig) -> None:
  _common.validate_top_k(cfg)


def route(inputs: RouterInputs, cfg: RouterConfig, rng: Optional[jax.Array],
          train: bool) -> Routing:
  del rng, train  # deterministic
  validate(cfg)
  logits = _common.logits_f32(inputs, "topk")
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
      aux_losses=_common.logit_aux_losses(logits, probs, index, mask),
      metrics={},
      max_assignments=num_tokens * k,
      nominal_k=float(k),
  )


register_router("topk", RouterDef(
    fn=route, validate=validate,
    doc="softmax top-k (Switch k=1, GShard k=2)"))
