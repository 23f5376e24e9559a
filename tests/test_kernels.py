"""Pallas grouped-matmul kernels in interpret mode against a float64 reference.

The Pallas interpreter fills output buffers with NaN before the kernel runs
(tested below), so a row the kernel forgets to write shows up as NaN.
"""
import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
import numpy as np
import pytest

from moe_jax.ops import gmm as op
from moe_jax.ops import registry
from moe_kernels import fused
from moe_kernels import gmm as gmm_lib
from moe_kernels import gmm_triton
from moe_kernels import schedule
from moe_kernels import tgmm_mosaic
from moe_kernels import tuning
from kernel_refs import random_inputs as _inputs
from kernel_refs import ref_gmm as _ref_gmm
from kernel_refs import ref_tgmm as _ref_tgmm
from kernel_refs import rel_err as _rel

SMALL = tuning.Config(32, 32, 16)  # several tiles even on small shapes
SMALL_T = tuning.Config(16, 32, 32)
SMALL_CFGS = (SMALL, SMALL, SMALL_T)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _check_out(y, ref, gs, dtype):
  y = np.asarray(y, np.float64)
  total = int(np.sum(gs))
  assert np.all(np.isfinite(y)), "unwritten (NaN) or non-finite output"
  assert np.all(y[total:] == 0), "rows past sum(group_sizes) must be zero"
  assert _rel(y, ref) < TOL[dtype]


CASES = [  # (M, K, N, group sizes)
    (100, 48, 40, [30, 0, 50, 7]),        # zeros, zero tail, M not a tile multiple
    (96, 64, 64, [0, 96, 0]),             # one non-empty group
    (77, 40, 24, [77]),                   # E = 1
    (64, 130, 70, [10, 20, 0, 30, 4]),    # K, N not multiples of any tile
    (50, 16, 32, [0, 0, 0]),              # no rows at all
]


def test_interpret_poisons_outputs():
  def kernel(o_ref):
    del o_ref
  y = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((8, 8), jnp.float32),
                     interpret=True)()
  assert np.all(np.isnan(np.asarray(y)))


