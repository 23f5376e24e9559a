"""Config validation (clear errors before compute) and every shipped config."""
import dataclasses
import glob
import importlib
import importlib.util
import json
import os
import sys
import textwrap

import jax
import pytest

from configs.base import base_config, router
from moe_jax import routers
from moe_jax.config_validation import ConfigError, validate_config
from moe_jax.training import loop
from moe_jax.training.config import ExperimentConfig, experiment_config

CONFIG_NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob("configs/*.py")
                      if not os.path.basename(p).startswith(("_", "base")))


def load(name):
  return importlib.import_module(f"configs.{name}").get_config()


def test_every_router_has_a_config():
  routers_in_configs = {load(n).model.moe.router.name for n in CONFIG_NAMES}
  built_in = {n for n in routers.names()
              if routers.get(n).route.__module__.startswith("moe_jax.routers.")}
  assert built_in <= routers_in_configs


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_shipped_configs_validate(name):
  validate_config(load(name), num_devices=1)


def test_gpu_config_is_about_one_billion_parameters():
  from moe_jax.layers.transformer import TransformerLM
  import jax.numpy as jnp
  model = TransformerLM(experiment_config(load("gpu_1b")).model)
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
    ("model.moe.router.top_k", 9, r"model\.moe\.router\.top_k=9; allowed: 1 <= top_k <= "
     r"num_experts \(8\)"),
    ("model.moe.router.top_k", 0, r"model\.moe\.router\.top_k=0; allowed"),
    ("model.moe.router.name", "softmax", r"model\.moe\.router\.name='softmax'.*known routers: "
     r"\['activation_dense_to_sparse', 'dense_to_sparse', 'expert_choice', 'hash'"),
    ("data.seq_len", 1024, r"data\.seq_len=1024 exceeds model\.max_len=512"),
    ("model.moe.dispatch", "sorted",
     r"model\.moe\.dispatch='sorted'; allowed: \['dropless', 'capacity', 'fused'\]"),
    ("model.dtype", "fp8", r"model\.dtype='fp8'; allowed"),
    ("model.moe.expert_kind", "moe", r"model\.moe\.expert_kind='moe'; allowed: \['mlp', 'swiglu'\]"),
    ("model.moe.router.logits_precision", "fp8",
     r"model\.moe\.router\.logits_precision='fp8'; allowed: \['float32', 'bfloat16'\]"),
    ("model.moe.gmm_impl", "cuda", r"model\.moe\.gmm_impl='cuda'; allowed: \['auto', "),
    ("model.head_dim", 7, r"model\.head_dim=7; allowed: an even number"),
    ("model.vocab_size", 100, r"model\.vocab_size=100; allowed: >= 256"),
    ("train.eval_every", 0, r"train\.eval_every=0; allowed: an integer >= 1"),
    ("optimizer.learning_rate", 0.0, r"optimizer\.learning_rate=0\.0; allowed: a number > 0"),
    ("data.heldout_permille", 1000, r"data\.heldout_permille=1000; allowed: an integer in"),
    ("mesh.shape.fsdp", 0, r"mesh\.shape\.fsdp=0; allowed: a positive size or -1"),
    # A typo anywhere is refused with the nearest valid names.
    ("model.moe.router.top_kk", 3, r"model\.moe\.router\.top_kk: unknown field of router "
     r"'topk'; did you mean top_k\?"),
    ("model.moe.num_expert", 4, r"model\.moe\.num_expert: unknown field; did you mean "
     r"num_experts\b"),
    ("train.num_step", 4, r"train\.num_step: unknown field; did you mean num_steps\?"),
    ("optimiser", {}, r"optimiser: unknown field; did you mean optimizer\?"),
    ("model.moe.fused_dispatch", "on", r"model\.moe\.fused_dispatch: unknown field; did you "
     r"mean dispatch\?"),
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


@pytest.mark.parametrize("name", routers.names())
def test_a_router_section_holds_exactly_its_routers_fields(name):
  fields = {f.name for f in dataclasses.fields(routers.get(name).config)} - {"num_experts"}
  assert set(router(name)) == fields | {"name"}


