"""TPU fused gmm kernels (moe_kernels.tpu_fused) in the Pallas TPU interpreter.

The interpreter fills output buffers with NaN before the kernel runs (tested
below), so a row or slot the kernel forgets to write shows up as NaN.
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import numpy as np
import pytest

from moe_kernels import tpu_fused

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

# (T, k, K, N, group sizes, tiles, dtype); M = T * k rows.
CASES = [
    (25, 4, 128, 256, [30, 0, 50, 7], (32, 128, 128), jnp.float32),  # zeros, tail, M % tm
    (48, 2, 256, 128, [0, 96, 0], (16, 128, 128), jnp.bfloat16),  # one non-empty group
    (35, 2, 128, 128, [61], None, jnp.float32),  # E = 1, default tiles, tail
    (10, 3, 128, 128, [0, 0, 0], (8, 128, 128), jnp.float32),  # no rows at all
]
IDS = ["zeros_tail", "one_group_bf16", "e1_default_tiles", "empty"]


def _rel(a, b):
  a = np.asarray(a, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _f64(a):
  return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _groups(gs, m):
  """Group of each row, -1 past sum(group_sizes)."""
  g = np.full(m, -1)
  g[:int(np.sum(gs))] = np.repeat(np.arange(len(gs)), gs)
  return g


def _rows_matmul(x, w, grp, transpose=False):
  out = np.zeros((x.shape[0], w.shape[1] if transpose else w.shape[2]))
  for i, e in enumerate(grp):
    if e >= 0:
      out[i] = x[i] @ (w[e].T if transpose else w[e])
  return out


def _setup(case, seed=0):
  t, k, kd, n, gs, tiles, dtype = case
  rng = np.random.default_rng(seed)
  m = t * k
  e = len(gs)
  x_tok = jnp.asarray(rng.standard_normal((t, kd)), dtype)
  x = jnp.asarray(rng.standard_normal((m, kd)), dtype)
  w = jnp.asarray(rng.standard_normal((e, kd, n)) / np.sqrt(kd), dtype)
  dy = jnp.asarray(rng.standard_normal((m, n)), dtype)
  # Expert-sorted copies of top-k routing: row r holds slot row_slot[r] = tok * k + j.
  row_slot = rng.permutation(m)
  row_index = row_slot // k
  row_weight = jnp.asarray(rng.uniform(0.1, 1.0, m), jnp.float32)
  return dict(t=t, k=k, m=m, gs=np.asarray(gs), tiles=tiles, dtype=dtype, x_tok=x_tok,
              x=x, w=w, dy=dy, row_slot=row_slot, row_index=row_index,
              row_weight=row_weight)


def _check(y, ref, dtype, zero_rows=None):
  y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
  assert np.all(np.isfinite(y)), "unwritten (NaN) or non-finite output"
  if zero_rows is not None:
    assert np.all(y[zero_rows] == 0), "rows past sum(group_sizes) must be zero"
  if np.linalg.norm(ref) == 0:
    assert np.all(y == 0)
  else:
    assert _rel(y, ref) < TOL[dtype]


def test_interpreter_poisons_outputs():
  def kernel(x_ref, blocked_ref, any_ref):
    del x_ref, blocked_ref, any_ref

  x = jnp.ones((8, 128), jnp.float32)
  shape = jax.ShapeDtypeStruct((8, 128), jnp.float32)
  blocked, anyspace = pl.pallas_call(
      kernel, out_shape=(shape, shape),
      out_specs=(pl.BlockSpec((8, 128), lambda: (0, 0)), pl.BlockSpec(memory_space=pl.ANY)),
      interpret=pltpu.InterpretParams())(x)
  assert np.all(np.isnan(np.asarray(blocked)))
  assert np.all(np.isnan(np.asarray(anyspace)))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gather_forward(case):
  s = _setup(case)
  y = tpu_fused.gmm_gather(s["x_tok"], jnp.asarray(s["row_index"]), s["w"],
                           jnp.asarray(s["gs"]), tiles=s["tiles"], interpret=True)
  assert y.shape == (s["m"], s["w"].shape[2]) and y.dtype == s["dtype"]
  grp = _groups(s["gs"], s["m"])
  ref = _rows_matmul(_f64(s["x_tok"])[s["row_index"]], _f64(s["w"]), grp)
  _check(y, ref, s["dtype"], zero_rows=grp < 0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_combine_forward(case):
  s = _setup(case)
  y = tpu_fused.gmm_combine(s["x"], s["w"], jnp.asarray(s["gs"]), jnp.asarray(s["row_slot"]),
                            s["row_weight"], tiles=s["tiles"], interpret=True)
  grp = _groups(s["gs"], s["m"])
  rows = _rows_matmul(_f64(s["x"]), _f64(s["w"]), grp) * _f64(s["row_weight"])[:, None]
  ref = np.zeros_like(rows)
  ref[s["row_slot"]] = rows
  zero = np.zeros(s["m"], bool)
  zero[s["row_slot"][grp < 0]] = True
  _check(y, ref, s["dtype"], zero_rows=zero)


def test_combine_f32_output_from_bf16():
  s = _setup(CASES[1])
  y = tpu_fused.gmm_combine(s["x"], s["w"], jnp.asarray(s["gs"]), jnp.asarray(s["row_slot"]),
                            s["row_weight"], jnp.float32, tiles=s["tiles"], interpret=True)
  assert y.dtype == jnp.float32
  rows = _rows_matmul(_f64(s["x"]), _f64(s["w"]), _groups(s["gs"], s["m"]))
  ref = np.zeros_like(rows)
  ref[s["row_slot"]] = rows * _f64(s["row_weight"])[:, None]
  _check(y, ref, jnp.bfloat16)


GRAD_CASES = [CASES[0], CASES[1], CASES[2]]
GRAD_IDS = IDS[:3]


@pytest.mark.parametrize("use_slot", [True, False], ids=["row_slot", "scatter_add"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=GRAD_IDS)
def test_gather_grads(case, use_slot):
  s = _setup(case, seed=1)
  gs = jnp.asarray(s["gs"])
  slot = jnp.asarray(s["row_slot"]) if use_slot else None

  def f(x_tok, w):
    return tpu_fused.gmm_gather(x_tok, jnp.asarray(s["row_index"]), w, gs, row_slot=slot,
                                tiles=s["tiles"], interpret=True)

  _, vjp = jax.vjp(f, s["x_tok"], s["w"])
  dx, dw = vjp(s["dy"])
  grp = _groups(s["gs"], s["m"])
  x_rows = _f64(s["x_tok"])[s["row_index"]]
  dy = _f64(s["dy"]) * (grp >= 0)[:, None]
  dx_rows = _rows_matmul(dy, _f64(s["w"]), grp, transpose=True)
  dx_ref = np.zeros((s["t"], x_rows.shape[1]))
  np.add.at(dx_ref, s["row_index"], dx_rows)
  dw_ref = np.stack([x_rows[grp == e].T @ dy[grp == e] for e in range(len(s["gs"]))])
  _check(dx, dx_ref, s["dtype"])
  _check(dw, dw_ref, s["dtype"])


@pytest.mark.parametrize("case", GRAD_CASES, ids=GRAD_IDS)
def test_combine_grads(case):
  s = _setup(case, seed=2)
  gs = jnp.asarray(s["gs"])
  slot = jnp.asarray(s["row_slot"])

  def f(x, w, rw):
    return tpu_fused.gmm_combine(x, w, gs, slot, rw, tiles=s["tiles"], interpret=True)

  _, vjp = jax.vjp(f, s["x"], s["w"], s["row_weight"])
  dx, dw, drw = vjp(s["dy"])
  grp = _groups(s["gs"], s["m"])
  valid = (grp >= 0)[:, None]
  g = _f64(s["dy"])[s["row_slot"]] * valid
  p = _rows_matmul(g, _f64(s["w"]), grp, transpose=True)
  rw = _f64(s["row_weight"])
  x = _f64(s["x"])
  dw_ref = np.stack([x[grp == e].T @ (rw[:, None] * g)[grp == e]
                     for e in range(len(s["gs"]))])
  _check(dx, rw[:, None] * p, s["dtype"])
  _check(dw, dw_ref, s["dtype"])
  _check(drw, np.sum(x * p, axis=1), s["dtype"])


@pytest.mark.parametrize("kd,n", [(100, 128), (128, 200)])
def test_dims_not_multiple_of_128_raise(kd, n):
  x = jnp.ones((16, kd), jnp.float32)
  w = jnp.ones((2, kd, n), jnp.float32)
  gs = jnp.array([8, 8])
  idx = jnp.arange(16)
  with pytest.raises(ValueError, match="multiple of 128"):
    tpu_fused.gmm_gather(x, idx, w, gs, interpret=True)
  with pytest.raises(ValueError, match="multiple of 128"):
    tpu_fused.gmm_combine(x, w, gs, idx, jnp.ones(16), interpret=True)


def test_bad_tiles_raise():
  x = jnp.ones((32, 256), jnp.bfloat16)
  w = jnp.ones((2, 256, 128), jnp.bfloat16)
  gs = jnp.array([16, 16])
  idx = jnp.arange(32)
  with pytest.raises(ValueError, match="multiple of 16"):
    tpu_fused.gmm_gather(x, idx, w, gs, tiles=(8, 128, 128), interpret=True)
  with pytest.raises(ValueError, match="tk"):
    tpu_fused.gmm_combine(x, w, gs, idx, jnp.ones(32), tiles=(16, 192, 128), interpret=True)


def test_visit_schedule_covers_every_row_once():
  gs = np.array([5, 0, 0, 19, 3, 0])
  m, tm = 40, 8
  tile, grp, lo, hi, first, last = (np.asarray(a) for a in tpu_fused._schedule(
      jnp.asarray(gs, jnp.int32), m, tm))
  assert len(tile) == -(-m // tm) + len(gs) - 1
  assert np.all(np.diff(tile) >= 0)  # revisits of a tile are consecutive
  covered = np.zeros(m, int)
  for t, lo_, hi_ in zip(tile, lo, hi):
    rows = np.arange(t * tm, t * tm + tm)
    covered[rows[(rows >= lo_) & (rows < hi_)]] += 1
  assert np.all(covered[:gs.sum()] == 1) and np.all(covered[gs.sum():] == 0)
  assert np.all(np.bincount(tile, weights=first, minlength=m // tm) == 1)
  assert np.all(np.bincount(tile, weights=last, minlength=m // tm) == 1)
