"""The functions the grouped-matmul benchmark and the GPU tests run, by impl name and mode.

Signatures: forward ``(x[M, K], w[E, K, N], gs) -> y[M, N]``; input gradient
``(dy[M, N], w[E, K, N], gs) -> dx[M, K]``; weight gradient ``(x, dy, gs) ->
dw[E, K, N]``; forward and gradients ``(x, w, gs, dy) -> (y, dx, dw)``. Which
names have which mode: ``impl_names.has_kernel``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks import timing
from benchmarks.impl_names import TGMM_BACKENDS, has_kernel
from benchmarks.tile_variants import GMM_PREFIX, TGMM_PREFIX, parse_variant
from moe_jax import ops
from moe_kernels import gmm as gmm_lib
from moe_kernels import gmm_mosaic
from moe_kernels import tgmm_mosaic


def pallas_dense(x, w, tm=128, tn=256, tk=64):
  """Control: a plain Pallas (Triton) matmul x[M, K] @ w[K, N] with BlockSpecs, no groups."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  m, k = x.shape
  n = w.shape[1]

  def kernel(x_ref, w_ref, o_ref):
    def body(i, acc):
      ks = pl.ds(pl.multiple_of(i * tk, tk), tk)
      return acc + jnp.dot(x_ref[:, ks], w_ref[ks, :], preferred_element_type=jnp.float32)
    acc = jax.lax.fori_loop(0, k // tk, body, jnp.zeros((tm, tn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)

  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
      grid=(m // tm, n // tn),
      in_specs=[pl.BlockSpec((tm, k), lambda i, j: (i, 0)),
                pl.BlockSpec((k, tn), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
      compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=4))(x, w)


def _gmm_variant_tiles(name, m, k, n, e):
  """A ``pallas_mosaic@...`` variant's tiles for the product [m, k] x [e, k, n]."""
  return parse_variant(name, gmm_mosaic.default_tiles(m, k, n, e))


def forward(name: str, interpret: bool = False):
  if name == "pallas_dense":
    return lambda x, w, gs: pallas_dense(x, w[0], tn=256 if w.shape[2] % 256 == 0 else 128)
  if name == "pallas_e1":  # all rows in one group: the grouping's own cost
    return lambda x, w, gs: gmm_lib.gmm(x, w[:1], jnp.sum(gs, keepdims=True),
                                        interpret=interpret)
  if name == "pallas_triton":
    return lambda x, w, gs: gmm_lib.gmm(x, w, gs, interpret=interpret)
  if name in ("pallas_mosaic", "pallas_mosaic_bf16x3"):
    backend = name.removeprefix("pallas_")
    return lambda x, w, gs: gmm_lib.gmm(x, w, gs, backend=backend, interpret=interpret)
  if name.startswith(GMM_PREFIX):
    def variant(x, w, gs):
      tiles = _gmm_variant_tiles(name, x.shape[0], x.shape[1], w.shape[2], w.shape[0])
      return gmm_mosaic.gmm(x, w, gs, tiles=tiles, interpret=interpret)
    return variant
  if name == "ragged_dot":  # the library's implementation, as the layer runs it
    return lambda x, w, gs: ops.grouped_matmul(x, w, gs, impl="ragged_dot")
  raise ValueError(f"no forward for impl {name!r}")


def input_gradient(name: str, interpret: bool = False):
  """dy[M, N] @ w[g]^T on the Mosaic kernel, with its default tiles
  (``pallas_mosaic``) or a ``pallas_mosaic@...`` variant's."""
  if name.split("@")[0] != "pallas_mosaic":
    raise ValueError(f"no input-gradient kernel for impl {name!r}")

  def run(dy, w, gs):
    tiles = None
    if "@" in name:
      tiles = _gmm_variant_tiles(name, dy.shape[0], dy.shape[1], w.shape[1], w.shape[0])
    return gmm_mosaic.gmm(dy, w, gs, tiles=tiles, transpose_rhs=True, interpret=interpret)
  return run


def weight_gradient(name: str, interpret: bool = False):
  """The weight-gradient kernel alone. ``tgmm_mosaic`` is the Mosaic kernel with
  its default tiles (the baseline of an A/B of ``tgmm_mosaic@...`` variants)."""
  if name == "tgmm_mosaic":
    return lambda x, dy, gs: tgmm_mosaic.tgmm(x, dy, gs, interpret=interpret)
  if name.startswith(TGMM_PREFIX):
    def variant(x, dy, gs):
      tiles = parse_variant(name, tgmm_mosaic.default_tiles(x.shape[1], dy.shape[1]))
      return tgmm_mosaic.tgmm(x, dy, gs, tiles=tiles, interpret=interpret)
    return variant
  if name in TGMM_BACKENDS:
    backend = TGMM_BACKENDS[name]
    return lambda x, dy, gs: gmm_lib.tgmm_call(x, dy, gs, x.dtype, num_rows=x.shape[0],
                                               backend=backend, interpret=interpret)
  raise ValueError(f"no weight-gradient kernel for impl {name!r}")


def forward_and_gradients(name: str, interpret: bool = False):
  f = forward(name, interpret)

  def run(x, w, gs, dy):
    y, (dx, dw) = timing.forward_backward(lambda a, b: f(a, b, gs))(x, w, dy)
    return y, dx, dw
  return run


_MODE_FUNCTIONS = {"fwd": forward, "fwdbwd": forward_and_gradients, "dx": input_gradient,
                   "tgmm": weight_gradient}


def mode_call(name: str, mode: str, x, w, dy, gs, interpret: bool = False):
  """(jitted function, its arguments) that run ``name`` in ``mode``; None where
  the impl has no such kernel."""
  if not has_kernel(name, mode):
    return None
  args = {"fwd": (x, w, gs), "fwdbwd": (x, w, gs, dy), "dx": (dy, w, gs), "tgmm": (x, dy, gs)}
  return jax.jit(_MODE_FUNCTIONS[mode](name, interpret)), args[mode]
