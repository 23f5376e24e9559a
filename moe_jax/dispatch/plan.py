"""Dispatch plans: where each routed token copy goes, and how it comes back.

A plan turns a ``Routing`` (token-major slots [T, K]) into the layout of a
buffer of R rows grouped by expert: each row's token and slot, each slot's
row, the rows per expert. It holds integers only; ``moe_jax.dispatch.gathers``
moves the activations.

* dropless: every valid slot gets a row. Rows are sorted by expert into
  contiguous groups of ``group_sizes[e]`` rows; R = routing.max_assignments.
  Rows past ``sum(group_sizes)`` are padding (zero input, zero output).
* capacity: each expert owns a block of C rows (R = E * C); slots past an
  expert's capacity are dropped and counted. Within an expert, earlier slots
  (first choices before second choices, then token order) win, as in GShard.

With C large enough that nothing is dropped, both plans produce the same
output for every token.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from moe_jax.routing import Routing

PLAN_MODES = ("dropless", "capacity")


@struct.dataclass
class DispatchPlan:
  buffer_token_index: jax.Array   # int32 [R]: source token of each row; T = padding
  buffer_slot_index: jax.Array    # int32 [R]: flat slot (t * K + j) of each row; T*K = padding
  group_sizes: jax.Array          # int32 [E]: rows per expert as laid out in the buffer
  combine_index: jax.Array        # int32 [T, K]: buffer row of each slot; R = dropped/invalid
  num_assigned: jax.Array         # int32: valid slots before capacity
  num_dropped: jax.Array          # int32: valid slots that did not get a row
  # Dropless with R = T*K: the rows are a permutation of all slots. row_slot_all
  # is each row's slot (t * K + j) without padding, for kernels that gather and
  # scatter rows themselves (invalid slots sit past sum(group_sizes)).
  row_slot_all: jax.Array | None = None
  is_permutation: bool = struct.field(pytree_node=False, default=False)

  @property
  def num_rows(self) -> int:
    return self.buffer_token_index.shape[0]

  @property
  def dropped_fraction(self) -> jax.Array:
    return self.num_dropped / jnp.maximum(self.num_assigned, 1)


def expert_capacity(num_tokens: int, num_experts: int, nominal_k: float,
                    capacity_factor: float) -> int:
  """Rows per expert: ceil(capacity_factor * T * k / E), at least 1."""
  return max(1, int(math.ceil(capacity_factor * num_tokens * nominal_k / num_experts)))


def _sorted_slots(routing: Routing):
  """Slots in priority order (slot j before j+1, then token), stably sorted by expert."""
  num_tokens, k = routing.expert_index.shape
  num_experts = routing.num_experts
  expert = routing.expert_index.T.reshape(-1)         # [K*T], slot j-major
  valid = routing.mask.T.reshape(-1)
  key = jnp.where(valid, expert, num_experts).astype(jnp.int32)
  order = jnp.argsort(key, stable=True).astype(jnp.int32)   # sorted pos -> flat slot
  counts = jnp.bincount(key, length=num_experts + 1)[:num_experts].astype(jnp.int32)
  starts = jnp.cumsum(counts) - counts
  # Rank of each flat slot in the sorted order (integer metadata only).
  rank = jnp.zeros((k * num_tokens,), jnp.int32).at[order].set(
      jnp.arange(k * num_tokens, dtype=jnp.int32))
  return key, valid, order, counts, starts, rank


def make_plan(routing: Routing, mode: str, capacity_factor: float = 1.0) -> DispatchPlan:
  if mode not in PLAN_MODES:
    raise ValueError(f"dispatch plan mode={mode!r}; allowed: {list(PLAN_MODES)}")
  num_tokens, k = routing.expert_index.shape
  num_experts = routing.num_experts
  num_slots = num_tokens * k
  key, valid, order, counts, starts, rank = _sorted_slots(routing)
  num_assigned = jnp.sum(valid.astype(jnp.int32))

  if mode == "dropless":
    num_rows = min(routing.max_assignments or num_slots, num_slots)
    row_slot = order[:num_rows]
    row_valid = jnp.arange(num_rows) < jnp.sum(counts)
    slot_row = jnp.where(valid & (rank < num_rows), rank, num_rows)
    group_sizes = counts
  else:
    capacity = expert_capacity(num_tokens, num_experts, routing.nominal_k, capacity_factor)
    num_rows = num_experts * capacity
    row_expert = jnp.repeat(jnp.arange(num_experts, dtype=jnp.int32), capacity)
    row_pos = jnp.tile(jnp.arange(capacity, dtype=jnp.int32), num_experts)
    row_valid = row_pos < counts[row_expert]
    sorted_pos = jnp.where(row_valid, starts[row_expert] + row_pos, 0)
    row_slot = order[sorted_pos]
    safe_key = jnp.minimum(key, num_experts - 1)
    pos_in_expert = rank - starts[safe_key]
    kept = valid & (pos_in_expert < capacity)
    slot_row = jnp.where(kept, safe_key * capacity + pos_in_expert, num_rows)
    group_sizes = jnp.full((num_experts,), capacity, jnp.int32)

  # row_slot is j-major (j * T + t); the [T, K] arrays flatten t-major (t * K + j).
  row_token = row_slot % num_tokens
  buffer_slot_index = jnp.where(
      row_valid, row_token * k + row_slot // num_tokens, num_slots).astype(jnp.int32)
  buffer_token_index = jnp.where(row_valid, row_token, num_tokens).astype(jnp.int32)
  combine_index = slot_row.reshape(k, num_tokens).T.astype(jnp.int32)
  num_kept = jnp.sum((combine_index < num_rows).astype(jnp.int32))
  is_permutation = mode == "dropless" and num_rows == num_slots
  row_slot_all = None
  if is_permutation:
    row_slot_all = ((row_slot % num_tokens) * k + row_slot // num_tokens).astype(jnp.int32)
  return DispatchPlan(
      buffer_token_index=buffer_token_index,
      buffer_slot_index=buffer_slot_index,
      group_sizes=group_sizes,
      combine_index=combine_index,
      num_assigned=num_assigned,
      num_dropped=num_assigned - num_kept,
      row_slot_all=row_slot_all,
      is_permutation=is_permutation)
