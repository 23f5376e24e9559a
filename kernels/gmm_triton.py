"""Grouped matmul kernels in Pallas with the Triton backend (GPU).

``gmm(x[M, K], w[E, K, N], group_sizes[E]) -> [M, N]`` multiplies each group of
contiguous rows by its expert's weights; ``tgmm(x[M, K], dy[M, N],
group_sizes[E]) -> [E, K, N]`` is the weight gradient (per group ``x_g^T dy_g``).
Both accumulate in float32. ``transpose_rhs=True`` makes gmm read ``w`` as
``[E, N, K]`` so the input gradient ``dy @ w^T`` needs no transposed copy of w.

Both take ``interpret=True`` to run on CPU through the Pallas interpreter,
which is how the tests check them.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from moe_kernels import schedule as sched_lib


def _dot_precision(dtype):
  # float32 inputs get exact float32 products (Triton's default is tf32).
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _swizzle(pid, num_m, num_n, group_m):
  """Maps a flat program id to (m, n) so nearby programs share weight tiles in L2."""
  per_group = group_m * num_n
  first_m = (pid // per_group) * group_m
  rows = jnp.minimum(num_m - first_m, group_m)
  m = first_m + (pid % per_group) % rows
  n = (pid % per_group) // rows
  return m, n


def _gmm_kernel(tile_group_ref, tile_block_ref, start_ref, end_ref, x_ref, w_ref,
                o_ref, *, tm, tn, tk, num_groups, num_visits, group_m,
                transpose_rhs, precision):
  m_total, k_total = x_ref.shape
  n_total = o_ref.shape[1]
  num_n = pl.cdiv(n_total, tn)
  visit, nb = _swizzle(pl.program_id(0), num_visits, num_n, group_m)
  g = tile_group_ref[visit]
  row0 = tile_block_ref[visit] * tm
  col0 = nb * tn
  rows = row0 + jnp.arange(tm, dtype=jnp.int32)
  cols = col0 + jnp.arange(tn, dtype=jnp.int32)
  out_mask = ((rows >= start_ref[g]) & (rows < end_ref[g]))[:, None]
  if n_total % tn:
    out_mask = out_mask & (cols < n_total)[None, :]
  out_block = o_ref.at[pl.ds(row0, tm), pl.ds(col0, tn)]

  @pl.when(g < num_groups)
  def _compute():
    ge = jnp.minimum(g, num_groups - 1)

    def body(kb, acc):
      k0 = pl.multiple_of(kb * tk, tk)
      ks = k0 + jnp.arange(tk, dtype=jnp.int32)
      x_mask = None
      if m_total % tm:
        x_mask = (rows < m_total)[:, None]
      if k_total % tk:
        km = (ks < k_total)[None, :]
        x_mask = km if x_mask is None else x_mask & km
      xb = _load(x_ref.at[pl.ds(row0, tm), pl.ds(k0, tk)], x_mask)
      if transpose_rhs:  # w is [E, N, K]
        w_mask = _and2(None if n_total % tn == 0 else (cols < n_total)[:, None],
                       None if k_total % tk == 0 else (ks < k_total)[None, :])
        wb = _load(w_ref.at[ge, pl.ds(col0, tn), pl.ds(k0, tk)], w_mask)
        prod = jax.lax.dot_general(xb, wb, (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32,
                                   precision=precision)
      else:
        w_mask = _and2(None if k_total % tk == 0 else (ks < k_total)[:, None],
                       None if n_total % tn == 0 else (cols < n_total)[None, :])
        wb = _load(w_ref.at[ge, pl.ds(k0, tk), pl.ds(col0, tn)], w_mask)
        prod = jnp.dot(xb, wb, preferred_element_type=jnp.float32,
                       precision=precision)
      return acc + prod

    acc = jax.lax.fori_loop(0, pl.cdiv(k_total, tk), body,
                            jnp.zeros((tm, tn), jnp.float32))
    plgpu.store(out_block, acc.astype(o_ref.dtype), mask=out_mask)

  @pl.when(g == num_groups)
  def _zero_tail():
    plgpu.store(out_block, jnp.zeros((tm, tn), o_ref.dtype), mask=out_mask)


def _and2(a, b):
  if a is None:
    return b
  if b is None:
    return a
  return a & b


def _load(ref, mask):
  if mask is None:
    return ref[...]
  return plgpu.load(ref, mask=mask, other=0)


def gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
        out_dtype: Optional[jnp.dtype] = None, transpose_rhs: bool = False,
        tiles: tuple[int, int, int] = (128, 128, 64), num_warps: int = 4,
        num_stages: int = 3, group_m: int = 8, interpret: bool = False) -> jax.Array:
  """Grouped matmul; rows past sum(group_sizes) are zero. See module doc."""
  tm, tn, tk = tiles
  m, k = x.shape
  n = w.shape[1] if transpose_rhs else w.shape[2]
  num_groups = w.shape[0]
  out_dtype = out_dtype or x.dtype
  sched = sched_lib.make_schedule(group_sizes, m, tm)
  num_visits = sched.num_visits
  kernel = functools.partial(
      _gmm_kernel, tm=tm, tn=tn, tk=tk, num_groups=num_groups,
      num_visits=num_visits, group_m=group_m, transpose_rhs=transpose_rhs,
      precision=_dot_precision(x.dtype))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(num_visits * pl.cdiv(n, tn),),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages),
      interpret=interpret,
      name="moe_gmm",
  )(sched.tile_group, sched.tile_block, sched.group_start, sched.group_end, x, w)


def _tgmm_kernel(start_ref, end_ref, x_ref, dy_ref, o_ref, *, tm, tn, tk,
                 precision):
  m_total, k_total = x_ref.shape
  n_total = dy_ref.shape[1]
  num_k = pl.cdiv(k_total, tk)
  num_n = pl.cdiv(n_total, tn)
  pid = pl.program_id(0)
  g = pid // (num_k * num_n)
  kb = (pid // num_n) % num_k
  nb = pid % num_n
  k0 = kb * tk
  col0 = nb * tn
  ks = k0 + jnp.arange(tk, dtype=jnp.int32)
  cols = col0 + jnp.arange(tn, dtype=jnp.int32)
  lo = start_ref[g]
  hi = end_ref[g]

  def body(i, acc):
    row0 = lo + i * tm
    rmask = (row0 + jnp.arange(tm, dtype=jnp.int32) < hi)[:, None]
    x_mask = rmask if k_total % tk == 0 else rmask & (ks < k_total)[None, :]
    dy_mask = rmask if n_total % tn == 0 else rmask & (cols < n_total)[None, :]
    xb = plgpu.load(x_ref.at[pl.ds(row0, tm), pl.ds(k0, tk)], mask=x_mask, other=0)
    dyb = plgpu.load(dy_ref.at[pl.ds(row0, tm), pl.ds(col0, tn)], mask=dy_mask,
                     other=0)
    return acc + jax.lax.dot_general(xb, dyb, (((0,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32,
                                     precision=precision)

  acc = jax.lax.fori_loop(0, pl.cdiv(hi - lo, tm), body,
                          jnp.zeros((tk, tn), jnp.float32))
  o_mask = _and2(None if k_total % tk == 0 else (ks < k_total)[:, None],
                 None if n_total % tn == 0 else (cols < n_total)[None, :])
  out_block = o_ref.at[g, pl.ds(k0, tk), pl.ds(col0, tn)]
  if o_mask is None:
    out_block[...] = acc.astype(o_ref.dtype)
  else:
    plgpu.store(out_block, acc.astype(o_ref.dtype), mask=o_mask)


def tgmm(x: jax.Array, dy: jax.Array, group_sizes: jax.Array, *,
         out_dtype: Optional[jnp.dtype] = None,
         tiles: tuple[int, int, int] = (64, 128, 128), num_warps: int = 4,
         num_stages: int = 3, interpret: bool = False) -> jax.Array:
  """Per-group x_g^T dy_g -> [E, K, N]; empty groups give zeros.

  ``tiles`` is (tm, tn, tk): tm rows per step of the reduction, [tk, tn]
  output tile per program.
  """
  tm, tn, tk = tiles
  m, k = x.shape
  n = dy.shape[1]
  num_groups = group_sizes.shape[0]
  starts, ends = sched_lib.group_bounds(group_sizes, m)
  kernel = functools.partial(_tgmm_kernel, tm=tm, tn=tn, tk=tk,
                             precision=_dot_precision(x.dtype))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype or x.dtype),
      grid=(num_groups * pl.cdiv(k, tk) * pl.cdiv(n, tn),),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages),
      interpret=interpret,
      name="moe_tgmm",
  )(starts, ends, x, dy)
