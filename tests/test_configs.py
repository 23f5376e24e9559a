"""Config validation (clear errors before compute) and every shipped config."""
import dataclasses
import glob
import importlib
import os

import jax
import pytest

from configs.base import router_defaults
from moe_jax.config_validation import ConfigError, validate_config
from moe_jax.routing import RouterConfig, known_routers
from moe_jax.training import loop

CONFIG_NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob("configs/*.py")
                      if not os.path.basename(p).startswith(("_", "base")))


def load(name):
  return importlib.import_module(f"configs.{name}").get_config()


def test_every_router_has_a_config():
  routers_in_configs = {load(n).model.moe.router.name for n in CONFIG_NAMES}
  assert set(known_routers()) <= routers_in_configs


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_shipped_configs_validate(name):
  validate_config(load(name), num_devices=1)


def test_gpu_config_is_about_one_billion_parameters():
  from moe_jax.layers.transformer import TransformerLM, model_config_from
  import jax.numpy as jnp
  config = load("gpu_1b")
  model = TransformerLM(model_config_from(config.model))
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0)}, jnp.zeros((1, 8), jnp.int32)))
  count = sum(x.size for x in jax.tree.leaves(shapes["params"]))
  assert 0.8e9 < count < 1.3e9, count


@pytest.mark.parametrize("name", [n for n in CONFIG_NAMES if n != "gpu_1b"])
def test_every_cpu_config_trains_two_steps(name, tmp_path):
  config = load(name)
  m = config.model
  m.d_model, m.num_layers, m.num_heads, m.head_dim, m.d_ff = 32, 2, 2, 16, 64
  m.moe.d_expert = 32
  config.data.max_bytes, config.data.seq_len, config.data.batch_size = 40_000, 16, 8
  config.train.num_steps, config.train.eval_batches = 2, 1
  summary = loop.train_and_evaluate(config, str(tmp_path))
  assert summary.final_step == 2 and summary.heldout_loss < 10


def bad(path, value):
  config = load("default")
  node = config
  *parents, leaf = path.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  return config


@pytest.mark.parametrize("path,value,pattern", [
    ("model.moe.router.top_k", 9, r"model\.moe\.router\.top_k=9; allowed: 1 <= top_k <= .*8"),
    ("model.moe.router.top_k", 0, r"model\.moe\.router\.top_k=0; allowed"),
    ("model.moe.router.name", "softmax", r"model\.moe\.router\.name='softmax'.*known routers: "
     r"\['activation_dense_to_sparse', 'dense_to_sparse', 'expert_choice', 'hash'"),
    ("data.seq_len", 1024, r"data\.seq_len=1024 exceeds model\.max_len=512"),
    ("model.moe.dispatch", "sorted", r"model\.moe\.dispatch='sorted'; allowed: \['dropless', 'capacity'\]"),
    ("model.dtype", "fp8", r"model\.dtype='fp8'; allowed"),
    ("model.moe.expert_kind", "moe", r"model\.moe\.expert_kind='moe'; allowed: \['mlp', 'swiglu'\]"),
    ("model.moe.router.logits_precision", "fp8",
     r"model\.moe\.router\.logits_precision='fp8'; allowed: \['float32', 'bfloat16'\]"),
    ("model.moe.fused_dispatch", "yes",
     r"model\.moe\.fused_dispatch='yes'; allowed: \['off', 'auto', 'on'\]"),
    ("model.moe.combine_weights_at", "input",
     r"model\.moe\.combine_weights_at='input'; allowed: \['hidden', 'output'\]"),
])
def test_bad_fields_are_named(path, value, pattern):
  with pytest.raises(ConfigError, match=pattern):
    validate_config(bad(path, value), num_devices=1)


def test_router_logits_precision():
  config = load("default")
  assert config.model.moe.router.logits_precision == "float32"
  config.model.moe.router.logits_precision = "bfloat16"
  validate_config(config, num_devices=1)
  del config.model.moe.router.logits_precision  # configs written before the field
  validate_config(config, num_devices=1)


def test_router_defaults_declare_every_router_field():
  fields = {f.name for f in dataclasses.fields(RouterConfig)} - {"num_experts"}
  assert set(router_defaults()) == fields


def test_capacity_factor_must_be_positive_where_used():
  config = bad("model.moe.capacity_factor_train", 0.0)
  validate_config(config, num_devices=1)  # dropless: the factor is unused
  config.model.moe.dispatch = "capacity"
  with pytest.raises(ConfigError, match=r"model\.moe\.capacity_factor_train=0.0; allowed: a number > 0"):
    validate_config(config, num_devices=1)
  config = load("expert_choice")
  config.model.moe.router.expert_capacity_factor = -1.0
  with pytest.raises(ConfigError, match=r"expert_capacity_factor=-1.0; allowed: a number > 0"):
    validate_config(config, num_devices=1)


def test_experts_must_divide_the_expert_axis():
  config = load("default")
  config.model.moe.num_experts = 6
  config.mesh.shape.update(data=-1, expert=4)
  with pytest.raises(ConfigError, match=r"num_experts=6 is not divisible by the expert mesh axis "
                     r"\(mesh.shape.expert=4\)"):
    validate_config(config, num_devices=8)


def test_temperature_schedule_must_fall():
  config = load("dense_to_sparse")
  config.model.moe.router.tau_min, config.model.moe.router.tau_max = 3.0, 1.0
  with pytest.raises(ConfigError, match=r"tau_min=3.0 > tau_max=1.0"):
    validate_config(config, num_devices=1)


def test_empty_corpus_fails_before_compute_and_leaves_workdir_alone(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  config = load("default")
  config.data.path = str(empty)
  workdir = tmp_path / "work"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("keep me")
  with pytest.raises(ValueError, match="data.path"):
    loop.train_and_evaluate(config, str(workdir))
  assert os.listdir(workdir) == ["notes.txt"]


def test_bad_config_does_not_touch_existing_checkpoints(tmp_path):
  config = bad("model.moe.router.top_k", 99)
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "checkpoints" / "marker").write_text("x")
  with pytest.raises(ConfigError):
    loop.train_and_evaluate(config, str(tmp_path))
  assert os.listdir(tmp_path / "checkpoints") == ["marker"]
