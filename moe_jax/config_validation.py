"""Checks a whole experiment config before any compute starts.

Every error names the offending field and the values it may take.
"""
from __future__ import annotations

from typing import Any

from moe_jax.dispatch import DISPATCH_MODES
from moe_jax.layers.experts import ACTIVATIONS, EXPERT_KINDS
from moe_jax.layers.moe import (COMBINE_WEIGHTS_AT, FUSED_MODES, ROUTER_LOGITS_PRECISIONS,
                                MoeConfig)
from moe_jax.layers.transformer import DTYPES
from moe_jax.routing import get_router
from moe_jax.sharding import mesh_shape

# Routers whose top_k sets how many experts a token uses (or the capacity budget).
_DENSE_TO_SPARSE = ("dense_to_sparse", "activation_dense_to_sparse")


class ConfigError(ValueError):
  """A config field has a value outside what it allows."""


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def validate_config(config: Any, num_devices: int) -> None:
  model, moe, router = config.model, config.model.moe, config.model.moe.router
  num_experts = moe.num_experts
  _require(num_experts >= 1, f"model.moe.num_experts={num_experts}; allowed: an integer >= 1")
  try:
    definition = get_router(router.name)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _require(1 <= router.top_k <= num_experts,
           f"model.moe.router.top_k={router.top_k}; allowed: 1 <= top_k <= "
           f"model.moe.num_experts ({num_experts})")
  _require(moe.dispatch in DISPATCH_MODES,
           f"model.moe.dispatch={moe.dispatch!r}; allowed: {list(DISPATCH_MODES)}")
  if moe.dispatch == "capacity":
    for field in ("capacity_factor_train", "capacity_factor_eval"):
      value = moe[field]
      _require(value > 0, f"model.moe.{field}={value}; allowed: a number > 0 "
               "(capacity dispatch gives each expert ceil(factor * tokens * k / experts) rows)")
  if router.name == "expert_choice":
    _require(router.expert_capacity_factor > 0,
             f"model.moe.router.expert_capacity_factor={router.expert_capacity_factor}; "
             "allowed: a number > 0")
  if router.name in _DENSE_TO_SPARSE:
    _require(router.tau_min > 0, f"model.moe.router.tau_min={router.tau_min}; allowed: > 0")
    _require(router.tau_min <= router.tau_max,
             f"model.moe.router.tau_min={router.tau_min} > tau_max={router.tau_max}; "
             "allowed: 0 < tau_min <= tau_max (the temperature anneals from tau_max down)")
    _require(router.anneal_steps >= 1,
             f"model.moe.router.anneal_steps={router.anneal_steps}; allowed: >= 1")
  _require(router.jitter_eps >= 0 and router.jitter_eps < 1,
           f"model.moe.router.jitter_eps={router.jitter_eps}; allowed: 0 <= jitter_eps < 1")
  router_config = _router_config(config)  # missing fields take their defaults
  _require(router_config.logits_precision in ROUTER_LOGITS_PRECISIONS,
           f"model.moe.router.logits_precision={router_config.logits_precision!r}; "
           f"allowed: {list(ROUTER_LOGITS_PRECISIONS)}")
  if definition.validate is not None:
    try:
      definition.validate(router_config)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  for field, allowed in (("fused_dispatch", FUSED_MODES),
                         ("combine_weights_at", COMBINE_WEIGHTS_AT)):
    value = moe.get(field, getattr(MoeConfig(), field))   # absent: the layer's default
    _require(value in allowed, f"model.moe.{field}={value!r}; allowed: {list(allowed)}")
  _require(moe.expert_kind in EXPERT_KINDS,
           f"model.moe.expert_kind={moe.expert_kind!r}; allowed: {sorted(EXPERT_KINDS)}")
  _require(moe.activation in ACTIVATIONS,
           f"model.moe.activation={moe.activation!r}; allowed: {sorted(ACTIVATIONS)}")
  _require(model.ffn_kind in EXPERT_KINDS,
           f"model.ffn_kind={model.ffn_kind!r}; allowed: {sorted(EXPERT_KINDS)}")
  _require(model.dtype in DTYPES, f"model.dtype={model.dtype!r}; allowed: {sorted(DTYPES)}")
  _require(model.moe_every >= 0, f"model.moe_every={model.moe_every}; allowed: >= 0 (0 = dense)")
  _require(model.head_dim % 2 == 0,
           f"model.head_dim={model.head_dim}; allowed: an even number (rotary embedding)")
  _require(config.data.seq_len <= model.max_len,
           f"data.seq_len={config.data.seq_len} exceeds model.max_len={model.max_len}; "
           "allowed: 1 <= seq_len <= max_len")
  _require(config.data.seq_len >= 1, f"data.seq_len={config.data.seq_len}; allowed: >= 1")
  _require(model.vocab_size >= 256,
           f"model.vocab_size={model.vocab_size}; allowed: >= 256 (byte-level tokens)")

  try:
    shape = dict(zip(("data", "fsdp", "expert", "tensor"),
                     mesh_shape(config.mesh.shape, num_devices)))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _require(num_experts % shape["expert"] == 0,
           f"model.moe.num_experts={num_experts} is not divisible by the expert mesh axis "
           f"(mesh.shape.expert={shape['expert']}); allowed: a multiple of {shape['expert']}")
  batch_shards = shape["data"] * shape["fsdp"] * shape["expert"]
  _require(config.data.batch_size % batch_shards == 0,
           f"data.batch_size={config.data.batch_size} is not divisible by the "
           f"data*fsdp*expert mesh size {batch_shards}; allowed: a multiple of {batch_shards}")
  train = config.train
  for field in ("num_steps", "log_every", "eval_every", "checkpoint_every",
                "keep_checkpoints", "eval_batches"):
    _require(train[field] >= 1, f"train.{field}={train[field]}; allowed: an integer >= 1")
  opt = config.optimizer
  _require(opt.learning_rate > 0, f"optimizer.learning_rate={opt.learning_rate}; allowed: > 0")
  _require(0 <= opt.min_lr_ratio <= 1,
           f"optimizer.min_lr_ratio={opt.min_lr_ratio}; allowed: 0 <= ratio <= 1")


def _router_config(config: Any):
  from moe_jax.routing import router_config_from  # pylint: disable=g-import-not-at-top
  return router_config_from(config.model.moe.router, config.model.moe.num_experts)
