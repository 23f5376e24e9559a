"""The MoE feed-forward layer: router -> dispatcher -> experts -> combine.

The layer names no router and no dispatcher: it asks the router (from the
config) what inputs, parameters and state it needs, and the dispatcher (by
name) how rows move. Collections it uses besides ``params``:
  ``router_state``  the router's non-trained state (the sigmoid_topk bias), updated
                    in place when the collection is mutable during training.
  ``moe``           sown per call: ``aux_loss`` (coefficient-weighted sum) and
                    ``metrics`` (diagnostics, see ``routing_diagnostics``).
RNG stream ``router``: jitter, router noise, Gumbel samples (training only).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import dispatch, ops, routers
from moe_jax.config_fields import (Checked, ConfigError, as_dict, build_fields, one_of,
                                   require)
from moe_jax.layers.experts import ACTIVATIONS, EXPERT_KINDS, DenseMlp, Experts
from moe_jax.ops.router_logits import router_logits
from moe_jax.routing import RouterInputs, Routing, expert_load_fraction


@dataclasses.dataclass(frozen=True)
class MoeConfig(Checked):
  """``config.model.moe``. ``router.num_experts`` always equals ``num_experts``."""
  num_experts: int = 8
  d_expert: int = 256                # hidden width of each expert
  expert_kind: str = "swiglu"        # swiglu | mlp
  activation: str = "gelu"           # of "mlp" experts
  dispatch: str = "dropless"         # a name in moe_jax.dispatch.DISPATCHERS
  capacity_factor_train: float = 1.25
  capacity_factor_eval: float = 2.0
  num_shared_experts: int = 0        # always-on experts, as one dense block
  d_shared: int = 0                  # hidden width of each shared expert; 0 = d_expert
  gmm_impl: str = "auto"             # a grouped_matmul implementation (moe_jax.ops.registry)
  router: routers.RouterConfig = dataclasses.field(
      default_factory=lambda: routers.get(routers.DEFAULT).config())

  def __post_init__(self):
    if self.router.num_experts != self.num_experts:
      object.__setattr__(self, "router",
                         dataclasses.replace(self.router, num_experts=self.num_experts))
    super().__post_init__()

  def validate(self) -> None:
    super().validate()
    require(self.num_experts >= 1, "num_experts", self.num_experts, "an integer >= 1")
    require(self.d_expert >= 1, "d_expert", self.d_expert, "an integer >= 1")
    one_of("expert_kind", self.expert_kind, sorted(EXPERT_KINDS))
    one_of("activation", self.activation, sorted(ACTIVATIONS))
    one_of("dispatch", self.dispatch, list(dispatch.DISPATCHERS))
    if self.dispatch == "capacity":
      for field in ("capacity_factor_train", "capacity_factor_eval"):
        require(getattr(self, field) > 0, field, getattr(self, field),
                "a number > 0 (capacity dispatch gives each expert "
                "ceil(factor * tokens * k / experts) rows)")
    require(self.num_shared_experts >= 0, "num_shared_experts", self.num_shared_experts,
            "an integer >= 0")
    require(self.d_shared >= 0, "d_shared", self.d_shared, "an integer >= 0 (0 = d_expert)")
    one_of("gmm_impl", self.gmm_impl, ops.registry.known())
    if self.dispatch == "fused" and self.gmm_impl != "auto":
      require(ops.registry.get(self.gmm_impl).fused is not None, "gmm_impl", self.gmm_impl,
              f"with dispatch='fused', one with fused kernels: {ops.registry.with_fused()}")

  @classmethod
  def from_mapping(cls, values: Any, path: str = "model.moe") -> "MoeConfig":
    """Built strictly from ``config.model.moe``; the router by its ``name``."""
    values = as_dict(values)
    router_values = values.pop("router", {})
    num_experts = values.get("num_experts", cls.num_experts)
    if not isinstance(num_experts, int) or num_experts < 1:
      raise ConfigError(f"{path}.num_experts={num_experts!r}; allowed: an integer >= 1")
    router = routers.config_from(router_values, num_experts, f"{path}.router")
    return build_fields(cls, {**values, "router": router}, path)


def routing_diagnostics(routing: Routing, plan: dispatch.DispatchPlan) -> dict[str, jax.Array]:
  """Per-layer router health: load per expert, balance, entropy, drops, sparsity."""
  load = expert_load_fraction(routing)
  probs = routing.router_probs
  entropy = -jnp.sum(probs * jnp.log(jnp.clip(probs, 1e-9, 1.0)), axis=-1)
  metrics = {
      "expert_load": load,
      "load_max_over_mean": jnp.max(load) * routing.num_experts,
      "router_entropy": jnp.mean(entropy),
      "dropped_fraction": plan.dropped_fraction.astype(jnp.float32),
      "active_experts_per_token": jnp.mean(jnp.sum(routing.mask, axis=-1).astype(jnp.float32)),
  }
  metrics.update({name: jnp.asarray(v, jnp.float32) for name, v in routing.metrics.items()})
  metrics.update({f"aux/{name}": jnp.asarray(v, jnp.float32)
                  for name, v in routing.aux_losses.items()})
  return metrics


class MoeLayer(nn.Module):
  """Sparse MoE feed-forward block over x [B, L, d]."""
  cfg: MoeConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _router_inputs(self, router: routers.Router, x_tokens, token_ids, step, state, train):
    cfg = self.cfg.router
    needs = router.inputs
    values = {}
    if needs & {"logits", "noise_logits"}:
      router_x = x_tokens.astype(jnp.float32)
      if train and cfg.jitter_eps > 0:
        router_x = router_x * jax.random.uniform(
            self.make_rng("router"), router_x.shape, jnp.float32,
            1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps)
      init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "router"))
      shape = (x_tokens.shape[-1], cfg.num_experts)
      for name, param in (("logits", "router"), ("noise_logits", "router_noise")):
        if name in needs:
          w = self.param(param, init, shape, jnp.float32)
          values[name] = router_logits(router_x, w, cfg.logits_precision)
    if "token_ids" in needs:
      if token_ids is None:
        raise ValueError(f"router {router.name!r} needs token ids; pass token_ids")
      values["token_ids"] = token_ids.reshape(-1).astype(jnp.int32)
    if "step" in needs:
      values["step"] = jnp.asarray(0 if step is None else step, jnp.int32)
    if "state" in needs:
      values["state"] = state
    return RouterInputs(**values)

  @nn.compact
  def __call__(self, x: jax.Array, token_ids: Optional[jax.Array] = None,
               step: Optional[jax.Array] = None, train: bool = False) -> jax.Array:
    cfg = self.cfg
    batch, length, d_model = x.shape
    x_tokens = x.reshape(batch * length, d_model)
    router = routers.of(cfg.router)
    state = None
    if router.state is not None:
      state = self.variable("router_state", router.state.name, router.state.init, cfg.router)
    inputs = self._router_inputs(router, x_tokens, token_ids, step,
                                 None if state is None else state.value, train)
    rng = self.make_rng("router") if train and self.has_rng("router") else None
    routing = router.route(inputs, cfg.router, rng, train)

    dispatcher = dispatch.get(cfg.dispatch)
    gmm_impl = ops.registry.resolve(cfg.gmm_impl, self.dtype).name
    plan = dispatcher.plan(routing, cfg.capacity_factor_train if train else
                           cfg.capacity_factor_eval)
    rows = dispatcher.dispatch(x_tokens.astype(self.dtype), plan, routing)
    experts = Experts(num_experts=cfg.num_experts, d_hidden=cfg.d_expert, kind=cfg.expert_kind,
                      activation=cfg.activation, gmm_impl=gmm_impl, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="experts")
    y = dispatcher.combine(experts(rows), plan)
    if cfg.num_shared_experts > 0:
      d_shared = (cfg.d_shared or cfg.d_expert) * cfg.num_shared_experts
      y = y + DenseMlp(d_shared, kind=cfg.expert_kind, activation=cfg.activation,
                       dtype=self.dtype, param_dtype=self.param_dtype,
                       name="shared_experts")(x_tokens.astype(self.dtype))

    self.sow("moe", "aux_loss", router.aux_loss(routing, cfg.router))
    self.sow("moe", "metrics", routing_diagnostics(routing, plan))
    if state is not None and train and self.is_mutable_collection("router_state"):
      state.value = router.state.update(state.value, routing, cfg.router)
    return y.reshape(batch, length, d_model).astype(x.dtype)
