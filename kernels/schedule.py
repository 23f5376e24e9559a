"""Tile schedules for grouped matmuls over contiguous, ragged row groups.

A forward (or input-gradient) gmm walks the rows of ``x`` in fixed row tiles
of ``tm`` rows. A row tile that straddles a group boundary is visited once per
group it touches; each visit multiplies the whole tile by that group's weights
and stores only that group's rows, so visits of one tile never write the same
row. Rows past ``sum(group_sizes)`` form a tail "group" ``E`` whose visits
store zeros. With G non-empty groups the number of visits is at most
``cdiv(M, tm) + G``; the grid is sized for the static bound
``cdiv(M, tm) + E`` and the unused visits at the end do nothing.

``group_aligned_visits`` is the other schedule, used by the Mosaic GPU kernels:
row tiles start at their group's first row, so a group straddling a tile
boundary does not cost an extra visit.

Everything here is plain jnp so it runs inside ``jit`` before the kernel.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class GroupSchedule:
  tile_group: jax.Array   # [T] int32: group of visit t (E = zero tail, E+1 = no-op)
  tile_block: jax.Array   # [T] int32: row-tile index of visit t
  group_start: jax.Array  # [E+2] int32: first row of each group (tail, no-op last)
  group_end: jax.Array    # [E+2] int32: one past the last row
  # [T, 4] int32 per visit: group, row tile, first and one-past-last row it stores.
  # One row per visit so the kernel reads its metadata with no dependent loads.
  visit_meta: jax.Array

  @property
  def num_visits(self) -> int:
    return self.tile_group.shape[0]


def group_bounds(group_sizes: jax.Array, num_rows: int):
  """Start and end rows of each group, clipped to ``num_rows``."""
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.minimum(jnp.cumsum(sizes), num_rows)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  return starts, ends


def max_visits(num_rows: int, num_groups: int, tm: int) -> int:
  return pl_cdiv(num_rows, tm) + num_groups


def pl_cdiv(a: int, b: int) -> int:
  return -(-a // b)


def make_schedule(group_sizes: jax.Array, num_rows: int, tm: int) -> GroupSchedule:
  num_groups = group_sizes.shape[0]
  starts, ends = group_bounds(group_sizes, num_rows)
  total = ends[-1]
  # Append the zero tail [total, M) and a no-op group with an empty range.
  starts = jnp.concatenate([starts, jnp.stack([total, jnp.int32(0)])])
  ends = jnp.concatenate([ends, jnp.stack([jnp.int32(num_rows), jnp.int32(0)])])
  sizes = ends - starts
  first = starts // tm
  last = (ends - 1) // tm
  visits = jnp.where(sizes > 0, last - first + 1, 0)
  cum = jnp.cumsum(visits)
  offset = cum - visits
  t = jnp.arange(max_visits(num_rows, num_groups, tm), dtype=jnp.int32)
  # compare_all: one fused comparison. The default "scan" method is a loop of
  # small kernels that cost 0.1 to 0.25 ms per call on an H100.
  group = jnp.searchsorted(cum, t, side="right", method="compare_all").astype(jnp.int32)
  group = jnp.minimum(group, num_groups + 1)  # past the last visit: no-op
  block = jnp.where(group <= num_groups,
                    first[jnp.minimum(group, num_groups)] + t - offset[jnp.minimum(group, num_groups)],
                    0)
  block = block.astype(jnp.int32)
  gi = jnp.minimum(group, num_groups + 1)
  lo = jnp.maximum(starts[gi], block * tm)
  hi = jnp.minimum(ends[gi], block * tm + tm)
  meta = jnp.stack([group, block, lo, hi], axis=1).astype(jnp.int32)
  return GroupSchedule(group, block, starts.astype(jnp.int32), ends.astype(jnp.int32),
                       meta)


def group_aligned_visits(group_sizes: jax.Array, num_rows: int, tm: int,
                         align: int = 8) -> jax.Array:
  """Visits whose row tiles start at their group's first row (not on the tm grid).

  Tile starts are rounded down to a multiple of ``align`` rows: Mosaic GPU copies
  into tiled shared memory with TMA over a tiled view of global memory, so a
  copy's first row must be a multiple of the tile's 8 rows. Group ``g`` then gets
  ``cdiv(s + (start mod align), tm)`` visits for its ``s`` rows, where the grid
  schedule above gives it one more whenever it straddles a tm boundary
  (Dirichlet(0.3) groups: 7% fewer visits at 256 groups, 4% at 64). A tile that
  would run past ``num_rows`` is moved back to end there, so no tile reads outside
  ``[0, num_rows)``; each visit stores only its own rows, which no other visit
  stores. ``num_rows`` must be a multiple of ``align`` and at least ``tm``, and
  ``tm`` a multiple of ``align``.

  Returns ``[cdiv(num_rows, tm) + E, 4]`` int32 rows (group, first row of the
  tile, first and one-past-last row it stores), the same layout as
  ``GroupSchedule.visit_meta`` except that column 1 is a row, not a tile index.
  The zero tail ``[sum(sizes), num_rows)`` is group ``E``; unused rows are no-op
  visits (group ``E + 1``, storing nothing).
  """
  if num_rows < tm or num_rows % align or tm % align:
    raise ValueError(f"group_aligned_visits needs num_rows >= tm, both multiples of "
                     f"align={align}; got num_rows={num_rows}, tm={tm}")
  num_groups = group_sizes.shape[0]
  starts, ends = group_bounds(group_sizes, num_rows)
  starts = jnp.concatenate([starts, jnp.stack([ends[-1], jnp.int32(0)])])
  ends = jnp.concatenate([ends, jnp.stack([jnp.int32(num_rows), jnp.int32(0)])])
  first = starts // align * align
  visits = jnp.where(ends > starts, (ends - first + tm - 1) // tm, 0)
  cum = jnp.cumsum(visits)
  t = jnp.arange(max_visits(num_rows, num_groups, tm), dtype=jnp.int32)
  group = jnp.searchsorted(cum, t, side="right", method="compare_all").astype(jnp.int32)
  group = jnp.minimum(group, num_groups + 1)
  tile = first[group] + (t - (cum - visits)[group]) * tm
  real = group <= num_groups
  lo = jnp.where(real, jnp.maximum(tile, starts[group]), 0)
  hi = jnp.where(real, jnp.minimum(tile + tm, ends[group]), 0)
  row0 = jnp.where(real, jnp.minimum(tile, num_rows - tm), 0)
  return jnp.stack([group, row0, lo, hi], axis=1).astype(jnp.int32)

