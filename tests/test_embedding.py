"""The embedding lookup's gradient methods (moe_jax.layers.embedding) against jnp.take's
autodiff gradient, alone, sharded and inside TransformerLM; the GPU check at the
shape of configs/gpu_1b.py:

  python -m pytest -m gpu tests/test_embedding.py
"""
from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import default as default_config
from moe_jax.config_fields import FieldError
from moe_jax.config_validation import ConfigError, validate_config
from moe_jax.layers import embedding
from moe_jax.layers.embedding import embed_lookup
from moe_jax.layers.transformer import ModelConfig, TransformerLM

METHODS = ["matmul", "segment_sum", "scatter", "auto"]

# (vocab, ids): repeated ids, every row hit, unused rows, odd batch and length.
CASES = {
    "every_row": (11, np.arange(3 * 7).reshape(3, 7) % 11),
    "unused_rows": (9, np.array([[0, 2, 2, 2, 7]])),
    "odd_3d": (13, np.random.default_rng(0).integers(0, 6, size=(3, 5, 7))),
}


def _inputs(vocab, ids, d=6, grad_dtype=jnp.float32):
  k1, k2 = jax.random.split(jax.random.key(len(ids.flat) + vocab))
  table = jax.random.normal(k1, (vocab, d), jnp.float32)
  grad = jax.random.normal(k2, ids.shape + (d,), jnp.float32).astype(grad_dtype)
  return table, jnp.asarray(ids, jnp.int32), grad


@jax.jit
def _take_vjp(table, ids, grad):
  y, vjp = jax.vjp(lambda t: jnp.take(t, ids, axis=0), table)
  return y, vjp(grad)[0]


@functools.partial(jax.jit, static_argnames=("method", "dtype"))
def _lookup_vjp(table, ids, grad, method, dtype):
  y, vjp = jax.vjp(lambda t: embed_lookup(t, ids, method, dtype), table)
  return y, vjp(grad)[0]


def _exact_table_grad(vocab, ids, grad):
  """float64 sum of the gradient rows per id (numpy)."""
  out = np.zeros((vocab, grad.shape[-1]), np.float64)
  np.add.at(out, np.asarray(ids).reshape(-1),
            np.asarray(grad, np.float64).reshape(-1, grad.shape[-1]))
  return out


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method", METHODS)
def test_float32_forward_and_grad_equal_take(method, case):
  vocab, ids = CASES[case]
  table, ids, grad = _inputs(vocab, ids)
  y_ref, d_ref = _take_vjp(table, ids, grad)
  y, d_table = _lookup_vjp(table, ids, grad, method, None)
  assert y.dtype == jnp.float32 and d_table.dtype == jnp.float32
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_allclose(d_table, d_ref, rtol=1e-6, atol=1e-6)
  unused = np.setdiff1d(np.arange(vocab), np.asarray(ids))
  assert np.all(np.asarray(d_table)[unused] == 0)
  if case == "every_row":
    assert unused.size == 0 and np.all(np.abs(np.asarray(d_table)).sum(-1) > 0)


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_activations(method):
  # Many tokens on few rows: the new methods add in float32, so they stay close
  # to the exact sum; the scatter path adds in bf16 (as jax writes it).
  vocab = 5
  ids = np.random.default_rng(1).integers(0, vocab - 1, size=(4, 129))
  table, ids, grad = _inputs(vocab, ids, d=8, grad_dtype=jnp.bfloat16)
  y, d_table = _lookup_vjp(table, ids, grad, method, jnp.bfloat16)
  assert y.dtype == jnp.bfloat16 and d_table.dtype == jnp.float32
  np.testing.assert_array_equal(y, table.astype(jnp.bfloat16)[ids])
  exact = _exact_table_grad(vocab, ids, grad)
  assert np.all(np.asarray(d_table)[vocab - 1] == 0)
  tol = 5e-2 if method == "scatter" else 1e-6
  np.testing.assert_allclose(d_table, exact, rtol=tol, atol=tol * np.abs(exact).max())


