"""The MoE feed-forward layer: router -> dispatch plan -> experts -> combine.

Collections the layer uses besides ``params``:
  ``router_state``  persistent non-trained state (the sigmoid_topk bias), updated
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

from moe_jax import dispatch as dispatch_lib
from moe_jax.layers.experts import FUSED_IMPLS, DenseMlp, Experts, FusedRows
from moe_jax.ops.grouped_matmul import resolve_impl
from moe_jax.routing import (Routing, RouterConfig, RouterInputs, expert_load_fraction,
                             get_router, router_config_from)


FUSED_MODES = ("off", "auto", "on")
# Where the combine weights multiply (unfused dispatch): "hidden" scales each row's
# expert activations before the expert's (linear, bias-free) output projection,
# inside the pass that makes them, so the combine is a plain sum and the weights'
# gradient a reduction over the hidden width; "output" scales the expert outputs
# in the combine (a float32 multiply over [T, K, d], and its own gradient pass
# over [T, K, d]). Equal up to rounding.
COMBINE_WEIGHTS_AT = ("hidden", "output")


# On GPUs with bfloat16 tensor cores (compute capability 8.0+): float32 products from
# six bfloat16 passes (each operand split in three bfloat16 pieces, the smallest
# cross terms dropped), float32 accuracy at about 0.7 of the time of a true-float32
# HIGHEST matmul, which runs on CUDA cores (docs/benchmarks.md, fourth session).
# Elsewhere HIGHEST: TPUs already run it as six bfloat16 passes, CPUs in float32.
FLOAT32_ROUTER_ALGORITHM = jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6


def float32_router_precision(device: Optional[jax.Device] = None):
  """The matmul precision of the "float32" router logits on ``device`` (default: the first)."""
  device = device or jax.devices()[0]
  if device.platform == "gpu" and float(getattr(device, "compute_capability", 0) or 0) >= 8.0:
    return FLOAT32_ROUTER_ALGORITHM
  return jax.lax.Precision.HIGHEST


def _logits_float32(x: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.dot(x.astype(jnp.float32), w, precision=float32_router_precision(),
                 preferred_element_type=jnp.float32)


def _logits_bfloat16(x: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                 preferred_element_type=jnp.float32)


# model.moe.router.logits_precision -> router projection (float32 x [T, d], float32
# w [d, E]) -> float32 logits [T, E]. "float32" is the default: router stability
# is sensitive to logit precision (ST-MoE). "bfloat16" rounds both operands and
# accumulates in float32, a speed option.
ROUTER_LOGITS_PRECISIONS = {
    "float32": _logits_float32,
    "bfloat16": _logits_bfloat16,
}


def router_logits_fn(precision: str):
  """The router projection for ``model.moe.router.logits_precision``."""
  if precision not in ROUTER_LOGITS_PRECISIONS:
    raise ValueError(f"model.moe.router.logits_precision={precision!r}; "
                     f"allowed: {list(ROUTER_LOGITS_PRECISIONS)}")
  return ROUTER_LOGITS_PRECISIONS[precision]


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  num_experts: int = 8
  d_expert: int = 256
  expert_kind: str = "swiglu"
  activation: str = "gelu"
  dispatch: str = "dropless"
  capacity_factor_train: float = 1.25
  capacity_factor_eval: float = 2.0
  num_shared_experts: int = 0
  d_shared: int = 0                  # hidden width of each shared expert; 0 = d_expert
  gmm_impl: str = "auto"
  # off | auto | on: gather rows inside the first grouped matmuls and write weighted
  # rows to their slots in the last one (moe_kernels.fused), skipping the separate
  # dispatch and combine. Needs dropless dispatch with R = T*K rows and a Pallas
  # grouped_matmul; "auto" uses it where it applies, "on" raises where it does not.
  fused_dispatch: str = "off"
  # hidden | output (see COMBINE_WEIGHTS_AT); unfused dispatch only: the fused
  # kernels weight the rows in their own epilogue.
  combine_weights_at: str = "hidden"
  router: RouterConfig = RouterConfig()


def moe_config_from(cfg: Any) -> MoeConfig:
  """Builds a MoeConfig from ``config.model.moe`` (ConfigDict or dict)."""
  values = dict(cfg)
  names = {f.name for f in dataclasses.fields(MoeConfig)}
  router = router_config_from(values.pop("router", {}), values.get("num_experts", 8))
  return MoeConfig(router=router, **{k: v for k, v in values.items() if k in names})


def aux_loss_coefficients(cfg: RouterConfig) -> dict[str, float]:
  return {
      "load_balance": cfg.load_balance_coef,
      "z_loss": cfg.z_loss_coef,
      "importance": cfg.importance_coef,
      "load": cfg.load_coef,
  }


def routing_diagnostics(routing: Routing, plan: dispatch_lib.DispatchPlan) -> dict[str, jax.Array]:
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

  def _router_inputs(self, x_tokens, token_ids, step, definition, bias, train):
    cfg = self.cfg
    logits_fn = router_logits_fn(cfg.router.logits_precision)
    router_x = x_tokens.astype(jnp.float32)
    if train and cfg.router.jitter_eps > 0:
      eps = cfg.router.jitter_eps
      router_x = router_x * jax.random.uniform(
          self.make_rng("router"), router_x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
    d_model, num_experts = x_tokens.shape[-1], cfg.num_experts
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "router"))

    def project(name):
      w = self.param(name, init, (d_model, num_experts), jnp.float32)
      return logits_fn(router_x, w)

    ids = None
    if definition.needs_token_ids:
      if token_ids is None:
        raise ValueError(f"router {cfg.router.name!r} needs token ids; pass token_ids")
      ids = token_ids.reshape(-1).astype(jnp.int32)
    return RouterInputs(
        logits=project("router") if definition.needs_logits else None,
        noise_logits=project("router_noise") if definition.needs_noise_logits else None,
        token_ids=ids, bias=bias,
        step=jnp.asarray(0 if step is None else step, jnp.int32))

  def _use_fused(self, plan: dispatch_lib.DispatchPlan, gmm_impl: str) -> bool:
    mode = self.cfg.fused_dispatch
    if mode not in FUSED_MODES:
      raise ValueError(f"model.moe.fused_dispatch={mode!r}; allowed: {list(FUSED_MODES)}")
    applies = plan.is_permutation and gmm_impl in FUSED_IMPLS
    if mode == "on" and not applies:
      raise ValueError(
          "model.moe.fused_dispatch='on' needs dropless dispatch with one row per slot "
          f"(top-k or dense-to-sparse routers) and a grouped_matmul in {sorted(FUSED_IMPLS)}; "
          f"got dispatch={self.cfg.dispatch!r}, router={self.cfg.router.name!r}, "
          f"impl={gmm_impl!r}")
    return mode != "off" and applies

  @nn.compact
  def __call__(self, x: jax.Array, token_ids: Optional[jax.Array] = None,
               step: Optional[jax.Array] = None, train: bool = False) -> jax.Array:
    cfg = self.cfg
    if cfg.combine_weights_at not in COMBINE_WEIGHTS_AT:
      raise ValueError(f"model.moe.combine_weights_at={cfg.combine_weights_at!r}; "
                       f"allowed: {list(COMBINE_WEIGHTS_AT)}")
    batch, length, d_model = x.shape
    x_tokens = x.reshape(batch * length, d_model)
    definition = get_router(cfg.router.name)
    bias = None
    if definition.needs_bias:
      bias = self.variable("router_state", "bias", jnp.zeros, (cfg.num_experts,), jnp.float32)
    inputs = self._router_inputs(x_tokens, token_ids, step, definition,
                                 None if bias is None else bias.value, train)
    rng = self.make_rng("router") if train and self.has_rng("router") else None
    routing = definition.fn(inputs, cfg.router, rng, train)

    capacity_factor = cfg.capacity_factor_train if train else cfg.capacity_factor_eval
    plan = dispatch_lib.make_plan(routing, cfg.dispatch, capacity_factor)
    gmm_impl = resolve_impl(cfg.gmm_impl, x_tokens.astype(self.dtype),
                            jnp.zeros((1, d_model, 1), self.dtype)).name
    experts = Experts(
        num_experts=cfg.num_experts, d_hidden=cfg.d_expert, kind=cfg.expert_kind,
        activation=cfg.activation, gmm_impl=gmm_impl, dtype=self.dtype,
        param_dtype=self.param_dtype, name="experts")
    if self._use_fused(plan, gmm_impl):
      k = routing.expert_index.shape[1]
      rows = FusedRows(row_slot=plan.row_slot_all,
                       row_weight=routing.combine_weight.reshape(-1)[plan.row_slot_all],
                       slots_per_token=k)
      y = experts(x_tokens.astype(self.dtype), plan.group_sizes, fused=rows)
    else:
      buffer = dispatch_lib.dispatch(x_tokens.astype(self.dtype), plan)
      buffer = nn.with_logical_constraint(buffer, ("activation_exp_rows", "activation_embed"))
      if cfg.combine_weights_at == "hidden":
        row_weight = dispatch_lib.row_values(routing.combine_weight.astype(jnp.float32), plan)
        y = dispatch_lib.combine(experts(buffer, plan.group_sizes, row_weight=row_weight),
                                 plan, None)
      else:
        y = dispatch_lib.combine(experts(buffer, plan.group_sizes), plan,
                                 routing.combine_weight)
    if cfg.num_shared_experts > 0:
      d_shared = (cfg.d_shared or cfg.d_expert) * cfg.num_shared_experts
      y = y + DenseMlp(d_shared, kind=cfg.expert_kind, activation=cfg.activation,
                       dtype=self.dtype, param_dtype=self.param_dtype,
                       name="shared_experts")(x_tokens.astype(self.dtype))

    coefficients = aux_loss_coefficients(cfg.router)
    unknown = set(routing.aux_losses) - set(coefficients)
    if unknown:
      raise ValueError(f"router {cfg.router.name!r} returned aux losses {sorted(unknown)} "
                       f"with no coefficient; known: {sorted(coefficients)}")
    aux_loss = sum((coefficients[n] * v for n, v in routing.aux_losses.items()),
                   jnp.zeros((), jnp.float32))
    metrics = routing_diagnostics(routing, plan)
    self.sow("moe", "aux_loss", aux_loss)
    self.sow("moe", "metrics", metrics)

    if bias is not None and train and self.is_mutable_collection("router_state"):
      from moe_jax.routers.sigmoid_topk import update_bias  # pylint: disable=g-import-not-at-top
      bias.value = update_bias(bias.value, metrics["expert_load"], cfg.router.bias_update_speed)
    return y.reshape(batch, length, d_model).astype(x.dtype)
