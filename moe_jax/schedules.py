"""Temperature schedules for the dense-to-sparse gates.

``TemperatureSchedule`` holds the schedule's fields; a gate's config inherits
it. Both schedules anneal from ``tau_max`` at step 0 to ``tau_min`` at
``anneal_steps`` and stay there. They take the step as a traced int array so
they work inside ``jit``; the config is static.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moe_jax.config_fields import Checked, one_of, require

SCHEDULES = ("linear", "exponential")


@dataclasses.dataclass(frozen=True)
class TemperatureSchedule(Checked):
  tau_max: float = 2.0
  tau_min: float = 0.1
  tau_schedule: str = "exponential"     # linear | exponential
  anneal_steps: int = 1000              # 0: tau_min from the first step
  hard_top1_after: int = -1             # step from which routing is hard top-1; -1: never

  def validate(self) -> None:
    super().validate()
    one_of("tau_schedule", self.tau_schedule, SCHEDULES)
    require(self.tau_max > 0, "tau_max", self.tau_max, "a number > 0")
    require(self.tau_min > 0, "tau_min", self.tau_min, "a number > 0")
    require(self.tau_min <= self.tau_max, "tau_min", self.tau_min,
            f"0 < tau_min <= tau_max ({self.tau_max}): the temperature anneals down")
    require(self.anneal_steps >= 0, "anneal_steps", self.anneal_steps, "an integer >= 0")
    require(self.hard_top1_after >= -1, "hard_top1_after", self.hard_top1_after,
            "-1 (never) or a step >= 0")


def _progress(step: jax.Array, anneal_steps: int) -> jax.Array:
  """min(step / anneal_steps, 1) as float32; 1 when anneal_steps is 0."""
  step = jnp.asarray(step, jnp.float32)
  if anneal_steps <= 0:
    return jnp.ones_like(step)
  return jnp.clip(step / anneal_steps, 0.0, 1.0)


def temperature(step: jax.Array, cfg: TemperatureSchedule) -> jax.Array:
  """Softmax temperature at ``step`` (float32, same shape as ``step``).

    linear:      tau_max + (tau_min - tau_max) * p
    exponential: tau_max * (tau_min / tau_max) ** p
    p = min(step / anneal_steps, 1)
  """
  p = _progress(step, cfg.anneal_steps)
  tau_max = jnp.float32(cfg.tau_max)
  tau_min = jnp.float32(cfg.tau_min)
  if cfg.tau_schedule == "linear":
    return tau_max + (tau_min - tau_max) * p
  return tau_max * jnp.power(tau_min / tau_max, p)


def is_hard_top1(step: jax.Array, cfg: TemperatureSchedule) -> jax.Array:
  """Bool array: routing has switched to hard top-1 at ``step``.

  True when ``cfg.hard_top1_after >= 0`` and ``step >= cfg.hard_top1_after``.
  """
  step = jnp.asarray(step)
  if cfg.hard_top1_after < 0:
    return jnp.zeros(step.shape, jnp.bool_)
  return step >= cfg.hard_top1_after