def test_matmul_multiplies_bfloat16_into_float32():
  # XLA may drop a bf16 rounding of a product (excess precision), so check the
  # program: bf16 operands (tensor cores), a float32 result.
  table, ids, grad = _inputs(*CASES["every_row"], grad_dtype=jnp.bfloat16)
  text = _lookup_vjp.lower(table, ids, grad, "matmul", jnp.bfloat16).as_text()
  dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
  assert len(dots) == 1 and re.search(r"\(tensor<21x11xbf16>, tensor<21x6xbf16>\) -> "
                                      r"tensor<11x6xf32>", dots[0]), dots


def test_auto_picks_matmul_up_to_the_threshold():
  limit = embedding.MATMUL_MAX_VOCAB
  assert embedding.resolve_method("auto", limit) == "matmul"
  assert embedding.resolve_method("auto", limit + 1) == "segment_sum"
  assert embedding.resolve_method("scatter", 4) == "scatter"
  with pytest.raises(ValueError, match=r"'onehot'; allowed: \['auto', 'matmul'"):
    embedding.resolve_method("onehot", 4)


@pytest.mark.parametrize("method,present,absent", [
    ("matmul", ["dot_general", "precision = [HIGHEST, HIGHEST]"], ["stablehlo.scatter"]),
    ("segment_sum", ["indices_are_sorted = true", "stablehlo.sort"], ["dot_general"]),
    ("scatter", ["stablehlo.scatter"], ["dot_general", "indices_are_sorted = true"]),
])
def test_the_backward_is_the_method_asked_for(method, present, absent):
  table, ids, grad = _inputs(*CASES["every_row"])
  text = jax.jit(lambda t, i, g: jax.vjp(lambda t: embed_lookup(t, i, method), t)[1](g)
                 ).lower(table, ids, grad).as_text()
  for op in present:
    assert op in text, op
  for op in absent:
    assert op not in text, op


@pytest.mark.parametrize("method", ["matmul", "segment_sum"])
def test_sharded_like_the_model(method):
  # The table split over (tensor, fsdp), the tokens over the batch axes: XLA adds
  # the shards' partial tables; the result equals the single-device gradient.
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  vocab, d = 16, 8
  ids = np.random.default_rng(2).integers(0, vocab - 3, size=(8, 5))
  table, ids, grad = _inputs(vocab, ids, d=d, grad_dtype=jnp.float32)
  shard = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  batch = P(("data", "fsdp"))
  args = (shard(table, P("tensor", "fsdp")), shard(ids, batch), shard(grad, batch))
  y, d_table = _lookup_vjp(*args, method, None)
  y_ref, d_ref = _take_vjp(table, ids, grad)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_allclose(d_table, d_ref, rtol=1e-6, atol=1e-6)


def _tiny_model(tie, method, dtype="float32"):
  return TransformerLM(ModelConfig(
      vocab_size=256, d_model=16, num_layers=1, num_heads=2, head_dim=8, d_ff=32,
      moe_every=0, max_len=16, tie_embeddings=tie, dtype=dtype, embedding_grad=method))


def _tokens():
  return jnp.asarray(np.random.default_rng(3).integers(0, 40, size=(3, 9)), jnp.int32)


@functools.partial(jax.jit, static_argnames="model")
def _model_grads(params, tokens, model):
  def loss(params):
    logits = model.apply({"params": params}, tokens)
    # A one-hot loss keeps scatters out of the backward but the embedding's.
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(tokens, 256), -1))
  return jax.grad(loss)(params)


@functools.lru_cache(maxsize=None)
def _scatter_reference(tie):
  """Parameters and their gradients with the plain autodiff embedding."""
  model = _tiny_model(tie, "scatter")
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), _tokens())["params"])
  return params, _model_grads(params, _tokens(), model)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("method", ["matmul", "segment_sum"])
def test_transformer_grads_equal_scatter(tie, method):
  params, want = _scatter_reference(tie)
  model = _tiny_model(tie, method)
  got = _model_grads(params, _tokens(), model)
  text = _model_grads.lower(params, _tokens(), model).as_text()
  assert ("stablehlo.scatter" in text) == (method == "segment_sum")
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
  d_embed = np.asarray(got["embed"]["embedding"])
  if tie:  # the unembedding's gradient reaches rows no input token uses
    assert np.all(np.abs(d_embed[40:]).sum(-1) > 0)
  else:
    assert np.all(d_embed[40:] == 0)


