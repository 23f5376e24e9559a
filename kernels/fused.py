"""Grouped matmuls fused with MoE dispatch (row gather) and combine (weighted scatter).

``gmm_gather(x_tokens[T, K], row_index[M], w[E, K, N], group_sizes[E])``
  computes ``gmm(x_tokens[row_index], w, group_sizes)`` without writing the
  permuted copy of the activations: each row tile gathers its token rows inside
  the kernel's load. ``row_index`` is the token of each expert-sorted row (for
  top-k routing a token appears k times); every entry must be in [0, T), rows
  past ``sum(group_sizes)`` included (their output is zero).
  VJP: dw = tgmm with the same in-kernel gather. For dx_tokens, pass
  ``row_slot`` (slot of each row, a permutation of [0, M) with
  slot = token * k + j, M = T * k): the input-gradient kernel then writes each
  row to its slot and dx_tokens is a reshape-sum over k. Without it, dx_tokens
  is an XLA scatter-add of ``gmm(dy, w^T)`` (slower).

``gmm_combine(x[M, K], w[E, K, N], group_sizes[E], out_index[M], row_weight[M])``
  returns ``out[M, N]`` in slot order: ``out[out_index[i]] = row_weight[i] *
  (x[i] @ w[group(i)])`` and zeros for rows past ``sum(group_sizes)``. With
  top-k dispatch, slots are token-major (slot = token * k + j), so the combined
  output is ``out.reshape(T, k, N).sum(1)``: no scatter-add anywhere.
  ``out_index`` must be a permutation of [0, M).
  VJP: with ``G = dy[out_index]`` (gathered in-kernel), dx = row_weight * (G @ w^T),
  d row_weight = rowsum(x * (G @ w^T)), dw = tgmm(x, row_weight * G).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from moe_kernels import gmm as gmm_lib


def _keep_inputs(primal, count):
  """A custom VJP's forward rule whose residuals are the primal's first ``count`` inputs."""
  return lambda *args: (primal(*args), args[:count])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _gather(x_tokens, row_index, row_slot, w, group_sizes, out_dtype, interpret):
  del row_slot
  return gmm_lib.fwd_call(x_tokens, w, group_sizes, out_dtype, interpret=interpret,
                          lhs_index=row_index)


def _gather_bwd(out_dtype, interpret, res, dy):
  del out_dtype
  x_tokens, row_index, row_slot, w, group_sizes = res
  m = row_index.shape[0]
  tokens, k = x_tokens.shape
  dy = dy.astype(x_tokens.dtype)
  if row_slot is not None:
    dx_slots = gmm_lib.fwd_call(dy, w, group_sizes, x_tokens.dtype, transpose_rhs=True,
                                interpret=interpret, out_index=row_slot)
    dx = jnp.sum(dx_slots.reshape(tokens, m // tokens, k), axis=1, dtype=jnp.float32)
  else:
    dx_rows = gmm_lib.fwd_call(dy, w, group_sizes, jnp.float32, transpose_rhs=True,
                               interpret=interpret)
    dx = jnp.zeros(x_tokens.shape, jnp.float32).at[row_index].add(dx_rows)
  dw = gmm_lib.tgmm_call(x_tokens, dy, group_sizes, w.dtype, num_rows=m,
                         interpret=interpret, x_index=row_index)
  return dx.astype(x_tokens.dtype), None, None, dw, None


_gather.defvjp(_keep_inputs(_gather, 5), _gather_bwd)


def gmm_gather(x_tokens: jax.Array, row_index: jax.Array, w: jax.Array,
               group_sizes: jax.Array, out_dtype: Optional[jnp.dtype] = None, *,
               row_slot: Optional[jax.Array] = None,
               interpret: bool = False) -> jax.Array:
  """gmm(x_tokens[row_index], w, group_sizes) with the gather inside the kernel."""
  out_dtype = jnp.dtype(out_dtype or x_tokens.dtype)
  m = row_index.shape[0]
  if row_slot is not None:
    if m % x_tokens.shape[0]:
      raise ValueError(f"row_slot needs M = T * k rows; got M={m}, T={x_tokens.shape[0]}")
    row_slot = row_slot.astype(jnp.int32)
  return _gather(x_tokens, row_index.astype(jnp.int32), row_slot, w,
                 group_sizes.astype(jnp.int32), out_dtype, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _combine(x, w, group_sizes, out_index, row_weight, out_dtype, interpret):
  return gmm_lib.fwd_call(x, w, group_sizes, out_dtype, interpret=interpret,
                          out_index=out_index, row_scale=row_weight)


def _combine_bwd(out_dtype, interpret, res, dy):
  del out_dtype
  x, w, group_sizes, out_index, row_weight = res
  dy = dy.astype(x.dtype)
  # One kernel gives dx = row_weight * (G @ w^T) and, from the same unscaled
  # tile, d row_weight = rowsum(x * (G @ w^T)) as per-column-tile partials.
  s = row_weight.astype(jnp.float32)
  dx, parts = gmm_lib.fwd_call(dy, w, group_sizes, x.dtype, transpose_rhs=True,
                               interpret=interpret, lhs_index=out_index, row_scale=s,
                               row_dot=x)
  ds = jnp.sum(parts, axis=0).astype(row_weight.dtype)
  dw = gmm_lib.tgmm_call(x, dy, group_sizes, w.dtype, num_rows=x.shape[0],
                         interpret=interpret, dy_index=out_index, row_scale=s)
  return dx, dw, None, None, ds


_combine.defvjp(_keep_inputs(_combine, 5), _combine_bwd)


def gmm_combine(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
                out_index: jax.Array, row_weight: jax.Array,
                out_dtype: Optional[jnp.dtype] = None, *,
                interpret: bool = False) -> jax.Array:
  """Weighted gmm whose rows are written to slot order ``out_index``."""
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  return _combine(x, w, group_sizes.astype(jnp.int32), out_index.astype(jnp.int32),
                  row_weight, out_dtype, interpret)
