"""Differentiable grouped matmul on the Pallas kernels, with tuned tiles.

``gmm(x, w, group_sizes)`` has a custom VJP: ``dx = gmm(dy, w^T)`` (read
transposed inside the kernel, no copy of w) and ``dw = tgmm(x, dy)``.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from moe_kernels import gmm_triton
from moe_kernels import tuning


def _fwd_call(x, w, group_sizes, out_dtype, transpose_rhs, interpret):
  n = w.shape[1] if transpose_rhs else w.shape[2]
  cfg = tuning.lookup("gmm", x.shape[0], x.shape[1], n, w.shape[0], x.dtype)
  return gmm_triton.gmm(x, w, group_sizes, out_dtype=out_dtype,
                        transpose_rhs=transpose_rhs, tiles=cfg.tiles,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                        interpret=interpret)


def _tgmm_call(x, dy, group_sizes, out_dtype, interpret):
  cfg = tuning.lookup("tgmm", x.shape[0], x.shape[1], dy.shape[1],
                      group_sizes.shape[0], x.dtype)
  return gmm_triton.tgmm(x, dy, group_sizes, out_dtype=out_dtype,
                         tiles=cfg.tiles, num_warps=cfg.num_warps,
                         num_stages=cfg.num_stages, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(x, w, group_sizes, out_dtype, interpret):
  return _fwd_call(x, w, group_sizes, out_dtype, False, interpret)


def _gmm_fwd(x, w, group_sizes, out_dtype, interpret):
  return _gmm(x, w, group_sizes, out_dtype, interpret), (x, w, group_sizes)


def _gmm_bwd(out_dtype, interpret, res, dy):
  del out_dtype
  x, w, group_sizes = res
  dy = dy.astype(x.dtype)
  dx = _fwd_call(dy, w, group_sizes, x.dtype, True, interpret)
  dw = _tgmm_call(x, dy, group_sizes, w.dtype, interpret)
  return dx, dw, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
        out_dtype: Optional[jnp.dtype] = None, *, interpret: bool = False) -> jax.Array:
  """x[M, K] @ w[E, K, N] by contiguous row groups -> [M, N] (zeros past the groups)."""
  if x.dtype != w.dtype:
    raise ValueError(f"gmm wants x and w of one dtype; got {x.dtype} and {w.dtype}")
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  return _gmm(x, w, group_sizes.astype(jnp.int32), out_dtype, interpret)