class _FlaxEmbedLM(nn.Module):
  """The parameter the model made with flax.linen.Embed before this module."""
  @nn.compact
  def __call__(self, tokens):
    return nn.Embed(256, 16, dtype=jnp.float32, param_dtype=jnp.float32,
                    embedding_init=nn.with_logical_partitioning(
                        nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
                    name="embed")(tokens)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_the_parameter_is_flax_embeds(tie):
  tokens = _tokens()
  key = jax.random.key(0)
  old = _FlaxEmbedLM().init(key, tokens)["params"]["embed"]
  new = _tiny_model(tie, "auto").init(key, tokens)["params"]
  assert set(new["embed"]) == {"embedding"}
  assert ("unembed" in new) != tie
  a, b = old["embedding"], new["embed"]["embedding"]
  assert isinstance(b, nn.Partitioned) and b.names == a.names == ("vocab", "embed")
  assert b.value.shape == a.value.shape == (256, 16) and b.value.dtype == jnp.float32
  np.testing.assert_array_equal(b.value, a.value)  # same initialiser, same rng path


def test_scatter_is_flax_embeds_forward_and_grad():
  table, tokens, grad = _inputs(256, np.asarray(_tokens()), d=16, grad_dtype=jnp.bfloat16)
  flax_embed = nn.Embed(256, 16, dtype=jnp.bfloat16)
  y_ref, vjp = jax.vjp(lambda t: flax_embed.apply({"params": {"embedding": t}}, tokens), table)
  y, d_table = _lookup_vjp(table, tokens, grad, "scatter", jnp.bfloat16)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(d_table, vjp(grad)[0])


def test_bad_method_is_refused_by_field():
  with pytest.raises(FieldError, match=r"embedding_grad='onehot'; allowed: \['auto', 'matmul', "
                                       r"'segment_sum', 'scatter'\]"):
    ModelConfig(embedding_grad="onehot")
  config = default_config.get_config()
  config.model.embedding_grad = "sparse"
  with pytest.raises(ConfigError, match=r"model\.embedding_grad='sparse'; allowed: \['auto'"):
    validate_config(config, num_devices=1)


# The shape of configs/gpu_1b.py: 32 x 1024 tokens, vocab 256, d_model 1024, bf16.
GPU_1B = dict(batch=32, length=1024, vocab=256, d_model=1024)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (jax default backend)")
@pytest.mark.parametrize("method", METHODS)
def test_gpu_1b_shape_against_float64(method):
  """Each method's gradient on the GPU against a float64 sum; the rows no token uses
  exactly zero; "matmul" (what "auto" picks here) compiles to no scatter at all."""
  vocab, d = GPU_1B["vocab"], GPU_1B["d_model"]
  rng = np.random.default_rng(4)
  ids = rng.integers(0, vocab - 6, size=(GPU_1B["batch"], GPU_1B["length"]))
  table, ids, grad = _inputs(vocab, ids, d=d, grad_dtype=jnp.bfloat16)
  y, d_table = _lookup_vjp(table, ids, grad, method, jnp.bfloat16)
  np.testing.assert_array_equal(y, table.astype(jnp.bfloat16)[ids])
  flat_ids = np.asarray(ids).reshape(-1)
  order = np.argsort(flat_ids, kind="stable")
  rows = np.asarray(grad, np.float64).reshape(-1, d)[order]
  starts = np.searchsorted(flat_ids[order], np.arange(vocab - 6))
  exact = np.zeros((vocab, d))
  exact[:vocab - 6] = np.add.reduceat(rows, starts, axis=0)
  d_table = np.asarray(d_table, np.float64)
  assert np.all(d_table[vocab - 6:] == 0)
  rel = np.abs(d_table - exact).max() / np.abs(exact).max()
  assert rel < (5e-2 if method == "scatter" else 1e-5), rel
  if embedding.resolve_method(method, vocab) == "matmul":
    hlo = jax.jit(lambda t, i, g: jax.vjp(lambda t: embed_lookup(t, i, method, jnp.bfloat16),
                                          t)[1](g)).lower(table, ids, grad).compile().as_text()
    assert " scatter(" not in hlo and "scatter-add" not in hlo
