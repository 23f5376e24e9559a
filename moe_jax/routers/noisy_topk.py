"""Noisy top-k gating (Shazeer et al., 2017).

In training the gate scores are H = logits + N(0, 1) * softplus(noise_logits);
at eval H = logits. A token keeps the k largest entries of H and its combine
weights are the softmax over those k values. ``router_probs`` = softmax(H).

Besides load_balance and z_loss (on the clean logits) the router reports the
paper's two losses: "importance" (cv^2 of the per-expert sum of sparse gates)
and "load" (cv^2 of the smooth load estimate). At eval "load" is computed
with H = logits, i.e. the expected load if fresh training noise were added
to the clean logits, so the eval value is deterministic and comparable.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax import losses
from moe_jax.routers import _common
from moe_jax.routing import (
    RouterConfig, RouterDef, RouterInputs, Routing, register_router)

_NAME = "noisy_topk"


def validate(cfg: RouterConfig) -> None:
  _common.validate_top_k(cfg)


def route(inputs: RouterInputs, cfg: RouterConfig, rng: Optional[jax.Array],
          train: bool) -> Routing:
  validate(cfg)
  logits = _common.logits_f32(inputs, _NAME)
  noise_logits = _common.require(
      inputs.noise_logits, "noise_logits", _NAME).astype(jnp.float32)
  num_tokens, num_experts = logits.shape
  k = cfg.top_k
  noise_std = jax.nn.softplus(noise_logits)
  if train:
    rng = _common.require_rng(rng, _NAME)
    noise = jax.random.normal(rng, logits.shape, jnp.float32)
    scores = logits + noise * noise_std
  else:
    scores = logits
  kept, index = jax.lax.top_k(scores, k)
  weights = jax.nn.softmax(kept, axis=-1)
  index = index.astype(jnp.int32)
  mask = jnp.ones(index.shape, jnp.bool_)
  probs = jax.nn.softmax(scores, axis=-1)
  onehot = jax.nn.one_hot(index, num_experts, dtype=jnp.float32)
  gates = jnp.sum(onehot * weights[..., None], axis=1)        # [T, E]
  aux = _common.logit_aux_losses(logits, probs, index, mask)
  aux["importance"] = losses.importance_loss(gates)
  aux["load"] = losses.load_loss(logits, scores, noise_std, k)
  return Routing(
      expert_index=index,
      combine_weight=weights,
      mask=mask,
      router_probs=probs,
      aux_losses=aux,
      metrics={},
      max_assignments=num_tokens * k,
      nominal_k=float(k),
  )


register_router(_NAME, RouterDef(
    fn=route, needs_noise_logits=True, validate=validate,
    doc="noisy top-k gating with importance and load losses (Shazeer 2017)"))
