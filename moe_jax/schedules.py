"""Temperature schedules for the dense-to-sparse gates.

Both schedules anneal from ``tau_max`` at step 0 to ``tau_min`` at
``anneal_steps`` and stay there. They take the step as a traced int array so
they work inside ``jit``; the config is static.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing import RouterConfig

SCHEDULES = ("linear", "exponential")


def validate(cfg: RouterConfig) -> None:
  """Raises ValueError naming the config field that makes no schedule."""
  if cfg.tau_schedule not in SCHEDULES:
    raise ValueError(
        f"model.moe.router.tau_schedule={cfg.tau_schedule!r} is not a known "
        f"temperature schedule; allowed: {list(SCHEDULES)}")
  if not cfg.tau_max > 0:
    raise ValueError(f"model.moe.router.tau_max must be > 0, got {cfg.tau_max}")
  if not cfg.tau_min > 0:
    raise ValueError(f"model.moe.router.tau_min must be > 0, got {cfg.tau_min}")
  if cfg.anneal_steps < 0:
    raise ValueError(
        f"model.moe.router.anneal_steps must be >= 0, got {cfg.anneal_steps}")


def _progress(step: jax.Array, anneal_steps: int) -> jax.Array:
  """min(step / anneal_steps, 1) as float32; 1 when anneal_steps is 0."""
  step = jnp.asarray(step, jnp.float32)
  if anneal_steps <= 0:
    return jnp.ones_like(step)
  return jnp.clip(step / anneal_steps, 0.0, 1.0)


def temperature(step: jax.Array, cfg: RouterConfig) -> jax.Array:
  """Softmax temperature at ``step`` (float32, same shape as ``step``).

    linear:      tau_max + (tau_min - tau_max) * p
    exponential: tau_max * (tau_min / tau_max) ** p
    p = min(step / anneal_steps, 1)
  """
  validate(cfg)
  p = _progress(step, cfg.anneal_steps)
  tau_max = jnp.float32(cfg.tau_max)
  tau_min = jnp.float32(cfg.tau_min)
  if cfg.tau_schedule == "linear":
    return tau_max + (tau_min - tau_max) * p
  return tau_max * jnp.power(tau_min / tau_max, p)


def is_hard_top1(step: jax.Array, cfg: RouterConfig) -> jax.Array:
  """Bool array: routing has switched to hard top-1 at ``step``.

  True when ``cfg.hard_top1_after >= 0`` and ``step >= cfg.hard_top1_after``.
  """
  step = jnp.asarray(step)
  if cfg.hard_top1_after < 0:
    return jnp.zeros(step.shape, jnp.bool_)
  return step >= cfg.hard_top1_after
