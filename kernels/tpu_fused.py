"""Fused-dispatch grouped matmuls as Pallas Mosaic TPU kernels.

Same semantics as ``moe_kernels.fused`` (the GPU Triton versions):

``gmm_gather(x_tokens[T, K], row_index[M], w[E, K, N], group_sizes[E])``
  = ``gmm(x_tokens[row_index], w, group_sizes)``. ``x_tokens`` stays in HBM;
  each row tile DMAs its token rows (indices scalar-prefetched into SMEM) into
  a VMEM buffer, one async copy per row, then multiplies with the ``w`` tile.
``gmm_combine(x[M, K], w[E, K, N], group_sizes[E], out_index[M], row_weight[M])``
  returns ``out[M, N]`` with ``out[out_index[i]] = row_weight[i] * (x[i] @
  w[group(i)])``; ``out_index`` must be a permutation of [0, M). Each finished
  row tile is written to its slots by one DMA per row into the HBM output, so
  every slot is written exactly once (rows past ``sum(group_sizes)`` as zeros).

Rows are grouped contiguously by expert; rows past ``sum(group_sizes)`` give
zeros. The grid is (N tiles, visits, K tiles), K innermost with an f32 VMEM
accumulator. A "visit" is a (row tile, group) pair: a row tile that straddles
groups is visited once per group it intersects, rows outside the group masked,
and consecutive visits of one tile merge into the same output block (the idea
of megablox's group metadata). There are at most ``m_tiles + E - 1`` visits;
spare grid steps repeat the last tile and change nothing.

TPU tiling constraints used (Mosaic: the last two dims of a VMEM block must be
multiples of the (sublane, lane) tile, (8, 128) for 32-bit and (16, 128) for
16-bit types, unless they span the whole array):
  - tk and tn multiples of 128, and they must divide K and N;
  - tm a multiple of 8 (f32) or 16 (bf16); M is padded to a multiple of tm;
  - so K and N must be multiples of 128 (ValueError otherwise).
Default tiles (tm, tk, tn) = (128, 128, 128), tm clipped to the padded M.

Only verified with the Pallas TPU interpreter (``interpret=True`` runs
``pltpu.InterpretParams()``, which emulates DMAs and semaphores) on CPU; no
TPU was available, so nothing here is compiled by Mosaic or timed.

VJPs (all three kernels here; no megablox): dx of ``gmm_gather`` is
``dy @ w^T`` written to slot order by the combine kernel when ``row_slot`` is
given, then a reshape-sum over k (no scatter-add); without ``row_slot`` it is
an XLA scatter-add. dx and d row_weight of ``gmm_combine`` come from the gather
kernel (``G = dy[out_index]`` gathered in-kernel), d row_weight =
rowsum(x * (G @ w^T)) in XLA. dw of both is ``tgmm_call``, a tgmm that gathers
one operand's rows in-kernel (x_tokens for gather, dy for combine).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

DEFAULT_TILES = (128, 128, 128)


def _sublanes(dtype) -> int:
  return 16 if jnp.dtype(dtype).itemsize == 2 else 8


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _tiles(m: int, k: int, n: int, dtype, tiles) -> tuple[int, int, int]:
  """Checks the TPU constraints and returns (tm, tk, tn)."""
  for name, dim in (("K", k), ("N", n)):
    if dim % 128:
      raise ValueError(f"TPU fused gmm needs {name} to be a multiple of 128 "
                       f"(the lane width); got {name}={dim}")
  sub = _sublanes(dtype)
  if tiles is None:
    tm, tk, tn = DEFAULT_TILES
    tm = min(tm, _cdiv(m, sub) * sub)
    tk, tn = min(tk, k), min(tn, n)
  else:
    tm, tk, tn = tiles
  if tm % sub:
    raise ValueError(f"tm={tm} must be a multiple of {sub} for {jnp.dtype(dtype)}")
  for name, t, dim in (("tk", tk, k), ("tn", tn, n)):
    if t % 128 or dim % t:
      raise ValueError(f"{name}={t} must be a multiple of 128 dividing {dim}")
  return tm, tk, tn


def _interpret(interpret):
  # Plain True would take the generic interpreter; the TPU one emulates DMAs,
  # semaphores and poisons uninitialised memory with NaN.
  return pltpu.InterpretParams() if interpret is True else interpret


def _schedule(group_sizes: jax.Array, m: int, tm: int):
  """Per-visit tile id, group id, row range [lo, hi), first/last-visit flags."""
  e = group_sizes.shape[0]
  tiles = _cdiv(m, tm)
  visits = tiles + e - 1
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes
  total = ends[-1]
  r0 = jnp.arange(tiles, dtype=jnp.int32) * tm
  r1 = jnp.minimum(r0 + tm, total)
  live = r0 < total
  # First / last group holding a row of the tile; empty groups between them
  # still get a visit, which masks every row.
  g0 = jnp.searchsorted(ends, r0, side="right").astype(jnp.int32)
  g1 = jnp.searchsorted(ends, r1 - 1, side="right").astype(jnp.int32)
  g0 = jnp.where(live, g0, e - 1)
  count = jnp.where(live, g1 - g0 + 1, 1)  # dead tiles: one visit writing zeros
  cum = jnp.cumsum(count)
  v = jnp.arange(visits, dtype=jnp.int32)
  t = jnp.searchsorted(cum, v, side="right").astype(jnp.int32)
  valid = t < tiles
  tile = jnp.minimum(t, tiles - 1)
  j = v - (cum[tile] - count[tile])
  last_group = g0[tiles - 1] + count[tiles - 1] - 1
  group = jnp.clip(jnp.where(valid, g0[tile] + j, last_group), 0, e - 1)
  rows = valid & live[tile]
  lo = jnp.where(rows, starts[group], 0).astype(jnp.int32)
  hi = jnp.where(rows, ends[group], 0).astype(jnp.int32)
  first = (valid & (j == 0)).astype(jnp.int32)
  last = (valid & (j == count[tile] - 1)).astype(jnp.int32)
  return tile, group, lo, hi, first, last


def _w_spec(tk, tn, transpose_rhs):
  if transpose_rhs:  # w is [E, N_out, K_in]
    return pl.BlockSpec((None, tn, tk), lambda n, v, k, tile, grp, *_: (grp[v], n, k))
  return pl.BlockSpec((None, tk, tn), lambda n, v, k, tile, grp, *_: (grp[v], k, n))


def _dot(x, w, transpose_rhs):
  dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
  return lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)


def _row_mask(tile, lo, hi, tm):
  rows = tile * tm + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
  return (rows >= lo) & (rows < hi)


def _gather_rows(hbm, idx_ref, first, col0, buf, sem):
  """buf[r] = hbm[idx_ref[first + r], col0:col0 + width] for every row r of buf.

  Every row copy is started before any is waited on, so the DMAs overlap.
  """
  rows, width = buf.shape

  def row_copy(r):
    return pltpu.make_async_copy(hbm.at[pl.ds(idx_ref[first + r], 1), pl.ds(col0, width)],
                                 buf.at[pl.ds(r, 1)], sem.at[0])

  lax.fori_loop(0, rows, lambda r, c: (row_copy(r).start(), c)[1], 0)
  lax.fori_loop(0, rows, lambda r, c: (row_copy(r).wait(), c)[1], 0)


def _accumulate(acc, k, has_rows, product) -> None:
  """acc = 0 at a visit's first contraction step, then acc += product() if it has rows."""
  @pl.when(k == 0)
  def _():
    acc[...] = jnp.zeros_like(acc)

  @pl.when(has_rows)
  def _():
    acc[...] += product()


