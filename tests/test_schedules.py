"""Temperature schedules and the hard top-1 switch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import schedules
from moe_jax.config_fields import FieldError


def _cfg(**kw):
  base = dict(tau_max=2.0, tau_min=0.1, anneal_steps=1000)
  base.update(kw)
  return schedules.TemperatureSchedule(**base)


@pytest.mark.parametrize("name", ["linear", "exponential"])
def test_endpoints(name):
  cfg = _cfg(tau_schedule=name)
  tau = lambda s: float(schedules.temperature(jnp.int32(s), cfg))
  assert tau(0) == pytest.approx(2.0)
  assert tau(1000) == pytest.approx(0.1, rel=1e-6)
  assert tau(5000) == pytest.approx(0.1, rel=1e-6)   # held after annealing


@pytest.mark.parametrize("name, expected", [
    ("linear", 1.05),              # 2 + (0.1 - 2) * 0.5
    ("exponential", 0.4472136),    # 2 * 0.05 ** 0.5 = 2 * 0.2236068
])
def test_midpoint(name, expected):
  cfg = _cfg(tau_schedule=name)
  assert float(schedules.temperature(jnp.int32(500), cfg)) == pytest.approx(
      expected, rel=1e-6)


@pytest.mark.parametrize("name", ["linear", "exponential"])
def test_monotone_non_increasing_and_jittable(name):
  cfg = _cfg(tau_schedule=name)
  steps = jnp.arange(0, 1300, 50, dtype=jnp.int32)
  taus = np.asarray(jax.jit(lambda s: schedules.temperature(s, cfg))(steps))
  assert taus.dtype == np.float32 and taus.shape == steps.shape
  assert np.all(np.diff(taus) <= 1e-7)
  assert np.all(taus >= 0.1 - 1e-6) and np.all(taus <= 2.0 + 1e-6)


def test_zero_anneal_steps_starts_at_tau_min():
  cfg = _cfg(anneal_steps=0, tau_schedule="linear")
  assert float(schedules.temperature(jnp.int32(0), cfg)) == pytest.approx(0.1)


def test_unknown_schedule_names_field_and_choices():
  with pytest.raises(FieldError, match=r"tau_schedule='cosine'; allowed: ") as e:
    _cfg(tau_schedule="cosine")
  assert "linear" in str(e.value) and "exponential" in str(e.value)


@pytest.mark.parametrize("kw, field", [
    (dict(tau_min=0.0), "tau_min"), (dict(tau_max=-1.0), "tau_max"),
    (dict(tau_min=3.0), "tau_min"),            # above tau_max: it must anneal down
    (dict(anneal_steps=-1), "anneal_steps"), (dict(hard_top1_after=-2), "hard_top1_after"),
])
def test_bad_schedule_fields_rejected(kw, field):
  with pytest.raises(FieldError, match=rf"^{field}=") as e:
    _cfg(**kw)
  assert e.value.field == field


def test_is_hard_top1():
  never = _cfg(hard_top1_after=-1)
  assert not bool(schedules.is_hard_top1(jnp.int32(10**6), never))
  cfg = _cfg(hard_top1_after=10)
  fn = jax.jit(lambda s: schedules.is_hard_top1(s, cfg))
  assert not bool(fn(jnp.int32(9)))
  assert bool(fn(jnp.int32(10)))
  assert bool(fn(jnp.int32(11)))
  assert fn(jnp.int32(0)).dtype == jnp.bool_
