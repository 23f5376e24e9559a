"""One grouped-matmul op with implementations chosen by name or by backend.

``grouped_matmul(x[M, K], w[E, K, N], group_sizes[E])`` multiplies the rows of
``x`` that belong to group ``e`` (rows are contiguous, group after group) by
``w[e]``. Rows past ``sum(group_sizes)`` produce zeros. Accumulation is in
float32; the result has ``x.dtype`` unless ``preferred_element_type`` is set.

Implementations register themselves with ``register_impl``; ``impl="auto"``
takes the first one in the backend's preference order whose ``supports``
check passes. A named implementation that cannot run raises ``ValueError``
with the reason, before any compute.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

GmmFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class GmmImpl:
  name: str
  fn: GmmFn  # fn(x, w, group_sizes, preferred_element_type) -> [M, N]
  # Returns None when the implementation can run here, else the reason.
  unsupported_reason: Callable[[jax.Array, jax.Array, str], Optional[str]]


_IMPLS: dict[str, GmmImpl] = {}
# Preference order for impl="auto", per backend platform. Kernel packages
# insert their implementations at the front when they are imported.
AUTO_ORDER: dict[str, list[str]] = {
    "gpu": ["ragged_dot"],
    "tpu": ["ragged_dot"],
    "cpu": ["ragged_dot"],
}


def register_impl(impl: GmmImpl, *, prefer_on: tuple[str, ...] = ()) -> None:
  _IMPLS[impl.name] = impl
  for platform in prefer_on:
    order = AUTO_ORDER.setdefault(platform, [])
    if impl.name in order:
      order.remove(impl.name)
    order.insert(0, impl.name)


def known_impls() -> list[str]:
  _load_kernel_impls()
  return sorted(["auto", *_IMPLS])


def _load_kernel_impls() -> None:
  try:
    import moe_kernels  # noqa: F401  pylint: disable=g-import-not-at-top
  except ImportError:
    pass


def _platform() -> str:
  return jax.default_backend()


def resolve_impl(impl: str, x: jax.Array, w: jax.Array) -> GmmImpl:
  """Picks the implementation, or raises naming the field and the choices."""
  _load_kernel_impls()
  platform = _platform()
  if impl == "auto":
    for name in AUTO_ORDER.get(platform, []) + ["ragged_dot"]:
      cand = _IMPLS.get(name)
      if cand is not None and cand.unsupported_reason(x, w, platform) is None:
        return cand
    return _IMPLS["reference"]
  if impl not in _IMPLS:
    raise ValueError(
        f"grouped_matmul impl={impl!r} is unknown; known: {known_impls()}")
  chosen = _IMPLS[impl]
  reason = chosen.unsupported_reason(x, w, platform)
  if reason is not None:
    raise ValueError(f"grouped_matmul impl={impl!r} cannot run here: {reason}")
  return chosen


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                   impl: str = "auto",
                   preferred_element_type: Optional[jnp.dtype] = None) -> jax.Array:
  if x.ndim != 2 or w.ndim != 3:
    raise ValueError(f"grouped_matmul wants x[M, K] and w[E, K, N]; got {x.shape}, {w.shape}")
  if x.shape[1] != w.shape[1]:
    raise ValueError(f"grouped_matmul: x has K={x.shape[1]} but w has K={w.shape[1]}")
  if group_sizes.shape != (w.shape[0],):
    raise ValueError(
        f"grouped_matmul: group_sizes has shape {group_sizes.shape}, want ({w.shape[0]},)")
  out_dtype = preferred_element_type or x.dtype
  chosen = resolve_impl(impl, x, w)
  return chosen.fn(x, w, group_sizes.astype(jnp.int32), out_dtype)


def _row_groups(group_sizes: jax.Array, num_rows: int) -> jax.Array:
  """Group id of each row; rows past the last group get id E (no group)."""
  ends = jnp.cumsum(group_sizes)
  return jnp.searchsorted(ends, jnp.arange(num_rows, dtype=ends.dtype), side="right")


def _reference(x, w, group_sizes, out_dtype):
  """Loop over groups with dense matmuls: slow, simple, the oracle."""
  row_group = _row_groups(group_sizes, x.shape[0])
  out = jnp.zeros((x.shape[0], w.shape[2]), jnp.float32)
  for e in range(w.shape[0]):
    ye = jnp.dot(x, w[e], preferred_element_type=jnp.float32)
    out = out + jnp.where((row_group == e)[:, None], ye, 0.0)
  return out.astype(out_dtype)


def _ragged_dot(x, w, group_sizes, out_dtype):
  y = jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)
  # ragged_dot leaves rows past sum(group_sizes) unspecified on some backends.
  valid = jnp.arange(x.shape[0]) < jnp.sum(group_sizes)
  return jnp.where(valid[:, None], y, 0.0).astype(out_dtype)


register_impl(GmmImpl("reference", _reference, lambda x, w, p: None))
register_impl(GmmImpl("ragged_dot", _ragged_dot, lambda x, w, p: None))
