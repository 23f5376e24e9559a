"""Sigmoid top-k with auxiliary-loss-free balancing (DeepSeek-V3).

Affinities s = sigmoid(logits). Experts are selected by s + bias, where the
bias is a non-learned per-expert state that ``update_bias`` nudges after each
training step: down for overloaded experts, up for underloaded ones. The bias
only changes which experts are chosen; the gate is

    gate = s[chosen] / sum(s[chosen]) * routed_scaling_factor.

Optional group-limited routing: the experts form ``num_groups`` equal
contiguous groups; a group's score is the sum of its two best selection
scores (its best when a group has one expert); each token may only use
experts in its ``topk_groups`` best groups.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.config_fields import require
from moe_jax.routers import base
from moe_jax.routing import RouterInputs, Routing, expert_load_fraction

_NAME = "sigmoid_topk"


@dataclasses.dataclass(frozen=True)
class SigmoidTopkConfig(base.TokenChoiceConfig):
  load_balance_coef: float = 0.0        # balance comes from the bias; > 0 adds a small loss
  z_loss_coef: float = 0.0
  bias_update_speed: float = 1e-3       # bias step per training step
  num_groups: int = 1                   # group-limited routing: expert groups
  topk_groups: int = 1                  # groups each token may use
  routed_scaling_factor: float = 1.0

  def validate(self) -> None:
    super().validate()
    require(self.bias_update_speed >= 0, "bias_update_speed", self.bias_update_speed,
            "a number >= 0")
    require(self.num_groups >= 1 and self.num_experts % self.num_groups == 0,
            "num_groups", self.num_groups,
            f"an integer >= 1 that divides num_experts ({self.num_experts})")
    require(1 <= self.topk_groups <= self.num_groups, "topk_groups", self.topk_groups,
            f"1 <= topk_groups <= num_groups ({self.num_groups})")
    reachable = self.topk_groups * (self.num_experts // self.num_groups)
    require(self.top_k <= reachable, "top_k", self.top_k,
            f"at most the {reachable} experts a token can reach (topk_groups="
            f"{self.topk_groups} groups of {self.num_experts // self.num_groups})")
    require(self.routed_scaling_factor > 0, "routed_scaling_factor", self.routed_scaling_factor,
            "a number > 0 (it scales every gate)")


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


def route(inputs: RouterInputs, cfg: SigmoidTopkConfig, rng: Optional[jax.Array],
          train: bool) -> Routing:
  del rng, train  # deterministic
  logits = base.logits_f32(inputs, _NAME)
  bias = base.require_input(inputs.state, "state", _NAME).astype(jnp.float32)
  scores = jax.nn.sigmoid(logits)
  selection = jax.lax.stop_gradient(scores + bias[None, :])
  allowed = group_mask(selection, cfg.num_groups, cfg.topk_groups)
  selection = jnp.where(allowed, selection, -jnp.inf)
  _, index = jax.lax.top_k(selection, cfg.top_k)
  chosen = jnp.take_along_axis(scores, index, axis=-1)
  weights = chosen / jnp.sum(chosen, axis=-1, keepdims=True) * cfg.routed_scaling_factor
  probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
  return base.top_k_routing(logits, probs, weights, index)

BIAS = base.RouterState(
    name="bias",
    init=lambda cfg: jnp.zeros((cfg.num_experts,), jnp.float32),
    update=lambda bias, routing, cfg: update_bias(
        bias, expert_load_fraction(routing), cfg.bias_update_speed))

ROUTER = base.register(base.Router(
    name=_NAME, config=SigmoidTopkConfig, route=route,
    inputs=frozenset({"logits", "state"}), aux_losses=base.LOGIT_AUX_LOSSES, state=BIAS,
    doc="sigmoid top-k with bias-based balancing and group-limited routing (DeepSeek-V3)"))