def _gather_kernel(tile_ref, grp_ref, lo_ref, hi_ref, first_ref, idx_ref,
                   x_hbm, w_ref, o_ref, xbuf, acc, sem, *, tm, tk, transpose_rhs):
  del grp_ref
  v, k = pl.program_id(1), pl.program_id(2)
  tile, lo, hi = tile_ref[v], lo_ref[v], hi_ref[v]

  def product():
    _gather_rows(x_hbm, idx_ref, tile * tm, k * tk, xbuf, sem)
    return _dot(xbuf[...], w_ref[...], transpose_rhs)
  _accumulate(acc, k, lo < hi, product)

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    # The out block stays in VMEM while consecutive visits hit the same tile.
    prev = jnp.where(first_ref[v] == 1, 0.0, o_ref[...].astype(jnp.float32))
    o_ref[...] = jnp.where(_row_mask(tile, lo, hi, tm), acc[...], prev).astype(o_ref.dtype)


def gather_call(x_tokens, row_index, w, group_sizes, out_dtype, *, tiles=None,
                transpose_rhs=False, interpret=False):
  """The gather kernel: gmm(x_tokens[row_index], w or w^T, group_sizes)."""
  m = row_index.shape[0]
  k = x_tokens.shape[1]
  n = w.shape[1] if transpose_rhs else w.shape[2]
  tm, tk, tn = _tiles(m, k, n, x_tokens.dtype, tiles)
  mp = _cdiv(m, tm) * tm
  sched = _schedule(group_sizes.astype(jnp.int32), m, tm)[:5]
  idx = jnp.pad(row_index.astype(jnp.int32), (0, mp - m))  # token 0 for pad rows
  visits = sched[0].shape[0]
  kernel = functools.partial(_gather_kernel, tm=tm, tk=tk, transpose_rhs=transpose_rhs)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, n), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=6,
          grid=(n // tn, visits, k // tk),
          in_specs=[pl.BlockSpec(memory_space=pl.ANY), _w_spec(tk, tn, transpose_rhs)],
          out_specs=pl.BlockSpec((tm, tn), lambda n, v, k, tile, *_: (tile[v], n)),
          scratch_shapes=[pltpu.VMEM((tm, tk), x_tokens.dtype),
                          pltpu.VMEM((tm, tn), jnp.float32),
                          pltpu.SemaphoreType.DMA((1,))]),
      interpret=_interpret(interpret),
  )(*sched, idx, x_tokens, w)
  return out[:m]


