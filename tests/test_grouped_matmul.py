"""The grouped_matmul op: implementations against a float64 loop, and impl selection."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.ops import grouped_matmul as gmm_lib


def float64_reference(x, w, group_sizes):
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  out = np.zeros((x.shape[0], w.shape[2]))
  start = 0
  for e, size in enumerate(np.asarray(group_sizes)):
    out[start:start + size] = x[start:start + size] @ w[e]
    start += size
  return out


@pytest.mark.parametrize("impl", ["reference", "ragged_dot"])
@pytest.mark.parametrize("sizes", [[3, 0, 5, 2], [0, 0, 10, 0], [10], [2, 2, 2, 0]])
def test_forward_and_grads(impl, sizes):
  rng = np.random.default_rng(len(sizes))
  m = 12  # rows past sum(sizes) are padding and must come out zero
  x = jnp.asarray(rng.normal(size=(m, 7)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(len(sizes), 7, 5)), jnp.float32)
  gs = jnp.asarray(sizes, jnp.int32)
  y = gmm_lib.grouped_matmul(x, w, gs, impl=impl)
  np.testing.assert_allclose(np.asarray(y), float64_reference(x, w, gs), rtol=1e-5, atol=1e-5)
  cot = jnp.asarray(rng.normal(size=(m, 5)), jnp.float32)
  grads = jax.grad(lambda x, w: jnp.sum(gmm_lib.grouped_matmul(x, w, gs, impl=impl) * cot),
                   argnums=(0, 1))(x, w)
  ref = jax.grad(lambda x, w: jnp.sum(gmm_lib.grouped_matmul(x, w, gs, impl="reference") * cot),
                 argnums=(0, 1))(x, w)
  # Oracle for the gradient: dx rows = cot @ w[e]^T, dw[e] = x_e^T cot_e, from float64 loops.
  x64, w64, c64 = (np.asarray(a, np.float64) for a in (x, w, cot))
  dx, dw = np.zeros_like(x64), np.zeros_like(w64)
  start = 0
  for e, size in enumerate(sizes):
    rows = slice(start, start + size)
    dx[rows] = c64[rows] @ w64[e].T
    dw[e] = x64[rows].T @ c64[rows]
    start += size
  for got in (grads, ref):
    np.testing.assert_allclose(np.asarray(got[0]), dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got[1]), dw, rtol=1e-5, atol=1e-5)


def test_bf16_output_dtype_and_accuracy():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 32)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(3, 32, 8)), jnp.bfloat16)
  gs = jnp.asarray([5, 6, 5], jnp.int32)
  y = gmm_lib.grouped_matmul(x, w, gs, impl="ragged_dot")
  assert y.dtype == jnp.bfloat16
  ref = float64_reference(x.astype(jnp.float32), w.astype(jnp.float32), gs)
  err = np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref)
  assert err < 1e-2


def test_auto_on_cpu_is_xla():
  x, w = jnp.ones((4, 2)), jnp.ones((2, 2, 3))
  assert gmm_lib.resolve_impl("auto", x, w).name == "ragged_dot"


def test_unknown_impl_lists_choices():
  with pytest.raises(ValueError, match="known:.*ragged_dot"):
    gmm_lib.grouped_matmul(jnp.ones((4, 2)), jnp.ones((2, 2, 3)), jnp.array([2, 2]), impl="cuda")


def test_impl_that_cannot_run_here_raises():
  gmm_lib.register_impl(gmm_lib.GmmImpl(
      "test_gpu_only", lambda *a: None, lambda x, w, platform: "needs a GPU"))
  try:
    with pytest.raises(ValueError, match="cannot run here: needs a GPU"):
      gmm_lib.grouped_matmul(jnp.ones((4, 2)), jnp.ones((2, 2, 3)), jnp.array([2, 2]),
                             impl="test_gpu_only")
  finally:
    gmm_lib._IMPLS.pop("test_gpu_only")


def test_shape_errors():
  with pytest.raises(ValueError, match="group_sizes"):
    gmm_lib.grouped_matmul(jnp.ones((4, 2)), jnp.ones((2, 2, 3)), jnp.array([4]))
  with pytest.raises(ValueError, match="K="):
    gmm_lib.grouped_matmul(jnp.ones((4, 3)), jnp.ones((2, 2, 3)), jnp.array([2, 2]))
