"""The dispatcher seam: routing -> expert-grouped rows -> back to tokens.

A ``Dispatcher`` has three steps, each a pure function:

    plan = dispatcher.plan(routing, capacity_factor)       # integers only
    rows = dispatcher.dispatch(x_tokens, plan, routing)     # ExpertRows
    y    = dispatcher.combine(experts(rows), plan)          # [T, d]

``ExpertRows`` is all the expert computation sees: rows grouped by expert,
their group sizes, and each row's combine weight. A dispatcher may fuse its
data movement into the expert matmuls (``row_slot``): the first one then
gathers token rows on load and the last one writes weighted rows to their
slots. Dispatchers are chosen by name (``model.moe.dispatch``):

  dropless  every routed slot gets a row (ragged groups)
  capacity  each expert owns C rows; slots past it are dropped and counted
  fused     dropless, with the gather and the combine inside the kernels
            (needs one row per slot and an implementation with fused kernels)
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from moe_jax import ops
from moe_jax.config_fields import ConfigError
from moe_jax.dispatch import gathers
from moe_jax.dispatch.plan import DispatchPlan, make_plan
from moe_jax.routing import Routing


@struct.dataclass
class ExpertRows:
  """Rows grouped by expert: ``group_sizes[e]`` rows for expert e, then padding.

  ``row_weight`` [R] (float32) is each row's combine weight: the expert output
  of row r is scaled by it. With ``row_slot`` [R] set, ``data`` holds the tokens
  [T, d] rather than the rows: row r is token ``row_slot[r] // slots_per_token``,
  gathered inside the first matmul, and the last matmul writes row r to slot
  ``row_slot[r]`` of a [T * slots_per_token, N] output.
  """
  data: jax.Array
  group_sizes: jax.Array
  row_weight: jax.Array
  row_slot: Optional[jax.Array] = None
  slots_per_token: int = struct.field(pytree_node=False, default=1)

  def matmul_in(self, w: jax.Array, impl: str) -> jax.Array:
    """Each row times its expert's ``w[e]``: [R, N]."""
    if self.row_slot is None:
      return ops.grouped_matmul(self.data, w, self.group_sizes, impl=impl)
    return ops.gather_grouped_matmul(self.data, self.row_slot, self.slots_per_token, w,
                                     self.group_sizes, impl=impl)

  def matmul_out(self, hidden: jax.Array, w: jax.Array, impl: str) -> jax.Array:
    """Each row's ``row_weight * (hidden @ w[e])``, in row order or, fused, slot order.

    Unfused, the weight scales the hidden row before the product (inside the pass
    that makes it): equal for a linear, bias-free projection, and the combine is a
    plain sum whose weight gradient is a reduction over the hidden width.
    """
    if self.row_slot is None:
      scaled = (hidden.astype(jnp.float32) * self.row_weight[:, None]).astype(hidden.dtype)
      return ops.grouped_matmul(scaled, w, self.group_sizes, impl=impl)
    return ops.scatter_grouped_matmul(hidden, w, self.group_sizes, self.row_slot,
                                      self.row_weight, impl=impl)


class Dispatcher(Protocol):
  """What the MoE layer asks of a dispatcher (each step a pure function)."""
  name: str

  def plan(self, routing: Routing, capacity_factor: float) -> DispatchPlan:
    """Where each routed slot goes: integers only."""

  def dispatch(self, x: jax.Array, plan: DispatchPlan, routing: Routing) -> ExpertRows:
    """Tokens [T, d] -> rows grouped by expert, with their combine weights."""

  def combine(self, y: jax.Array, plan: DispatchPlan) -> jax.Array:
    """The experts' weighted rows -> [T, d]."""


@dataclasses.dataclass(frozen=True)
class Sorted:
  """Rows sorted by expert, moved by gathers (``dropless`` or ``capacity`` plans)."""
  name: str
  mode: str

  def plan(self, routing: Routing, capacity_factor: float) -> DispatchPlan:
    return make_plan(routing, self.mode, capacity_factor)

  def dispatch(self, x: jax.Array, plan: DispatchPlan, routing: Routing) -> ExpertRows:
    weights = routing.combine_weight.astype(jnp.float32)
    buffer = nn.with_logical_constraint(gathers.tokens_to_rows(x, plan),
                                        ("activation_exp_rows", "activation_embed"))
    return ExpertRows(data=buffer, group_sizes=plan.group_sizes,
                      row_weight=gathers.row_values(weights, plan))

  def combine(self, y: jax.Array, plan: DispatchPlan) -> jax.Array:
    return gathers.rows_to_tokens(y, plan)


@dataclasses.dataclass(frozen=True)
class Fused:
  """Dropless, with the row gather and the weighted combine inside the kernels."""
  name: str = "fused"

  def plan(self, routing: Routing, capacity_factor: float) -> DispatchPlan:
    plan = make_plan(routing, "dropless", capacity_factor)
    if not plan.is_permutation:
      raise ConfigError(
          "model.moe.dispatch='fused' needs one row per routing slot (the top-k and "
          f"dense-to-sparse routers); this router allows {routing.max_assignments} rows "
          f"for {plan.combine_index.size} slots: use 'dropless'")
    return plan

  def dispatch(self, x: jax.Array, plan: DispatchPlan, routing: Routing) -> ExpertRows:
    k = routing.expert_index.shape[1]
    weights = routing.combine_weight.astype(jnp.float32).reshape(-1)
    return ExpertRows(data=x, group_sizes=plan.group_sizes,
                      row_weight=jnp.take(weights, plan.row_slot_all),
                      row_slot=plan.row_slot_all, slots_per_token=k)

  def combine(self, y: jax.Array, plan: DispatchPlan) -> jax.Array:
    num_tokens, k = plan.combine_index.shape
    return jnp.sum(y.reshape(num_tokens, k, -1), axis=1, dtype=jnp.float32).astype(y.dtype)


DISPATCHERS: dict[str, Dispatcher] = {
    d.name: d for d in (Sorted("dropless", "dropless"), Sorted("capacity", "capacity"), Fused())}


def get(name: str) -> Dispatcher:
  if name not in DISPATCHERS:
    raise ConfigError(f"model.moe.dispatch={name!r}; allowed: {list(DISPATCHERS)}")
  return DISPATCHERS[name]
