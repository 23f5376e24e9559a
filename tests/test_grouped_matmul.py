"""The grouped_matmul op: implementations against a float64 loop, and impl selection."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.ops import gmm as gmm_lib
from moe_jax.ops import registry


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


@pytest.mark.parametrize("impl,k,n", [("reference", 5, 4), ("ragged_dot", 5, 4),
                                       ("megablox_interpret", 128, 128)])  # native offset
@pytest.mark.parametrize("sizes,num_local", [([3, 0, 5, 2], 2), ([4, 1, 0, 6, 2, 3], 3),
                                            ([0, 7, 0, 0], 1)])
def test_group_offset_computes_only_the_local_groups(impl, k, n, sizes, num_local):
  # An expert-parallel shard holds w for experts [offset, offset + num_local); rows
  # of other groups come out zero, and so do their gradients.
  assert (registry.get(impl).group_offset_fn is not None) == impl.startswith("megablox")
  rng = np.random.default_rng(sum(sizes))
  m, num_groups = sum(sizes) + 3, len(sizes)
  x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
  w_all = jnp.asarray(rng.normal(size=(num_groups, k, n)) / np.sqrt(k), jnp.float32)
  gs = jnp.asarray(sizes, jnp.int32)
  cot = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
  full = float64_reference(x, w_all, gs)
  starts = np.concatenate([[0], np.cumsum(sizes)])

  @jax.jit   # the offset is traced, as inside shard_map
  def local(x, w, offset):
    return gmm_lib.grouped_matmul(x, w, gs, impl=impl, group_offset=offset)

  for offset in range(num_groups - num_local + 1):
    w = w_all[offset:offset + num_local]
    rows = slice(starts[offset], starts[offset + num_local])
    want = np.zeros_like(full)
    want[rows] = full[rows]
    np.testing.assert_allclose(np.asarray(local(x, w, offset)), want, rtol=1e-5, atol=1e-5)
    dx, dw = jax.grad(lambda x, w: jnp.sum(local(x, w, offset) * cot), argnums=(0, 1))(x, w)
    x64, c64 = np.asarray(x, np.float64), np.asarray(cot, np.float64)
    want_dx = np.zeros_like(x64)
    want_dx[rows] = np.concatenate(
        [c64[starts[e]:starts[e + 1]] @ np.asarray(w_all[e], np.float64).T
         for e in range(offset, offset + num_local)])
    np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-5, atol=1e-5)
    for i, e in enumerate(range(offset, offset + num_local)):
      g = slice(starts[e], starts[e + 1])
      np.testing.assert_allclose(np.asarray(dw[i]), x64[g].T @ c64[g], rtol=1e-5, atol=1e-5)


def test_fused_products_equal_gather_matmul_scatter():
  rng = np.random.default_rng(1)
  tokens, k, e = 6, 2, 3
  slot_expert = rng.integers(0, e, tokens * k)
  row_slot = jnp.asarray(np.argsort(slot_expert, kind="stable"), jnp.int32)
  gs = jnp.asarray(np.bincount(slot_expert, minlength=e), jnp.int32)
  x = jnp.asarray(rng.normal(size=(tokens, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(e, 4, 5)), jnp.float32)
  weight = jnp.asarray(rng.random(tokens * k), jnp.float32)
  rows = gmm_lib.gather_grouped_matmul(x, row_slot, k, w, gs, impl="reference")
  np.testing.assert_allclose(np.asarray(rows),
                             float64_reference(np.asarray(x)[np.asarray(row_slot) // k], w, gs),
                             rtol=1e-5, atol=1e-5)
  slots = gmm_lib.scatter_grouped_matmul(rows, jnp.swapaxes(w, 1, 2)[:, :5, :4], gs, row_slot,
                                         weight, impl="reference")
  want = np.zeros((tokens * k, 4))
  want[np.asarray(row_slot)] = (np.asarray(weight)[:, None]
                                * float64_reference(rows, jnp.swapaxes(w, 1, 2), gs))
  np.testing.assert_allclose(np.asarray(slots), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="'ragged_dot' has no fused gather/combine kernels"):
    gmm_lib.gather_grouped_matmul(x, row_slot, k, w, gs, impl="ragged_dot")


def test_auto_on_cpu_is_xla():
  assert registry.resolve("auto", jnp.float32).name == "ragged_dot"
  assert registry.resolve("auto", jnp.bfloat16).name == "ragged_dot"


def test_capabilities_are_declared():
  assert {"reference", "pallas_mosaic", "pallas_triton", "megablox"} <= set(registry.with_fused())
  assert "ragged_dot" not in registry.with_fused()
  mosaic = registry.get("pallas_mosaic")
  assert mosaic.platforms == ("gpu",) and mosaic.min_compute_capability == 9.0
  assert registry.get("pallas_triton_interpret").platforms == ("cpu", "gpu", "tpu")
  for name in registry.AUTO_ORDER["gpu"] + registry.AUTO_ORDER["tpu"]:
    assert "interpret" not in name and name in registry.known()


def test_unknown_impl_lists_choices():
  with pytest.raises(ValueError, match="known:.*ragged_dot"):
    gmm_lib.grouped_matmul(jnp.ones((4, 2)), jnp.ones((2, 2, 3)), jnp.array([2, 2]), impl="cuda")


@pytest.mark.parametrize("impl,pattern", [
    (registry.GmmImpl("test_gpu_only", lambda *a: None, platforms=("gpu",),
                      elsewhere="try test_elsewhere"),
     r"impl='test_gpu_only' cannot run here: runs on gpu, this is 'cpu'; try test_elsewhere"),
    (registry.GmmImpl("test_bf16_only", lambda *a: None, dtypes=("bfloat16",)),
     r"cannot run here: takes bfloat16, got float32"),
    (registry.GmmImpl("test_missing", lambda *a: None, available=lambda: "not installed"),
     r"cannot run here: not installed"),
])
def test_impl_that_cannot_run_here_raises(impl, pattern):
  registry.register(impl)
  try:
    with pytest.raises(ValueError, match=pattern):
      gmm_lib.grouped_matmul(jnp.ones((4, 2)), jnp.ones((2, 2, 3)), jnp.array([2, 2]),
                             impl=impl.name)
  finally:
    registry._IMPLS.pop(impl.name)  # pylint: disable=protected-access


def test_shape_errors():
  with pytest.raises(ValueError, match="group_sizes"):
    gmm_lib.grouped_matmul(jnp.ones((4, 2)), jnp.ones((2, 2, 3)), jnp.array([4]))
  with pytest.raises(ValueError, match="K="):
    gmm_lib.grouped_matmul(jnp.ones((4, 3)), jnp.ones((2, 2, 3)), jnp.array([2, 2]))
  with pytest.raises(ValueError, match="share a dtype"):
    gmm_lib.grouped_matmul(jnp.ones((4, 2)), jnp.ones((2, 2, 3), jnp.bfloat16), jnp.array([2, 2]))
  with pytest.raises(ValueError, match="3 local experts but only 2 groups"):
    gmm_lib.grouped_matmul(jnp.ones((4, 2)), jnp.ones((3, 2, 3)), jnp.array([2, 2]),
                           group_offset=0)