def test_defaults_have_one_source():
  # base_config() restates nothing: its values are the dataclasses' defaults.
  assert experiment_config(base_config()) == ExperimentConfig()


def test_a_section_with_a_foreign_router_field_is_refused():
  config = load("topk")
  config.model.moe.router.name = "hash"
  with pytest.raises(ConfigError, match=r"model\.moe\.router\.\w+: unknown field of "
                     r"router 'hash'; known: \['hash_seed'\]"):
    validate_config(config, num_devices=1)


def test_a_wrong_type_is_refused():
  config = load("default")
  config.model.moe.router.unlock()
  del config.model.moe.router.top_k
  config.model.moe.router.top_k = "2"
  with pytest.raises(ConfigError, match=r"model\.moe\.router\.top_k='2': expected int"):
    validate_config(config, num_devices=1)


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
  with pytest.raises(ConfigError, match=r"model\.moe\.router\.tau_min=3\.0; allowed: "
                     r"0 < tau_min <= tau_max \(1\.0\)"):
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


TOY_ROUTER = textwrap.dedent("""
    \"\"\"A toy router that sends every token to expert 0, weighted by its softmax.\"\"\"
    import dataclasses

    import jax
    import jax.numpy as jnp

    from moe_jax import routers
    from moe_jax.routers import base
    from moe_jax.routing import Routing


    @dataclasses.dataclass(frozen=True)
    class FirstExpertConfig(base.LogitRouterConfig):
      temperature: float = 1.0


    def route(inputs, cfg, rng, train):
      logits = base.logits_f32(inputs, "toy_first_expert") / cfg.temperature
      t = logits.shape[0]
      probs = jax.nn.softmax(logits, axis=-1)
      index = jnp.zeros((t, 1), jnp.int32)
      mask = jnp.ones((t, 1), bool)
      return Routing(expert_index=index, combine_weight=probs[:, :1], mask=mask,
                     router_probs=probs,
                     aux_losses=base.logit_aux_losses(logits, probs, index, mask),
                     max_assignments=t)


    routers.register(base.Router(name="toy_first_expert", config=FirstExpertConfig,
                                 route=route, aux_losses=base.LOGIT_AUX_LOSSES))
    """)

TOY_CONFIG = textwrap.dedent("""
    import toy_router  # noqa: F401  registers the router
    from configs.base import base_config


    def get_config():
      c = base_config("toy_first_expert")
      c.model.moe.router.temperature = 2.0
      return c
    """)


