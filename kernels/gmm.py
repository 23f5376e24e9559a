"""Differentiable grouped matmul on the Pallas kernels, with tuned tiles.

``gmm(x, w, group_sizes)`` has a custom VJP: ``dx = gmm(dy, w^T)`` (read
transposed inside the kernel, no copy of w) and ``dw = tgmm(x, dy)``.

``backend`` picks the kernels of the two gmm products: ``"triton"``
(``gmm_triton``, any dtype) or ``"mosaic"`` (``gmm_mosaic``, Hopper, 16-bit
floats, K and N tile multiples; a product it cannot take goes to the Triton
kernel). The weight gradient follows the same rule with ``tgmm_mosaic``.
``"mosaic_bf16x3"`` is ``"mosaic"`` that also takes float32: each float32
operand is split into two bfloat16 pieces, a = hi + lo, and the product is
hi.hi + hi.lo + lo.hi with float32 accumulation on the bfloat16 tensor cores
(the lo.lo term, about 2^-18 of the product, is dropped): near-float32 accuracy
instead of the Triton kernels' exact float32 dots on CUDA cores.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from moe_kernels import gmm_mosaic
from moe_kernels import gmm_triton
from moe_kernels import tgmm_mosaic
from moe_kernels import tuning

BACKENDS = ("triton", "mosaic", "mosaic_bf16x3")


def split_bf16(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """float32 a -> bfloat16 (hi, lo) with hi = a rounded to bfloat16, lo = a - hi rounded.

  hi is rounded on the bits (round to nearest even), not by converting to
  bfloat16 and back: XLA on the GPU may drop a float32 -> bfloat16 -> float32
  round trip, which would make lo zero (seen on an H100: the lo pieces came out zero).
  """
  bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
  bits = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))) & jnp.uint32(0xFFFF0000)
  hi = jax.lax.bitcast_convert_type(bits, jnp.float32)
  return hi.astype(jnp.bfloat16), (a - hi).astype(jnp.bfloat16)


def _bf16x3_fwd(x, w, group_sizes, out_dtype, *, transpose_rhs, interpret):
  # One kernel over a 3x longer contraction: [xh | xh | xl] . [wh ; wl ; wh].
  xh, xl = split_bf16(x)
  wh, wl = split_bf16(w)
  contraction = 2 if transpose_rhs else 1
  x3 = jnp.concatenate([xh, xh, xl], axis=1)
  w3 = jnp.concatenate([wh, wl, wh], axis=contraction)
  return gmm_mosaic.gmm(x3, w3, group_sizes, out_dtype=out_dtype,
                        transpose_rhs=transpose_rhs, interpret=interpret)


def _bf16x3_tgmm(x, dy, group_sizes, out_dtype, *, interpret):
  xh, xl = split_bf16(x)
  dh, dl = split_bf16(dy)
  parts = [tgmm_mosaic.tgmm(a, b, group_sizes, out_dtype=jnp.float32, interpret=interpret)
           for a, b in ((xh, dh), (xh, dl), (xl, dh))]
  return (parts[0] + parts[1] + parts[2]).astype(out_dtype)


def _bf16x3_applies(backend, dtype) -> bool:
  return backend == "mosaic_bf16x3" and jnp.dtype(dtype) == jnp.dtype(jnp.float32)


def fwd_call(x, w, group_sizes, out_dtype, *, transpose_rhs=False, interpret=False,
             config: Optional[tuning.Config] = None, backend: str = "triton", **fused):
  """One gmm product with the tuned tiles for this shape (``fused``: index/scale options)."""
  n = w.shape[1] if transpose_rhs else w.shape[2]
  bf16x3 = _bf16x3_applies(backend, x.dtype)
  kernel_dtype = jnp.bfloat16 if bf16x3 else x.dtype
  if backend != "triton" and not fused and config is None and gmm_mosaic.takes(
      x.shape[0], x.shape[1], n, w.shape[0], kernel_dtype, transpose_rhs=transpose_rhs,
      interpret=interpret):
    if bf16x3:
      return _bf16x3_fwd(x, w, group_sizes, out_dtype, transpose_rhs=transpose_rhs,
                         interpret=interpret)
    return gmm_mosaic.gmm(x, w, group_sizes, out_dtype=out_dtype,
                          transpose_rhs=transpose_rhs, interpret=interpret)
  m = fused["lhs_index"].shape[0] if fused.get("lhs_index") is not None else x.shape[0]
  cfg = config or tuning.lookup("gmm", m, x.shape[1], n, w.shape[0], x.dtype)
  return gmm_triton.gmm(x, w, group_sizes, out_dtype=out_dtype,
                        transpose_rhs=transpose_rhs, tiles=cfg.tiles,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                        group_m=cfg.group_m, interpret=interpret, **fused)


def tgmm_call(x, dy, group_sizes, out_dtype, *, num_rows, interpret=False,
              config: Optional[tuning.Config] = None, backend: str = "triton", **fused):
  bf16x3 = _bf16x3_applies(backend, x.dtype)
  if (backend != "triton" and not fused and config is None and num_rows == x.shape[0]
      and tgmm_mosaic.takes(x.shape[1], dy.shape[1], jnp.bfloat16 if bf16x3 else x.dtype,
                            interpret=interpret)):
    if bf16x3:
      return _bf16x3_tgmm(x, dy, group_sizes, out_dtype, interpret=interpret)
    return tgmm_mosaic.tgmm(x, dy, group_sizes, out_dtype=out_dtype, interpret=interpret)
  cfg = config or tuning.lookup("tgmm", num_rows, x.shape[1], dy.shape[1],
                                group_sizes.shape[0], x.dtype)
  return gmm_triton.tgmm(x, dy, group_sizes, out_dtype=out_dtype, num_rows=num_rows,
                         tiles=cfg.tiles, num_warps=cfg.num_warps,
                         num_stages=cfg.num_stages, interpret=interpret, **fused)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gmm(x, w, group_sizes, out_dtype, interpret, configs, backend):
  return fwd_call(x, w, group_sizes, out_dtype, interpret=interpret, config=configs[0],
                  backend=backend)


def _gmm_fwd(x, w, group_sizes, out_dtype, interpret, configs, backend):
  return (_gmm(x, w, group_sizes, out_dtype, interpret, configs, backend),
          (x, w, group_sizes))


def _gmm_bwd(out_dtype, interpret, configs, backend, res, dy):
  del out_dtype
  x, w, group_sizes = res
  dy = dy.astype(x.dtype)
  dx = fwd_call(dy, w, group_sizes, x.dtype, transpose_rhs=True, interpret=interpret,
                config=configs[1], backend=backend)
  dw = tgmm_call(x, dy, group_sizes, w.dtype, num_rows=x.shape[0], interpret=interpret,
                 config=configs[2], backend=backend)
  return dx, dw, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
        out_dtype: Optional[jnp.dtype] = None, *, interpret: bool = False,
        configs: tuple[Optional[tuning.Config], ...] = (None, None, None),
        backend: str = "triton") -> jax.Array:
  """x[M, K] @ w[E, K, N] by contiguous row groups -> [M, N] (zeros past the groups).

  ``configs`` overrides the tuned Triton tiles of (forward gmm, input-gradient
  gmm, tgmm); an overridden product runs on the Triton kernel.
  """
  if x.dtype != w.dtype:
    raise ValueError(f"gmm wants x and w of one dtype; got {x.dtype} and {w.dtype}")
  if backend not in BACKENDS:
    raise ValueError(f"gmm backend={backend!r}; choose one of {BACKENDS}")
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  return _gmm(x, w, group_sizes.astype(jnp.int32), out_dtype, interpret, tuple(configs),
              backend)
