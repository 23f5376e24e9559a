"""TPU grouped matmul through jax's megablox kernels (Mosaic TPU).

No TPU was available to time our own TPU kernels, so ``impl="auto"`` on TPU
uses jax's megablox gmm/tgmm (their custom VJP included). Row count is padded
to the row tile so any M works; rows past sum(group_sizes) come back zero.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def available() -> bool:
  try:
    from jax.experimental.pallas.ops.tpu import megablox  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def _tiling(m: int, k: int, n: int, dtype) -> tuple[int, int, int]:
  # TPU tiles: rows a multiple of the sublane packing (8 f32, 16 bf16),
  # K and N in lanes of 128; 512-wide K/N tiles keep the MXU busy.
  sub = 16 if jnp.dtype(dtype).itemsize == 2 else 8
  tm = min(512, -(-m // sub) * sub)
  tk = min(512, -(-k // 128) * 128)
  tn = min(1024, -(-n // 128) * 128)
  return tm, tk, tn


def gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
        out_dtype: Optional[jnp.dtype] = None, *, group_offset: Optional[jax.Array] = None,
        interpret: bool = False) -> jax.Array:
  """``group_offset``: w holds groups [offset, offset + len(w)) of ``group_sizes``;
  rows of other groups come out zero (megablox skips them)."""
  from jax.experimental.pallas.ops.tpu.megablox import ops  # pylint: disable=g-import-not-at-top
  m, k = x.shape
  n = w.shape[2]
  tiling = _tiling(m, k, n, x.dtype)
  pad = -m % tiling[0]
  xp = jnp.pad(x, ((0, pad), (0, 0))) if pad else x
  offset = None if group_offset is None else jnp.asarray(group_offset, jnp.int32).reshape(())
  y = ops.gmm(xp, w, group_sizes.astype(jnp.int32), jnp.float32, tiling,
              offset, None, False, interpret)
  y = y[:m]
  valid = jnp.arange(m) < jnp.sum(group_sizes)
  return jnp.where(valid[:, None], y, 0.0).astype(out_dtype or x.dtype)
