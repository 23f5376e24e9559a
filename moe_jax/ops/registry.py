"""Grouped-matmul implementations by name, with what each can do.

Each ``GmmImpl`` states its capabilities: the platforms and dtypes it runs on,
the GPU generation it needs, whether it has kernels that gather rows on load
and write rows to slots (``fused``, for fused dispatch), and whether it takes
``group_offset`` natively. ``resolve(name, dtype)`` returns the implementation
or raises naming the field and the reason before any compute; ``"auto"`` takes
the first implementation in ``AUTO_ORDER`` for the platform that can run.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax.numpy as jnp

from moe_jax.config_fields import ConfigError
from moe_jax.ops import device

FLOAT_DTYPES = ("bfloat16", "float16", "float32")
ANY_PLATFORM = ("cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class FusedKernels:
  """Grouped matmuls fused with dispatch and combine.

  gather(tokens[T, K], row_token[R], row_slot[R], w[E, K, N], group_sizes, out_dtype)
      = grouped_matmul(tokens[row_token], w, group_sizes), rows gathered on load;
      row_slot (slot t * k + j of each row, a permutation) lets the backward write
      each row's input gradient to its slot instead of scatter-adding.
  scatter(x[R, K], w, group_sizes, row_slot[R], row_weight[R], out_dtype)
      = rows of row_weight * (x @ w[group]) written to their slots: out[row_slot[r]].
  """
  gather: Callable
  scatter: Callable


@dataclasses.dataclass(frozen=True)
class GmmImpl:
  name: str
  fn: Callable                      # fn(x, w, group_sizes, out_dtype) -> [M, N]
  platforms: tuple[str, ...] = ANY_PLATFORM
  dtypes: tuple[str, ...] = FLOAT_DTYPES
  min_compute_capability: float = 0.0   # on GPUs
  fused: Optional[FusedKernels] = None
  # fn(x, w_local, group_sizes, group_offset, out_dtype) that skips other groups' rows
  # itself; without it grouped_matmul moves the local groups' rows to the front.
  group_offset_fn: Optional[Callable] = None
  available: Callable[[], Optional[str]] = lambda: None   # None, or why it cannot load
  elsewhere: str = ""               # what to use where this cannot run

  def unsupported_reason(self, dtype, platform: Optional[str] = None) -> Optional[str]:
    """None if this implementation runs on ``platform`` (default: here) for ``dtype``."""
    platform = platform or device.platform()
    if reason := self.available():
      return reason
    if platform not in self.platforms:
      hint = f"; {self.elsewhere}" if self.elsewhere else ""
      return f"runs on {'/'.join(self.platforms)}, this is {platform!r}{hint}"
    if platform == "gpu" and self.min_compute_capability:
      cc = device.compute_capability()
      if cc < self.min_compute_capability:
        return (f"needs GPU compute capability {self.min_compute_capability} or newer, "
                f"this GPU has {cc}")
    if jnp.dtype(dtype).name not in self.dtypes:
      return f"takes {'/'.join(self.dtypes)}, got {jnp.dtype(dtype).name}"
    return None


_IMPLS: dict[str, GmmImpl] = {}
# impl="auto": the first of these that can run on the platform.
AUTO_ORDER = {
    "gpu": ("pallas_mosaic", "pallas_triton", "ragged_dot"),
    "tpu": ("megablox", "ragged_dot"),
    "cpu": ("ragged_dot",),
}


def register(impl: GmmImpl) -> GmmImpl:
  if impl.name in _IMPLS or impl.name == "auto":
    raise ValueError(f"grouped_matmul impl {impl.name!r} is already registered")
  _IMPLS[impl.name] = impl
  return impl


def get(name: str) -> GmmImpl:
  if name not in _IMPLS:
    raise ConfigError(f"grouped_matmul impl={name!r} is unknown; known: {known()}")
  return _IMPLS[name]


def known() -> list[str]:
  return sorted(["auto", *_IMPLS])


def with_fused() -> list[str]:
  return sorted(n for n, i in _IMPLS.items() if i.fused is not None)


def resolve(name: str, dtype, *, field: str = "model.moe.gmm_impl") -> GmmImpl:
  """The implementation ``name`` names for ``dtype`` here; raises ConfigError if none."""
  platform = device.platform()
  if name == "auto":
    for candidate in AUTO_ORDER.get(platform, ()) + ("ragged_dot",):
      impl = _IMPLS.get(candidate)
      if impl is not None and impl.unsupported_reason(dtype, platform) is None:
        return impl
    return _IMPLS["reference"]
  if name not in _IMPLS:
    raise ConfigError(f"{field}={name!r} is not a grouped_matmul implementation; "
                      f"known: {known()}")
  impl = _IMPLS[name]
  reason = impl.unsupported_reason(dtype, platform)
  if reason is not None:
    raise ConfigError(f"{field}={name!r} cannot run here: {reason}")
  return impl