@pytest.mark.parametrize("m, k, n, gs", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gmm_forward_and_transposed(m, k, n, gs, dtype):
  rng = np.random.default_rng(m + k)
  gs = np.asarray(gs, np.int32)
  x, w, _ = _inputs(rng, m, k, n, len(gs), dtype)
  ref = _ref_gmm(x, w, gs)
  y = gmm_triton.gmm(x, w, jnp.asarray(gs), tiles=SMALL.tiles, interpret=True)
  assert y.dtype == dtype
  _check_out(y, ref, gs, dtype)
  yt = gmm_triton.gmm(x, jnp.swapaxes(w, 1, 2), jnp.asarray(gs), transpose_rhs=True,
                      tiles=SMALL.tiles, interpret=True)
  _check_out(yt, ref, gs, dtype)


@pytest.mark.parametrize("m, k, n, gs", CASES[:4])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gmm_gradients(m, k, n, gs, dtype):
  rng = np.random.default_rng(m * 3 + n)
  gs = np.asarray(gs, np.int32)
  x, w, dy = _inputs(rng, m, k, n, len(gs), dtype)
  f = lambda a, b: gmm_lib.gmm(a, b, jnp.asarray(gs), interpret=True, configs=SMALL_CFGS)
  y, vjp = jax.vjp(f, x, w)
  dx, dw = vjp(dy)
  _check_out(y, _ref_gmm(x, w, gs), gs, dtype)
  # dx = dy @ w^T per group, zero past the groups; dw = per-group x^T dy, zero if empty.
  _check_out(dx, _ref_gmm(dy, np.swapaxes(np.asarray(w, np.float64), 1, 2), gs), gs, dtype)
  dw_ref = _ref_tgmm(x, dy, gs)
  assert np.all(np.isfinite(np.asarray(dw, np.float64)))
  assert np.all(np.asarray(dw, np.float64)[gs == 0] == 0)
  assert _rel(dw, dw_ref) < TOL[dtype]
  assert dx.dtype == dtype and dw.dtype == dtype


def test_tgmm_direct_and_tail_rows_ignored():
  rng = np.random.default_rng(5)
  gs = np.array([5, 0, 33, 1], np.int32)  # total 39 of 60 rows
  x, _, dy = _inputs(rng, 60, 40, 24, 4, jnp.float32)
  dw = gmm_triton.tgmm(x, dy, jnp.asarray(gs), tiles=SMALL_T.tiles, interpret=True)
  np.testing.assert_allclose(np.asarray(dw), _ref_tgmm(x, dy, gs), rtol=1e-5, atol=1e-5)


# The schedules run inside jit before the kernels; jitted here too, one compiled
# program per random shape instead of one per eager op (about 4x faster).
@functools.partial(jax.jit, static_argnums=(1, 2))
def _schedule_arrays(sizes, m, tm):
  s = schedule.make_schedule(sizes, m, tm)
  return s.tile_group, s.tile_block, s.group_start, s.group_end


_group_aligned_visits = jax.jit(schedule.group_aligned_visits, static_argnums=(1, 2))


def test_schedule_visits_every_row_once():
  rng = np.random.default_rng(0)
  for _ in range(20):
    e = int(rng.integers(1, 7))
    m = int(rng.integers(1, 300))
    tm = int(rng.choice([16, 32, 64]))
    gs = rng.multinomial(int(rng.integers(0, m + 1)), np.ones(e) / e).astype(np.int32)
    group, block, lo, hi = map(np.asarray, _schedule_arrays(jnp.asarray(gs), m, tm))
    covered = np.zeros(m, np.int32)
    for g, b in zip(group, block):
      rows = np.arange(b * tm, b * tm + tm)
      covered[rows[(rows >= lo[g]) & (rows < hi[g]) & (rows < m)]] += 1
    assert np.all(covered == 1)


def test_group_aligned_visits_store_every_row_once_inside_the_rows():
  rng = np.random.default_rng(1)
  for i in range(30):
    e = int(rng.integers(1, 9))
    tm = int(rng.choice([16, 32, 64]))
    m = 8 * int(rng.integers(tm // 8, 50))          # a multiple of 8, at least tm
    total = int(rng.integers(0, m + 1)) if i % 3 else m
    gs = (rng.dirichlet(np.full(e, 0.3)) * total).astype(np.int32)
    gs[int(rng.integers(e))] = 0                        # an empty group
    meta = np.asarray(_group_aligned_visits(jnp.asarray(gs), m, tm))
    assert meta.shape == (schedule.max_visits(m, e, tm), 4)
    ends = np.cumsum(gs)
    bounds = np.stack([np.r_[0, ends[:-1]], ends], 1).tolist() + [[ends[-1], m]]
    stored = np.zeros(m, np.int32)
    for g, row0, lo, hi in meta:
      if g > e:                                          # no-op visit
        assert (lo, hi) == (0, 0)
        continue
      assert 0 <= row0 and row0 + tm <= m                # the tile reads inside x
      assert row0 % 8 == 0                               # where TMA can start a copy
      assert row0 <= lo < hi <= row0 + tm                 # stores inside its tile
      assert bounds[g][0] <= lo and hi <= bounds[g][1]   # and only its group's rows
      stored[lo:hi] += 1
    np.testing.assert_array_equal(stored, 1)
    visits = np.bincount(meta[:, 0], minlength=e + 2)[:e + 1]
    np.testing.assert_array_equal(visits, [-(-(b - a // 8 * 8) // tm) if b > a else 0
                                           for a, b in bounds])


def test_tgmm_step_plan_covers_each_group_inside_the_padded_rows():
  rng = np.random.default_rng(2)
  for _ in range(30):
    e = int(rng.integers(1, 9))
    tr = int(rng.choice([16, 64]))
    m = int(rng.integers(1, 400))
    padded = -(-m // tr) * tr
    gs = (rng.dirichlet(np.full(e, 0.3)) * rng.integers(0, m + 1)).astype(np.int32)
    plan = np.asarray(tgmm_mosaic.step_plan(jnp.asarray(gs), m, padded, tr))
    ends = np.cumsum(gs)
    for g, (start, end, row0, steps) in enumerate(plan):
      assert (start, end) == (ends[g] - gs[g], ends[g])
      if gs[g] == 0:
        assert steps == 0
        continue
      assert row0 <= start and end <= row0 + steps * tr <= padded   # covers, inside
      assert row0 + tr > start and row0 + (steps - 1) * tr < end     # no idle steps
      assert row0 % 8 == 0                                           # TMA-aligned
      first = start // 8 * 8
      if first + -(-(end - first) // tr) * tr <= padded:             # group-aligned
        assert (row0, steps) == (first, -(-(end - first) // tr))
      else:                                                          # on the tr grid
        assert (row0, steps) == (start // tr * tr, -(-end // tr) - start // tr)


def test_schedule_has_no_loops():
  # A while loop here (jnp.searchsorted's default "scan" method) launches a small
  # kernel per step before every grouped matmul: 0.1 to 0.25 ms per call on an H100.
  jaxpr = jax.make_jaxpr(lambda g: schedule.make_schedule(g, 4096, 128).visit_meta)(
      jnp.ones((64,), jnp.int32))
  text = str(jaxpr)   # includes nested jaxprs
  assert "while[" not in text and "scan[" not in text, text
  text = str(jax.make_jaxpr(lambda g: schedule.group_aligned_visits(g, 4096, 128))(
      jnp.ones((64,), jnp.int32)))
  assert "while[" not in text and "scan[" not in text, text


@hypothesis.settings(max_examples=12, deadline=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(
    m=st.integers(1, 120), k=st.integers(1, 70), n=st.integers(1, 70),
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    seed=st.integers(0, 2**16))
def test_property_gmm_matches_reference(m, k, n, sizes, seed):
  gs = np.asarray(sizes, np.int32)
  # Trim the group sizes so that they fit in M (the remainder is the zero tail).
  gs = np.minimum(gs, np.maximum(m - (np.cumsum(gs) - gs), 0)).astype(np.int32)
  rng = np.random.default_rng(seed)
  x, w, dy = _inputs(rng, m, k, n, len(gs), jnp.float32)
  # Under jit, as in a model, with the group sizes a runtime input: one compiled
  # forward and one backward per example instead of an eager op per new shape.
  gmm = jax.jit(lambda a, b, g: gmm_lib.gmm(a, b, g, interpret=True, configs=SMALL_CFGS))
  y, vjp = jax.vjp(lambda a, b: gmm(a, b, jnp.asarray(gs)), x, w)
  _check_out(y, _ref_gmm(x, w, gs), gs, jnp.float32)
  _, dw = vjp(dy)
  assert _rel(dw, _ref_tgmm(x, dy, gs)) < 1e-5


# --- fused dispatch / combine -------------------------------------------------

def _dispatch(rng, tokens, k, e, drop_tail):
  """Random top-k dispatch: rows sorted by expert, their token and slot."""
  expert = rng.integers(0, e, size=(tokens, k))
  slot = np.arange(tokens * k)
  order = np.argsort(expert.reshape(-1), kind="stable")
  gs = np.bincount(expert.reshape(-1), minlength=e).astype(np.int32)
  if drop_tail:  # pretend the last expert's rows were dropped: a zero tail
    gs[-1] = 0
  return order // k, slot[order], gs  # row_token, row_slot, group sizes


@pytest.mark.parametrize("dtype, with_slot", [(jnp.float32, False), (jnp.float32, True),
                                              (jnp.bfloat16, True)])
def test_gmm_gather_matches_reference(dtype, with_slot):
  rng = np.random.default_rng(11)
  tokens, topk, kdim, n, e = 45, 2, 40, 36, 5
  row_token, row_slot, gs = _dispatch(rng, tokens, topk, e, drop_tail=True)
  xt, w, dy = _inputs(rng, tokens, kdim, n, e, dtype)
  dy = jnp.asarray(rng.standard_normal((tokens * topk, n)), dtype)
  ri = jnp.asarray(row_token, jnp.int32)

  f = functools.partial(fused.gmm_gather, row_index=ri, group_sizes=jnp.asarray(gs),
                        row_slot=jnp.asarray(row_slot) if with_slot else None,
                        interpret=True)
  y, vjp = jax.vjp(lambda a, b: f(a, w=b), xt, w)
  x_sorted = np.asarray(xt, np.float64)[row_token]
  _check_out(y, _ref_gmm(x_sorted, w, gs), gs, dtype)
  dxt, dw = vjp(dy)
  dx_rows = _ref_gmm(dy, np.swapaxes(np.asarray(w, np.float64), 1, 2), gs)
  dxt_ref = np.zeros((tokens, kdim))
  np.add.at(dxt_ref, row_token, dx_rows)
  assert _rel(dxt, dxt_ref) < TOL[dtype]
  assert _rel(dw, _ref_tgmm(x_sorted, dy, gs)) < TOL[dtype]


@pytest.mark.parametrize("dtype,seed", [(jnp.float32, 12), (jnp.bfloat16, 12),
                                        (jnp.float32, 3), (jnp.float32, 7)])
def test_gmm_combine_matches_reference(dtype, seed):
  # Several permutations: slot 0 must be written wherever its row lands, also
  # when the last row tile is partial (a regression: padding rows once pointed
  # at slot 0 and overwrote it in interpret mode).
  rng = np.random.default_rng(seed)
  tokens, topk, kdim, n, e = 40, 2, 36, 44, 4
  _, row_slot, gs = _dispatch(rng, tokens, topk, e, drop_tail=True)
  m = tokens * topk
  x, w, _ = _inputs(rng, m, kdim, n, e, dtype)
  dy = jnp.asarray(rng.standard_normal((m, n)), dtype)
  s = jnp.asarray(rng.random(m), jnp.float32)
  f = lambda a, b, c: fused.gmm_combine(a, b, jnp.asarray(gs), jnp.asarray(row_slot), c,
                                        interpret=True)
  y, vjp = jax.vjp(f, x, w, s)

  def ref_fn(a, b, c):  # float64 numpy reference of the same function
    rows = _ref_gmm(a, b, gs) * np.asarray(c, np.float64)[:, None]
    out = np.zeros_like(rows)
    out[row_slot] = rows
    return out
  assert np.all(np.isfinite(np.asarray(y, np.float64)))
  assert _rel(y, ref_fn(x, w, s)) < TOL[dtype]
  dx, dw, ds = vjp(dy)
  g = np.asarray(dy, np.float64)[row_slot]  # cotangent of each sorted row
  sf = np.asarray(s, np.float64)
  dxu = _ref_gmm(g, np.swapaxes(np.asarray(w, np.float64), 1, 2), gs)
  assert _rel(dx, dxu * sf[:, None]) < TOL[dtype]
  assert _rel(ds, np.sum(dxu * np.asarray(x, np.float64), -1)) < TOL[dtype]
  assert _rel(dw, _ref_tgmm(x, g * sf[:, None], gs)) < TOL[dtype]


# --- registry ---------------------------------------------------------------

def test_registry_on_cpu():
  x = jnp.ones((8, 16), jnp.float32)
  w = jnp.ones((2, 16, 8), jnp.float32)
  gs = jnp.array([3, 4], jnp.int32)
  assert registry.resolve("auto", x.dtype).name == "ragged_dot"
  for name in ("pallas_triton", "megablox"):
    with pytest.raises(ValueError, match="cannot run here"):
      op.grouped_matmul(x, w, gs, impl=name)
  y = op.grouped_matmul(x, w, gs, impl="pallas_triton_interpret")
  np.testing.assert_allclose(np.asarray(y), _ref_gmm(x, w, np.asarray(gs)), rtol=1e-6)


def test_megablox_wrapper_interpret():
  from moe_kernels import tpu  # pylint: disable=g-import-not-at-top
  if not tpu.available():
    pytest.skip("megablox not importable")
  rng = np.random.default_rng(3)
  gs = np.array([7, 0, 20], np.int32)
  x, w, _ = _inputs(rng, 40, 128, 128, 3, jnp.float32)
  y = tpu.gmm(x, w, jnp.asarray(gs), interpret=True)
  _check_out(y, _ref_gmm(x, w, gs), gs, jnp.float32)
