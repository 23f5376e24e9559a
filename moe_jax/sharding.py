"""Device mesh and logical-axis rules.

The mesh has four named axes, in this order: data, fsdp, expert, tensor.
``config.mesh.shape`` gives each size; at most one may be -1 (takes the rest).
Logical names on parameters and activations map to mesh axes through
``config.mesh.rules``, a list of (logical name, mesh axis or list of axes or None).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moe_jax.config_fields import Checked, ConfigError, FieldError, as_dict, require

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

# Every logical name the layers give a parameter or an activation.
LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES)


@dataclasses.dataclass(frozen=True)
class MeshShape(Checked):
  """``config.mesh.shape``: devices along each mesh axis; -1 takes the rest."""
  data: int = -1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1

  def validate(self) -> None:
    super().validate()
    for axis in MESH_AXES:
      size = getattr(self, axis)
      require(size >= 1 or size == -1, axis, size, "a positive size or -1")
    free = [a for a in MESH_AXES if getattr(self, a) == -1]
    require(len(free) <= 1, free[-1] if free else "data", -1,
            f"at most one axis of -1; got {free}")


@dataclasses.dataclass(frozen=True)
class MeshConfig(Checked):
  """``config.mesh``."""
  shape: MeshShape = dataclasses.field(default_factory=MeshShape)
  rules: tuple = DEFAULT_RULES

  def validate(self) -> None:
    super().validate()
    rules_from(self.rules)


def mesh_shape(shape_cfg: Any, num_devices: int) -> tuple[int, ...]:
  """Resolves the mesh sizes (one may be -1) against the device count."""
  values = as_dict(shape_cfg)
  unknown = set(values) - set(MESH_AXES)
  if unknown:
    raise ConfigError(f"mesh.shape has unknown axes {sorted(unknown)}; "
                      f"allowed: {list(MESH_AXES)}")
  try:
    shape = MeshShape(**values)
  except FieldError as e:
    raise e.at("mesh.shape") from None
  sizes = {axis: getattr(shape, axis) for axis in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(f"mesh.shape: {num_devices} devices are not divisible by the fixed "
                       f"axes' product {fixed}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(f"mesh.shape {sizes} has {math.prod(sizes.values())} devices, "
                     f"but {num_devices} are available")
  return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(shape_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(shape_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def rules_from(rules_cfg: Any) -> tuple[tuple[str, Any], ...]:
  """The rules as tuples; raises ConfigError for a malformed rule, a logical name
  the model does not use (a typo would silently leave its dimension unsharded)
  or a mesh axis that does not exist or repeats within a rule."""
  if rules_cfg is None:
    return DEFAULT_RULES
  if not isinstance(rules_cfg, (list, tuple)):
    raise ConfigError(f"mesh.rules={rules_cfg!r}; allowed: a list of (logical name, mesh axes) "
                      "pairs")
  out = []
  for rule in rules_cfg:
    if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ConfigError(f"mesh.rules: {rule!r} is not a rule; allowed: a pair (logical name, "
                        "mesh axis or list of mesh axes or None)")
    name, axes = rule
    if name not in LOGICAL_AXES:
      raise ConfigError(f"mesh.rules: logical name {name!r} is not used by the model; "
                        f"allowed: {list(LOGICAL_AXES)}")
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ConfigError(f"mesh.rules: {name!r} maps to {axis!r}; allowed: {list(MESH_AXES)} "
                         "or None")
    if isinstance(axes, tuple) and len(set(axes)) != len(axes):
      raise ConfigError(f"mesh.rules: {name!r} maps to {list(axes)}; allowed: each mesh axis "
                        "at most once")
    out.append((name, axes))
  return tuple(out)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  spec = nn.logical_to_mesh_axes(("activation_batch", "activation_length"), rules)
  return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
