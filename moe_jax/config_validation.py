"""Checks a whole experiment config before any compute starts.

Each section checks its own fields when it is built (``moe_jax.config_fields``);
what is left here is what spans sections or needs the devices: sequence length
against the model's, the mesh against the device count and every dimension
that the logical-axis rules shard (``sharded_dims``), and the attention
implementation against the platform, dtype, shapes and mesh (``attention_for``).
Every error names the field and the values it may take.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax

from moe_jax import routers
from moe_jax.config_fields import ConfigError
from moe_jax.layers import attention
from moe_jax.sharding import MESH_AXES, mesh_shape, rules_from
from moe_jax.training.config import ExperimentConfig, experiment_config

__all__ = ["ConfigError", "attention_for", "sharded_dims", "validate_config"]


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def sharded_dims(cfg: ExperimentConfig) -> list[tuple[tuple[str, ...], tuple[Any, ...]]]:
  """The logical names of each parameter the model makes for ``cfg`` and of the
  input batch, with each dimension as (the field that gives it, its size).

  These are the arrays whose shardings jax requires to divide their dimensions
  (the state's and the batch's jit shardings). Activation constraints inside
  the step are left out: jax shards those unevenly when it must.
  """
  model, moe, data = cfg.model, cfg.model.moe, cfg.data
  d_model = ("model.d_model", model.d_model)
  heads, head_dim = ("model.num_heads", model.num_heads), ("model.head_dim", model.head_dim)
  vocab = ("model.vocab_size", model.vocab_size)

  def mlp(width):
    return [(("embed", "mlp"), (d_model, width)), (("mlp", "embed"), (width, d_model))]

  dims = [
      (("activation_batch", "activation_length"),
       (("data.batch_size", data.batch_size), ("data.seq_len", data.seq_len))),
      (("vocab", "embed"), (vocab, d_model)),
      (("norm",), (d_model,)),
      (("embed", "heads", "kv"), (d_model, heads, head_dim)),
      (("heads", "kv", "embed"), (heads, head_dim, d_model)),
  ]
  if not model.tie_embeddings:
    dims.append((("embed", "vocab"), (d_model, vocab)))
  moe_layers = [model.is_moe_layer(i) for i in range(model.num_layers)]
  if not all(moe_layers):
    dims += mlp(("model.d_ff", model.d_ff))
  if any(moe_layers):
    experts = ("model.moe.num_experts", moe.num_experts)
    d_expert = ("model.moe.d_expert", moe.d_expert)
    dims += [(("expert", "embed", "mlp"), (experts, d_model, d_expert)),
             (("expert", "mlp", "embed"), (experts, d_expert, d_model))]
    if routers.of(moe.router).inputs & {"logits", "noise_logits"}:
      dims.append((("embed", "router"), (d_model, experts)))
    if moe.num_shared_experts > 0:
      width = "d_shared" if moe.d_shared else "d_expert"
      dims += mlp((f"model.moe.num_shared_experts*model.moe.{width}",
                   moe.num_shared_experts * (moe.d_shared or moe.d_expert)))
  return dims


def _check_divisible(cfg: ExperimentConfig, sizes: dict[str, int]) -> None:
  """Each sharded dimension is a multiple of the mesh axes the rules give it.

  The axes come from flax's own rule resolution, per array: a rule is skipped
  where its mesh axis already shards another dimension of the same array.
  """
  rules = rules_from(cfg.mesh.rules)
  for names, dims in sharded_dims(cfg):
    for name, axes, (field, value) in zip(names, nn.logical_to_mesh_axes(names, rules), dims):
      axes = tuple(a for a in (axes if isinstance(axes, tuple) else (axes,)) if a in MESH_AXES)
      shards = math.prod(sizes[a] for a in axes)
      mesh_fields = ", ".join(f"mesh.shape.{a}={sizes[a]}" for a in axes)
      _require(value % shards == 0,
               f"{field}={value} is not divisible by the {'*'.join(axes)} mesh "
               f"{'axes' if len(axes) > 1 else 'axis'} ({mesh_fields}) that mesh.rules shard "
               f"its {name!r} dimension over; allowed: a multiple of {shards}")


def attention_for(cfg: ExperimentConfig, num_devices: int, platform: Optional[str] = None,
                  compute_capability: Optional[float] = None) -> attention.AttentionImpl:
  """The attention implementation ``model.attention_impl`` takes on ``platform``
  (default: jax's default backend) for the model's dtype and shapes and the mesh;
  raises ConfigError if the one it names cannot run there."""
  model = cfg.model
  sizes = dict(zip(MESH_AXES, mesh_shape(cfg.mesh.shape, num_devices)))
  return attention.resolve(
      model.attention_impl, platform or jax.default_backend(), model.activation_dtype,
      model.head_dim, cfg.data.seq_len, compute_capability=compute_capability,
      split=attention.split_dims(rules_from(cfg.mesh.rules), sizes))


def validate_config(config: Any, num_devices: int, platform: Optional[str] = None,
                    compute_capability: Optional[float] = None) -> ExperimentConfig:
  """The checked, typed config; raises ConfigError naming the first bad field.

  ``platform`` and ``compute_capability`` (default: the default device's) are
  where it will run, for the attention check.
  """
  cfg = experiment_config(config)
  model, data = cfg.model, cfg.data
  _require(data.seq_len <= model.max_len,
           f"data.seq_len={data.seq_len} exceeds model.max_len={model.max_len}; "
           "allowed: 1 <= seq_len <= max_len")
  _check_divisible(cfg, dict(zip(MESH_AXES, mesh_shape(cfg.mesh.shape, num_devices))))
  attention_for(cfg, num_devices, platform, compute_capability)
  return cfg
