"""The one grouped-matmul op, and the two implementations XLA provides.

``grouped_matmul(x[M, K], w[E, K, N], group_sizes[E])`` multiplies the rows of
``x`` that belong to group ``e`` (rows are contiguous, group after group) by
``w[e]``. Rows past ``sum(group_sizes)`` produce zeros. Accumulation is in
float32; the result has ``x.dtype`` unless ``preferred_element_type`` is set.

``group_offset`` computes only a contiguous range of groups: ``w`` then holds
the E_local experts ``group_offset .. group_offset + E_local - 1`` of the
``len(group_sizes)`` groups (an expert-parallel shard's own experts), and rows
of other groups come out as zeros. ``group_offset`` may be traced.

``gather_grouped_matmul`` and ``scatter_grouped_matmul`` are the products with
dispatch and combine fused in (implementations with ``fused`` kernels).

The implementation is chosen by name (``moe_jax.ops.registry``).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.ops import registry
from moe_jax.ops.registry import FusedKernels, GmmImpl

_FIELD = "grouped_matmul impl"


def _check_shapes(x, w, group_sizes, group_offset) -> None:
  if x.ndim != 2 or w.ndim != 3:
    raise ValueError(f"grouped_matmul wants x[M, K] and w[E, K, N]; got {x.shape}, {w.shape}")
  if x.shape[1] != w.shape[1]:
    raise ValueError(f"grouped_matmul: x has K={x.shape[1]} but w has K={w.shape[1]}")
  if x.dtype != w.dtype:
    raise ValueError(f"grouped_matmul: x and w must share a dtype; got {x.dtype}, {w.dtype}")
  want = (w.shape[0],) if group_offset is None else None
  if group_sizes.ndim != 1 or (want and group_sizes.shape != want):
    raise ValueError(f"grouped_matmul: group_sizes has shape {group_sizes.shape}, want "
                     f"({w.shape[0]},)" + ("" if want else " or more groups"))
  if group_offset is not None and group_sizes.shape[0] < w.shape[0]:
    raise ValueError(f"grouped_matmul: {w.shape[0]} local experts but only "
                     f"{group_sizes.shape[0]} groups")


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                   impl: str = "auto", group_offset: Optional[jax.Array] = None,
                   preferred_element_type: Optional[jnp.dtype] = None) -> jax.Array:
  _check_shapes(x, w, group_sizes, group_offset)
  out_dtype = preferred_element_type or x.dtype
  chosen = registry.resolve(impl, x.dtype, field=_FIELD)
  group_sizes = group_sizes.astype(jnp.int32)
  if group_offset is None:
    return chosen.fn(x, w, group_sizes, out_dtype)
  group_offset = jnp.asarray(group_offset, jnp.int32)
  if chosen.group_offset_fn is not None:
    return chosen.group_offset_fn(x, w, group_sizes, group_offset, out_dtype)
  return _local_groups(chosen, x, w, group_sizes, group_offset, out_dtype)


def _local_groups(impl: GmmImpl, x, w, group_sizes, group_offset, out_dtype):
  """Rows of the local groups rolled to the front, multiplied, and rolled back.

  The local groups' rows are contiguous, so a roll (a gather, differentiable)
  brings them to rows [0, n); the implementation zeroes the rows past them.
  """
  num_local = w.shape[0]
  local_sizes = jax.lax.dynamic_slice_in_dim(group_sizes, group_offset, num_local)
  start = jnp.sum(jnp.where(jnp.arange(group_sizes.shape[0]) < group_offset, group_sizes, 0))
  y = impl.fn(jnp.roll(x, -start, axis=0), w, local_sizes, out_dtype)
  return jnp.roll(y, start, axis=0)


def _fused_kernels(impl: str, dtype) -> FusedKernels:
  chosen = registry.resolve(impl, dtype, field=_FIELD)
  if chosen.fused is None:
    raise ValueError(f"{_FIELD}={chosen.name!r} has no fused gather/combine kernels; "
                     f"implementations that have them: {registry.with_fused()}")
  return chosen.fused


def gather_grouped_matmul(tokens: jax.Array, row_slot: jax.Array, slots_per_token: int,
                          w: jax.Array, group_sizes: jax.Array, *,
                          impl: str = "auto") -> jax.Array:
  """grouped_matmul(tokens[row_slot // slots_per_token], w, group_sizes), gathering on load.

  ``row_slot`` [R = T * slots_per_token] is the slot (t * k + j) of each row, a
  permutation of the slots.
  """
  _check_shapes(tokens, w, group_sizes, None)
  fused = _fused_kernels(impl, tokens.dtype)
  return fused.gather(tokens, row_slot // slots_per_token, row_slot, w,
                      group_sizes.astype(jnp.int32), tokens.dtype)


def scatter_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
                           row_slot: jax.Array, row_weight: jax.Array, *,
                           impl: str = "auto") -> jax.Array:
  """out[row_slot[r]] = row_weight[r] * (x[r] @ w[group of r]): rows written to their slots."""
  _check_shapes(x, w, group_sizes, None)
  fused = _fused_kernels(impl, x.dtype)
  return fused.scatter(x, w, group_sizes.astype(jnp.int32), row_slot,
                       row_weight.astype(x.dtype), x.dtype)


# ------------------------------------------------------------- XLA implementations


def _row_groups(group_sizes: jax.Array, num_rows: int) -> jax.Array:
  """Group id of each row; rows past the last group get id E (no group)."""
  ends = jnp.cumsum(group_sizes)
  return jnp.searchsorted(ends, jnp.arange(num_rows, dtype=ends.dtype), side="right")


def _reference(x, w, group_sizes, out_dtype):
  """Loop over groups with dense matmuls: slow, simple, the oracle."""
  row_group = _row_groups(group_sizes, x.shape[0])
  out = jnp.zeros((x.shape[0], w.shape[2]), jnp.float32)
  for e in range(w.shape[0]):
    ye = jnp.dot(x, w[e], preferred_element_type=jnp.float32)
    out = out + jnp.where((row_group == e)[:, None], ye, 0.0)
  return out.astype(out_dtype)


def _reference_gather(tokens, row_token, row_slot, w, group_sizes, out_dtype):
  del row_slot
  return _reference(jnp.take(tokens, row_token, axis=0), w, group_sizes, out_dtype)


def _reference_scatter(x, w, group_sizes, row_slot, row_weight, out_dtype):
  y = _reference(x, w, group_sizes, jnp.float32) * row_weight.astype(jnp.float32)[:, None]
  slot_row = jnp.zeros_like(row_slot).at[row_slot].set(jnp.arange(row_slot.shape[0]))
  return jnp.take(y, slot_row, axis=0).astype(out_dtype)


def _ragged_dot(x, w, group_sizes, out_dtype):
  y = jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)
  # ragged_dot leaves rows past sum(group_sizes) unspecified on some backends.
  valid = jnp.arange(x.shape[0]) < jnp.sum(group_sizes)
  return jnp.where(valid[:, None], y, 0.0).astype(out_dtype)


# The oracle; its fused products go through XLA gathers (for tests).
registry.register(GmmImpl(
    "reference", _reference, fused=FusedKernels(_reference_gather, _reference_scatter)))
registry.register(GmmImpl("ragged_dot", _ragged_dot))
