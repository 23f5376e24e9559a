"""Moving activations by a dispatch plan: gathers both ways, gathers in both gradients.

Tokens to rows and rows back to slots are gathers; their custom VJPs are
gathers too (each row feeds exactly one kept slot), so no scatter-add of
activations is ever emitted.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.dispatch.plan import DispatchPlan


def _take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
  """x[index] where index == len(x) selects a zero row (no padded copy of x)."""
  return jnp.take(x, index, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def _dispatch_rows(x, buffer_token_index, combine_index):
  return _take_rows(x, buffer_token_index)


def _dispatch_fwd(x, buffer_token_index, combine_index):
  return _take_rows(x, buffer_token_index), combine_index


def _dispatch_bwd(combine_index, d_buffer):
  # Each token's gradient is the sum of its rows' gradients: gather by slot, sum over K.
  num_tokens, k = combine_index.shape
  rows = _take_rows(d_buffer, combine_index.reshape(-1))
  return rows.reshape(num_tokens, k, -1).sum(axis=1), None, None


_dispatch_rows.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def _collect_slots(y_buffer, combine_index, buffer_slot_index):
  return _take_rows(y_buffer, combine_index.reshape(-1))


def _collect_fwd(y_buffer, combine_index, buffer_slot_index):
  return _take_rows(y_buffer, combine_index.reshape(-1)), buffer_slot_index


def _collect_bwd(buffer_slot_index, d_slots):
  # Every buffer row feeds at most one slot: its gradient is that slot's.
  return _take_rows(d_slots, buffer_slot_index), None, None


_collect_slots.defvjp(_collect_fwd, _collect_bwd)


@jax.custom_vjp
def _slot_values_to_rows(values, buffer_slot_index, combine_index):
  return _take_rows(values.reshape(-1), buffer_slot_index)


def _slot_values_fwd(values, buffer_slot_index, combine_index):
  return _take_rows(values.reshape(-1), buffer_slot_index), combine_index


def _slot_values_bwd(combine_index, d_rows):
  # Rows and kept slots pair up one to one: a slot's gradient is its row's.
  return _take_rows(d_rows, combine_index.reshape(-1)).reshape(combine_index.shape), None, None


_slot_values_to_rows.defvjp(_slot_values_fwd, _slot_values_bwd)


def row_values(values: jax.Array, plan: DispatchPlan) -> jax.Array:
  """Per-slot values [T, K] -> per-row [R] (0 on padding rows); gathers both ways."""
  return _slot_values_to_rows(values, plan.buffer_slot_index, plan.combine_index)


def tokens_to_rows(x: jax.Array, plan: DispatchPlan) -> jax.Array:
  """[T, d] tokens -> [R, d] expert-grouped buffer (zero padding rows)."""
  return _dispatch_rows(x, plan.buffer_token_index, plan.combine_index)


def rows_to_tokens(y_buffer: jax.Array, plan: DispatchPlan) -> jax.Array:
  """[R, d] weighted expert outputs -> [T, d]: each token's rows summed (gather +
  reshape-sum, in float32); dropped and invalid slots add nothing."""
  num_tokens, k = plan.combine_index.shape
  slots = _collect_slots(y_buffer, plan.combine_index, plan.buffer_slot_index)
  slots = slots.reshape(num_tokens, k, -1)
  return jnp.sum(slots, axis=1, dtype=jnp.float32).astype(y_buffer.dtype)
