"""Attention implementations (moe_jax.layers.attention): each against a plain
softmax reference or XLA, the choice ``auto`` makes per platform, dtype, shape
and mesh, and the refusals before compute.

The Pallas TPU kernel runs in the Pallas TPU interpreter on CPU. The GPU section
(cuDNN against XLA in bf16 at a configs/gpu_1b.py layer's shape) runs only when
selected on a GPU:

  python -m pytest -m gpu tests/test_attention.py
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from configs import gpu_1b
from kernel_refs import rel_err
from moe_jax.config_fields import ConfigError, build
from moe_jax.config_validation import attention_for, validate_config
from moe_jax.layers import attention
from moe_jax.layers.transformer import CausalSelfAttention, ModelConfig
from moe_jax.sharding import DEFAULT_RULES, make_mesh
from moe_jax.training.config import experiment_config

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu",
                            reason="needs a GPU (jax default backend)")


def softmax_reference(q, k, v):
  """Causal softmax(q k^T / sqrt(D)) v over [B, L, H, D], spelled out in float32."""
  q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  length = q.shape[1]
  causal = jnp.tril(jnp.ones((length, length), bool))
  weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def qkv_and_cotangent(shape, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  return [jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys]


def value_and_grads(fn):
  """(q, k, v, dout) -> (out, (dq, dk, dv)), jitted."""
  def run(q, k, v, dout):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(dout.astype(out.dtype))
  return jax.jit(run)


def assert_close(got, want, tol):
  (out, grads), (ref_out, ref_grads) = got, want
  for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
    a = np.asarray(a, np.float32)
    assert np.all(np.isfinite(a)), name
    assert rel_err(a, np.asarray(b, np.float32)) < tol, (name, rel_err(a, b))


# (B, L, H, D): odd sequence lengths, several head dims.
@pytest.mark.parametrize("shape", [(2, 7, 3, 8), (1, 13, 2, 16), (2, 1, 1, 4), (1, 33, 2, 64)])
def test_xla_matches_softmax_reference(shape):
  *qkv, dout = qkv_and_cotangent(shape)
  assert_close(value_and_grads(attention.get("xla").fn)(*qkv, dout),
               value_and_grads(softmax_reference)(*qkv, dout), 1e-5)


def test_reference_is_causal():
  # Changing the last position's k and v leaves every earlier output as it was.
  q, k, v, _ = qkv_and_cotangent((1, 6, 2, 8))
  out = attention.get("xla").fn(q, k, v)
  moved = attention.get("xla").fn(q, k.at[:, -1].add(1.0), v.at[:, -1].add(1.0))
  np.testing.assert_array_equal(out[:, :-1], moved[:, :-1])
  assert not np.allclose(out[:, -1], moved[:, -1])


def test_pallas_tpu_interpreted_matches_xla():
  # 384: three 128-blocks, so the kernel skips blocks above the diagonal (the test
  # below runs one block per device).
  *qkv, dout = qkv_and_cotangent((1, 384, 1, 32))
  with pltpu.force_tpu_interpret_mode():
    got = value_and_grads(attention.get("pallas_tpu").fn)(*qkv, dout)
  assert_close(got, value_and_grads(attention.get("xla").fn)(*qkv, dout), 1e-5)


def test_pallas_tpu_runs_per_device_under_a_mesh():
  # attend() wraps the kernel in a shard_map over batch (data) and heads (tensor).
  mesh = make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])
  *qkv, dout = qkv_and_cotangent((2, 128, 4, 16))

  def sharded(q, k, v):
    return attention.attend("pallas_tpu", q, k, v, platform="tpu")
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES), \
      pltpu.force_tpu_interpret_mode():
    text = jax.jit(sharded).lower(*qkv[:3]).as_text()
    got = value_and_grads(sharded)(*qkv, dout)
  # Each device's kernel sees its own batch row and two of the four heads.
  assert "sdy.manual_computation" in text and "tensor<1x128x2x16xf32>" in text
  assert_close(got, value_and_grads(attention.get("xla").fn)(*qkv, dout), 1e-5)


def test_cudnn_refused_on_cpu_naming_the_reason_and_what_auto_takes():
  with pytest.raises(ConfigError) as e:
    attention.resolve("cudnn", "cpu", jnp.bfloat16, 64, 1024)
  message = str(e.value)
  assert "model.attention_impl='cudnn'" in message
  assert "NVIDIA GPUs" in message and "'cpu'" in message
  assert "takes 'xla'" in message


def test_auto_on_cpu_takes_xla():
  assert attention.resolve("auto", "cpu", jnp.bfloat16, 64, 1024).name == "xla"
  assert attention.resolve("auto", jax.default_backend(), jnp.float32, 32, 128).name == "xla"


BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


# (platform, dtype, head_dim, seq_len, compute capability, split dims) -> auto's choice
@pytest.mark.parametrize("where, choice", [
    (("gpu", BF16, 64, 1024, 9.0, ()), "cudnn"),        # configs/gpu_1b.py on Hopper
    (("gpu", F16, 128, 778, 8.0, ()), "cudnn"),         # any even sequence length
    (("gpu", BF16, 128, 777, 9.0, ()), "xla"),          # odd: cuDNN refuses it in training
    (("gpu", F32, 64, 1024, 9.0, ()), "xla"),           # cuDNN takes bf16/fp16 only
    (("gpu", BF16, 60, 1024, 9.0, ()), "xla"),          # head_dim not a multiple of 8
    (("gpu", BF16, 192, 1024, 8.0, ()), "xla"),         # > 128 before Hopper
    (("gpu", BF16, 192, 1024, 9.0, ()), "cudnn"),       # <= 256 from Hopper on
    (("gpu", BF16, 264, 1024, 9.0, ()), "xla"),
    (("gpu", BF16, 64, 1024, 7.5, ()), "xla"),          # before Ampere
    (("gpu", BF16, 64, 1024, 9.0, ("length",)), "xla"),  # sequence split over devices
    (("tpu", BF16, 64, 1024, 0.0, ()), "pallas_tpu"),
    (("tpu", F32, 256, 384, 0.0, ()), "pallas_tpu"),
    (("tpu", F16, 64, 1024, 0.0, ()), "xla"),
    (("tpu", BF16, 64, 1000, 0.0, ()), "xla"),          # not a multiple of 128
    (("tpu", BF16, 192, 1024, 0.0, ()), "xla"),
    (("tpu", BF16, 64, 1024, 0.0, ("head_dim",)), "xla"),
    (("cpu", BF16, 64, 1024, 0.0, ()), "xla"),
])
def test_auto_choice(where, choice):
  platform, dtype, head_dim, seq_len, cc, split = where
  assert attention.resolve("auto", platform, dtype, head_dim, seq_len, compute_capability=cc,
                           split=split).name == choice


@pytest.mark.parametrize("name, where, reason", [
    ("cudnn", ("gpu", F32, 64, 1024, 9.0, ()), "takes bfloat16/float16"),
    ("cudnn", ("gpu", BF16, 60, 1024, 9.0, ()), "multiple of 8 and <= 256"),
    ("cudnn", ("gpu", BF16, 64, 1024, 7.5, ()), "compute capability 8.0"),
    ("cudnn", ("gpu", BF16, 64, 1024, 9.0, ("length",)), "split their length"),
    ("pallas_tpu", ("gpu", BF16, 64, 1024, 9.0, ()), "runs on TPUs"),
    ("pallas_tpu", ("tpu", BF16, 64, 1000, 0.0, ()), "multiple of 128, got 1000"),
])
def test_refusals_name_the_reason_and_what_auto_takes(name, where, reason):
  platform, dtype, head_dim, seq_len, cc, split = where
  auto = attention.resolve("auto", platform, dtype, head_dim, seq_len, compute_capability=cc,
                           split=split).name
  with pytest.raises(ConfigError, match=reason) as e:
    attention.resolve(name, platform, dtype, head_dim, seq_len, compute_capability=cc,
                      split=split)
  assert f"model.attention_impl={name!r}" in str(e.value)
  assert f"takes {auto!r} here" in str(e.value)


def test_model_config_refuses_an_unknown_name_with_the_list():
  with pytest.raises(ConfigError) as e:
    build(ModelConfig, {"attention_impl": "flash"}, "model")
  assert str(e.value) == ("model.attention_impl='flash'; allowed: "
                          "['auto', 'cudnn', 'pallas_tpu', 'xla']")


def test_split_dims():
  sizes = {"data": 2, "fsdp": 1, "expert": 1, "tensor": 4}
  assert attention.split_dims(DEFAULT_RULES, sizes) == ()   # batch and heads only
  by_length = (("activation_length", "data"), ("activation_kv", "fsdp"))
  assert attention.split_dims(by_length, sizes) == ("length",)
  assert attention.split_dims(by_length, {**sizes, "data": 1}) == ()
  # Resolved per array as flax does: the batch took data first, so the length stays whole.
  assert attention.split_dims((("activation_batch", "data"), *by_length), sizes) == ()
  assert attention.split_dims((), sizes) == ()


def test_gpu_1b_takes_cudnn_on_hopper_and_xla_here():
  config = gpu_1b.get_config()
  assert config.model.attention_impl == "auto"
  cfg = experiment_config(config)
  assert attention_for(cfg, 1, "gpu", 9.0).name == "cudnn"
  assert attention_for(cfg, 1, "cpu").name == "xla"
  config.model.dtype = "float32"
  assert attention_for(experiment_config(config), 1, "gpu", 9.0).name == "xla"


def test_validate_config_refuses_what_cannot_run_before_compute():
  config = gpu_1b.get_config()
  config.model.attention_impl = "cudnn"
  validate_config(config, 1, "gpu", 9.0)
  with pytest.raises(ConfigError, match="model.attention_impl='cudnn' cannot run here.*'cpu'"):
    validate_config(config, 1, "cpu")
  # The sequence split over the data axis: cuDNN's partitioner refuses it, auto avoids it.
  moved = {"activation_batch": ("fsdp", "expert"), "activation_length": "data"}
  config.mesh.rules = tuple((name, moved.get(name, axes)) for name, axes in DEFAULT_RULES)
  with pytest.raises(ConfigError, match="split their length"):
    validate_config(config, 8, "gpu", 9.0)
  config.model.attention_impl = "auto"
  assert attention_for(validate_config(config, 8, "gpu", 9.0), 8, "gpu", 9.0).name == "xla"


def _layer(impl):
  cfg = ModelConfig(d_model=16, num_heads=2, head_dim=8, attention_impl=impl)
  x = jax.random.normal(jax.random.key(1), (2, 5, 16))
  positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
  layer = CausalSelfAttention(cfg)
  return layer, x, positions


def test_layer_resolves_by_itself_outside_the_training_loop():
  layer, x, positions = _layer("auto")
  params = jax.jit(layer.init)(jax.random.key(0), x, positions)
  out = jax.jit(layer.apply)(params, x, positions)
  np.testing.assert_array_equal(out, jax.jit(_layer("xla")[0].apply)(params, x, positions))
  with pytest.raises(ConfigError, match="model.attention_impl='cudnn' cannot run here"):
    jax.jit(_layer("cudnn")[0].apply)(params, x, positions)


# --- On a GPU: cuDNN against XLA in bf16 ---------------------------------------------

# (B, L, H, D): one layer of configs/gpu_1b.py, and odd sizes.
GPU_SHAPES = [(32, 1024, 16, 64), (2, 778, 4, 128), (3, 200, 2, 40)]
BF16_TOL = 2e-2   # relative (Frobenius) error against float32; bf16 rounding is ~4e-3


def errors(got, want) -> dict:
  (out, grads), (ref_out, ref_grads) = got, want
  return {name: rel_err(np.asarray(a, np.float32), np.asarray(b, np.float32))
          for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads))}


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_cudnn_matches_xla_in_bf16(shape):
  """cuDNN in bf16 within bf16 rounding of XLA in float32 on the same inputs, and of
  XLA in bf16; the program (forward and backward) calls cuDNN's fused attention."""
  *qkv, dout = qkv_and_cotangent(shape, jnp.bfloat16)
  impl = attention.resolve("auto", "gpu", jnp.bfloat16, shape[-1], shape[1])
  assert impl.name == "cudnn"
  cudnn = value_and_grads(impl.fn)
  hlo = cudnn.lower(*qkv, dout).as_text()
  assert "__cudnn$fmhaSoftmax" in hlo and "__cudnn$fmhaSoftmaxBackward" in hlo
  got = cudnn(*qkv, dout)
  f32 = value_and_grads(attention.get("xla").fn)(*(t.astype(jnp.float32) for t in (*qkv, dout)))
  xla_bf16 = value_and_grads(attention.get("xla").fn)(*qkv, dout)
  print(f"\n{shape}: cudnn vs f32 {errors(got, f32)}\n  xla bf16 vs f32 "
        f"{errors(xla_bf16, f32)}\n  cudnn vs xla bf16 {errors(got, xla_bf16)}")
  assert_close(got, f32, BF16_TOL)
  assert_close(got, xla_bf16, 1.5 * BF16_TOL)