def test_a_new_router_is_one_module_and_a_config_file(tmp_path, monkeypatch):
  (tmp_path / "toy_router.py").write_text(TOY_ROUTER)
  (tmp_path / "toy_config.py").write_text(TOY_CONFIG)
  monkeypatch.syspath_prepend(str(tmp_path))
  spec = importlib.util.spec_from_file_location("toy_config", tmp_path / "toy_config.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  m = config.model
  m.d_model, m.num_layers, m.num_heads, m.head_dim, m.d_ff = 32, 2, 2, 16, 64
  m.moe.d_expert = 32
  config.data.max_bytes, config.data.seq_len, config.data.batch_size = 40_000, 16, 8
  config.train.num_steps, config.train.log_every, config.train.eval_batches = 2, 1, 1
  summary = loop.train_and_evaluate(config, str(tmp_path / "work"))
  assert summary.final_step == 2 and summary.heldout_loss < 10
  with open(tmp_path / "work" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  loads = [r["moe/layer_1/expert_load"] for r in records if "moe/layer_1/expert_load" in r]
  assert loads and all(load[0] == 1.0 and sum(load[1:]) == 0.0 for load in loads)
  assert "toy_router" in sys.modules


def with_values(name="default", **values):
  """Config ``name`` with each ``a__b__c=value`` set at a.b.c (in order)."""
  config = load(name)
  for path, value in values.items():
    node = config
    *parents, leaf = path.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def rules_with(**changes):
  """The default rules with some logical names mapped elsewhere (same order)."""
  from moe_jax.sharding import DEFAULT_RULES
  return tuple((name, changes.get(name, axes)) for name, axes in DEFAULT_RULES)


TENSOR2 = dict(mesh__shape__tensor=2)  # data=-1 takes the other 4 of 8 devices


@pytest.mark.parametrize("path,value,message,others", [
    ("optimizer.grad_clip_norm", -1, "optimizer.grad_clip_norm=-1.0; allowed: a number > 0", {}),
    ("optimizer.b2", 1.5, "optimizer.b2=1.5; allowed: 0 <= b2 < 1", {}),
    ("optimizer.warmup_steps", -5, "optimizer.warmup_steps=-5; allowed: an integer >= 0", {}),
    ("model.num_heads", 0, "model.num_heads=0; allowed: an integer >= 1", {}),
    ("model.d_model", 0, "model.d_model=0; allowed: an integer >= 1", {}),
    ("data.batch_size", 0, "data.batch_size=0; allowed: an integer >= 1", {}),
    ("mesh.shape.foo", 2, "mesh.shape.foo: unknown field", {}),
    ("model.moe.router.routed_scaling_factor", 0.0,
     "model.moe.router.routed_scaling_factor=0.0; allowed: a number > 0",
     dict(model__moe__router=router("sigmoid_topk"))),
    # mesh.rules: malformed, a logical name no array has, a mesh axis twice.
    ("mesh.rules", (("heads",),), "mesh.rules: ('heads',) is not a rule", {}),
    ("mesh.rules", rules_with() + (("head", "tensor"),),
     "mesh.rules: logical name 'head' is not used by the model", {}),
    ("mesh.rules", rules_with(mlp=("tensor", "tensor")),
     "mesh.rules: 'mlp' maps to ['tensor', 'tensor']; allowed: each mesh axis at most once", {}),
    # Every dimension the rules shard must divide by its mesh axes.
    ("model.num_heads", 3, "model.num_heads=3 is not divisible by the tensor mesh axis "
     "(mesh.shape.tensor=2) that mesh.rules shard its 'heads' dimension over; allowed: a "
     "multiple of 2", TENSOR2),
    ("model.d_ff", 65, "model.d_ff=65 is not divisible by the tensor mesh axis "
     "(mesh.shape.tensor=2)", TENSOR2),
    ("model.moe.d_expert", 33, "model.moe.d_expert=33 is not divisible by the tensor mesh axis "
     "(mesh.shape.tensor=2)", TENSOR2),
    ("model.vocab_size", 257, "model.vocab_size=257 is not divisible by the tensor mesh axis "
     "(mesh.shape.tensor=2)", TENSOR2),
    ("model.d_model", 33, "model.d_model=33 is not divisible by the fsdp mesh axis "
     "(mesh.shape.fsdp=2)", dict(mesh__shape__fsdp=2)),
    ("model.moe.d_shared", 33, "model.moe.num_shared_experts*model.moe.d_shared=33 is not "
     "divisible by the tensor mesh axis (mesh.shape.tensor=2)",
     dict(TENSOR2, model__moe__num_shared_experts=1)),
    ("model.moe.num_experts", 6, "model.moe.num_experts=6 is not divisible by the expert mesh "
     "axis (mesh.shape.expert=4)", dict(mesh__shape__expert=4)),
    ("data.batch_size", 12, "data.batch_size=12 is not divisible by the data*fsdp*expert mesh "
     "axes (mesh.shape.data=8, mesh.shape.fsdp=1, mesh.shape.expert=1)", {}),
    # Rules other than the defaults: the checks follow config.mesh.rules.
    ("data.seq_len", 15, "data.seq_len=15 is not divisible by the tensor mesh axis "
     "(mesh.shape.tensor=2) that mesh.rules shard its 'activation_length' dimension",
     dict(TENSOR2, mesh__rules=rules_with(activation_length="tensor"))),
    ("model.head_dim", 6, "model.head_dim=6 is not divisible by the tensor mesh axis "
     "(mesh.shape.tensor=4) that mesh.rules shard its 'kv' dimension",
     dict(mesh__shape__tensor=4, mesh__rules=rules_with(heads=None, kv="tensor"))),
    ("model.moe.num_experts", 6, "model.moe.num_experts=6 is not divisible by the tensor mesh "
     "axis (mesh.shape.tensor=4) that mesh.rules shard its 'router' dimension",
     dict(mesh__shape__tensor=4, model__num_heads=4, mesh__rules=rules_with(router="tensor"))),
    ("model.d_ff", 66, "model.d_ff=66 is not divisible by the tensor*expert mesh axes "
     "(mesh.shape.tensor=2, mesh.shape.expert=2) that mesh.rules shard its 'mlp' dimension "
     "over; allowed: a multiple of 4",
     dict(mesh__shape__expert=2, mesh__shape__tensor=2, mesh__rules=rules_with(
         mlp=("tensor", "expert")))),
])
def test_bad_values_are_refused_by_field_on_eight_devices(path, value, message, others):
  config = with_values(**others, **{path.replace(".", "__"): value})
  with pytest.raises(ConfigError) as error:
    validate_config(config, num_devices=8)
  assert message in str(error.value)


@pytest.mark.parametrize("values", [
    # The rules are resolved per array as flax does: "embed" comes first in the
    # rules, so in the attention weights it takes the tensor axis and heads stay whole.
    dict(TENSOR2, model__num_heads=3, mesh__rules=rules_with(embed="tensor")),
    # No array has an expert dimension (no MoE layer) or none is sharded.
    dict(model__moe_every=0, model__moe__num_experts=6, mesh__shape__expert=4),
    dict(model__moe__num_experts=6, mesh__shape__expert=4, mesh__rules=rules_with(expert=None)),
    # Activation constraints inside the step may shard unevenly (jax pads them).
    dict(mesh__shape__tensor=4, model__num_heads=4, model__head_dim=6,
         mesh__rules=rules_with(heads=None, activation_heads=None, activation_kv="tensor")),
    # "heads" comes before "kv" in the rules, so kv -> tensor leaves head_dim whole.
    dict(mesh__shape__tensor=4, model__num_heads=4, model__head_dim=6,
         mesh__rules=rules_with(kv="tensor")),
])
def test_dimensions_that_no_rule_shards_need_not_divide(values):
  validate_config(with_values(**values), num_devices=8)


@pytest.mark.parametrize("values", [
    {},
    dict(model__tie_embeddings=False, model__moe_every=1, model__moe__num_shared_experts=2,
         model__moe__router=router("noisy_topk")),
    dict(model__moe__d_shared=72, model__moe__num_shared_experts=2,
         model__moe__expert_kind="mlp", model__moe__router=router("sigmoid_topk")),
    dict(model__moe__router=router("hash")),
    dict(model__moe_every=0),
])
def test_sharded_dims_are_the_models_parameters(values):
  # The table validate_config checks is every parameter the model makes, with its
  # logical names and sizes.
  import flax.linen as nn
  import jax.numpy as jnp
  from moe_jax.config_validation import sharded_dims
  from moe_jax.layers.transformer import TransformerLM
  values = dict(model__d_model=24, model__num_heads=3, model__head_dim=8, model__d_ff=40,
                model__moe__num_experts=4, model__moe__d_expert=56, **values)
  cfg = experiment_config(with_values(**values))
  model = TransformerLM(cfg.model)
  boxed = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)},
                                            jnp.zeros((1, 8), jnp.int32)))
  params = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(p, nn.Partitioned) for p in params)
  made = set()
  for p in params:
    named = [(n, s) for n, s in zip(p.names, p.value.shape) if n is not None]
    made.add((tuple(n for n, _ in named), tuple(s for _, s in named)))
  table = {(names, tuple(size for _, size in dims)) for names, dims in sharded_dims(cfg)
           if not names[0].startswith("activation_")}
  assert made == table