def _combine_kernel(tile_ref, grp_ref, lo_ref, hi_ref, first_ref, last_ref, oidx_ref,
                    x_ref, w_ref, s_ref, o_hbm, acc, ybuf, obuf, sem, *, m, tm, tn,
                    transpose_rhs):
  del grp_ref
  n, v, k = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  tile, lo, hi = tile_ref[v], lo_ref[v], hi_ref[v]
  _accumulate(acc, k, lo < hi, lambda: _dot(x_ref[...], w_ref[...], transpose_rhs))

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    prev = jnp.where(first_ref[v] == 1, 0.0, ybuf[...])
    ybuf[...] = jnp.where(_row_mask(tile, lo, hi, tm), acc[...] * s_ref[...], prev)

  def row_copy(r):
    slot = oidx_ref[tile * tm + r]
    return pltpu.make_async_copy(obuf.at[pl.ds(r, 1)],
                                 o_hbm.at[pl.ds(slot, 1), pl.ds(n * tn, tn)], sem.at[0])

  def each_real_row(fn):
    def body(r, c):
      pl.when(tile * tm + r < m)(lambda: fn(row_copy(r)))
      return c
    lax.fori_loop(0, tm, body, 0)

  @pl.when((k == pl.num_programs(2) - 1) & (last_ref[v] == 1))
  def _():
    obuf[...] = ybuf[...].astype(obuf.dtype)
    each_real_row(lambda c: c.start())
    each_real_row(lambda c: c.wait())


def combine_call(x, w, group_sizes, out_index, row_weight, out_dtype, *, tiles=None,
                 transpose_rhs=False, interpret=False):
  """The combine kernel: out[out_index[i]] = row_weight[i] * (x[i] @ w[group(i)])."""
  m, k = x.shape
  n = w.shape[1] if transpose_rhs else w.shape[2]
  tm, tk, tn = _tiles(m, k, n, x.dtype, tiles)
  mp = _cdiv(m, tm) * tm
  sched = _schedule(group_sizes.astype(jnp.int32), m, tm)
  oidx = jnp.pad(out_index.astype(jnp.int32), (0, mp - m))
  xp = jnp.pad(x, ((0, mp - m), (0, 0)))
  s = jnp.pad(row_weight.astype(jnp.float32), (0, mp - m))[:, None]
  visits = sched[0].shape[0]
  kernel = functools.partial(_combine_kernel, m=m, tm=tm, tn=tn, transpose_rhs=transpose_rhs)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=7,
          grid=(n // tn, visits, k // tk),
          in_specs=[pl.BlockSpec((tm, tk), lambda n, v, k, tile, *_: (tile[v], k)),
                    _w_spec(tk, tn, transpose_rhs),
                    pl.BlockSpec((tm, 1), lambda n, v, k, tile, *_: (tile[v], 0))],
          out_specs=pl.BlockSpec(memory_space=pl.ANY),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32),
                          pltpu.VMEM((tm, tn), jnp.float32),
                          pltpu.VMEM((tm, tn), out_dtype),
                          pltpu.SemaphoreType.DMA((1,))]),
      interpret=_interpret(interpret),
  )(*sched, oidx, xp, w, s)


