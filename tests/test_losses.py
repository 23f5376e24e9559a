"""Auxiliary losses against values worked out by hand."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import losses


def _lb(probs, index, mask=None):
  index = jnp.asarray(index, jnp.int32)
  if mask is None:
    mask = jnp.ones(index.shape, bool)
  return float(losses.switch_load_balance_loss(
      jnp.asarray(probs, jnp.float32), index, jnp.asarray(mask)))


def test_load_balance_uniform_is_one():
  # f = [1/2, 1/2], P = [1/2, 1/2]: 2 * (1/4 + 1/4) = 1
  probs = [[0.5, 0.5]] * 4
  assert _lb(probs, [[0], [1], [0], [1]]) == pytest.approx(1.0)


def test_load_balance_all_on_one_expert_is_num_experts():
  # E = 4, f = [1, 0, 0, 0], P = [1, 0, 0, 0]: 4 * 1 = 4
  probs = [[1.0, 0.0, 0.0, 0.0]] * 3
  assert _lb(probs, [[0], [0], [0]]) == pytest.approx(4.0)


def test_load_balance_mixed_case():
  # f = [1, 0], P = [(0.9 + 0.7) / 2, ...] = [0.8, 0.2]: 2 * 0.8 = 1.6
  probs = [[0.9, 0.1], [0.7, 0.3]]
  assert _lb(probs, [[0], [0]]) == pytest.approx(1.6)


def test_load_balance_ignores_masked_slots():
  # Valid slots only go to expert 0: f = [1, 0]; P = [0.6, 0.4]: 2 * 0.6 = 1.2
  probs = [[0.6, 0.4], [0.6, 0.4]]
  index = [[0, 1], [0, 1]]
  mask = [[True, False], [True, False]]
  assert _lb(probs, index, mask) == pytest.approx(1.2)


def test_load_balance_gradient_only_through_probs():
  # d/dP[t, i] = E * f_i / T = 2 * [1, 0] / 2 = [1, 0] on every row.
  probs = jnp.array([[0.9, 0.1], [0.7, 0.3]])
  index = jnp.array([[0], [0]], jnp.int32)
  mask = jnp.ones((2, 1), bool)
  grad = jax.grad(losses.switch_load_balance_loss)(probs, index, mask)
  np.testing.assert_allclose(grad, [[1.0, 0.0], [1.0, 0.0]], atol=1e-6)


def test_z_loss_of_zero_logits_is_log_e_squared():
  # logsumexp of E zeros = log E; mean of (log 4)^2 = 1.9218120...
  assert float(losses.router_z_loss(jnp.zeros((3, 4)))) == pytest.approx(
      math.log(4) ** 2, rel=1e-6)
  assert math.log(4) ** 2 == pytest.approx(1.9218120556728056)


def test_z_loss_mixed_rows():
  # Row 1: log(e^0 + e^log 3) = log 4. Row 2: log(2 e^1) = 1 + log 2.
  # mean((log 4)^2, (1 + log 2)^2) = (1.921812 + 2.866747) / 2 = 2.394280
  logits = jnp.array([[0.0, math.log(3.0)], [1.0, 1.0]])
  got = float(losses.router_z_loss(logits))
  assert got == pytest.approx(2.394280, rel=1e-5)


@pytest.mark.parametrize("x, expected", [
    ([1.0, 1.0], 0.0),          # no spread
    ([0.0, 2.0], 1.0),          # mean 1, population var (1 + 1) / 2 = 1
    ([1.0, 2.0, 3.0], 1 / 6),   # mean 2, var (1 + 0 + 1) / 3 = 2/3; / 4
    ([0.0, 0.0], 0.0),          # eps keeps 0/0 finite
])
def test_cv_squared(x, expected):
  got = float(losses.cv_squared(jnp.array(x)))
  assert got == pytest.approx(expected, abs=1e-6)


def test_importance_loss():
  # Column sums [2, 0]: cv^2 = 1. Column sums [1, 1]: 0.
  assert float(losses.importance_loss(jnp.array([[1.0, 0.0], [1.0, 0.0]]))) == (
      pytest.approx(1.0))
  assert float(losses.importance_loss(jnp.array([[0.7, 0.3], [0.3, 0.7]]))) == (
      pytest.approx(0.0, abs=1e-6))


def _load_loss_brute_force(clean, noisy, std, k):
  """Per (t, i): k-th largest noisy logit among the other experts."""
  num_tokens, num_experts = clean.shape
  load = [0.0] * num_experts
  for t in range(num_tokens):
    for i in range(num_experts):
      others = sorted((noisy[t, j] for j in range(num_experts) if j != i),
                      reverse=True)
      z = (clean[t, i] - others[k - 1]) / std[t, i]
      load[i] += 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
  mean = sum(load) / num_experts
  var = sum((x - mean) ** 2 for x in load) / num_experts
  return var / (mean ** 2 + 1e-10)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_load_loss_matches_brute_force(k):
  rng = np.random.default_rng(k)
  clean = rng.normal(size=(6, 5)).astype(np.float32)
  std = (0.5 + rng.random(size=(6, 5))).astype(np.float32)
  noisy = clean + rng.normal(size=(6, 5)).astype(np.float32) * std
  got = float(losses.load_loss(clean, noisy, std, k))
  want = _load_loss_brute_force(clean.astype(np.float64), noisy, std, k)
  assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_load_loss_all_experts_chosen_is_zero():
  x = jnp.arange(6.0).reshape(2, 3)
  assert float(losses.load_loss(x, x, jnp.ones_like(x), 3)) == 0.0


def test_load_loss_gradient_is_finite_with_tiny_std():
  clean = jnp.array([[1.0, -1.0, 0.5], [0.0, 2.0, -2.0]])
  std = jnp.array([[1e-30, 1.0, 1.0], [0.0, 1.0, 0.3]])
  grads = jax.grad(losses.load_loss, argnums=(0, 2))(clean, clean, std, 1)
  for g in grads:
    assert np.all(np.isfinite(g))
