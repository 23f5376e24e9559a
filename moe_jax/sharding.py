"""Device mesh and logical-axis rules.

The mesh has four named axes, in this order: data, fsdp, expert, tensor.
``config.mesh.shape`` gives each size; exactly one may be -1 (takes the rest).
Logical names on parameters and activations map to mesh axes through
``config.mesh.rules``, a list of (logical name, mesh axis or list of axes or None).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

DEFAULT_RULES = (
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_vocab", "tensor"),
    ("activation_exp_rows", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("expert", "expert"),
    ("router", None),
    ("norm", None),
)


def mesh_shape(shape_cfg: Any, num_devices: int) -> tuple[int, ...]:
  """Resolves the mesh sizes (one may be -1) against the device count."""
  sizes = {axis: int(shape_cfg.get(axis, 1)) for axis in MESH_AXES}
  unknown = set(dict(shape_cfg)) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh.shape has unknown axes {sorted(unknown)}; allowed: {list(MESH_AXES)}")
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"mesh.shape: at most one axis may be -1, got {free}")
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(f"mesh.shape.{axis}={size}; allowed: a positive size or -1")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh.shape: {num_devices} devices are not divisible by the fixed "
                       f"axes' product {fixed}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh.shape {sizes} has {math.prod(sizes.values())} devices, "
                     f"but {num_devices} are available")
  return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(shape_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(shape_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def rules_from(rules_cfg: Any) -> tuple[tuple[str, Any], ...]:
  if rules_cfg is None:
    return DEFAULT_RULES
  out = []
  for name, axes in rules_cfg:
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f"mesh.rules: {name!r} maps to {axis!r}; allowed: {list(MESH_AXES)} "
                         "or None")
    out.append((name, axes))
  return tuple(out)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  spec = nn.logical_to_mesh_axes(("activation_batch", "activation_length"), rules)
  return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
