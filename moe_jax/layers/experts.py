"""Stacked expert parameters [E, ...] applied to expert-grouped rows.

``Experts`` takes ``ExpertRows`` from a dispatcher and returns each row's
weighted expert output; every matmul goes through the grouped-matmul op, so
the implementation (XLA ragged_dot, Pallas kernels, the reference) is a
config choice. ``expert_ffn`` is the same computation as a pure function of
the weights, for callers that hold the weights themselves (e.g. inside a
``shard_map`` over the expert axis).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.dispatch import ExpertRows

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": jax.nn.gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class ExpertKind:
  """A feed-forward expert: its input-side and output-side weight stacks."""
  weights: tuple[str, str]
  gated: bool


# SwiGLU keeps its gate and up projections in one stack w_gate_up[E, d, f, 2]
# ([..., 0] gate, [..., 1] up), read as [E, d, 2f] with gate and up columns
# interleaved. One grouped matmul then makes both halves, and in the backward
# one transposed matmul gives the rows' gradient directly, with no separate
# pass adding the gate and up contributions. Interleaving (rather than [gate |
# up]) keeps each gate column next to its up column when "mlp" is sharded.
EXPERT_KINDS = {
    "swiglu": ExpertKind(weights=("w_gate_up", "w_down"), gated=True),
    "mlp": ExpertKind(weights=("w_in", "w_out"), gated=False),
}


def expert_ffn(weights: Mapping[str, jax.Array], rows: ExpertRows, *, kind: str,
               activation: str, impl: str) -> jax.Array:
  """Each row through its expert, scaled by its combine weight (see ExpertRows)."""
  w_in, w_out = (weights[n] for n in EXPERT_KINDS[kind].weights)
  if EXPERT_KINDS[kind].gated:
    e, d, f, _ = w_in.shape
    gate_up = rows.matmul_in(w_in.reshape(e, d, 2 * f), impl).reshape(-1, f, 2)
    hidden = jax.nn.silu(gate_up[..., 0]) * gate_up[..., 1]
  else:
    hidden = ACTIVATIONS[activation](rows.matmul_in(w_in, impl))
  return rows.matmul_out(hidden, w_out, impl)


def expert_init(out_axis=2):
  # fan-in scaling per expert: axis 0 indexes experts, not inputs.
  return nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=1, out_axis=out_axis, batch_axis=(0,))


class Experts(nn.Module):
  """E feed-forward experts of hidden width ``d_hidden`` over ``ExpertRows``."""
  num_experts: int
  d_hidden: int
  kind: str = "swiglu"
  activation: str = "gelu"          # for kind="mlp"; SwiGLU always uses silu
  gmm_impl: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, rows: ExpertRows) -> jax.Array:
    d_model = rows.data.shape[-1]
    e, f = self.num_experts, self.d_hidden

    def stack(name, shape, axes, out_axis=2):
      init = nn.with_logical_partitioning(expert_init(out_axis=out_axis), axes)
      return self.param(name, init, shape, self.param_dtype).astype(self.dtype)

    in_axes, out_axes = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")
    w_in, w_out = EXPERT_KINDS[self.kind].weights
    if EXPERT_KINDS[self.kind].gated:
      first = stack(w_in, (e, d_model, f, 2), (*in_axes, None), out_axis=(2, 3))
    else:
      first = stack(w_in, (e, d_model, f), in_axes)
    weights = {w_in: first, w_out: stack(w_out, (e, f, d_model), out_axes)}
    rows = rows.replace(data=rows.data.astype(self.dtype))
    return expert_ffn(weights, rows, kind=self.kind, activation=self.activation,
                      impl=self.gmm_impl)


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

    if EXPERT_KINDS[self.kind].gated:
      hidden = jax.nn.silu(dense("w_gate", self.d_hidden, ("embed", "mlp"))(x)) * dense(
          "w_up", self.d_hidden, ("embed", "mlp"))(x)
      return dense("w_down", d_model, ("mlp", "embed"))(hidden)
    hidden = ACTIVATIONS[self.activation](dense("w_in", self.d_hidden, ("embed", "mlp"))(x))
    return dense("w_out", d_model, ("mlp", "embed"))(hidden)
