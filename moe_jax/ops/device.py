"""What the default device is: its platform and, for NVIDIA GPUs, compute capability."""
from __future__ import annotations

from typing import Optional

import jax


def platform() -> str:
  """"cpu", "gpu" or "tpu": the default backend."""
  return jax.default_backend()


def compute_capability(device: Optional[jax.Device] = None) -> float:
  """An NVIDIA GPU's compute capability (9.0 on Hopper); 0.0 for anything else."""
  try:
    device = device or jax.devices()[0]
  except RuntimeError:
    return 0.0
  if device.platform != "gpu":
    return 0.0
  try:
    return float(getattr(device, "compute_capability", 0) or 0)
  except (TypeError, ValueError):
    return 0.0
