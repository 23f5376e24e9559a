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

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.config_fields import require
from moe_jax.routers import base
from moe_jax.routing import RouterInputs, Routing

_NAME = "expert_choice"


@dataclasses.dataclass(frozen=True)
class ExpertChoiceConfig(base.LogitRouterConfig):
  load_balance_coef: float = 0.0        # balanced by construction
  expert_capacity_factor: float = 2.0   # C = T * expert_capacity_factor / E

  def validate(self) -> None:
    super().validate()
    require(self.expert_capacity_factor > 0, "expert_capacity_factor",
            self.expert_capacity_factor, "a number > 0")


def capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
  """Tokens per expert: clip(round(T * capacity_factor / E), 1, T)."""
  c = math.floor(num_tokens * capacity_factor / num_experts + 0.5)
  return int(min(max(c, 1), num_tokens))


def route(inputs: RouterInputs, cfg: ExpertChoiceConfig, rng: Optional[jax.Array],
          train: bool) -> Routing:
  del rng, train  # deterministic
  logits = base.logits_f32(inputs, _NAME)
  num_tokens, num_experts = logits.shape
  c = capacity(num_tokens, num_experts, cfg.expert_capacity_factor)
  probs = jax.nn.softmax(logits, axis=-1)
  _, taken = jax.lax.top_k(probs.T, c)                       # [E, C] token ids
  chosen = jnp.zeros((num_experts, num_tokens), jnp.bool_)
  chosen = chosen.at[jnp.arange(num_experts)[:, None], taken].set(True)
  return base.per_expert_routing(logits, probs, chosen.T, max_assignments=num_experts * c,
                                 nominal_k=num_experts * c / num_tokens)

ROUTER = base.register(base.Router(
    name=_NAME, config=ExpertChoiceConfig, route=route, aux_losses=base.LOGIT_AUX_LOSSES,
    causal=False, doc="expert choice: each expert takes its top-C tokens (Zhou 2022); "
                      "not causal"))