def _tgmm_kernel(tile_ref, grp_ref, lo_ref, hi_ref, gfirst_ref, glast_ref, idx_ref,
                 g_hbm, b_ref, o_ref, gbuf, acc, sem, *, tm, gathered_is_a):
  del grp_ref
  ia, ib, v = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  tile, lo, hi = tile_ref[v], lo_ref[v], hi_ref[v]
  tg = gbuf.shape[1]
  col = ia if gathered_is_a else ib

  @pl.when(gfirst_ref[v] == 1)
  def _():
    acc[...] = jnp.zeros_like(acc)

  @pl.when(lo < hi)
  def _():
    _gather_rows(g_hbm, idx_ref, tile * tm, col * tg, gbuf, sem)
    # Rows are contracted, so rows of other groups must be zeroed.
    g = jnp.where(_row_mask(tile, lo, hi, tm), gbuf[...], 0).astype(gbuf.dtype)
    lhs, rhs = (g, b_ref[...]) if gathered_is_a else (b_ref[...], g)
    acc[...] += lax.dot_general(lhs, rhs, (((0,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)

  # Visits of one group are consecutive, so its dw block stays resident.
  @pl.when(glast_ref[v] == 1)
  def _():
    o_ref[...] = acc[...].astype(o_ref.dtype)


def tgmm_call(a, b, group_sizes, out_dtype, *, a_index=None, b_index=None, tiles=None,
              interpret=False):
  """dw[e] = a_rows[group e]^T @ b_rows[group e], [E, A, B], with exactly one of
  ``a_rows = a[a_index]`` / ``b_rows = b[b_index]`` gathered in the kernel."""
  gathered_is_a = a_index is not None
  if gathered_is_a == (b_index is not None):
    raise ValueError("tgmm_call gathers exactly one operand: pass a_index or b_index")
  gathered, index, blocked = (a, a_index, b) if gathered_is_a else (b, b_index, a)
  m = index.shape[0]
  e = group_sizes.shape[0]
  wa, wb = a.shape[1], b.shape[1]
  tm, ta, tb = _tiles(m, wa, wb, a.dtype, tiles)
  mp = _cdiv(m, tm) * tm
  group_sizes = group_sizes.astype(jnp.int32)
  tile, grp, lo, hi, _, _ = _schedule(group_sizes, m, tm)
  change = grp[1:] != grp[:-1]
  gfirst = jnp.concatenate([jnp.ones(1, bool), change]).astype(jnp.int32)
  glast = jnp.concatenate([change, jnp.ones(1, bool)]).astype(jnp.int32)
  idx = jnp.pad(index.astype(jnp.int32), (0, mp - m))
  blocked = jnp.pad(blocked, ((0, mp - m), (0, 0)))
  if gathered_is_a:
    b_spec = pl.BlockSpec((tm, tb), lambda ia, ib, v, tile, *_: (tile[v], ib))
  else:
    b_spec = pl.BlockSpec((tm, ta), lambda ia, ib, v, tile, *_: (tile[v], ia))
  kernel = functools.partial(_tgmm_kernel, tm=tm, gathered_is_a=gathered_is_a)
  dw = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((e, wa, wb), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=7,
          grid=(wa // ta, wb // tb, tile.shape[0]),
          in_specs=[pl.BlockSpec(memory_space=pl.ANY), b_spec],
          out_specs=pl.BlockSpec((None, ta, tb),
                                 lambda ia, ib, v, tile, grp, *_: (grp[v], ia, ib)),
          scratch_shapes=[pltpu.VMEM((tm, ta if gathered_is_a else tb), gathered.dtype),
                          pltpu.VMEM((ta, tb), jnp.float32),
                          pltpu.SemaphoreType.DMA((1,))]),
      interpret=_interpret(interpret),
  )(tile, grp, lo, hi, gfirst, glast, idx, gathered, blocked)
  # Empty groups are never visited, so their blocks were never written.
  return jnp.where((group_sizes > 0)[:, None, None], dw, 0).astype(out_dtype)


def _keep_inputs(primal, count):
  """A custom VJP's forward rule whose residuals are the primal's first ``count`` inputs."""
  return lambda *args: (primal(*args), args[:count])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _gather(x_tokens, row_index, row_slot, w, group_sizes, out_dtype, tiles, interpret):
  del row_slot
  return gather_call(x_tokens, row_index, w, group_sizes, out_dtype, tiles=tiles,
                     interpret=interpret)


def _gather_bwd(out_dtype, tiles, interpret, res, dy):
  del out_dtype
  x_tokens, row_index, row_slot, w, group_sizes = res
  m = row_index.shape[0]
  t, k = x_tokens.shape
  dy = dy.astype(x_tokens.dtype)
  bwd_tiles = None if tiles is None else (tiles[0], tiles[2], tiles[1])
  if row_slot is not None:
    dx_slots = combine_call(dy, w, group_sizes, row_slot, jnp.ones((m,), jnp.float32),
                            jnp.float32, tiles=bwd_tiles, transpose_rhs=True,
                            interpret=interpret)
    dx = jnp.sum(dx_slots.reshape(t, m // t, k), axis=1)
  else:
    dx_rows = gather_call(dy, jnp.arange(m, dtype=jnp.int32), w, group_sizes, jnp.float32,
                          tiles=bwd_tiles, transpose_rhs=True, interpret=interpret)
    dx = jnp.zeros((t, k), jnp.float32).at[row_index].add(dx_rows)
  dw = tgmm_call(x_tokens, dy, group_sizes, w.dtype, a_index=row_index, tiles=tiles,
                 interpret=interpret)
  return dx.astype(x_tokens.dtype), None, None, dw, None


_gather.defvjp(_keep_inputs(_gather, 5), _gather_bwd)


def gmm_gather(x_tokens: jax.Array, row_index: jax.Array, w: jax.Array,
               group_sizes: jax.Array, out_dtype: Optional[jnp.dtype] = None, *,
               row_slot: Optional[jax.Array] = None, tiles=None,
               interpret=False) -> jax.Array:
  """gmm(x_tokens[row_index], w, group_sizes) with the row gather in the kernel.

  ``row_slot`` (a permutation of [0, M), M = T * k, slot = token * k + j) lets
  the backward write dx per slot and reduce over k instead of scatter-adding.
  """
  out_dtype = jnp.dtype(out_dtype or x_tokens.dtype)
  m = row_index.shape[0]
  _tiles(m, x_tokens.shape[1], w.shape[2], x_tokens.dtype, tiles)
  if row_slot is not None:
    if m % x_tokens.shape[0]:
      raise ValueError(f"row_slot needs M = T * k rows; got M={m}, T={x_tokens.shape[0]}")
    row_slot = row_slot.astype(jnp.int32)
  tiles = None if tiles is None else tuple(tiles)
  return _gather(x_tokens, row_index.astype(jnp.int32), row_slot, w,
                 group_sizes.astype(jnp.int32), out_dtype, tiles, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _combine(x, w, group_sizes, out_index, row_weight, out_dtype, tiles, interpret):
  return combine_call(x, w, group_sizes, out_index, row_weight, out_dtype, tiles=tiles,
                      interpret=interpret)


def _combine_bwd(out_dtype, tiles, interpret, res, dy):
  del out_dtype
  x, w, group_sizes, out_index, row_weight = res
  dy = dy.astype(x.dtype)
  bwd_tiles = None if tiles is None else (tiles[0], tiles[2], tiles[1])
  # P = G @ w^T with G = dy[out_index] gathered in-kernel; zero past the groups.
  p = gather_call(dy, out_index, w, group_sizes, jnp.float32, tiles=bwd_tiles,
                  transpose_rhs=True, interpret=interpret)
  s = row_weight.astype(jnp.float32)
  dx = (s[:, None] * p).astype(x.dtype)
  ds = jnp.sum(x.astype(jnp.float32) * p, axis=1).astype(row_weight.dtype)
  xs = (x.astype(jnp.float32) * s[:, None]).astype(x.dtype)
  dw = tgmm_call(xs, dy, group_sizes, w.dtype, b_index=out_index, tiles=tiles,
                 interpret=interpret)
  return dx, dw, None, None, ds


_combine.defvjp(_keep_inputs(_combine, 5), _combine_bwd)


def gmm_combine(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
                out_index: jax.Array, row_weight: jax.Array,
                out_dtype: Optional[jnp.dtype] = None, *, tiles=None,
                interpret=False) -> jax.Array:
  """Weighted gmm whose rows are written to slot order ``out_index``."""
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  _tiles(x.shape[0], x.shape[1], w.shape[2], x.dtype, tiles)
  tiles = None if tiles is None else tuple(tiles)
  return _combine(x, w, group_sizes.astype(jnp.int32), out_index.astype(jnp.int32),
                  row_weight, out_dtype, tiles, interpret)
