"""Stacked expert parameters [E, ...] applied to an expert-grouped buffer.

Every matmul goes through ``grouped_matmul``, so the implementation (XLA
ragged_dot, Pallas kernels, the reference) is a config choice.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from moe_jax.ops.grouped_matmul import grouped_matmul

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": jax.nn.gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation_by_name(name: str, field: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"{field}={name!r}; allowed: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


# grouped_matmul implementations with sibling kernels that gather rows on load and
# write weighted rows to their slots: impl -> (module in moe_kernels, interpret mode).
FUSED_IMPLS = {
    # The fused gather/combine kernels are Triton-backend kernels; the Mosaic
    # impls use them too when fused dispatch is on.
    "pallas_mosaic": ("fused", False),
    "pallas_mosaic_interpret": ("fused", True),
    "pallas_triton": ("fused", False),
    "pallas_triton_interpret": ("fused", True),
    "megablox": ("tpu_fused", False),
    "megablox_interpret": ("tpu_fused", True),
}


@struct.dataclass
class FusedRows:
  """A dropless plan whose R = T*K rows are a permutation of the slots."""
  row_slot: jax.Array            # int32 [R]: slot (t * K + j) of each row
  row_weight: jax.Array          # float32 [R]: combine weight of each row
  slots_per_token: int = struct.field(pytree_node=False, default=1)


@dataclasses.dataclass(frozen=True)
class ExpertKind:
  """A feed-forward expert: which weight stacks it has and how it combines them."""
  weights: tuple[str, ...]     # names of the input-side and output-side [E, ...] stacks
  gated: bool


# SwiGLU keeps its gate and up projections in one stack w_gate_up[E, d, f, 2]
# ([..., 0] gate, [..., 1] up), read as [E, d, 2f] with gate and up columns
# interleaved. One grouped matmul then makes both halves, and in the backward
# one transposed matmul gives the buffer gradient directly, with no separate
# pass adding the gate and up contributions. Interleaving (rather than [gate |
# up]) keeps each gate column next to its up column when "mlp" is sharded.
EXPERT_KINDS = {
    "swiglu": ExpertKind(weights=("w_gate_up", "w_down"), gated=True),
    "mlp": ExpertKind(weights=("w_in", "w_out"), gated=False),
}


def expert_init(in_axis: int = 1, out_axis=2):
  # fan-in scaling per expert: axis 0 indexes experts, not inputs.
  return nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis, batch_axis=(0,))


class Experts(nn.Module):
  """E feed-forward experts over rows grouped by expert (``group_sizes``)."""
  num_experts: int
  d_hidden: int
  kind: str = "swiglu"
  activation: str = "gelu"          # for kind="mlp"; SwiGLU always uses silu
  gmm_impl: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, group_sizes: jax.Array,
               fused: FusedRows | None = None,
               row_weight: jax.Array | None = None) -> jax.Array:
    """x: the expert-grouped buffer [R, d]; or, with ``fused``, the tokens [T, d],
    in which case rows are gathered inside the kernels and the result is the
    combined [T, d] output. ``row_weight`` [R] (float32), if given, scales each
    row's hidden activations before the output projection: since that projection
    is linear (no bias), the output rows come out weighted, in the same pass that
    makes the activations."""
    if self.kind not in EXPERT_KINDS:
      raise ValueError(f"model.moe.expert_kind={self.kind!r}; allowed: {sorted(EXPERT_KINDS)}")
    d_model = x.shape[-1]
    e, f = self.num_experts, self.d_hidden

    def stack(name, shape, axes, out_axis=2):
      init = nn.with_logical_partitioning(expert_init(out_axis=out_axis), axes)
      return self.param(name, init, shape, self.param_dtype).astype(self.dtype)

    if fused is None:
      def first(lhs, w):
        return grouped_matmul(lhs, w, group_sizes, impl=self.gmm_impl)

      def last(hidden, w):
        return grouped_matmul(hidden, w, group_sizes, impl=self.gmm_impl)
    else:
      module, interpret = FUSED_IMPLS[self.gmm_impl]
      fused_kernels = importlib.import_module(f"moe_kernels.{module}")
      k = fused.slots_per_token

      def first(tokens, w):
        return fused_kernels.gmm_gather(tokens, fused.row_slot // k, w, group_sizes,
                                        row_slot=fused.row_slot, interpret=interpret)

      def last(hidden, w):
        slots = fused_kernels.gmm_combine(hidden, w, group_sizes, fused.row_slot,
                                          fused.row_weight.astype(hidden.dtype),
                                          interpret=interpret)
        return jnp.sum(slots.reshape(-1, k, slots.shape[-1]), axis=1,
                       dtype=jnp.float32).astype(hidden.dtype)

    def weighted(hidden):
      if row_weight is None:
        return hidden
      return (hidden.astype(jnp.float32) * row_weight[:, None]).astype(hidden.dtype)

    x = x.astype(self.dtype)
    in_axes, out_axes = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")
    if EXPERT_KINDS[self.kind].gated:
      w_gate_up = stack("w_gate_up", (e, d_model, f, 2), (*in_axes, None), out_axis=(2, 3))
      gate_up = first(x, w_gate_up.reshape(e, d_model, 2 * f)).reshape(-1, f, 2)
      hidden = jax.nn.silu(gate_up[..., 0]) * gate_up[..., 1]
      return last(weighted(hidden), stack("w_down", (e, f, d_model), out_axes))
    act = activation_by_name(self.activation, "model.moe.activation")
    hidden = act(first(x, stack("w_in", (e, d_model, f), in_axes)))
    return last(weighted(hidden), stack("w_out", (e, f, d_model), out_axes))


class DenseMlp(nn.Module):
  """A dense SwiGLU/MLP feed-forward block (dense layers and shared experts)."""
  d_hidden: int
  kind: str = "swiglu"
  activation: str = "gelu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d_model = x.shape[-1]

    def dense(name, features, axes):
      return nn.DenseGeneral(
          features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
          kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
          name=name)

    if self.kind == "swiglu":
      hidden = jax.nn.silu(dense("w_gate", self.d_hidden, ("embed", "mlp"))(x)) * dense(
          "w_up", self.d_hidden, ("embed", "mlp"))(x)
    elif self.kind == "mlp":
      act = activation_by_name(self.activation, "model.activation")
      hidden = act(dense("w_in", self.d_hidden, ("embed", "mlp"))(x))
    else:
      raise ValueError(f"feed-forward kind={self.kind!r}; allowed: {sorted(EXPERT_KINDS)}")
    return dense("w_down" if self.kind == "swiglu" else "w_out", d_model, ("mlp", "embed"))(hidden)
