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

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax import losses
from moe_jax.config_fields import require
from moe_jax.routers import base
from moe_jax.routing import RouterInputs, Routing

_NAME = "noisy_topk"


@dataclasses.dataclass(frozen=True)
class NoisyTopkConfig(base.TokenChoiceConfig):
  load_balance_coef: float = 0.0        # the paper balances with its own two losses
  importance_coef: float = 0.01         # cv^2 of the per-expert sum of gates
  load_coef: float = 0.01               # cv^2 of the smooth load estimate

  def validate(self) -> None:
    super().validate()
    for field in ("importance_coef", "load_coef"):
      require(getattr(self, field) >= 0, field, getattr(self, field), "a number >= 0")


def route(inputs: RouterInputs, cfg: NoisyTopkConfig, rng: Optional[jax.Array],
          train: bool) -> Routing:
  logits = base.logits_f32(inputs, _NAME)
  noise_logits = base.require_input(
      inputs.noise_logits, "noise_logits", _NAME).astype(jnp.float32)
  num_experts = logits.shape[1]
  noise_std = jax.nn.softplus(noise_logits)
  if train:
    rng = base.require_rng(rng, _NAME)
    noise = jax.random.normal(rng, logits.shape, jnp.float32)
    scores = logits + noise * noise_std
  else:
    scores = logits
  kept, index = jax.lax.top_k(scores, cfg.top_k)
  weights = jax.nn.softmax(kept, axis=-1)
  onehot = jax.nn.one_hot(index, num_experts, dtype=jnp.float32)
  gates = jnp.sum(onehot * weights[..., None], axis=1)        # [T, E]
  return base.top_k_routing(
      logits, jax.nn.softmax(scores, axis=-1), weights, index,
      importance=losses.importance_loss(gates),
      load=losses.load_loss(logits, scores, noise_std, cfg.top_k))

ROUTER = base.register(base.Router(
    name=_NAME, config=NoisyTopkConfig, route=route,
    inputs=frozenset({"logits", "noise_logits"}),
    aux_losses={**base.LOGIT_AUX_LOSSES, "importance": "importance_coef", "load": "load_coef"},
    doc="noisy top-k gating with importance and load losses (Shazeer 2017)"))
