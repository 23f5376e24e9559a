"""moe_kernels: Pallas kernels for expert compute (installed from kernels/).

Importing this package registers grouped-matmul implementations with
``moe_jax.ops.grouped_matmul``:

- ``pallas_mosaic``: Pallas Mosaic GPU gmm (persistent, warp-specialized, TMA +
  wgmma) for the forward and input-gradient products and Mosaic GPU tgmm for the
  weight gradient; Hopper (sm_90) and newer, 16-bit floats. First choice of
  ``impl="auto"`` on such GPUs; other shapes/dtypes fall back per product to
  the Triton kernels.
- ``pallas_mosaic_interpret``: the same through the Mosaic GPU and Triton
  interpreters (CPU tests).
- ``pallas_mosaic_bf16x3`` (and ``..._interpret``): ``pallas_mosaic`` that also runs
  float32 on the Mosaic kernels, as three bfloat16 products of split operands
  (near-float32 accuracy on tensor cores; ``pallas_mosaic`` sends float32 to the
  Triton kernels' exact float32 dots). Opt-in, never chosen by ``auto``.
- ``pallas_triton``: Pallas (Triton backend) gmm/tgmm with a custom VJP; GPU only,
  ``impl="auto"``'s choice on GPUs older than Hopper.
- ``pallas_triton_interpret``: the same kernels through the Pallas interpreter;
  runs anywhere, slowly. For tests; never chosen by ``auto``.
- ``megablox``: jax's Mosaic TPU gmm/tgmm; TPU only, first choice on TPU.

Modules: ``gmm`` (differentiable gmm with tuned tiles), ``gmm_mosaic`` and
``tgmm_mosaic`` (the Mosaic GPU kernels), ``gmm_triton`` (the
kernels: gmm, tgmm, with gather/scatter/scale options), ``fused``
(``gmm_gather`` for dispatch, ``gmm_combine`` for the weighted combine, each
with its VJP), ``schedule`` (row-tile schedule), ``tuning`` / ``tuning_table``
(tiles per shape; ``python -m experiments.benchmark_gmm --autotune`` rewrites
the table), ``tpu`` (megablox wrapper). Benchmarks: docs/benchmarks.md.
"""
from __future__ import annotations

import jax.numpy as jnp

from moe_kernels import gmm as _gmm_lib
from moe_kernels import tpu as _tpu

_FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def _dtype_reason(x, w):
  if x.dtype != w.dtype:
    return f"x and w must share a dtype (got {x.dtype} and {w.dtype})"
  if jnp.dtype(x.dtype) not in _FLOAT_DTYPES:
    return f"dtype {x.dtype} is not one of bfloat16, float16, float32"
  return None


def _triton_reason(x, w, platform):
  if platform != "gpu":
    return (f"needs a GPU (Pallas Triton backend), running on {platform!r}; "
            "use 'pallas_triton_interpret' to run the kernels on CPU")
  return _dtype_reason(x, w)


def _compute_capability() -> float:
  try:
    import jax  # pylint: disable=g-import-not-at-top
    return float(getattr(jax.devices()[0], "compute_capability", 0) or 0)
  except (RuntimeError, ValueError):
    return 0.0


def _mosaic_reason(x, w, platform):
  if platform != "gpu":
    return (f"needs an NVIDIA GPU of compute capability 9.0 or newer (Mosaic GPU), running "
            f"on {platform!r}; use 'pallas_mosaic_interpret' to run the kernels on CPU")
  cc = _compute_capability()
  if cc < 9.0:
    return f"needs compute capability 9.0 or newer (wgmma/TMA), this GPU has {cc}"
  return _dtype_reason(x, w)


def _interpret_reason(x, w, platform):
  del platform
  return _dtype_reason(x, w)


def _megablox_reason(x, w, platform):
  if platform != "tpu":
    return f"needs a TPU (megablox is a Mosaic TPU kernel), running on {platform!r}"
  if not _tpu.available():
    return "jax.experimental.pallas.ops.tpu.megablox is not importable"
  return _dtype_reason(x, w)


def _register():
  try:
    from moe_jax.ops import grouped_matmul as op  # pylint: disable=g-import-not-at-top
  except ImportError:  # kernels used without moe_jax
    return
  op.register_impl(op.GmmImpl(
      "pallas_triton",
      lambda x, w, gs, dt: _gmm_lib.gmm(x, w, gs, dt), _triton_reason),
      prefer_on=("gpu",))
  # Registered after pallas_triton so that it comes first in the GPU order;
  # on a GPU without sm_90 its reason makes auto move on to pallas_triton.
  op.register_impl(op.GmmImpl(
      "pallas_mosaic",
      lambda x, w, gs, dt: _gmm_lib.gmm(x, w, gs, dt, backend="mosaic"), _mosaic_reason),
      prefer_on=("gpu",))
  op.register_impl(op.GmmImpl(
      "pallas_mosaic_interpret",
      lambda x, w, gs, dt: _gmm_lib.gmm(x, w, gs, dt, backend="mosaic", interpret=True),
      _interpret_reason))
  op.register_impl(op.GmmImpl(
      "pallas_mosaic_bf16x3",
      lambda x, w, gs, dt: _gmm_lib.gmm(x, w, gs, dt, backend="mosaic_bf16x3"),
      _mosaic_reason))
  op.register_impl(op.GmmImpl(
      "pallas_mosaic_bf16x3_interpret",
      lambda x, w, gs, dt: _gmm_lib.gmm(x, w, gs, dt, backend="mosaic_bf16x3",
                                        interpret=True),
      _interpret_reason))
  op.register_impl(op.GmmImpl(
      "pallas_triton_interpret",
      lambda x, w, gs, dt: _gmm_lib.gmm(x, w, gs, dt, interpret=True),
      _interpret_reason))
  op.register_impl(op.GmmImpl(
      "megablox", lambda x, w, gs, dt: _tpu.gmm(x, w, gs, dt), _megablox_reason),
      prefer_on=("tpu",))
  op.register_impl(op.GmmImpl(
      "megablox_interpret", lambda x, w, gs, dt: _tpu.gmm(x, w, gs, dt, interpret=True),
      lambda x, w, platform: ("jax.experimental.pallas.ops.tpu.megablox is not importable"
                              if not _tpu.available() else _dtype_reason(x, w))))


_register()
