"""The router projection: float32 x [T, d] @ float32 w [d, E] -> float32 logits [T, E].

``logits_precision`` (a field of every logit router's config) picks how:

  "float32"   float32 accuracy (router stability is sensitive to logit precision,
              ST-MoE). On GPUs with bfloat16 tensor cores (compute capability 8.0+)
              as six bfloat16 passes (each operand split in three bfloat16 pieces,
              the smallest cross terms dropped): float32 accuracy at about 0.7 of
              the time of a true-float32 matmul, which runs on CUDA cores (measured
              on an H100). Elsewhere precision HIGHEST: TPUs already run it as six
              bfloat16 passes, CPUs in float32.
  "bfloat16"  both operands rounded to bfloat16, float32 accumulation: a speed option.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.ops import device

FLOAT32_ROUTER_ALGORITHM = jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6


def float32_router_precision(dev: Optional[jax.Device] = None):
  """The matmul precision of "float32" router logits on ``dev`` (default: the first device)."""
  if device.compute_capability(dev) >= 8.0:
    return FLOAT32_ROUTER_ALGORITHM
  return jax.lax.Precision.HIGHEST


def _float32(x: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.dot(x.astype(jnp.float32), w, precision=float32_router_precision(),
                 preferred_element_type=jnp.float32)


def _bfloat16(x: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                 preferred_element_type=jnp.float32)


PROJECTIONS = {"float32": _float32, "bfloat16": _bfloat16}
PRECISIONS = tuple(PROJECTIONS)


def router_logits(x: jax.Array, w: jax.Array, precision: str) -> jax.Array:
  return PROJECTIONS[precision](x, w)
