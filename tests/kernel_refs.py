"""Float64 references and random inputs shared by the kernel tests."""
import jax.numpy as jnp
import numpy as np


def ref_gmm(x, w, gs):
  """Rows of x grouped by gs, each group times its w[e]; rows past the groups are 0."""
  x = np.asarray(x, np.float64)
  w = np.asarray(w, np.float64)
  out = np.zeros((x.shape[0], w.shape[2]))
  s = 0
  for e, g in enumerate(np.asarray(gs)):
    out[s:s + g] = x[s:s + g] @ w[e]
    s += g
  return out


def ref_tgmm(x, dy, gs):
  """Per-group x^T dy -> [E, K, N]; empty groups give zeros."""
  x = np.asarray(x, np.float64)
  dy = np.asarray(dy, np.float64)
  out = np.zeros((len(gs), x.shape[1], dy.shape[1]))
  s = 0
  for e, g in enumerate(np.asarray(gs)):
    out[e] = x[s:s + g].T @ dy[s:s + g]
    s += g
  return out


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def random_inputs(rng, m, k, n, e, dtype):
  """x[m, k], w[e, k, n] (fan-in scaled) and dy[m, n], all random normal."""
  x = jnp.asarray(rng.standard_normal((m, k)), dtype)
  w = jnp.asarray(rng.standard_normal((e, k, n)) / np.sqrt(k), dtype)
  dy = jnp.asarray(rng.standard_normal((m, n)), dtype)
  return x, w, dy