@pytest.mark.gpu
@on_gpu
def test_model_takes_cudnn_and_matches_xla():
  """A small bf16 LM's loss and gradients with auto (cuDNN here) and with XLA."""
  from moe_jax.layers.transformer import TransformerLM  # pylint: disable=g-import-not-at-top
  tokens = jax.random.randint(jax.random.key(0), (4, 256), 0, 256)
  models = {impl: TransformerLM(ModelConfig(d_model=256, num_layers=2, num_heads=4,
                                            head_dim=64, moe_every=0, dtype="bfloat16",
                                            attention_impl=impl))
            for impl in ("auto", "xla")}
  params = jax.jit(models["xla"].init)(jax.random.key(1), tokens)

  def loss(model, params):
    logits = jax.nn.log_softmax(model.apply(params, tokens)[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1))
  runs = {impl: jax.jit(jax.value_and_grad(lambda p, m=m: loss(m, p))) for impl, m in
          models.items()}
  assert "__cudnn$fmha" in runs["auto"].lower(params).as_text()
  assert "__cudnn$fmha" not in runs["xla"].lower(params).as_text()
  (auto_loss, auto_grads), (xla_loss, xla_grads) = runs["auto"](params), runs["xla"](params)
  assert abs(float(auto_loss) - float(xla_loss)) < 1e-2 * abs(float(xla_loss))
  for a, b in zip(jax.tree.leaves(auto_grads), jax.tree.leaves(xla_grads)):
    assert rel_err(a, b) < 5e-2
