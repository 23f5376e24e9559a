"""What a router is: its config, its route function, and what it asks of the layer.

A router module defines a frozen config dataclass holding only its own fields
and their defaults (checked by its ``validate``), a pure function

    route(inputs: RouterInputs, cfg, rng: jax.Array | None, train: bool) -> Routing

and registers a ``Router`` naming the inputs it reads, its auxiliary losses
with the config field holding each one's coefficient, whether it is causal,
and an optional per-layer state with its update rule. The MoE layer asks the
``Router``; it never names one.

Config classes build on three bases:
  ``RouterConfig``       every router: ``num_experts`` (filled in from
                         ``model.moe.num_experts``, not set in the router's section)
  ``LogitRouterConfig``  routers over a learned projection of the tokens: its
                         precision, input jitter, and the load-balance and
                         z-loss coefficients
  ``TokenChoiceConfig``  routers where each token picks ``top_k`` experts
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from moe_jax import losses
from moe_jax.config_fields import Checked, ConfigError, one_of, require
from moe_jax.ops.router_logits import PRECISIONS as LOGITS_PRECISIONS
from moe_jax.routing import RouterInputs, Routing



@dataclasses.dataclass(frozen=True)
class RouterConfig(Checked):
  """Fields every router has."""
  num_experts: int = 8

  def validate(self) -> None:
    super().validate()
    require(self.num_experts >= 1, "num_experts", self.num_experts, "an integer >= 1")


@dataclasses.dataclass(frozen=True)
class LogitRouterConfig(RouterConfig):
  """Routers whose scores are a learned linear projection of the tokens (float32 logits)."""
  logits_precision: str = "float32"     # float32 | bfloat16 (moe_jax.ops.router_logits)
  jitter_eps: float = 0.0               # multiplicative jitter of the router input in training
  load_balance_coef: float = 0.01       # Switch: alpha * E * sum f_i P_i
  z_loss_coef: float = 1e-3             # ST-MoE router z-loss

  def validate(self) -> None:
    super().validate()
    one_of("logits_precision", self.logits_precision, LOGITS_PRECISIONS)
    require(0 <= self.jitter_eps < 1, "jitter_eps", self.jitter_eps, "0 <= jitter_eps < 1")
    for field in ("load_balance_coef", "z_loss_coef"):
      require(getattr(self, field) >= 0, field, getattr(self, field), "a number >= 0")


@dataclasses.dataclass(frozen=True)
class TokenChoiceConfig(LogitRouterConfig):
  """Routers where each token takes ``top_k`` experts (or, for gates whose count
  varies, the budget that capacity-based dispatch sizes buffers by)."""
  top_k: int = 2

  def validate(self) -> None:
    super().validate()
    require(1 <= self.top_k <= self.num_experts, "top_k", self.top_k,
            f"1 <= top_k <= num_experts ({self.num_experts})")


# The losses every logit router reports, and their coefficients' fields.
LOGIT_AUX_LOSSES = {"load_balance": "load_balance_coef", "z_loss": "z_loss_coef"}

RouteFn = Callable[[RouterInputs, Any, Optional[jax.Array], bool], Routing]


@dataclasses.dataclass(frozen=True)
class RouterState:
  """Non-trained per-layer state (collection ``router_state``), updated after each
  training step outside the optimiser."""
  name: str                                         # the variable's name
  init: Callable[[Any], jax.Array]                  # cfg -> initial value
  update: Callable[[jax.Array, Routing, Any], jax.Array]   # (state, routing, cfg) -> new state


INPUTS = frozenset(f.name for f in dataclasses.fields(RouterInputs))


@dataclasses.dataclass(frozen=True)
class Router:
  """A registered router and what the layer must give it."""
  name: str
  config: type                          # its config dataclass (a RouterConfig)
  route: RouteFn
  inputs: frozenset = frozenset({"logits"})    # RouterInputs fields it reads
  aux_losses: Mapping[str, str] = dataclasses.field(default_factory=dict)  # loss -> coef field
  causal: bool = True                   # False: a token's route depends on later tokens
  state: Optional[RouterState] = None
  doc: str = ""

  def __post_init__(self):
    fields = {f.name for f in dataclasses.fields(self.config)}
    problems = []
    if not issubclass(self.config, RouterConfig):
      problems.append("config must subclass RouterConfig")
    if not self.inputs <= INPUTS:
      problems.append(f"inputs {sorted(self.inputs - INPUTS)} are not RouterInputs fields")
    if self.inputs & {"logits", "noise_logits"} and not issubclass(
        self.config, LogitRouterConfig):
      problems.append("a router reading logits needs a LogitRouterConfig")
    if ("state" in self.inputs) != (self.state is not None):
      problems.append("'state' in inputs exactly when the router declares a state")
    missing = sorted(set(self.aux_losses.values()) - fields)
    if missing:
      problems.append(f"aux-loss coefficient fields {missing} are not config fields")
    if problems:
      raise ValueError(f"router {self.name!r}: " + "; ".join(problems))

  def aux_loss(self, routing: Routing, cfg) -> jax.Array:
    """The coefficient-weighted sum of the routing's auxiliary losses (float32)."""
    unknown = sorted(set(routing.aux_losses) - set(self.aux_losses))
    if unknown:
      raise ValueError(f"router {self.name!r} returned aux losses {unknown} that it does "
                       f"not declare; declared: {sorted(self.aux_losses)}")
    return sum((getattr(cfg, self.aux_losses[n]) * v for n, v in routing.aux_losses.items()),
               jnp.zeros((), jnp.float32))


