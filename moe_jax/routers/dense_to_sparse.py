"""EvoMoE's Dense-to-Sparse gate.

    g = softmax((logits + Gumbel noise) / tau)   in training
    g = softmax(logits / tau)                    at eval

tau follows ``schedules.temperature(step)``. Every expert with g above
``gate_threshold`` is active, and so is each token's argmax; the combine
weight of an active expert is its g (not renormalised). At large tau g is
near uniform and every expert is active (a dense layer); as tau falls the
gate sharpens and fewer experts pass the threshold. Once
``is_hard_top1(step)`` holds only the argmax stays active.

The number of active experts per token varies, so the output has one slot
per expert (K = E) and ``max_assignments`` = T * E. ``nominal_k`` is
``cfg.top_k``: capacity-based dispatch sizes each expert's buffer as if every
token used top_k experts on average, and drops what does not fit.

``gate_routing`` is shared with ``activation_dense_to_sparse``, which only
changes the scores fed to the temperature softmax.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax import schedules
from moe_jax.routers import _common
from moe_jax.routing import (
    RouterConfig, RouterDef, RouterInputs, Routing, register_router)

_NAME = "dense_to_sparse"


def validate(cfg: RouterConfig) -> None:
  _common.validate_top_k(cfg)
  schedules.validate(cfg)
  if not 0.0 <= cfg.gate_threshold < 1.0:
    raise ValueError(
        f"model.moe.router.gate_threshold={cfg.gate_threshold} must be in "
        "[0, 1)")


def gate_routing(scores: jax.Array, logits: jax.Array, inputs: RouterInputs,
                 cfg: RouterConfig, rng: Optional[jax.Array], train: bool,
                 name: str) -> Routing:
  """Temperature-softmax gate over ``scores`` [T, E] (float32).

  ``logits`` are the raw router outputs, used for the z-loss.
  """
  step = _common.require(inputs.step, "step", name)
  num_tokens, num_experts = scores.shape
  tau = schedules.temperature(step, cfg)
  if train:
    rng = _common.require_rng(rng, name)
    scores = scores + jax.random.gumbel(rng, scores.shape, jnp.float32)
  gates = jax.nn.softmax(scores / tau, axis=-1)
  top1 = jax.nn.one_hot(
      jnp.argmax(gates, axis=-1), num_experts, dtype=jnp.bool_)
  mask = (gates > cfg.gate_threshold) | top1
  mask = jnp.where(schedules.is_hard_top1(step, cfg), top1, mask)
  weights = jnp.where(mask, gates, 0.0)
  index = jnp.broadcast_to(
      jnp.arange(num_experts, dtype=jnp.int32), (num_tokens, num_experts))
  return Routing(
      expert_index=index,
      combine_weight=weights,
      mask=mask,
      router_probs=gates,
      aux_losses=_common.logit_aux_losses(logits, gates, index, mask),
      metrics={"temperature": tau},
      max_assignments=num_tokens * num_experts,
      nominal_k=float(cfg.top_k),
  )


def route(inputs: RouterInputs, cfg: RouterConfig, rng: Optional[jax.Array],
          train: bool) -> Routing:
  validate(cfg)
  logits = _common.logits_f32(inputs, _NAME)
  return gate_routing(logits, logits, inputs, cfg, rng, train, _NAME)


register_router(_NAME, RouterDef(
    fn=route, validate=validate,
    doc="EvoMoE dense-to-sparse gate: Gumbel softmax with annealed "
        "temperature and a gate threshold"))
