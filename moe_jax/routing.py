"""Routing types and the router registry.

Axis letters used throughout moe_jax:
  T  tokens in the routed group (batch * length, flattened)
  E  experts
  K  routing slots per token (top-k for token choice; E for routers whose
     number of active experts per token varies, e.g. expert choice or the
     dense-to-sparse gates)
  d  model width, f  expert hidden width

A router is a pure function ``route(inputs, cfg, rng, train) -> Routing``.
Routers are chosen by name from ``ROUTERS``; each entry states what it needs
(logits, a noise projection, token ids, a bias state, a temperature) so the
Flax layer creates only those parameters and variables.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

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
  bias: Optional[jax.Array] = None          # float32 [E] (sigmoid_topk)
  step: Optional[jax.Array] = None          # int32 scalar (temperature schedules)


@dataclasses.dataclass(frozen=True)
class RouterConfig:
  """Router hyper-parameters; built from ``config.model.moe.router``.

  Fields that a router does not use are ignored by it.
  """
  name: str = "topk"
  num_experts: int = 8
  top_k: int = 2
  renormalize: bool = True              # topk: renormalise the k weights
  jitter_eps: float = 0.0               # topk: multiplicative input jitter
  # Router logits matmul: "float32" (f32 operands, precision HIGHEST) or
  # "bfloat16" (bf16 operands, f32 accumulation); see MoeLayer.
  logits_precision: str = "float32"
  # Coefficients of the auxiliary losses (the layer multiplies by them).
  load_balance_coef: float = 0.01       # Switch: alpha * E * sum f_i P_i
  z_loss_coef: float = 0.0              # ST-MoE router z-loss
  importance_coef: float = 0.0          # noisy_topk importance loss
  load_coef: float = 0.0                # noisy_topk load loss
  # sigmoid_topk (DeepSeek-V3 auxiliary-loss-free balancing).
  bias_update_speed: float = 1e-3
  num_groups: int = 1                   # group-limited routing: expert groups
  topk_groups: int = 1                  # groups each token may use
  routed_scaling_factor: float = 1.0
  # expert_choice: C = T * capacity_factor / E.
  expert_capacity_factor: float = 2.0
  # Dense-to-sparse gates (dense_to_sparse, activation_dense_to_sparse).
  tau_max: float = 2.0
  tau_min: float = 0.1
  tau_schedule: str = "exponential"     # linear | exponential
  anneal_steps: int = 1000
  hard_top1_after: int = -1             # step after which routing is hard top-1; -1: never
  gate_threshold: float = 0.05
  activation: str = "tanh"              # activation_dense_to_sparse
  # hash
  hash_seed: int = 0


RouteFn = Callable[[RouterInputs, RouterConfig, Optional[jax.Array], bool], Routing]


@dataclasses.dataclass(frozen=True)
class RouterDef:
  """A registered router and what the layer must provide to it."""
  fn: RouteFn
  needs_logits: bool = True
  needs_noise_logits: bool = False
  needs_token_ids: bool = False
  needs_bias: bool = False
  causal: bool = True                   # False: a token's route depends on later tokens
  doc: str = ""
  # Checks the router's fields of a RouterConfig; raises ValueError naming
  # the offending config field. Called from config validation.
  validate: Optional[Callable[[RouterConfig], None]] = None


ROUTERS: dict[str, RouterDef] = {}


def register_router(name: str, definition: RouterDef) -> None:
  if name in ROUTERS:
    raise ValueError(f"router {name!r} is already registered")
  ROUTERS[name] = definition


def get_router(name: str) -> RouterDef:
  # Importing the package registers the built-in routers.
  import moe_jax.routers  # noqa: F401  pylint: disable=g-import-not-at-top
  if name not in ROUTERS:
    raise ValueError(
        f"model.moe.router.name={name!r} is not a known router; "
        f"known routers: {sorted(ROUTERS)}")
  return ROUTERS[name]


def known_routers() -> list[str]:
  import moe_jax.routers  # noqa: F401  pylint: disable=g-import-not-at-top
  return sorted(ROUTERS)


def router_config_from(cfg: Any, num_experts: int) -> RouterConfig:
  """Builds a RouterConfig from a ConfigDict/dict, ignoring unknown keys."""
  values = dict(cfg) if not isinstance(cfg, RouterConfig) else dataclasses.asdict(cfg)
  names = {f.name for f in dataclasses.fields(RouterConfig)}
  values = {k: v for k, v in values.items() if k in names}
  values["num_experts"] = num_experts
  return RouterConfig(**values)


def expert_load_fraction(routing: Routing) -> jax.Array:
  """Fraction of (valid) assignments that go to each expert, float32 [E]."""
  onehot = jax.nn.one_hot(routing.expert_index, routing.num_experts, dtype=jnp.float32)
  counts = jnp.sum(onehot * routing.mask[..., None], axis=(0, 1))
  return counts / jnp.maximum(jnp.sum(counts), 1.0)
