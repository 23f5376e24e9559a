"""Expert-choice routing (Zhou et al., 2022).

probs = softmax(logits) over experts. Each expert takes the C tokens with the
highest probs[:, e], C = clip(round(T * expert_capacity_factor / E), 1, T)
(round half up). A token may be taken by any number of experts, including
none. Output is token-major with one slot per expert (K = E): slot (t, e) is
expert e, valid when e took t, weighted probs[t, e].

Not causal: whether a token is taken depends on the scores of every other
token in the group, later ones included, so in an autoregressive LM the
routing of position t leaks information about positions after t. Use it for
encoders, or with groups that never span a sequence's future.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.routers import _common
from moe_jax.routing import (
    RouterConfig, RouterDef, RouterInputs, Routing, register_router)

_NAME = "expert_choice"


def validate(cfg: RouterConfig) -> None:
  _common.validate_num_experts(cfg)
  if not cfg.expert_capacity_factor > 0:
    raise ValueError(
        "model.moe.router.expert_capacity_factor must be > 0, got "
        f"{cfg.expert_capacity_factor}")


def capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
  """Tokens per expert: clip(round(T * capacity_factor / E), 1, T)."""
  c = math.floor(num_tokens * capacity_factor / num_experts + 0.5)
  return int(min(max(c, 1), num_tokens))


def route(inputs: RouterInputs, cfg: RouterConfig, rng: Optional[jax.Array],
          train: bool) -> Routing:
  del rng, train  # deterministic
  validate(cfg)
  logits = _common.logits_f32(inputs, _NAME)
  num_tokens, num_experts = logits.shape
  c = capacity(num_tokens, num_experts, cfg.expert_capacity_factor)
  probs = jax.nn.softmax(logits, axis=-1)
  _, taken = jax.lax.top_k(probs.T, c)                       # [E, C] token ids
  chosen = jnp.zeros((num_experts, num_tokens), jnp.bool_)
  chosen = chosen.at[jnp.arange(num_experts)[:, None], taken].set(True)
  mask = chosen.T                                            # [T, E]
  weights = jnp.where(mask, probs, 0.0)
  index = jnp.broadcast_to(
      jnp.arange(num_experts, dtype=jnp.int32), (num_tokens, num_experts))
  return Routing(
      expert_index=index,
      combine_weight=weights,
      mask=mask,
      router_probs=probs,
      aux_losses=_common.logit_aux_losses(logits, probs, index, mask),
      metrics={},
      max_assignments=num_experts * c,
      nominal_k=num_experts * c / num_tokens,
  )


register_router(_NAME, RouterDef(
    fn=route, causal=False, validate=validate,
    doc="expert choice: each expert takes its top-C tokens (Zhou 2022); "
        "not causal"))
