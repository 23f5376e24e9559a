"""The whole experiment config as typed, checked dataclasses.

``ExperimentConfig`` gathers the sections, each owned by the module that uses
it: ``model`` (layers.transformer, with ``model.moe`` and its router),
``data`` (data), ``mesh`` (sharding), and ``optimizer`` and ``train`` (here).
``experiment_config(config)`` builds it strictly from an ml-collections
ConfigDict (moe_jax.config_fields): unknown keys, wrong types and bad values
raise ConfigError naming the field.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from moe_jax import routers
from moe_jax.config_fields import Checked, build, require
from moe_jax.data import DataConfig
from moe_jax.layers.transformer import ModelConfig
from moe_jax.sharding import MeshConfig


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(Checked):
  """``config.optimizer``: AdamW, linear warm-up, cosine decay, global-norm clipping."""
  learning_rate: float = 3e-3
  warmup_steps: int = 50
  min_lr_ratio: float = 0.1         # the cosine ends at min_lr_ratio * learning_rate
  weight_decay: float = 0.1         # not on norm scales and router projections
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip_norm: float = 1.0

  def validate(self) -> None:
    super().validate()
    require(self.learning_rate > 0, "learning_rate", self.learning_rate, "a number > 0")
    require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an integer >= 0")
    require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio,
            "0 <= min_lr_ratio <= 1")
    require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
    for field in ("b1", "b2"):
      require(0 <= getattr(self, field) < 1, field, getattr(self, field), f"0 <= {field} < 1")
    require(self.eps > 0, "eps", self.eps, "a number > 0")
    require(self.grad_clip_norm > 0, "grad_clip_norm", self.grad_clip_norm, "a number > 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Checked):
  """``config.train``: steps, and how often to log, evaluate and checkpoint."""
  num_steps: int = 600
  log_every: int = 50               # logged values are means over the steps since the last log
  eval_every: int = 200
  eval_batches: int = 8             # held-out batches per evaluation during training; 0 = all
  final_eval_batches: int = 0       # held-out batches of the final evaluation; 0 = all
  checkpoint_every: int = 200
  keep_checkpoints: int = 2

  def validate(self) -> None:
    super().validate()
    for field in ("num_steps", "log_every", "eval_every", "checkpoint_every",
                  "keep_checkpoints"):
      require(getattr(self, field) >= 1, field, getattr(self, field), "an integer >= 1")
    for field in ("eval_batches", "final_eval_batches"):
      require(getattr(self, field) >= 0, field, getattr(self, field),
              "an integer >= 0 (0 = the whole held-out split)")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig(Checked):
  seed: int = 0
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
  """Plain JSON-ready values of every field (the router with its ``name``), such
  that ``experiment_config(config_to_dict(c)) == c``."""
  values = json.loads(json.dumps(dataclasses.asdict(config)))
  router = values["model"]["moe"]["router"]
  del router["num_experts"]          # set by model.moe.num_experts
  router["name"] = routers.of(config.model.moe.router).name
  return values


def experiment_config(config: Any) -> ExperimentConfig:
  """An ExperimentConfig from a ConfigDict or dict (an ExperimentConfig passes through)."""
  if isinstance(config, ExperimentConfig):
    return config
  return build(ExperimentConfig, config)
