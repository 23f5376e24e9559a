"""Checks a whole experiment config before any compute starts.

Each section checks its own fields when it is built (``moe_jax.config_fields``);
what is left here is what spans sections or needs the devices: sequence length
against the model's, and the mesh against the device count, the experts and
the batch. Every error names the field and the values it may take.
"""
from __future__ import annotations

from typing import Any

from moe_jax.config_fields import ConfigError
from moe_jax.sharding import mesh_shape
from moe_jax.training.config import ExperimentConfig, experiment_config

__all__ = ["ConfigError", "validate_config"]


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def validate_config(config: Any, num_devices: int) -> ExperimentConfig:
  """The checked, typed config; raises ConfigError naming the first bad field."""
  cfg = experiment_config(config)
  model, data = cfg.model, cfg.data
  _require(data.seq_len <= model.max_len,
           f"data.seq_len={data.seq_len} exceeds model.max_len={model.max_len}; "
           "allowed: 1 <= seq_len <= max_len")
  shape = dict(zip(("data", "fsdp", "expert", "tensor"),
                   mesh_shape(cfg.mesh.shape, num_devices)))
  num_experts = model.moe.num_experts
  _require(num_experts % shape["expert"] == 0,
           f"model.moe.num_experts={num_experts} is not divisible by the expert mesh axis "
           f"(mesh.shape.expert={shape['expert']}); allowed: a multiple of {shape['expert']}")
  batch_shards = shape["data"] * shape["fsdp"] * shape["expert"]
  _require(data.batch_size % batch_shards == 0,
           f"data.batch_size={data.batch_size} is not divisible by the "
           f"data*fsdp*expert mesh size {batch_shards}; allowed: a multiple of {batch_shards}")
  return cfg
