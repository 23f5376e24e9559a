"""Grouped matmul on Hopper through Pallas Mosaic GPU: persistent and warp-specialized.

``gmm(x[M, K], w[E, K, N], group_sizes)`` (or ``w[E, N, K]`` read transposed,
for the input gradient) with the group-aligned row schedule of
``moe_kernels.schedule.group_aligned_visits``: a visit is one row tile of one
group, starting at the group's first row rounded down to a multiple of 8 (so a
group of s rows gets about cdiv(s, tm) visits); a tile may also read its
neighbours' rows, and stores only its own group's.

Structure of one CTA (three warpgroups, one CTA per SM, persistent):

- a memory warpgroup issues TMA loads of the [tm, tk] x tile and the
  [tk, 2 tn] weight tile into a ring of ``stages`` shared-memory slots;
- two compute warpgroups each own half of the CTA's [tm, 2 tn] output tile
  (float32 accumulator in registers) and run ``wgmma`` on the shared slots:
  half of the columns, or with ``Tiles.split="m"`` half of the rows, in which
  case a half holding none of a visit's rows skips its wgmma and stores;
- work items (visit, column block) are dealt round-robin to the CTAs, so the
  memory warpgroup prefetches the next item's tiles while the compute
  warpgroups store the current one. Items run in windows of ``window`` visits
  that sweep the column blocks (snaking), so a weight block is fetched from
  HBM once per window rather than once per visit.

The epilogue stores a visit's rows [lo, hi) of the tile with TMA. TMA box sizes
are static, so a partial row range is stored as at most log2(tm) + 1 boxes of
power-of-two heights (one box for a full tile). Rows past ``sum(group_sizes)``
are written as zeros by their own visits.

Limits (``unsupported_reason`` says which one failed): 16-bit floats only
(float32 goes to the Triton kernels, which use exact float32 dots), K a
multiple of ``tk`` and N a multiple of 2 ``tn``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moe_kernels import schedule as sched_lib

try:  # Mosaic GPU is importable on every platform, but keep kernels optional.
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
  plgpu = None


# Mosaic GPU copies a [rows, cols] block into shared memory tiled (8, swizzle)
# with TMA over the same tiling of global memory, so a copy's first row must be a
# multiple of 8, and the kernel must prove it (pl.multiple_of) to compile.
TMA_ROW_ALIGN = 8


@dataclasses.dataclass(frozen=True)
class Tiles:
  tm: int = 128     # rows per tile (wgmma M of each compute warpgroup)
  tn: int = 128     # output columns per compute warpgroup; a CTA covers 2 * tn
  tk: int = 64      # contraction step (64 16-bit values = one 128-byte swizzle row)
  stages: int = 4   # shared-memory ring depth
  epi_n: int = 64   # columns per epilogue store
  # Work order: ``window`` consecutive visits sweep the column blocks together
  # (visits minor), so one weight block is reused by up to ``window`` row tiles
  # while it is in L2, instead of every wave streaming all of w[g]'s columns.
  window: int = 4
  # How the two compute warpgroups share the CTA's [tm, 2 tn] tile. "n": each owns
  # [tm, tn] (a column half). "m": each owns [tm / 2, 2 tn] (a row half), so a
  # visit whose rows all lie in one half (the short last tile of most groups)
  # skips the other half's wgmma and epilogue, leaving the tensor cores to the
  # warpgroup that has rows: compute follows the visit's rows in steps of
  # tm / 2 instead of tm.
  split: str = "n"

  @property
  def wg_rows(self) -> int:
    return self.tm // 2 if self.split == "m" else self.tm

  @property
  def wg_cols(self) -> int:
    return 2 * self.tn if self.split == "m" else self.tn


SPLITS = ("n", "m")
# wgmma's M is 64 rows per instruction; a float32 accumulator of more than
# 128 x 128 values per warpgroup (128 registers a thread) leaves too few for the rest.
WGMMA_ROWS = 64
MAX_ACC_VALUES = 128 * 128


# Shared memory a CTA may use on Hopper (227 KB), less room for the barriers.
SMEM_BUDGET = 227 * 1024 - 1024


def smem_bytes(t: Tiles, itemsize: int = 2, out_itemsize: int = 2) -> int:
  """Shared memory of one CTA: the operand ring and the two epilogue buffers."""
  ring = t.stages * (t.tm * t.tk + t.tk * 2 * t.tn) * itemsize
  return ring + 2 * t.wg_rows * t.epi_n * out_itemsize


def fit_stages(t: Tiles, smem_fn) -> Tiles:
  """``t`` with its ring made shallower until ``smem_fn(t)`` fits the budget."""
  while t.stages > 2 and smem_fn(t) > SMEM_BUDGET:
    t = dataclasses.replace(t, stages=t.stages - 1)
  return t


def default_tiles(m: int, k: int, n: int, num_groups: int, out_dtype=jnp.bfloat16) -> Tiles:
  tn = 128 if n % 256 == 0 else 64
  tm = 128 if m >= 128 * num_groups else 64  # few rows per group: halve the waste
  split = "n"
  if tn == 64 and m >= 256 * num_groups:
    # 128-column CTAs: 256 rows split by rows gives each warpgroup 128 x 128, not
    # 128 x 64, and skips a half with no rows (H200: fine-1408 forward 0.617 ->
    # 0.575 ms balanced, 0.671 -> 0.632 skewed). With 256 columns the row split
    # (64 x 256 a warpgroup) measured slower (H200: dsv3 skewed 6.73 -> 8.14 ms).
    tm, split = 256, "m"
  # A 3-deep ring measured faster for long contractions on skewed groups (H100,
  # dsv3, K=7168: 0.68 -> 0.83 of dense) and level elsewhere at K >= 4096; shorter
  # contractions and tn=64 measured slower with it and keep 4. A float32 output
  # doubles the epilogue buffers: 4 stages at tn=128 no longer fit.
  stages = 3 if k >= 4096 and tn == 128 else 4
  out_itemsize = jnp.dtype(out_dtype).itemsize
  return fit_stages(Tiles(tm=tm, tn=tn, stages=stages, split=split),
                    lambda t: smem_bytes(t, out_itemsize=out_itemsize))


def dtype_reason(dtype, what: str) -> Optional[str]:
  if plgpu is None:
    return "jax.experimental.pallas.mosaic_gpu is not importable"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"Mosaic GPU {what} takes bfloat16/float16, got {jnp.dtype(dtype).name}"
  return None


def multiples_reason(*checks: tuple[str, int, str, int]) -> Optional[str]:
  """The first (what, size, tile name, tile) whose size is not a multiple of its tile."""
  for what, size, name, tile in checks:
    if size % tile:
      return f"{what}{size} is not a multiple of {name}={tile}"
  return None


def unsupported_reason(k: int, n: int, dtype, tiles: Tiles) -> Optional[str]:
  return (dtype_reason(dtype, "gmm")
          or multiples_reason(("contraction size ", k, "tk", tiles.tk),
                              ("output columns ", n, "2*tn", 2 * tiles.tn),
                              ("tn=", tiles.tn, "epi_n", tiles.epi_n))
          or tiles_reason(tiles))


def tiles_reason(t: Tiles) -> Optional[str]:
  """Why a tile configuration cannot run, whatever the operands (None if it can)."""
  if t.split not in SPLITS:
    return f"split={t.split!r} is not one of {SPLITS}"
  if t.wg_rows % WGMMA_ROWS:
    return (f"tm={t.tm} with split={t.split!r} gives each warpgroup {t.wg_rows} rows, "
            f"not a multiple of wgmma's {WGMMA_ROWS}")
  if t.wg_rows * t.wg_cols > MAX_ACC_VALUES:
    return (f"tm={t.tm}, tn={t.tn} with split={t.split!r} gives each warpgroup a "
            f"{t.wg_rows}x{t.wg_cols} accumulator, over {MAX_ACC_VALUES} values")
  return None


def interpreter_reads_transposed() -> bool:
  """jax < 0.11's Mosaic GPU interpreter cannot read a transposed shared-memory
  operand (it fails inside a worker thread and the call never returns)."""
  major, minor = (int(v) for v in jax.__version__.split(".")[:2])
  return (major, minor) >= (0, 11)


def check_interpretable(interpret, transposed: bool, what: str) -> None:
  if interpret and transposed and not interpreter_reads_transposed():
    raise NotImplementedError(
        f"{what} reads a transposed operand, which the Mosaic GPU interpreter of jax "
        f"{jax.__version__} cannot run (jax >= 0.11 can); use the Triton kernels here")


def takes(m: int, k: int, n: int, num_groups: int, dtype, *, transpose_rhs: bool = False,
          interpret=False) -> bool:
  """Whether gmm() runs this product with its default tiles (else use Triton)."""
  if interpret and transpose_rhs and not interpreter_reads_transposed():
    return False
  return unsupported_reason(k, n, dtype, default_tiles(m, k, n, num_groups)) is None


def interpret_params(interpret):
  if not interpret:
    return None
  if interpret is not True:
    return interpret
  from jax._src.pallas.mosaic_gpu.interpret import params  # pylint: disable=g-import-not-at-top
  return params.InterpretGPUParams()


def default_num_sms(interpret) -> int:
  if interpret:
    return 2
  return getattr(jax.devices()[0], "core_count", None) or 132


def item_coords(idx, window: int, n_ctas: int):
  """Work item -> (visit, column block): windows of visits sweep the column blocks,
  snaking."""
  per_window = window * n_ctas
  win = lax.div(idx, per_window)
  r = lax.rem(idx, per_window)
  visit = win * window + lax.rem(r, window)
  sweep = lax.div(r, window)
  return visit, jnp.where(lax.rem(win, 2) == 0, sweep, n_ctas - 1 - sweep)


def smem_transforms(minor: int, dtype):
  """Shared-memory tiling and swizzle of operand blocks whose minor dimension is
  ``minor`` values of ``dtype`` (the widest swizzle that fits a row)."""
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(minor * itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def persistent_kernel(kernel, out_type, num_ctas: int, interpret):
  """``kernel`` on ``num_ctas`` CTAs of three warpgroups each (memory + two compute)."""
  return plgpu.kernel(
      kernel, out_type=out_type, grid=(num_ctas,), grid_names=("sm",), num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret_params(interpret))


def _kernel(meta_gmem, lhs_gmem, rhs_gmem, out_gmem, *, t: Tiles, num_groups: int,
            num_items: int, n_ctas: int, k_steps: int, transpose_rhs: bool):
  # meta_gmem has a multiple of t.window rows (padding rows are no-op visits).
  dtype = lhs_gmem.dtype
  out_dtype = out_gmem.dtype
  transforms = smem_transforms(t.tk, dtype)
  cta_n = 2 * t.tn
  spec = functools.partial(plgpu.BlockSpec, transforms=transforms)
  if transpose_rhs:  # rhs[g] is [N, K]: load [2tn, tk] blocks, feed wgmma transposed
    b_spec = spec((cta_n, t.tk), lambda kb: (0, kb))
  else:
    b_spec = spec((t.tk, cta_n), lambda kb: (kb, 0))
  a_spec = spec((t.tm, t.tk), lambda kb: (0, kb))

  def make_pipeline(body, context):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(k_steps,), memory_registers=40, in_specs=[a_spec, b_spec],
        wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=min(t.stages, k_steps),
        compute_context=context)

  def rhs_block(group, nj):
    cols = pl.ds(nj * cta_n, cta_n)
    return rhs_gmem.at[group].at[cols, :] if transpose_rhs else rhs_gmem.at[group].at[:, cols]

  ignore = lambda *_, **__: None

  @functools.partial(
      pl.run_scoped,
      allocs=make_pipeline(ignore, ignore).get_allocations(lhs_gmem.at[pl.ds(0, t.tm), :],
                                                           rhs_block(0, 0)),
      out_smem=plgpu.SMEM((2, t.wg_rows, t.epi_n), out_dtype),
      collective_axes="wg")
  def _scope(allocs, out_smem):
    wg = lax.axis_index("wg")
    by_rows = t.split == "m"
    # This warpgroup's part of the CTA tile: rows [wg_row0, wg_row0 + wg_rows)
    # and columns [wg_col0, wg_col0 + wg_cols) of the [tm, 2 tn] tile.
    wg_row0 = wg * t.wg_rows if by_rows else 0
    wg_col0 = 0 if by_rows else wg * t.tn

    @plgpu.nd_loop((num_items,), collective_axes="sm")
    def _item(info):
      (idx,) = info.index
      visit, nj = item_coords(idx, t.window, n_ctas)
      group = meta_gmem[visit, 0]
      row0 = pl.multiple_of(meta_gmem[visit, 1], TMA_ROW_ALIGN)
      lo = meta_gmem[visit, 2] - row0   # first row to store, within the tile
      hi = meta_gmem[visit, 3] - row0
      # The rows this warpgroup stores, within its own [wg_rows, wg_cols] part.
      my_lo = jnp.clip(lo - wg_row0, 0, t.wg_rows)
      my_size = jnp.clip(hi - wg_row0, 0, t.wg_rows) - my_lo
      col0 = nj * cta_n + wg_col0       # this warpgroup's first output column

      def store_rows(chunk_fn):
        """Stores rows [my_lo, my_lo + my_size) of this warpgroup's part."""
        for c in range(t.wg_cols // t.epi_n):
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # slot free again
          out_smem[wg] = chunk_fn(c)
          plgpu.commit_smem()
          start = my_lo
          height = t.wg_rows
          while height >= 1:
            @pl.when((my_size & height) != 0)
            def _store(start=start, height=height):
              plgpu.copy_smem_to_gmem(
                  out_smem.at[wg, pl.ds(start, height)],
                  out_gmem.at[pl.ds(row0 + wg_row0 + start, height),
                              pl.ds(col0 + c * t.epi_n, t.epi_n)])
            start = start + (my_size & height)
            height //= 2

      def context(eval_pipeline):
        @functools.partial(pl.run_scoped,
                           acc_ref=plgpu.ACC((t.wg_rows, t.wg_cols), jnp.float32))
        def _acc(acc_ref):
          eval_pipeline(acc_ref)

          @pl.when(my_size > 0)
          def _epilogue():
            acc = acc_ref[...].astype(out_dtype)
            store_rows(lambda c: acc[:, c * t.epi_n:(c + 1) * t.epi_n])

      def mma(_, a_smem, b_smem, acc_ref):
        if by_rows:
          a = a_smem.at[pl.ds(pl.multiple_of(wg * t.wg_rows, t.wg_rows), t.wg_rows)]
          b = b_smem.transpose((1, 0)) if transpose_rhs else b_smem
          pl.when(my_size > 0)(lambda: plgpu.wgmma(acc_ref, a, b))  # else no rows here
        else:
          cols = pl.ds(wg * t.tn, t.tn)
          b = b_smem.at[cols, :].transpose((1, 0)) if transpose_rhs else b_smem.at[:, cols]
          plgpu.wgmma(acc_ref, a_smem, b)
        plgpu.wgmma_wait(0)
        return acc_ref

      @pl.when(group < num_groups)
      def _compute():
        make_pipeline(mma, context)(lhs_gmem.at[pl.ds(row0, t.tm), :],
                                    rhs_block(group, nj), allocations=allocs)

      @pl.when((group == num_groups) & (wg < 2) & (my_size > 0))
      def _zero_tail():
        store_rows(lambda c: jnp.zeros((t.wg_rows, t.epi_n), out_dtype))

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


# A jit boundary per kernel call: every MoE layer of a model makes the same call,
# and jax lowers one jitted function once per module, so a 16-layer train step
# carries one copy of each Mosaic kernel instead of 16 (measured: the lowered
# text of 4 layers fell from 5.9 MB to 1.9 MB).
@functools.partial(jax.jit, static_argnames=("out_dtype", "transpose_rhs", "tiles",
                                             "interpret", "num_sms"))
def gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
        out_dtype: Optional[jnp.dtype] = None, transpose_rhs: bool = False,
        tiles: Optional[Tiles] = None, interpret=False,
        num_sms: Optional[int] = None) -> jax.Array:
  """Grouped matmul; rows past sum(group_sizes) are zero. See the module doc.

  ``interpret``: True (or an ``InterpretGPUParams``) runs the Mosaic GPU
  interpreter on any backend, for tests. Call it under ``jax.jit``: from jax 0.11
  the interpreter runs each warpgroup as a separate CPU computation, and eager ops
  queued behind it can hold the in-flight slots those need (a deadlock).
  """
  m, k = x.shape
  num_groups = w.shape[0]
  n = w.shape[1] if transpose_rhs else w.shape[2]
  kw = w.shape[2] if transpose_rhs else w.shape[1]
  if kw != k:
    raise ValueError(f"x has {k} columns but w contracts over {kw}")
  if x.dtype != w.dtype:
    raise ValueError(f"gmm wants x and w of one dtype; got {x.dtype} and {w.dtype}")
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  t = tiles or default_tiles(m, k, n, num_groups, out_dtype)
  reason = unsupported_reason(k, n, x.dtype, t)
  if reason:
    raise ValueError(f"moe_kernels.gmm_mosaic: {reason}")
  check_interpretable(interpret, transpose_rhs, "gmm_mosaic.gmm(transpose_rhs=True)")
  # Tiles never read past row M (the schedule moves a tile that would back), but
  # start on multiples of 8 rows (TMA_ROW_ALIGN), so M is padded to a multiple of 8
  # and to at least one tile; the spare rows are never stored.
  padded = max(sched_lib.pl_cdiv(m, TMA_ROW_ALIGN) * TMA_ROW_ALIGN, t.tm)
  if padded != m:
    x = jnp.pad(x, ((0, padded - m), (0, 0)))
  meta = sched_lib.group_aligned_visits(group_sizes.astype(jnp.int32), padded, t.tm,
                                       TMA_ROW_ALIGN)
  # Whole windows of visits: the extra ones are no-ops (group E + 1).
  num_visits = sched_lib.pl_cdiv(meta.shape[0], t.window) * t.window
  noop = jnp.array([[num_groups + 1, 0, 0, 0]], jnp.int32)
  meta = jnp.concatenate([meta, jnp.repeat(noop, num_visits - meta.shape[0], axis=0)])
  n_ctas = n // (2 * t.tn)
  num_items = num_visits * n_ctas
  grid = num_sms or default_num_sms(interpret)
  kernel = functools.partial(
      _kernel, t=t, num_groups=num_groups, num_items=num_items,
      n_ctas=n_ctas, k_steps=k // t.tk, transpose_rhs=transpose_rhs)
  call = persistent_kernel(kernel, jax.ShapeDtypeStruct((padded, n), out_dtype), grid,
                           interpret)
  out = call(meta, x, w)
  return out[:m] if padded != m else out
