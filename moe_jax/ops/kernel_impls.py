"""The Pallas kernels of ``moe_kernels`` as grouped-matmul implementations.

- ``pallas_mosaic``: Mosaic GPU gmm/tgmm (persistent, warp-specialized, TMA +
  wgmma); Hopper (compute capability 9.0) and newer. ``auto``'s first choice on
  such GPUs; a product its kernels cannot take (float32, shapes off the tile
  grid) runs on the Triton kernels.
- ``pallas_triton``: Pallas Triton gmm/tgmm; any NVIDIA GPU. ``auto``'s choice
  on GPUs older than Hopper.
- ``pallas_mosaic_bf16x3``: ``pallas_mosaic`` that also runs float32 on the
  Mosaic kernels, as three bfloat16 products of split operands (near-float32
  accuracy on tensor cores). Opt-in.
- ``megablox``: jax's Mosaic TPU gmm/tgmm; ``auto``'s first choice on TPU.
- ``*_interpret``: the same kernels through the Pallas interpreters, on any
  platform, slowly; for tests, never chosen by ``auto``.

The GPU implementations (Mosaic ones included) have fused gather/combine
kernels (``moe_kernels.fused``, Triton); megablox has TPU ones
(``moe_kernels.tpu_fused``) and skips other shards' groups itself for
``group_offset``.
"""
from __future__ import annotations

import functools

from moe_jax.ops import registry
from moe_jax.ops.registry import ANY_PLATFORM, FusedKernels, GmmImpl

try:
  from moe_kernels import fused as _gpu_fused
  from moe_kernels import gmm as _gmm
  from moe_kernels import tpu as _tpu
  from moe_kernels import tpu_fused as _tpu_fused
except ImportError:  # moe_jax without its kernels: the XLA implementations only
  _gmm = None


def _fused(module, interpret: bool) -> FusedKernels:
  def gather(tokens, row_token, row_slot, w, group_sizes, out_dtype):
    return module.gmm_gather(tokens, row_token, w, group_sizes, out_dtype,
                             row_slot=row_slot, interpret=interpret)

  def scatter(x, w, group_sizes, row_slot, row_weight, out_dtype):
    return module.gmm_combine(x, w, group_sizes, row_slot, row_weight, out_dtype,
                              interpret=interpret)
  return FusedKernels(gather, scatter)


def _pallas_gpu(backend: str, interpret: bool):
  return functools.partial(_gmm.gmm, backend=backend, interpret=interpret)


def _megablox(x, w, group_sizes, out_dtype, *, interpret):
  return _tpu.gmm(x, w, group_sizes, out_dtype, interpret=interpret)


def _megablox_local(x, w, group_sizes, group_offset, out_dtype, *, interpret):
  return _tpu.gmm(x, w, group_sizes, out_dtype, group_offset=group_offset,
                  interpret=interpret)


def _megablox_missing():
  return None if _tpu.available() else "jax.experimental.pallas.ops.tpu.megablox is not importable"


def _register() -> None:
  gpu, hopper = ("gpu",), 9.0
  on_cpu = "use '{}_interpret' to run its kernels elsewhere"
  for name, backend, fused in (("pallas_mosaic", "mosaic", True),
                               ("pallas_mosaic_bf16x3", "mosaic_bf16x3", False),
                               ("pallas_triton", "triton", True)):
    cc = hopper if backend.startswith("mosaic") else 0.0
    registry.register(GmmImpl(
        name, _pallas_gpu(backend, False), platforms=gpu, min_compute_capability=cc,
        fused=_fused(_gpu_fused, False) if fused else None, elsewhere=on_cpu.format(name)))
    registry.register(GmmImpl(
        f"{name}_interpret", _pallas_gpu(backend, True),
        fused=_fused(_gpu_fused, True) if fused else None))
  for name, interpret in (("megablox", False), ("megablox_interpret", True)):
    registry.register(GmmImpl(
        name, functools.partial(_megablox, interpret=interpret),
        platforms=ANY_PLATFORM if interpret else ("tpu",),
        fused=_fused(_tpu_fused, interpret), available=_megablox_missing,
        group_offset_fn=functools.partial(_megablox_local, interpret=interpret),
        elsewhere="" if interpret else on_cpu.format("megablox")))


if _gmm is not None:
  _register()
