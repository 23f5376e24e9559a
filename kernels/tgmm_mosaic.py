"""Weight gradient of a grouped matmul on Hopper through Pallas Mosaic GPU.

``tgmm(x[M, K], dy[M, N], group_sizes) -> dw[E, K, N]`` with
``dw[g] = x[rows of g]^T @ dy[rows of g]``: a contraction over each group's
rows. Same CTA structure as ``gmm_mosaic`` (persistent, one memory and two
compute warpgroups, TMA + wgmma); the compute warpgroups split the output
columns.

A work item is one [tko, 2 tn] output tile of one group (items ordered group by
group, and inside a group in windows of dw row blocks that sweep the column
blocks together: see ``Tiles.window``). It reduces over the
group's rows in steps of ``tr`` rows starting at the group's first row rounded
down to a multiple of 8 (``step_plan``; a group near the end of x whose last
step would run past the padded rows steps on the tr grid instead). A step can
hold rows of a neighbour group: before the wgmma, each compute warpgroup zeroes
those rows in its own column half of the dy tile in shared memory (dy rows
outside the group times any finite x row give zero). Empty groups store zeros.

Limits (``unsupported_reason``): 16-bit floats, K a multiple of ``tko`` and N a
multiple of 2 ``tn``. x must be finite everywhere (a neighbour's row of x is
multiplied by zeros, and inf * 0 is NaN).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moe_kernels import gmm_mosaic
from moe_kernels import schedule as sched_lib

plgpu = gmm_mosaic.plgpu


@dataclasses.dataclass(frozen=True)
class Tiles:
  tko: int = 128   # rows of the dw tile (features of x)
  tn: int = 128    # columns of the dw tile per compute warpgroup (a CTA covers 2 tn)
  tr: int = 64     # reduction step: rows of x and dy per pipeline step
  stages: int = 4
  epi_n: int = 64
  # Work order inside a group: with at least ``window_from`` column blocks,
  # windows of up to ``window`` row blocks of dw sweep the column blocks
  # (snaking), so a wave of CTAs reads a few column blocks of dy and a few of
  # x rather than all of dy's columns at once. With fewer column blocks the
  # column block varies fastest (measured faster there: docs/benchmarks.md).
  window: int = 16
  window_from: int = 12
  # Steps start at each group's first row (step_plan); False steps on the tr grid
  # (one more step for a group straddling a block boundary), kept to compare.
  group_aligned: bool = True


def smem_bytes(t: Tiles, itemsize: int = 2, out_itemsize: int = 2) -> int:
  """Shared memory of one CTA: the x and dy ring and the two epilogue buffers."""
  return t.stages * t.tr * (t.tko + 2 * t.tn) * itemsize + 2 * t.tko * t.epi_n * out_itemsize


def default_tiles(k: int, n: int, out_dtype=jnp.bfloat16) -> Tiles:
  del k
  out_itemsize = jnp.dtype(out_dtype).itemsize
  # A float32 dw doubles the epilogue buffers: the ring gets shallower to fit.
  return gmm_mosaic.fit_stages(Tiles(tn=128 if n % 256 == 0 else 64),
                               lambda t: smem_bytes(t, out_itemsize=out_itemsize))


def unsupported_reason(k: int, n: int, dtype, tiles: Tiles) -> Optional[str]:
  if reason := gmm_mosaic.dtype_reason(dtype, "tgmm"):
    return reason
  if k % tiles.tko:
    return f"x columns {k} are not a multiple of tko={tiles.tko}"
  if n % (2 * tiles.tn):
    return f"dy columns {n} are not a multiple of 2*tn={2 * tiles.tn}"
  if tiles.tn % tiles.epi_n:
    return f"tn={tiles.tn} is not a multiple of epi_n={tiles.epi_n}"
  return None


def takes(k: int, n: int, dtype, *, interpret=False) -> bool:
  """Whether tgmm() runs this product with its default tiles (else use Triton)."""
  if interpret and not gmm_mosaic.interpreter_reads_transposed():
    return False
  return unsupported_reason(k, n, dtype, default_tiles(k, n)) is None


def _window(k_blocks: int, limit: int) -> int:
  """The largest divisor of k_blocks not above limit (windows tile the row blocks)."""
  return max(w for w in range(1, min(limit, k_blocks) + 1) if k_blocks % w == 0)


def step_plan(group_sizes: jax.Array, num_rows: int, padded_rows: int, tr: int,
              group_aligned: bool = True,
              align: int = gmm_mosaic.TMA_ROW_ALIGN) -> jax.Array:
  """Per group (first row, one past the last, first row of its first step, steps).

  Steps start at the group's first row rounded down to a multiple of ``align``
  (TMA copies start on 8-row tiles; see gmm_mosaic.TMA_ROW_ALIGN), so a group of
  s rows takes about cdiv(s, tr) steps, where on the tr grid a group straddling
  a block boundary takes one more. A group whose steps would read past
  ``padded_rows`` steps on the tr grid instead, as does every group with
  ``group_aligned=False``.
  """
  starts, ends = sched_lib.group_bounds(group_sizes.astype(jnp.int32), num_rows)
  nonempty = ends > starts
  first = starts // align * align
  steps = jnp.where(nonempty, (ends - first + tr - 1) // tr, 0)
  fits = (first + steps * tr <= padded_rows) & group_aligned
  grid_first = starts // tr
  grid_steps = jnp.where(nonempty, (ends + tr - 1) // tr - grid_first, 0)
  row0 = jnp.where(fits, first, grid_first * tr)
  steps = jnp.where(fits, steps, grid_steps)
  return jnp.stack([starts, ends, row0, steps], axis=1).astype(jnp.int32)


def _kernel(meta_gmem, x_gmem, dy_gmem, out_gmem, *, t: Tiles, num_groups: int,
            k_blocks: int, n_ctas: int, num_rows: int):
  # meta_gmem[g] = (first row, one past the last row, first row of step 0, steps)
  dtype = x_gmem.dtype
  out_dtype = out_gmem.dtype
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(t.tr * itemsize * 8)
  transforms = (plgpu.TilingTransform((8, swizzle // itemsize)),
                plgpu.SwizzleTransform(swizzle))
  cta_n = 2 * t.tn
  x_spec = plgpu.BlockSpec((t.tr, t.tko), lambda r: (r, 0), transforms=transforms)
  dy_spec = plgpu.BlockSpec((t.tr, cta_n), lambda r: (r, 0), transforms=transforms)

  def make_pipeline(body, context, steps):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(steps,), memory_registers=40, in_specs=[x_spec, dy_spec],
        wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=t.stages,
        compute_context=context)

  ignore = lambda *_, **__: None
  # The pipeline gets a num_rows-long row slice starting at the group's first
  # block; it may reach past the array but only the group's blocks are read.
  whole = pl.ds(0, num_rows)

  @functools.partial(
      pl.run_scoped,
      allocs=make_pipeline(ignore, ignore, t.stages).get_allocations(
          x_gmem.at[whole, pl.ds(0, t.tko)], dy_gmem.at[whole, pl.ds(0, cta_n)]),
      out_smem=plgpu.SMEM((2, t.tko, t.epi_n), out_dtype),
      collective_axes="wg")
  def _scope(allocs, out_smem):
    wg = lax.axis_index("wg")
    per_group = k_blocks * n_ctas
    window = _window(k_blocks, t.window) if n_ctas >= t.window_from else 1

    @plgpu.nd_loop((num_groups * per_group,), collective_axes="sm")
    def _item(info):
      (idx,) = info.index
      g = lax.div(idx, per_group)
      kb, nj = gmm_mosaic.item_coords(lax.rem(idx, per_group), window, n_ctas)
      start = meta_gmem[g, 0]
      end = meta_gmem[g, 1]
      row0 = pl.multiple_of(meta_gmem[g, 2], gmm_mosaic.TMA_ROW_ALIGN)
      steps = meta_gmem[g, 3]
      cols = pl.ds(wg * t.tn, t.tn)

      def store(chunk_fn):
        for c in range(t.tn // t.epi_n):
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          out_smem[wg] = chunk_fn(c)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(
              out_smem.at[wg],
              out_gmem.at[g, pl.ds(kb * t.tko, t.tko),
                          pl.ds(nj * cta_n + wg * t.tn + c * t.epi_n, t.epi_n)])

      def context(eval_pipeline):
        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((t.tko, t.tn), jnp.float32))
        def _acc(acc_ref):
          eval_pipeline(acc_ref)
          acc = acc_ref[...].astype(out_dtype)
          store(lambda c: acc[:, c * t.epi_n:(c + 1) * t.epi_n])

      def mma(idxs, x_smem, dy_smem, acc_ref):
        (step,) = idxs
        dy_half = dy_smem.at[:, cols]
        lo = start - (row0 + step * t.tr)  # rows of this step before the group
        hi = end - (row0 + step * t.tr)    # first row of this step after the group

        @pl.when((lo > 0) | (hi < t.tr))
        def _mask_neighbours():
          rows = plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, (t.tr, t.tn), 0),
                                   plgpu.Layout.WGMMA)
          keep = (rows >= lo) & (rows < hi)
          dy_half[...] = jnp.where(keep, dy_half[...], jnp.zeros((t.tr, t.tn), dtype))
          plgpu.commit_smem()

        plgpu.wgmma(acc_ref, x_smem.transpose((1, 0)), dy_half)
        plgpu.wgmma_wait(0)
        return acc_ref

      @pl.when(steps > 0)
      def _compute():
        make_pipeline(mma, context, steps)(
            x_gmem.at[pl.ds(row0, num_rows), pl.ds(kb * t.tko, t.tko)],
            dy_gmem.at[pl.ds(row0, num_rows), pl.ds(nj * cta_n, cta_n)],
            allocations=allocs)

      @pl.when((steps == 0) & (wg < 2))
      def _empty_group():
        store(lambda c: jnp.zeros((t.tko, t.epi_n), out_dtype))

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


# Jitted for the reason given at gmm_mosaic.gmm: one lowering per model, not per layer.
@functools.partial(jax.jit, static_argnames=("out_dtype", "tiles", "interpret", "num_sms"))
def tgmm(x: jax.Array, dy: jax.Array, group_sizes: jax.Array, *,
         out_dtype: Optional[jnp.dtype] = None, tiles: Optional[Tiles] = None,
         interpret=False, num_sms: Optional[int] = None) -> jax.Array:
  """Per-group x^T dy -> [E, K, N]; rows past sum(group_sizes) are ignored."""
  m, k = x.shape
  n = dy.shape[1]
  if dy.shape[0] != m:
    raise ValueError(f"tgmm: x has {m} rows but dy has {dy.shape[0]}")
  if x.dtype != dy.dtype:
    raise ValueError(f"tgmm wants x and dy of one dtype; got {x.dtype} and {dy.dtype}")
  t = tiles or default_tiles(k, n, out_dtype or x.dtype)
  reason = unsupported_reason(k, n, x.dtype, t)
  if reason:
    raise ValueError(f"moe_kernels.tgmm_mosaic: {reason}")
  gmm_mosaic.check_interpretable(interpret, True, "tgmm_mosaic.tgmm")
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  num_groups = group_sizes.shape[0]
  # Each group's steps span whole tr-row blocks, so the last one may run past M:
  # pad M to a multiple of tr (a copy, only when M is not one already).
  padded = sched_lib.pl_cdiv(m, t.tr) * t.tr
  if padded != m:
    x = jnp.pad(x, ((0, padded - m), (0, 0)))
    dy = jnp.pad(dy, ((0, padded - m), (0, 0)))
  meta = step_plan(group_sizes, m, padded, t.tr, t.group_aligned)
  kernel = functools.partial(_kernel, t=t, num_groups=num_groups, k_blocks=k // t.tko,
                             n_ctas=n // (2 * t.tn), num_rows=padded)
  call = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
      grid=(num_sms or gmm_mosaic.default_num_sms(interpret),),
      grid_names=("sm",),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=gmm_mosaic.interpret_params(interpret),
  )
  return call(meta, x, dy)

