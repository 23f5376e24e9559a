"""Hash routing (Roller et al., 2021, "Hash Layers for Large Sparse Models").

Each token goes to one expert chosen by a fixed hash of its token id, with
weight 1. Nothing is learned, so there is no gradient and no auxiliary loss
(``aux_losses`` is empty). The hash is pure uint32 arithmetic (a seeded
integer mixer), so it is the same on every run, backend and jax version, and
it scatters consecutive ids across experts.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.routers import base
from moe_jax.routing import RouterInputs, Routing

_NAME = "hash"
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads seeds over uint32


@dataclasses.dataclass(frozen=True)
class HashConfig(base.RouterConfig):
  hash_seed: int = 0                    # picks one of many fixed hash functions


def _mix32(h: jax.Array) -> jax.Array:
  """Avalanching uint32 -> uint32 mixer (xor-shift / multiply rounds)."""
  h = h ^ (h >> np.uint32(16))
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> np.uint32(13))
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> np.uint32(16))


def hash_experts(token_ids: jax.Array, num_experts: int,
                 seed: int) -> jax.Array:
  """int32 expert of each token id, in [0, num_experts)."""
  offset = np.uint32((seed * _GOLDEN) % (1 << 32))
  h = _mix32(token_ids.astype(jnp.uint32) + offset)
  return (h % np.uint32(num_experts)).astype(jnp.int32)


def route(inputs: RouterInputs, cfg: HashConfig, rng: Optional[jax.Array],
          train: bool) -> Routing:
  del rng, train  # deterministic
  token_ids = base.require_input(inputs.token_ids, "token_ids", _NAME)
  num_tokens = token_ids.shape[0]
  expert = hash_experts(token_ids, cfg.num_experts, cfg.hash_seed)
  return Routing(
      expert_index=expert[:, None],
      combine_weight=jnp.ones((num_tokens, 1), jnp.float32),
      mask=jnp.ones((num_tokens, 1), jnp.bool_),
      router_probs=jax.nn.one_hot(expert, cfg.num_experts, dtype=jnp.float32),
      aux_losses={},
      metrics={},
      max_assignments=num_tokens,
      nominal_k=1.0,
  )


ROUTER = base.register(base.Router(
    name=_NAME, config=HashConfig, route=route, inputs=frozenset({"token_ids"}),
    doc="fixed hash of the token id to one expert (Hash Layers)"))
