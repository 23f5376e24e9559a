"""Weight gradient of a grouped matmul on Hopper through Pallas Mosaic GPU.

``tgmm(x[M, K], dy[M, N], group_sizes) -> dw[E, K, N]`` with
``dw[g] = x[rows of g]^T @ dy[rows of g]``: a contraction over each group's
rows. Same CTA structure as ``gmm_mosaic`` (persistent, one memory and two
compute warpgroups, TMA + wgmma); the compute warpgroups split the output
columns. One shared-memory ring serves all of a CTA's (item, step) pairs, so the
memory warpgroup loads the next item's first steps while the compute warpgroups
store the current tile.

A work item is one [tko, 2 tn] output tile of one group (items ordered group by
group, groups largest first by step count so the last items dealt to the CTAs
are the shortest, and inside a group in windows of dw row blocks that sweep the
column blocks together: see ``Tiles.window``). It reduces over the
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
  # column block varies fastest (windows there measured slower on skewed groups,
  # H100: fine-768 0.77 -> 0.68 of dense, dsv3 0.62 -> 0.54).
  window: int = 16
  window_from: int = 12


def smem_bytes(t: Tiles, itemsize: int = 2, out_itemsize: int = 2) -> int:
  """Shared memory of one CTA: the x and dy ring and the two epilogue buffers."""
  return t.stages * t.tr * (t.tko + 2 * t.tn) * itemsize + 2 * t.tko * t.epi_n * out_itemsize


def default_tiles(k: int, n: int, out_dtype=jnp.bfloat16) -> Tiles:
  del k
  out_itemsize = jnp.dtype(out_dtype).itemsize
  fits = lambda t: smem_bytes(t, out_itemsize=out_itemsize)
  tn = 128 if n % 256 == 0 else 64
  # Each warpgroup stores its dw tile in one epilogue chunk (epi_n = tn): with two
  # chunks the second waits for the first to leave shared memory, once per item
  # (H200: dsv3 skewed 7.74 -> 7.39 ms, fine-768 skewed 0.386 -> 0.372; balanced
  # level). The bigger buffer costs a ring slot (4 -> 3 at tn = 128, measured level
  # on its own); where that would leave fewer than 3 slots (a float32 dw) the
  # chunks stay at 64 columns. A float32 dw doubles the epilogue buffers either way.
  t = gmm_mosaic.fit_stages(Tiles(tn=tn, epi_n=tn), fits)
  if t.stages < 3 or fits(t) > gmm_mosaic.SMEM_BUDGET:
    t = gmm_mosaic.fit_stages(Tiles(tn=tn), fits)
  return t


def unsupported_reason(k: int, n: int, dtype, tiles: Tiles) -> Optional[str]:
  # The neighbour-row mask is built in the wgmma register layout, 64 rows a tile.
  return (gmm_mosaic.dtype_reason(dtype, "tgmm")
          or gmm_mosaic.multiples_reason(("x columns ", k, "tko", tiles.tko),
                                         ("dy columns ", n, "2*tn", 2 * tiles.tn),
                                         ("tn=", tiles.tn, "epi_n", tiles.epi_n),
                                         ("tr=", tiles.tr, "wgmma rows", 64)))


def takes(k: int, n: int, dtype, *, interpret=False) -> bool:
  """Whether tgmm() runs this product with its default tiles (else use Triton)."""
  if interpret and not gmm_mosaic.interpreter_reads_transposed():
    return False
  return unsupported_reason(k, n, dtype, default_tiles(k, n)) is None


def _window(k_blocks: int, limit: int) -> int:
  """The largest divisor of k_blocks not above limit (windows tile the row blocks)."""
  return max(w for w in range(1, min(limit, k_blocks) + 1) if k_blocks % w == 0)


def step_plan(group_sizes: jax.Array, num_rows: int, padded_rows: int, tr: int,
              align: int = gmm_mosaic.TMA_ROW_ALIGN) -> jax.Array:
  """Per group (first row, one past the last, first row of its first step, steps).

  Steps start at the group's first row rounded down to a multiple of ``align``
  (TMA copies start on 8-row tiles; see gmm_mosaic.TMA_ROW_ALIGN), so a group of
  s rows takes about cdiv(s, tr) steps, where on the tr grid a group straddling
  a block boundary takes one more. A group whose steps would read past
  ``padded_rows`` steps on the tr grid instead.
  """
  starts, ends = sched_lib.group_bounds(group_sizes.astype(jnp.int32), num_rows)
  nonempty = ends > starts
  first = starts // align * align
  steps = jnp.where(nonempty, (ends - first + tr - 1) // tr, 0)
  fits = first + steps * tr <= padded_rows
  grid_first = starts // tr
  grid_steps = jnp.where(nonempty, (ends + tr - 1) // tr - grid_first, 0)
  row0 = jnp.where(fits, first, grid_first * tr)
  steps = jnp.where(fits, steps, grid_steps)
  return jnp.stack([starts, ends, row0, steps], axis=1).astype(jnp.int32)


# Registers a thread of the memory warpgroup keeps; the compute warpgroups share the
# rest of the 64K-register file (jax's warp-specialized pipeline makes the same split).
MEMORY_REGISTERS = 40
COMPUTE_REGISTERS = 232


def _kernel(meta_gmem, x_gmem, dy_gmem, out_gmem, *, t: Tiles, num_groups: int,
            k_blocks: int, n_ctas: int, num_sms: int):
  """One ring for all of a CTA's items: the memory warpgroup walks the CTA's
  (item, step) pairs without stopping at item boundaries, the compute
  warpgroups walk the same sequence and store each tile when its steps are done.

  Ring slot s % stages holds the CTA's s-th step overall. ``full[slot]``
  completes when both TMA copies of a step have landed; ``empty[slot]`` when
  both compute warpgroups have finished the wgmma that read it.
  """
  # meta_gmem[p] = (group, first row, one past the last row, first row of step 0,
  # steps) of the p-th group in processing order (see item_plan).
  dtype = x_gmem.dtype
  out_dtype = out_gmem.dtype
  transforms = gmm_mosaic.smem_transforms(t.tr, dtype)
  cta_n = 2 * t.tn
  per_group = k_blocks * n_ctas
  num_items = num_groups * per_group
  window = _window(k_blocks, t.window) if n_ctas >= t.window_from else 1

  def item(idx):
    """Work item idx -> (group, dw row block, column block, group rows, steps)."""
    p = lax.div(idx, per_group)
    kb, nj = gmm_mosaic.item_coords(lax.rem(idx, per_group), window, n_ctas)
    row0 = pl.multiple_of(meta_gmem[p, 3], gmm_mosaic.TMA_ROW_ALIGN)
    return meta_gmem[p, 0], kb, nj, meta_gmem[p, 1], meta_gmem[p, 2], row0, meta_gmem[p, 4]

  def store(out_smem, wg, g, kb, nj, chunk_fn):
    for c in range(t.tn // t.epi_n):
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      out_smem[wg] = chunk_fn(c)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(
          out_smem.at[wg],
          out_gmem.at[g, pl.ds(kb * t.tko, t.tko),
                      pl.ds(nj * cta_n + wg * t.tn + c * t.epi_n, t.epi_n)])

  def store_acc(out_smem, wg, g, kb, nj, acc_ref):
    acc = acc_ref[...].astype(out_dtype)
    store(out_smem, wg, g, kb, nj, lambda c: acc[:, c * t.epi_n:(c + 1) * t.epi_n])

  def store_zeros(out_smem, wg, g, kb, nj):
    store(out_smem, wg, g, kb, nj, lambda c: jnp.zeros((t.tko, t.epi_n), out_dtype))

  def mma(acc_ref, x_smem, dy_smem, wg, first_row, start, end):
    """acc += x_smem^T @ (this warpgroup's dy columns, rows outside the group zeroed)."""
    dy_half = dy_smem.at[:, pl.ds(wg * t.tn, t.tn)]
    lo = start - first_row  # rows of this step before the group
    hi = end - first_row    # first row of this step after the group

    @pl.when((lo > 0) | (hi < t.tr))
    def _mask_neighbours():
      rows = plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, (t.tr, t.tn), 0),
                               plgpu.Layout.WGMMA)
      keep = (rows >= lo) & (rows < hi)
      dy_half[...] = jnp.where(keep, dy_half[...], jnp.zeros((t.tr, t.tn), dtype))
      plgpu.commit_smem()

    plgpu.wgmma(acc_ref, x_smem.transpose((1, 0)), dy_half)
    plgpu.wgmma_wait(0)

  def x_block(kb, rows):
    return x_gmem.at[rows, pl.ds(kb * t.tko, t.tko)]

  def dy_block(nj, rows):
    return dy_gmem.at[rows, pl.ds(nj * cta_n, cta_n)]

  @functools.partial(
      pl.run_scoped,
      x_ring=plgpu.SMEM((t.stages, t.tr, t.tko), dtype, transforms=transforms),
      dy_ring=plgpu.SMEM((t.stages, t.tr, cta_n), dtype, transforms=transforms),
      full=plgpu.Barrier(num_arrivals=2, num_barriers=t.stages),
      empty=plgpu.Barrier(num_arrivals=2, num_barriers=t.stages),
      out_smem=plgpu.SMEM((2, t.tko, t.epi_n), out_dtype),
      collective_axes="wg")
  def _scope(x_ring, dy_ring, full, empty, out_smem):
    wg = lax.axis_index("wg")
    sm = lax.axis_index("sm")
    my_items = lax.div(num_items - sm + num_sms - 1, num_sms)

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

      def item_loads(j, s):
        _, kb, nj, _, _, row0, steps = item(sm + j * num_sms)

        def step_loads(i, s):
          slot = lax.rem(s, t.stages)

          @pl.when(s >= t.stages)
          def _wait_free():
            plgpu.barrier_wait(empty.at[slot])

          rows = pl.ds(pl.multiple_of(row0 + i * t.tr, gmm_mosaic.TMA_ROW_ALIGN), t.tr)
          plgpu.copy_gmem_to_smem(x_block(kb, rows), x_ring.at[slot], full.at[slot])
          plgpu.copy_gmem_to_smem(dy_block(nj, rows), dy_ring.at[slot], full.at[slot])
          return s + 1

        return lax.fori_loop(0, steps, step_loads, s)

      lax.fori_loop(0, my_items, item_loads, jnp.int32(0))

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")

      def item_compute(j, s):
        g, kb, nj, start, end, row0, steps = item(sm + j * num_sms)

        @pl.when(steps > 0)
        def _reduce():
          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((t.tko, t.tn), jnp.float32))
          def _acc(acc_ref):
            def step_compute(i, acc_ref):
              slot = lax.rem(s + i, t.stages)
              plgpu.barrier_wait(full.at[slot])
              mma(acc_ref, x_ring.at[slot], dy_ring.at[slot], wg, row0 + i * t.tr, start, end)
              plgpu.barrier_arrive(empty.at[slot])
              return acc_ref

            lax.fori_loop(0, steps, step_compute, acc_ref)
            store_acc(out_smem, wg, g, kb, nj, acc_ref)

        @pl.when(steps == 0)
        def _empty_group():
          store_zeros(out_smem, wg, g, kb, nj)

        return s + steps

      lax.fori_loop(0, my_items, item_compute, jnp.int32(0))
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def item_plan(group_sizes: jax.Array, num_rows: int, padded_rows: int, t: Tiles) -> jax.Array:
  """[E, 5] int32: per group, (group, then its step_plan row), largest step count
  first (ties in group order)."""
  plan = step_plan(group_sizes, num_rows, padded_rows, t.tr)
  order = jnp.argsort(-plan[:, 3], stable=True).astype(jnp.int32)
  return jnp.concatenate([order[:, None], plan[order]], axis=1)


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
  meta = item_plan(group_sizes, m, padded, t)
  grid = num_sms or gmm_mosaic.default_num_sms(interpret)
  kernel = functools.partial(_kernel, t=t, num_groups=num_groups, k_blocks=k // t.tko,
                             n_ctas=n // (2 * t.tn), num_sms=grid)
  call = gmm_mosaic.persistent_kernel(
      kernel, jax.ShapeDtypeStruct((num_groups, k, n), out_dtype), grid, interpret)
  return call(meta, x, dy)