_REGISTRY: dict[str, Router] = {}
_BY_CONFIG: dict[type, Router] = {}


def register(router: Router) -> Router:
  if router.name in _REGISTRY:
    raise ValueError(f"router {router.name!r} is already registered")
  if router.config in _BY_CONFIG:
    raise ValueError(f"router {router.name!r}: config class {router.config.__name__} already "
                     f"belongs to router {_BY_CONFIG[router.config].name!r}; subclass it")
  _REGISTRY[router.name] = _BY_CONFIG[router.config] = router
  return router


def for_config(cfg: RouterConfig) -> Router:
  """The router whose config ``cfg`` is."""
  if type(cfg) not in _BY_CONFIG:
    raise ValueError(f"{type(cfg).__name__} is not the config of a registered router")
  return _BY_CONFIG[type(cfg)]


def lookup(name: str) -> Router:
  if name not in _REGISTRY:
    raise ConfigError(f"model.moe.router.name={name!r} is not a known router; "
                      f"known routers: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def registered() -> list[str]:
  return sorted(_REGISTRY)


# Helpers for route functions.


def require_input(value: Optional[jax.Array], field: str, router: str) -> jax.Array:
  """``value``, or a clear error if the layer did not provide it."""
  if value is None:
    raise ValueError(f"router {router!r} needs RouterInputs.{field}, got None")
  return value


def require_rng(rng: Optional[jax.Array], router: str) -> jax.Array:
  if rng is None:
    raise ValueError(f"router {router!r} samples noise in training and needs an rng; "
                     "got None (pass an rng, or train=False)")
  return rng


def logits_f32(inputs: RouterInputs, router: str) -> jax.Array:
  return require_input(inputs.logits, "logits", router).astype(jnp.float32)


def logit_aux_losses(logits: jax.Array, router_probs: jax.Array,
                     expert_index: jax.Array, mask: jax.Array) -> dict:
  """The losses every logit router reports (LOGIT_AUX_LOSSES)."""
  return {
      "load_balance": losses.switch_load_balance_loss(router_probs, expert_index, mask),
      "z_loss": losses.router_z_loss(logits),
  }


def top_k_routing(logits: jax.Array, probs: jax.Array, weights: jax.Array,
                  index: jax.Array, **extra_losses: jax.Array) -> Routing:
  """Every token in k slots (k = index.shape[1]), all valid, with the logit losses."""
  num_tokens, k = index.shape
  index = index.astype(jnp.int32)
  mask = jnp.ones(index.shape, jnp.bool_)
  return Routing(expert_index=index, combine_weight=weights, mask=mask, router_probs=probs,
                 aux_losses={**logit_aux_losses(logits, probs, index, mask), **extra_losses},
                 metrics={}, max_assignments=num_tokens * k, nominal_k=float(k))


def per_expert_routing(logits: jax.Array, probs: jax.Array, mask: jax.Array, *,
                       max_assignments: int, nominal_k: float, metrics=None) -> Routing:
  """One slot per expert (K = E), valid where ``mask`` [T, E], weighted ``probs``."""
  num_tokens, num_experts = mask.shape
  index = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), (num_tokens, num_experts))
  return Routing(expert_index=index, combine_weight=jnp.where(mask, probs, 0.0), mask=mask,
                 router_probs=probs, aux_losses=logit_aux_losses(logits, probs, index, mask),
                 metrics=metrics or {}, max_assignments=max_assignments, nominal_k=nominal_k)
