"""Tile configurations per shape class, and the lookup the Triton kernels use.

A configuration is (tm, tn, tk, num_warps, num_stages, group_m). For ``gmm`` the output
tile is [tm, tn] and tk is the contraction step; for ``tgmm`` the output tile
is [tk, tn] and tm is the row (reduction) step.

Measured entries live in ``tuning_table.json`` next to this module (written by
``python -m tools.autotune_gmm`` on the target GPU, shipped as package data);
shapes not in it fall back to the heuristic below.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import pathlib
from typing import Mapping, Optional

import jax.numpy as jnp

TABLE_FILE = "tuning_table.json"
KEY_FORMAT = "op:dtype:r<rows per group class>:k<K>:n<N>"
VALUE_FORMAT = "[tm, tn, tk, num_warps, num_stages, group_m]; group_m may be left out"


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


def read_table(path) -> dict[str, tuple[int, ...]]:
  """The entries of a table file: key -> (tm, tn, tk, num_warps, num_stages[, group_m])."""
  text = path.read_text() if hasattr(path, "read_text") else pathlib.Path(path).read_text()
  data = json.loads(text)
  return {k: tuple(v) for k, v in data["entries"].items()}


def format_table(entries: Mapping[str, tuple[int, ...]], *, device: str, jax_version: str,
                 date: str) -> str:
  """A table file's text: the measuring run's device, jax and date, then one entry a line."""
  header = {"device": device, "jax": jax_version, "date": date, "key": KEY_FORMAT,
            "value": VALUE_FORMAT, "written_by": "python -m tools.autotune_gmm"}
  lines = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in header.items()]
  body = [f"    {json.dumps(k)}: {json.dumps(list(v))}" for k, v in sorted(entries.items())]
  return "{\n" + "\n".join(lines) + '\n  "entries": {\n' + ",\n".join(body) + "\n  }\n}\n"


@functools.cache
def _packaged_table() -> dict[str, tuple[int, ...]]:
  try:
    return read_table(importlib.resources.files(__package__ or "moe_kernels") / TABLE_FILE)
  except FileNotFoundError:  # an install without the package data: heuristics only
    return {}


def lookup(op: str, m: int, k: int, n: int, num_groups: int, dtype) -> Config:
  entry: Optional[tuple[int, ...]] = _packaged_table().get(key(op, m, k, n, num_groups, dtype))
  if entry is not None:
    return Config(*entry)
  return heuristic(op, m, k, n, num_groups, dtype)
