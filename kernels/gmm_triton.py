"""Grouped matmul kernels in Pallas with the Triton backend (GPU).

``gmm(x[M, K], w[E, K, N], group_sizes[E]) -> [M, N]`` multiplies each group of
contiguous rows by its expert's weights; ``tgmm(x[M, K], dy[M, N],
group_sizes[E]) -> [E, K, N]`` is the weight gradient (per group ``x_g^T dy_g``).
Both accumulate in float32. ``transpose_rhs=True`` makes gmm read ``w`` as
``[E, N, K]`` so the input gradient ``dy @ w^T`` needs no transposed copy of w.

Fused dispatch/combine options (all [M] int32/float32 vectors over the
*logical*, expert-sorted rows):
- ``lhs_index``: logical row i of the LHS is ``x[lhs_index[i]]`` (gather inside
  the load; x may have any number of rows).
- ``out_index``: logical output row i is stored at ``out[out_index[i]]``; must
  be a permutation of the output rows (``num_out_rows``) so every row is written once.
- ``row_scale``: logical output row i is multiplied by ``row_scale[i]``.
- ``row_dot`` ([M, N], logical row order): also return, per output column tile
  j, ``sum_n (unscaled output)[i, n] * row_dot[i, n]`` as ``[cdiv(N, tn), M]``
  float32 partials (sum over axis 0 outside). The combine's VJP uses it for
  the routing-weight gradient without another pass over [M, N].
tgmm takes ``x_index`` / ``dy_index`` (gathers) and ``row_scale`` (scales dy rows).

Everything takes ``interpret=True`` to run on CPU through the Pallas
interpreter, which is how the tests check the kernels.
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


def _and(*masks):
  out = None
  for m in masks:
    if m is not None:
      out = m if out is None else out & m
  return out


def _load(ref, mask, other=0):
  if mask is None:
    return ref[...]
  return plgpu.load(ref, mask=mask, other=other)


def _gmm_kernel(*refs, tm, tn, tk, num_groups, num_visits, num_rows, group_m,
                transpose_rhs, precision, gather, scatter, scale, row_dot):
  refs = list(refs)
  meta_ref, x_ref, w_ref = refs[:3]
  num_out = 2 if row_dot else 1
  opt = refs[3:-num_out]
  o_ref = refs[-num_out]
  lhs_index_ref = opt.pop(0) if gather else None
  out_index_ref = opt.pop(0) if scatter else None
  scale_ref = opt.pop(0) if scale else None
  dot_ref = opt.pop(0) if row_dot else None
  part_ref = refs[-1] if row_dot else None
  k_total = x_ref.shape[1]
  n_total = o_ref.shape[1]
  num_n = pl.cdiv(n_total, tn)
  visit, nb = _swizzle(pl.program_id(0), num_visits, num_n, group_m)
  g = meta_ref[visit, 0]
  row0 = pl.multiple_of(meta_ref[visit, 1] * tm, tm)
  col0 = nb * tn
  rows = row0 + jnp.arange(tm, dtype=jnp.int32)
  cols = col0 + jnp.arange(tn, dtype=jnp.int32)
  in_rows = None if num_rows % tm == 0 else (rows < num_rows)
  col_ok = None if n_total % tn == 0 else (cols < n_total)[None, :]
  row_in = (rows >= meta_ref[visit, 2]) & (rows < meta_ref[visit, 3])
  out_mask = _and(row_in[:, None], col_ok)

  def row_vector(ref, other):
    return _load(ref.at[pl.ds(row0, tm)], in_rows, other)

  src = row_vector(lhs_index_ref, 0) if gather else None
  if scatter:
    dst = row_vector(out_index_ref, 0)
    if in_rows is not None:
      # Rows past the end point into the output's padding rows, never at a real
      # slot: a masked store may still read-modify-write its targets (the
      # interpreter does), and a duplicate real index would then race.
      dst = jnp.where(in_rows, dst, rows)
    out_block = o_ref.at[dst[:, None], cols[None, :]]
  else:
    out_block = o_ref.at[pl.ds(row0, tm), pl.ds(col0, tn)]

  @pl.when(g < num_groups)
  def _compute():
    ge = jnp.minimum(g, num_groups - 1)

    def body(kb, acc):
      k0 = pl.multiple_of(kb * tk, tk)
      ks = k0 + jnp.arange(tk, dtype=jnp.int32)
      k_ok = None if k_total % tk == 0 else (ks < k_total)
      if gather:
        xb = _load(x_ref.at[src[:, None], ks[None, :]],
                   None if k_ok is None else k_ok[None, :])
      else:
        xb = _load(x_ref.at[pl.ds(row0, tm), pl.ds(k0, tk)],
                   _and(None if in_rows is None else in_rows[:, None],
                        None if k_ok is None else k_ok[None, :]))
      if transpose_rhs:  # w is [E, N, K]
        wb = _load(w_ref.at[ge, pl.ds(col0, tn), pl.ds(k0, tk)],
                   _and(None if col_ok is None else col_ok.T,
                        None if k_ok is None else k_ok[None, :]))
        prod = jax.lax.dot_general(xb, wb, (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32,
                                   precision=precision)
      else:
        wb = _load(w_ref.at[ge, pl.ds(k0, tk), pl.ds(col0, tn)],
                   _and(None if k_ok is None else k_ok[:, None], col_ok))
        prod = jnp.dot(xb, wb, preferred_element_type=jnp.float32,
                       precision=precision)
      return acc + prod

    acc = jax.lax.fori_loop(0, pl.cdiv(k_total, tk), body,
                            jnp.zeros((tm, tn), jnp.float32))
    if row_dot:
      other = _load(dot_ref.at[pl.ds(row0, tm), pl.ds(col0, tn)],
                    _and(None if in_rows is None else in_rows[:, None], col_ok))
      part = jnp.sum(acc * other.astype(jnp.float32), axis=1)
      plgpu.store(part_ref.at[nb, pl.ds(row0, tm)], part, mask=row_in)
    if scale:
      acc = acc * row_vector(scale_ref, 0.0).astype(jnp.float32)[:, None]
    plgpu.store(out_block, acc.astype(o_ref.dtype), mask=out_mask)

  @pl.when(g == num_groups)
  def _zero_tail():
    plgpu.store(out_block, jnp.zeros((tm, tn), o_ref.dtype), mask=out_mask)
    if row_dot:
      plgpu.store(part_ref.at[nb, pl.ds(row0, tm)], jnp.zeros((tm,), jnp.float32),
                  mask=row_in)


def gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
        out_dtype: Optional[jnp.dtype] = None, transpose_rhs: bool = False,
        lhs_index: Optional[jax.Array] = None,
        out_index: Optional[jax.Array] = None,
        row_scale: Optional[jax.Array] = None,
        row_dot: Optional[jax.Array] = None,
        num_out_rows: Optional[int] = None,
        tiles: tuple[int, int, int] = (128, 128, 64), num_warps: int = 4,
        num_stages: int = 3, group_m: int = 8, interpret: bool = False) -> jax.Array:
  """Grouped matmul; rows past sum(group_sizes) are zero. See module doc.

  Returns the [out_rows, N] product, or (product, row-dot partials) with ``row_dot``.
  """
  tm, tn, tk = tiles
  m = x.shape[0] if lhs_index is None else lhs_index.shape[0]
  k = x.shape[1]
  n = w.shape[1] if transpose_rhs else w.shape[2]
  num_groups = w.shape[0]
  out_rows = m if out_index is None else (num_out_rows or m)
  if out_index is not None and out_rows != m:
    raise ValueError(f"out_index must permute the {m} rows; got num_out_rows={out_rows}")
  out_dtype = out_dtype or x.dtype
  sched = sched_lib.make_schedule(group_sizes, m, tm)
  num_visits = sched.num_visits
  opt = [a.astype(dt) for a, dt in ((lhs_index, jnp.int32), (out_index, jnp.int32),
                                     (row_scale, jnp.float32)) if a is not None]
  # A scatter into slots gets tm - 1 spare rows so tile rows past the end have
  # somewhere harmless to point (see the kernel); they are sliced off below.
  padded_rows = pl.cdiv(out_rows, tm) * tm if out_index is not None else out_rows
  out_shape = [jax.ShapeDtypeStruct((padded_rows, n), out_dtype)]
  if row_dot is not None:
    opt.append(row_dot)
    out_shape.append(jax.ShapeDtypeStruct((pl.cdiv(n, tn), m), jnp.float32))
  kernel = functools.partial(
      _gmm_kernel, row_dot=row_dot is not None, tm=tm, tn=tn, tk=tk, num_groups=num_groups,
      num_visits=num_visits, num_rows=m, group_m=group_m,
      transpose_rhs=transpose_rhs, precision=_dot_precision(x.dtype),
      gather=lhs_index is not None, scatter=out_index is not None,
      scale=row_scale is not None)
  out = pl.pallas_call(
      kernel,
      out_shape=tuple(out_shape),
      grid=(num_visits * pl.cdiv(n, tn),),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages),
      interpret=interpret,
      name="moe_gmm",
  )(sched.visit_meta, x, w, *opt)
  out = list(out)
  if padded_rows != out_rows:
    out[0] = out[0][:out_rows]
  return tuple(out) if row_dot is not None else out[0]


def _tgmm_kernel(*refs, tm, tn, tk, precision, gather_x, gather_dy, scale):
  refs = list(refs)
  start_ref, end_ref, x_ref, dy_ref = refs[:4]
  opt = refs[4:-1]
  o_ref = refs[-1]
  x_index_ref = opt.pop(0) if gather_x else None
  dy_index_ref = opt.pop(0) if gather_dy else None
  scale_ref = opt.pop(0) if scale else None
  k_total = x_ref.shape[1]
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
  k_ok = None if k_total % tk == 0 else (ks < k_total)[None, :]
  n_ok = None if n_total % tn == 0 else (cols < n_total)[None, :]
  lo = start_ref[g]
  hi = end_ref[g]

  def body(i, acc):
    row0 = lo + i * tm
    row_ok = row0 + jnp.arange(tm, dtype=jnp.int32) < hi
    rmask = row_ok[:, None]
    if gather_x:
      src = plgpu.load(x_index_ref.at[pl.ds(row0, tm)], mask=row_ok, other=0)
      x_view = x_ref.at[src[:, None], ks[None, :]]
    else:
      x_view = x_ref.at[pl.ds(row0, tm), pl.ds(k0, tk)]
    if gather_dy:
      src = plgpu.load(dy_index_ref.at[pl.ds(row0, tm)], mask=row_ok, other=0)
      dy_view = dy_ref.at[src[:, None], cols[None, :]]
    else:
      dy_view = dy_ref.at[pl.ds(row0, tm), pl.ds(col0, tn)]
    xb = plgpu.load(x_view, mask=_and(rmask, k_ok), other=0)
    dyb = plgpu.load(dy_view, mask=_and(rmask, n_ok), other=0)
    if scale:
      s = plgpu.load(scale_ref.at[pl.ds(row0, tm)], mask=row_ok, other=0.0)
      dyb = (dyb.astype(jnp.float32) * s[:, None]).astype(dyb.dtype)
    return acc + jax.lax.dot_general(xb, dyb, (((0,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32,
                                     precision=precision)

  acc = jax.lax.fori_loop(0, pl.cdiv(hi - lo, tm), body,
                          jnp.zeros((tk, tn), jnp.float32))
  o_mask = _and(None if k_ok is None else k_ok.T, n_ok)
  out_block = o_ref.at[g, pl.ds(k0, tk), pl.ds(col0, tn)]
  if o_mask is None:
    out_block[...] = acc.astype(o_ref.dtype)
  else:
    plgpu.store(out_block, acc.astype(o_ref.dtype), mask=o_mask)


def tgmm(x: jax.Array, dy: jax.Array, group_sizes: jax.Array, *,
         out_dtype: Optional[jnp.dtype] = None,
         x_index: Optional[jax.Array] = None,
         dy_index: Optional[jax.Array] = None,
         row_scale: Optional[jax.Array] = None,
         num_rows: Optional[int] = None,
         tiles: tuple[int, int, int] = (64, 128, 128), num_warps: int = 4,
         num_stages: int = 3, interpret: bool = False) -> jax.Array:
  """Per-group x_g^T dy_g -> [E, K, N]; empty groups give zeros.

  ``tiles`` is (tm, tn, tk): tm rows per step of the reduction, [tk, tn]
  output tile per program. ``num_rows`` is the logical row count M (needed
  only when both x and dy are gathered).
  """
  tm, tn, tk = tiles
  if num_rows is None:
    num_rows = (x_index.shape[0] if x_index is not None else
                dy_index.shape[0] if dy_index is not None else x.shape[0])
  k = x.shape[1]
  n = dy.shape[1]
  num_groups = group_sizes.shape[0]
  starts, ends = sched_lib.group_bounds(group_sizes, num_rows)
  opt = [a.astype(dt) for a, dt in ((x_index, jnp.int32), (dy_index, jnp.int32),
                                     (row_scale, jnp.float32)) if a is not None]
  kernel = functools.partial(_tgmm_kernel, tm=tm, tn=tn, tk=tk,
                             precision=_dot_precision(x.dtype),
                             gather_x=x_index is not None,
                             gather_dy=dy_index is not None,
                             scale=row_scale is not None)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype or x.dtype),
      grid=(num_groups * pl.cdiv(k, tk) * pl.cdiv(n, tn),),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages),
      interpret=interpret,
      name="moe_tgmm",
  )(starts, ends, x, dy, *opt)
