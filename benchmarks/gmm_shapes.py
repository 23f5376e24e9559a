"""Grouped-matmul shapes, group-size distributions and random inputs of the benchmarks."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# name -> (M rows, K contraction, N output columns, E groups) of x[M, K] @ w[E, K, N].
SHAPES = {
    "llama-ish": (32768, 4096, 3584, 8),
    "fine-768": (65536, 2048, 768, 64),
    "fine-1408": (65536, 2048, 1408, 64),
    "dsv3": (131072, 7168, 2048, 256),
    "decode": (256, 4096, 1024, 64),
    # dsv3 with 128, 256 and 1024 rows a group when balanced (dsv3 has 512): the
    # weight gradient's cost per item against its steps per item.
    "dsv3-r128": (32768, 7168, 2048, 256),
    "dsv3-r256": (65536, 7168, 2048, 256),
    "dsv3-r1024": (262144, 7168, 2048, 256),
    # The whole-layer benchmark's products (gate and up as one [d, 2f] matmul):
    "mixtral-up": (16384, 4096, 14336, 8),
    "mixtral-gate-up": (16384, 4096, 28672, 8),
    "mixtral-down": (16384, 14336, 4096, 8),
    "fine-gate-up": (131072, 2048, 1536, 64),
    "fine-down": (131072, 768, 2048, 64),
    "gpu1b-gate-up": (98304, 1024, 512, 64),   # one layer of configs/gpu_1b.py, top-6
    "gpu1b-down": (98304, 256, 1024, 64),
    "tiny": (200, 64, 96, 4),  # CPU smoke tests with --interpret (off the Mosaic grid)
    "tiny-mosaic": (200, 128, 256, 4),
}
DEFAULT_SHAPES = ("llama-ish", "fine-768", "fine-1408", "dsv3", "decode")
DISTS = ("balanced", "skewed")


def group_sizes(m: int, e: int, dist: str, seed: int = 0) -> np.ndarray:
  """int32 [e] summing to m: equal ("balanced"), or Dirichlet(0.3) ("skewed": a
  few hot groups and some nearly empty, as routers early in training)."""
  if dist == "balanced":
    sizes = np.full(e, m // e)
    sizes[: m - sizes.sum()] += 1
    return sizes.astype(np.int32)
  if dist != "skewed":
    raise ValueError(f"dist={dist!r} is not one of {DISTS}")
  rng = np.random.default_rng(seed)
  p = rng.dirichlet(np.full(e, 0.3))
  sizes = np.floor(p * m).astype(np.int64)
  sizes[np.argmax(sizes)] += m - sizes.sum()
  return sizes.astype(np.int32)


def make_inputs(m: int, k: int, n: int, e: int, dtype, seed: int = 0):
  """Random normal x[m, k], w[e, k, n] (fan-in scaled) and dy[m, n]."""
  kx, kw, kd = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (m, k), dtype)
  w = (jax.random.normal(kw, (e, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
  dy = jax.random.normal(kd, (m, n), dtype)
  return x, w, dy
