"""How the benchmark programs time a function: medians of samples, A/B pairs.

A sample queues ``iters`` calls back to back and waits for the last, so host
dispatch overlaps device work as in a training loop; a time is the median over
samples. ``sync`` waits for a call's result: ``jax.block_until_ready`` by
default, ``torch.cuda.synchronize`` for torch programs.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import jax


def _block_until_ready(out: Any) -> None:
  jax.block_until_ready(out)


def median_seconds(fn: Callable, *args, iters: int, reps: int, warm: bool = True,
                   sync: Callable[[Any], None] = _block_until_ready) -> float:
  """Median seconds per call of ``fn(*args)`` over ``reps`` samples of ``iters`` calls."""
  if warm:  # compiles, and the first call's one-off costs stay out of the samples
    sync(fn(*args))
  samples = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    sync(out)
    samples.append((time.perf_counter() - start) / iters)
  return statistics.median(samples)


@dataclasses.dataclass(frozen=True)
class Pair:
  base_seconds: float   # median of the baseline's samples
  seconds: float        # median of the measured function's samples
  ratio: float          # median of the per-pair ratios base / fn: > 1 is faster than base


def paired(base: Callable, base_args: tuple, fn: Callable, args: tuple, *, iters: int,
           reps: int, warm: bool = True,
           sync: Callable[[Any], None] = _block_until_ready) -> Pair:
  """Times ``base`` and ``fn`` in alternating samples, so that clock and
  temperature drift during the run hit both alike. ``warm=False``: both have run
  before (compiled)."""
  if warm:
    sync(base(*base_args))
    sync(fn(*args))
  if fn is base and args is base_args:  # its own baseline
    t = median_seconds(fn, *args, iters=iters, reps=reps, warm=False, sync=sync)
    return Pair(t, t, 1.0)
  base_times, times, ratios = [], [], []
  for _ in range(reps):
    b = median_seconds(base, *base_args, iters=iters, reps=1, warm=False, sync=sync)
    f = median_seconds(fn, *args, iters=iters, reps=1, warm=False, sync=sync)
    base_times.append(b)
    times.append(f)
    ratios.append(b / f)
  return Pair(statistics.median(base_times), statistics.median(times), statistics.median(ratios))


def forward_backward(f: Callable) -> Callable:
  """``(*primals, dy) -> (f(*primals), cotangents of the primals for output cotangent dy)``.

  What a training step needs of a function: its output (for what follows) and
  the gradients. The output is returned so XLA cannot drop the last forward
  product, and ``dy`` is an argument (random, see ``random_cotangent``), not a
  constant, so XLA cannot fold the backward's first products away; timing
  ``jax.grad`` of ``sum(f)`` allows both.
  """
  def step(*primals_and_dy):
    *primals, dy = primals_and_dy
    y, vjp = jax.vjp(f, *primals)
    return y, vjp(dy)
  return step


def random_cotangent(shape, dtype, seed: int = 7) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), shape, dtype)
