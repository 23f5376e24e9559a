"""What a router returns (``Routing``) and what it reads (``RouterInputs``).

Axis letters used throughout moe_jax:
  T  tokens in the routed group (batch * length, flattened)
  E  experts
  K  routing slots per token (top-k for token choice; E for routers whose
     number of active experts per token varies, e.g. expert choice or the
     dense-to-sparse gates)
  d  model width, f  expert hidden width

A router is a pure function ``route(inputs, cfg, rng, train) -> Routing``,
registered by name with what it needs (``moe_jax.routers``), so the Flax layer
creates only those parameters and variables.
"""
from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Routing:
  """Who goes where with what weight, in token-major slot form.

  Slot (t, j) sends token t to expert ``expert_index[t, j]`` with weight
  ``combine_weight[t, j]`` when ``mask[t, j]`` is true. Invalid slots carry
  weight 0. ``max_assignments`` is a static upper bound on ``mask.sum()``
  (T*k for top-k, E*C for expert choice) that sizes dispatch buffers.
  ``nominal_k`` is the average number of experts per token the router aims
  for; capacity-based dispatch sizes each expert's buffer from it.
  """
  expert_index: jax.Array          # int32 [T, K]
  combine_weight: jax.Array        # float32 [T, K]
  mask: jax.Array                  # bool [T, K]
  router_probs: jax.Array          # float32 [T, E]
  aux_losses: Mapping[str, jax.Array] = struct.field(default_factory=dict)
  metrics: Mapping[str, jax.Array] = struct.field(default_factory=dict)
  max_assignments: int = struct.field(pytree_node=False, default=0)
  nominal_k: float = struct.field(pytree_node=False, default=1.0)

  @property
  def num_tokens(self) -> int:
    return self.expert_index.shape[0]

  @property
  def num_experts(self) -> int:
    return self.router_probs.shape[-1]


@struct.dataclass
class RouterInputs:
  """Everything a router may read. Fields a router does not need are None."""
  logits: Optional[jax.Array] = None        # float32 [T, E]
  noise_logits: Optional[jax.Array] = None  # float32 [T, E] (noisy_topk)
  token_ids: Optional[jax.Array] = None     # int32 [T] (hash)
  state: Optional[jax.Array] = None         # the router's own state (sigmoid_topk: bias [E])
  step: Optional[jax.Array] = None          # int32 scalar (temperature schedules)


def expert_load_fraction(routing: Routing) -> jax.Array:
  """Fraction of (valid) assignments that go to each expert, float32 [E]."""
  onehot = jax.nn.one_hot(routing.expert_index, routing.num_experts, dtype=jnp.float32)
  counts = jnp.sum(onehot * routing.mask[..., None], axis=(0, 1))
  return counts / jnp.maximum(jnp.sum(counts), 1.0)
