"""Tile configurations per shape class, and the lookup the kernels use.

A configuration is (tm, tn, tk, num_warps, num_stages, group_m). For ``gmm`` the output
tile is [tm, tn] and tk is the contraction step; for ``tgmm`` the output tile
is [tk, tn] and tm is the row (reduction) step.

Measured entries live in ``tuning_table.TABLE`` (written by
``python -m experiments.benchmark_gmm --autotune`` on the target GPU); shapes
not in it fall back to the heuristic below.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Config:
  tm: int
  tn: int
  tk: int
  num_warps: int = 4
  num_stages: int = 3
  group_m: int = 8  # gmm only: row tiles per L2 swizzle group

  @property
  def tiles(self):
    return (self.tm, self.tn, self.tk)

  def as_tuple(self):
    return (self.tm, self.tn, self.tk, self.num_warps, self.num_stages, self.group_m)


def rows_class(m: int, num_groups: int) -> int:
  """Average rows per group, rounded up to a power of two and capped at 1024."""
  avg = max(1, m // max(1, num_groups))
  p = 1
  while p < avg and p < 1024:
    p *= 2
  return p


def key(op: str, m: int, k: int, n: int, num_groups: int, dtype) -> str:
  return f"{op}:{jnp.dtype(dtype).name}:r{rows_class(m, num_groups)}:k{k}:n{n}"


def heuristic(op: str, m: int, k: int, n: int, num_groups: int, dtype) -> Config:
  if jnp.dtype(dtype).itemsize >= 4:  # exact float32 dots: small tiles
    return Config(64, 64, 32, 4, 2)
  rows = rows_class(m, num_groups)
  if op == "tgmm":
    return Config(64, 128, 128, 8, 3) if rows >= 64 else Config(32, 128, 64, 4, 3)
  if rows < 64:  # decode-like: groups of a few rows, weight loads dominate
    return Config(64, 128, 64, 4, 4)
  return Config(128, 256, 64, 8, 3)


def lookup(op: str, m: int, k: int, n: int, num_groups: int, dtype) -> Config:
  try:
    from moe_kernels import tuning_table  # pylint: disable=g-import-not-at-top
    entry = tuning_table.TABLE.get(key(op, m, k, n, num_groups, dtype))
  except ImportError:
    entry = None
  if entry is not None:
    return Config(*entry)
  return heuristic(op, m, k, n, num_groups, dtype)
