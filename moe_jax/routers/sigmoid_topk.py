"""Sigmoid top-k with auxiliary-loss-free balancing (DeepSeek-V3).

Affinities s = sigmoid(logits). Experts are selected by s + bias, where the
bias is a non-learned per-expert state that ``update_bias`` nudges after each
step: down for overloaded experts, up for underloaded ones. The bias only
changes which experts are chosen; the gate is

    gate = s[chosen] / sum(s[chosen]) * routed_scaling_factor.

Optional group-limited routing: the experts form ``num_groups`` equal
contiguous groups; a group's score is the sum of its two best selection
scores (its best when a group has one expert); each token may only use
experts in its ``topk_groups`` best groups.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.routers import _common
from moe_jax.routing import (
    RouterConfig, RouterDef, RouterInputs, Routing, register_router)

_NAME = "sigmoid_topk"


def validate(cfg: RouterConfig) -> None:
  _common.validate_top_k(cfg)
  if cfg.num_groups < 1 or cfg.num_experts % cfg.num_groups:
    raise ValueError(
        f"model.moe.router.num_groups={cfg.num_groups} must be >= 1 and divide "
        f"num_experts={cfg.num_experts}")
  if not 1 <= cfg.topk_groups <= cfg.num_groups:
    raise ValueError(
        f"model.moe.router.topk_groups={cfg.topk_groups} must be in "
        f"[1, num_groups={cfg.num_groups}]")
  allowed = cfg.topk_groups * (cfg.num_experts // cfg.num_groups)
  if cfg.top_k > allowed:
    raise ValueError(
        f"model.moe.router.top_k={cfg.top_k} exceeds the {allowed} experts a "
        f"token can reach (topk_groups={cfg.topk_groups} groups of "
        f"{cfg.num_experts // cfg.num_groups})")


def update_bias(bias: jax.Array, load_fraction: jax.Array,
                speed: float) -> jax.Array:
  """bias + speed * sign(mean(load_fraction) - load_fraction).

  Overloaded experts (above the mean load) get a lower bias, underloaded ones
  a higher bias; experts exactly at the mean keep theirs.
  """
  load_fraction = load_fraction.astype(jnp.float32)
  error = jnp.mean(load_fraction) - load_fraction
  return bias + speed * jnp.sign(error).astype(bias.dtype)


def group_mask(selection: jax.Array, num_groups: int,
               topk_groups: int) -> jax.Array:
  """Bool [T, E]: experts in each token's ``topk_groups`` best groups."""
  num_tokens, num_experts = selection.shape
  if topk_groups >= num_groups:
    return jnp.ones(selection.shape, jnp.bool_)
  per_group = num_experts // num_groups
  grouped = selection.reshape(num_tokens, num_groups, per_group)
  best, _ = jax.lax.top_k(grouped, min(2, per_group))
  group_score = jnp.sum(best, axis=-1)                       # [T, G]
  _, kept = jax.lax.top_k(group_score, topk_groups)          # [T, topk_groups]
  kept_groups = jnp.any(
      kept[:, :, None] == jnp.arange(num_groups)[None, None, :], axis=1)
  return jnp.repeat(kept_groups, per_group, axis=1)


def route(inputs: RouterInputs, cfg: RouterConfig, rng: Optional[jax.Array],
          train: bool) -> Routing:
  del rng, train  # deterministic
  validate(cfg)
  logits = _common.logits_f32(inputs, _NAME)
  bias = _common.require(inputs.bias, "bias", _NAME).astype(jnp.float32)
  num_tokens = logits.shape[0]
  k = cfg.top_k
  scores = jax.nn.sigmoid(logits)
  selection = jax.lax.stop_gradient(scores + bias[None, :])
  allowed = group_mask(selection, cfg.num_groups, cfg.topk_groups)
  selection = jnp.where(allowed, selection, -jnp.inf)
  _, index = jax.lax.top_k(selection, k)
  index = index.astype(jnp.int32)
  chosen = jnp.take_along_axis(scores, index, axis=-1)
  weights = chosen / jnp.sum(chosen, axis=-1, keepdims=True)
  weights = weights * cfg.routed_scaling_factor
  mask = jnp.ones(index.shape, jnp.bool_)
  probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
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


register_router(_NAME, RouterDef(
    fn=route, needs_bias=True, validate=validate,
    doc="sigmoid top-k with bias-based balancing and group-limited routing "
        "(DeepSeek-V3)"))
