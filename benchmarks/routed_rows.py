"""Expert-sorted rows of random top-2 routing, and the fused gather / combine kernels on them.

The rows come from the library's own dropless plan (``moe_jax.dispatch.make_plan``),
so the benchmark and the GPU tests lay rows out exactly as the MoE layer does.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.dispatch import make_plan
from moe_jax.routing import Routing
from moe_kernels import fused
from moe_kernels import gmm as gmm_lib

TOP_K = 2


@dataclasses.dataclass(frozen=True)
class RoutedRows:
  """T * k rows sorted by expert, as a dropless plan lays them out."""
  row_token: jax.Array    # int32 [T*k]: the token each row copies
  row_slot: jax.Array     # int32 [T*k]: each row's slot t * k + j (a permutation)
  row_weight: jax.Array   # float32 [T*k]: each row's combine weight
  group_sizes: jax.Array  # int32 [E]: rows per expert

  @property
  def num_tokens(self) -> int:
    return self.row_token.shape[0] // TOP_K


def random_top2_rows(num_tokens: int, num_experts: int, seed: int = 0) -> RoutedRows:
  """Each token routed to two different experts drawn uniformly, random weights."""
  if num_experts < TOP_K:
    raise ValueError(f"top-{TOP_K} routing needs at least {TOP_K} experts, got {num_experts}")
  rng = np.random.default_rng(seed)
  first = rng.integers(num_experts, size=num_tokens)
  second = (first + rng.integers(1, num_experts, size=num_tokens)) % num_experts
  routing = Routing(
      expert_index=jnp.asarray(np.stack([first, second], axis=1), jnp.int32),
      combine_weight=jnp.asarray(rng.random((num_tokens, TOP_K)), jnp.float32),
      mask=jnp.ones((num_tokens, TOP_K), bool),
      router_probs=jnp.full((num_tokens, num_experts), 1.0 / num_experts, jnp.float32),
      max_assignments=num_tokens * TOP_K, nominal_k=float(TOP_K))
  plan = make_plan(routing, "dropless")
  row_weight = routing.combine_weight.reshape(-1)[plan.row_slot_all]
  return RoutedRows(row_token=plan.buffer_token_index, row_slot=plan.row_slot_all,
                    row_weight=row_weight, group_sizes=plan.group_sizes)


def gather_and_combine(rows: RoutedRows, interpret: bool = False) -> dict:
  """name -> f(lhs, w) for the fused kernels and the unfused versions they replace.

  ``gather_*``: (x_tokens[T, K], w[E, K, N]) -> expert rows [T*k, N], the
  dispatch gather fused into the up projection's loads. ``combine_*``:
  (hidden rows [T*k, N], w_down[E, N, K]) -> weighted rows in slot order
  [T*k, K], the combine's weighting and permutation fused into the down
  projection's stores. Unfused: an XLA gather or permutation around ``gmm``.
  """
  gs = rows.group_sizes
  slot_to_row = jnp.argsort(rows.row_slot)

  def combine_unfused(h, w_down):
    y = gmm_lib.gmm(h, w_down, gs, jnp.float32, interpret=interpret)
    return (y * rows.row_weight[:, None]).astype(h.dtype)[slot_to_row]

  return {
      "gather_unfused": lambda x, w: gmm_lib.gmm(x[rows.row_token], w, gs, interpret=interpret),
      "gather_fused": lambda x, w: fused.gmm_gather(x, rows.row_token, w, gs,
                                                    row_slot=rows.row_slot, interpret=interpret),
      "combine_unfused": combine_unfused,
      "combine_fused": lambda h, w_down: fused.gmm_combine(h, w_down, gs, rows.row_slot,
                                                           rows.row_weight, interpret=interpret),
  }
