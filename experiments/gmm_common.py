"""Shapes, group sizes, inputs and timing shared by the grouped-matmul benchmarks."""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

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
    "tiny": (200, 64, 96, 4),  # CPU smoke tests with --interpret (off the Mosaic grid)
    "tiny-mosaic": (200, 128, 256, 4),
}


def group_sizes(m: int, e: int, dist: str, seed: int = 0) -> np.ndarray:
  if dist == "balanced":
    sizes = np.full(e, m // e)
    sizes[: m - sizes.sum()] += 1
    return sizes.astype(np.int32)
  rng = np.random.default_rng(seed)
  # Dirichlet(0.3): a few hot experts, some nearly empty (as routers early in training).
  p = rng.dirichlet(np.full(e, 0.3))
  sizes = np.floor(p * m).astype(np.int64)
  sizes[np.argmax(sizes)] += m - sizes.sum()
  return sizes.astype(np.int32)


def bench(fn, *args, iters: int, reps: int, warm: bool = True) -> float:
  """Median seconds per call; calls queued back to back, one sync per sample."""
  if warm:
    jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / iters)
  return statistics.median(samples)


def make_inputs(m, k, n, e, dtype, seed=0):
  kx, kw, kd = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(kx, (m, k), dtype)
  w = (jax.random.normal(kw, (e, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
  dy = jax.random.normal(kd, (m, n), dtype)
  return x, w, dy


def rel_err(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
