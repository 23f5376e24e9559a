"""Auxiliary router losses, as pure functions of router outputs.

All functions compute in float32 and return an unweighted scalar; the layer
multiplies each by its coefficient from the config.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def switch_load_balance_loss(router_probs: jax.Array, expert_index: jax.Array,
                             mask: jax.Array) -> jax.Array:
  """Switch Transformer load-balancing loss.

    loss = E * sum_i f_i * P_i
    f_i  = (valid assignments to expert i) / (total valid assignments)
    P_i  = mean_t router_probs[t, i]

  Perfectly uniform routing gives 1.0; everything on one expert that also
  holds all the probability gives E. f is a count, so the gradient flows only
  through P.

  Args:
    router_probs: float [T, E] router distribution over experts.
    expert_index: int [T, K] expert of each routing slot.
    mask: bool [T, K] which slots are valid.
  """
  probs = router_probs.astype(jnp.float32)
  num_experts = probs.shape[-1]
  onehot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)
  counts = jnp.sum(onehot * mask[..., None].astype(jnp.float32), axis=(0, 1))
  fraction = jax.lax.stop_gradient(counts / jnp.maximum(jnp.sum(counts), 1.0))
  mean_prob = jnp.mean(probs, axis=0)
  return num_experts * jnp.sum(fraction * mean_prob)


def router_z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: mean_t (logsumexp_e logits[t, e])^2."""
  lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.square(lse))


def cv_squared(x: jax.Array) -> jax.Array:
  """Squared coefficient of variation over all elements of ``x``.

    cv^2 = var(x) / (mean(x)^2 + 1e-10)

  with the population variance (divide by n, not n - 1), so [1, 1] -> 0 and
  [0, 2] -> 1.
  """
  x = x.astype(jnp.float32)
  return jnp.var(x) / (jnp.square(jnp.mean(x)) + 1e-10)


def importance_loss(gates: jax.Array) -> jax.Array:
  """Shazeer et al. (2017) importance loss: cv_squared(sum_t gates[t, :]).

  Args:
    gates: float [T, E] sparse gate values (0 for experts a token skips).
  """
  return cv_squared(jnp.sum(gates.astype(jnp.float32), axis=0))


def _normal_cdf(x: jax.Array) -> jax.Array:
  return 0.5 * (1.0 + jax.lax.erf(x / math.sqrt(2.0)))


def load_loss(clean_logits: jax.Array, noisy_logits: jax.Array,
              noise_std: jax.Array, k: int) -> jax.Array:
  """Shazeer et al. (2017) load loss: cv_squared of a smooth load estimate.

    load_i = sum_t P(t, i)
    P(t, i) = Phi((clean[t, i] - threshold[t, i]) / noise_std[t, i])

  ``threshold[t, i]`` is the k-th largest noisy logit of token t among the
  experts other than i: the k-th largest overall when i is not in the top-k,
  the (k+1)-th when it is. P(t, i) is the probability that expert i would be
  in the top-k under a fresh draw of its own noise, the others held fixed.
  ``noise_std`` is floored at 1e-6 so that a vanishing softplus cannot give
  NaN gradients. With k >= E every expert is always chosen and the loss is 0.

  Args:
    clean_logits: float [T, E] logits before noise.
    noisy_logits: float [T, E] the logits the top-k was taken from.
    noise_std: float [T, E] standard deviation of the noise.
    k: experts per token.
  """
  clean = clean_logits.astype(jnp.float32)
  noisy = noisy_logits.astype(jnp.float32)
  std = jnp.maximum(noise_std.astype(jnp.float32), 1e-6)
  num_experts = clean.shape[-1]
  if k >= num_experts:
    return jnp.zeros((), jnp.float32)
  top_values, top_index = jax.lax.top_k(noisy, k + 1)
  threshold_if_in = top_values[:, k:k + 1]      # (k+1)-th largest
  threshold_if_out = top_values[:, k - 1:k]     # k-th largest
  in_top_k = jnp.any(
      top_index[:, :k, None] == jnp.arange(num_experts)[None, None, :], axis=1)
  threshold = jnp.where(in_top_k, threshold_if_in, threshold_if_out)
  prob = _normal_cdf((clean - threshold) / std)
  return cv_squared(jnp.sum(prob, axis=0))
