"""The Mosaic GPU grouped matmul (moe_kernels.gmm_mosaic) in the Mosaic GPU interpreter.

The interpreter runs on CPU and fills output buffers with NaN before the
kernel runs (tested below), so a row the kernel forgets to store shows up as
NaN. References are float64 numpy loops over the groups. Gradients through
``gmm(backend="mosaic")`` also run ``tgmm_mosaic`` for the weight gradient where
it takes the shape.

On jax < 0.11 the interpreter cannot run a transposed shared-memory operand
(an AttributeError in one interpreter thread, after which the other threads
wait forever). The kernels refuse it there (tested), ``gmm(backend="mosaic")``
sends those products to the Triton kernels, and the tests of the transposed
product and of tgmm_mosaic are skipped.
"""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu
import numpy as np
import pytest

from moe_jax.ops import gmm as op
from moe_jax.ops import registry
from moe_kernels import gmm as gmm_lib
from moe_kernels import gmm_mosaic
from moe_kernels import tgmm_mosaic
from moe_kernels.gmm_mosaic import Tiles
from kernel_refs import random_inputs as _inputs
from kernel_refs import ref_gmm as _ref_gmm
from kernel_refs import ref_tgmm as _ref_tgmm
from kernel_refs import rel_err as _rel


TRANSPOSE_OK = gmm_mosaic.interpreter_reads_transposed()
needs_transpose = pytest.mark.skipif(
    not TRANSPOSE_OK,
    reason=f"jax {jax.__version__} < 0.11: the Mosaic GPU interpreter cannot run the "
           "transposed-rhs wgmma ('TransposeTransform' object has no attribute 'indices'; "
           "the other interpreter threads then hang), so no transposed product and no "
           "gradient through gmm(backend='mosaic')")

TOL = {jnp.bfloat16: 1e-2, jnp.float16: 1e-2, jnp.float32: 1e-5}
T = Tiles(tm=64, tn=64, stages=2)  # small tiles keep the interpreter fast

CASES = [  # (id, M, K, N, group sizes, tiles)
    # zeros among the groups, zero tail (150 of 200 rows), M % tm = 8
    ("zeros_tail", 200, 128, 128, [70, 0, 50, 30], T),
    ("one_group", 128, 64, 128, [0, 128, 0], T),
    # E = 1, M % tm = 36, 4 contraction steps through a 2-slot ring
    ("e1_ring", 100, 256, 128, [100], T),
    ("no_rows", 96, 64, 128, [0, 0, 0], T),
    # n_ctas = 4 column blocks; 6 visits in 3 windows of 2 (snaking sweeps); tail 22 rows
    ("windows", 192, 64, 512, [40, 0, 100, 30], Tiles(tm=64, tn=64, stages=2, window=2)),
    # tm = tn = 128: two epilogue chunks per warpgroup, 128-row store boxes; tail 26
    ("tiles128", 256, 128, 256, [100, 0, 130], Tiles(tm=128, tn=128, stages=2)),
    # six groups straddling tiles, odd sizes (many power-of-two store boxes); tail 5
    ("straddle", 130, 64, 128, [10, 20, 0, 30, 4, 61], T),
    # a 3-deep ring over 4 contraction steps (the default for K >= 4096); tail 40
    ("ring3", 200, 256, 256, [90, 0, 70], Tiles(tm=64, tn=64, stages=3)),
    # warpgroups split by rows (64 each): groups of 10 and 3 rows and the 22-row
    # second tile of the 150-row group have rows in one half only, so the other
    # warpgroup skips its wgmma and its stores; the 100-row group fills both; tail 37
    ("split_m", 300, 128, 128, [10, 100, 0, 3, 150], Tiles(tm=128, tn=64, stages=2, split="m")),
    # 256-row tiles, 128 rows a warpgroup; the 200-row group's tile spans both halves
    ("split_m_tm256", 300, 128, 128, [10, 200, 0, 50],
     Tiles(tm=256, tn=64, stages=2, split="m")),
]
IDS = [c[0] for c in CASES]
CASES = [c[1:] for c in CASES]


def _value_and_vjp(f, x, w, dy):
  """(f(x, w), dx, dw) for cotangent dy, under jit: from jax 0.11 the interpreter runs
  each warpgroup as its own CPU computation, and eager ops queued behind it can
  hold the slots those need (a deadlock seen on a 2-core machine)."""
  def run(x, w, dy):
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(dy))
  return jax.jit(run)(x, w, dy)


def _check_out(y, ref, gs, dtype):
  y = np.asarray(y, np.float64)
  assert y.shape == ref.shape
  total = int(np.sum(gs))
  bad_rows = np.unique(np.where(~np.isfinite(y))[0])
  assert not bad_rows.size, f"unwritten (NaN) rows: {bad_rows}"
  assert np.all(y[total:] == 0), "rows past sum(group_sizes) must be exactly zero"
  if total:
    assert _rel(y, ref) < TOL[dtype], _rel(y, ref)


def test_interpret_poisons_outputs():
  # Negative control: a kernel that stores nothing returns all NaN, so the
  # finiteness checks below catch unwritten rows.
  def kernel(o_ref):
    del o_ref
  call = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((64, 128), jnp.bfloat16),
                      grid=(2,), grid_names=("sm",),
                      interpret=gmm_mosaic.interpret_params(True))
  assert np.all(np.isnan(np.asarray(call(), np.float32)))


FORWARD = ([pytest.param(*c, jnp.bfloat16, id=f"{i}-bf16") for i, c in zip(IDS, CASES)]
           + [pytest.param(*c, jnp.float16, id=f"{i}-f16") for i, c in zip(IDS, CASES)
              if i in ("zeros_tail", "windows", "straddle")])


@pytest.mark.parametrize("m, k, n, gs, tiles, dtype", FORWARD)
def test_gmm_forward(m, k, n, gs, tiles, dtype):
  rng = np.random.default_rng(m + k + n)
  gs = np.asarray(gs, np.int32)
  x, w, _ = _inputs(rng, m, k, n, len(gs), dtype)
  y = gmm_mosaic.gmm(x, w, jnp.asarray(gs), tiles=tiles, interpret=True)
  assert y.dtype == dtype
  _check_out(y, _ref_gmm(x, w, gs), gs, dtype)


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
def test_default_tiles_fit_shared_memory(out_dtype):
  # A float32 output doubles the epilogue buffers; 4 stages at tn=128 then need
  # 256 KB, past Hopper's 227 KB (found by lowering the float32 path for CUDA).
  # This checks the defaults against smem_bytes, our model of the footprint;
  # Mosaic's own count is checked by test_bf16x3_float32_lowers_for_cuda, which
  # lowers gmm and tgmm with float32 outputs at default tiles.
  itemsize = jnp.dtype(out_dtype).itemsize
  for m, k, n, e in [(65536, 2048, 768, 64), (131072, 7168, 2048, 256), (4096, 512, 1408, 8),
                     (256, 4096, 1024, 64)]:
    t = gmm_mosaic.default_tiles(m, k, n, e, out_dtype)
    assert gmm_mosaic.smem_bytes(t, out_itemsize=itemsize) <= gmm_mosaic.SMEM_BUDGET, t
    tt = tgmm_mosaic.default_tiles(k, n, out_dtype)
    assert tgmm_mosaic.smem_bytes(tt, out_itemsize=itemsize) <= gmm_mosaic.SMEM_BUDGET, tt
  assert gmm_mosaic.default_tiles(65536, 2048, 768, 64, jnp.float32).stages == 3
  assert tgmm_mosaic.default_tiles(2048, 768, jnp.float32).stages == 3


@pytest.mark.parametrize("tiles, match", [
    (Tiles(split="k"), "split='k' is not one of"),
    (Tiles(tm=64, split="m"), "32 rows, not a multiple of wgmma's 64"),
    (Tiles(tm=256, tn=128, split="m"), "128x256 accumulator"),
])
def test_bad_tiles_are_refused_by_name(tiles, match):
  x = jnp.ones((256, 128), jnp.bfloat16)
  w = jnp.ones((2, 128, 256), jnp.bfloat16)
  with pytest.raises(ValueError, match=match):
    gmm_mosaic.gmm(x, w, jnp.array([100, 156], jnp.int32), tiles=tiles, interpret=True)


def test_split_by_rows_shares_the_columns():
  t = Tiles(tm=128, tn=128, split="m")
  assert (t.wg_rows, t.wg_cols) == (64, 256)
  assert (Tiles(tm=128, tn=128).wg_rows, Tiles(tm=128, tn=128).wg_cols) == (128, 128)
  # A row half needs half the epilogue buffer of a column half.
  assert (gmm_mosaic.smem_bytes(Tiles(split="n")) - gmm_mosaic.smem_bytes(Tiles(split="m"))
          == 2 * 64 * 64 * 2)


def test_default_tiles_split_128_column_ctas_by_rows():
  # N % 256 != 0 gives 128-column CTAs: 256 rows, one 128 x 128 half a warpgroup.
  t = gmm_mosaic.default_tiles(65536, 2048, 1408, 64)
  assert (t.tm, t.tn, t.split, t.wg_rows, t.wg_cols) == (256, 64, "m", 128, 128)
  # Too few rows a group for 256-row tiles, or 256-column CTAs: split by columns.
  assert gmm_mosaic.default_tiles(8192, 2048, 1408, 64).split == "n"
  assert gmm_mosaic.default_tiles(65536, 2048, 768, 64).split == "n"


def test_tgmm_default_tiles_store_one_chunk_a_warpgroup():
  t = tgmm_mosaic.default_tiles(2048, 2048)
  assert (t.tn, t.epi_n, t.stages) == (128, 128, 3)
  assert tgmm_mosaic.default_tiles(2048, 1408).epi_n == 64 == tgmm_mosaic.default_tiles(
      2048, 1408).tn
  # A float32 dw keeps 64-column chunks rather than a 2-slot ring.
  f32 = tgmm_mosaic.default_tiles(2048, 2048, jnp.float32)
  assert (f32.epi_n, f32.stages) == (64, 3)


def test_default_tiles_pick_the_ring_depth_by_contraction():
  assert gmm_mosaic.default_tiles(131072, 7168, 2048, 256).stages == 3
  assert gmm_mosaic.default_tiles(65536, 2048, 768, 64).stages == 4
  assert gmm_mosaic.default_tiles(65536, 4096, 1408, 64).stages == 4   # tn = 64


def test_gmm_out_dtype_float32():
  rng = np.random.default_rng(1)
  gs = np.array([70, 0, 50, 30], np.int32)
  x, w, _ = _inputs(rng, 200, 128, 128, 4, jnp.bfloat16)
  y = gmm_mosaic.gmm(x, w, jnp.asarray(gs), out_dtype=jnp.float32, tiles=T, interpret=True)
  assert y.dtype == jnp.float32
  # float32 output of bf16 inputs (exact products, float32 sums): float32 accuracy.
  _check_out(y, _ref_gmm(x, w, gs), gs, jnp.float32)


@needs_transpose
@pytest.mark.parametrize("m, k, n, gs, tiles", CASES, ids=IDS)
def test_gmm_transposed_rhs(m, k, n, gs, tiles):
  rng = np.random.default_rng(m * 7 + n)
  gs = np.asarray(gs, np.int32)
  x, w, _ = _inputs(rng, m, k, n, len(gs), jnp.bfloat16)
  y = gmm_mosaic.gmm(x, jnp.swapaxes(w, 1, 2), jnp.asarray(gs), transpose_rhs=True,
                     tiles=tiles, interpret=True)
  _check_out(y, _ref_gmm(x, w, gs), gs, jnp.bfloat16)


ALL = ["gmm", "gmm_t", "tgmm"]
GRAD_CASES = [  # (M, K, N, group sizes, dtype, products that the Mosaic kernels run)
    (200, 128, 128, [70, 0, 50, 30], jnp.bfloat16, ALL),  # zeros, tail
    (128, 128, 256, [0, 128, 0], jnp.float16, ALL),       # one group
    (100, 128, 128, [100], jnp.bfloat16, ALL),            # E = 1
    (64, 128, 128, [0, 0], jnp.bfloat16, ALL),            # no rows
    # N = 64 is not a multiple of 2*tn: the forward and the weight gradient fall
    # back to Triton while the input gradient (N' = K = 128) runs on gmm_mosaic.
    (96, 128, 64, [50, 0, 30], jnp.bfloat16, ["gmm_t"]),
]


@needs_transpose
@pytest.mark.parametrize("m, k, n, gs, dtype, products", GRAD_CASES,
                         ids=["zeros_tail", "one_group_f16", "e1", "no_rows", "mixed"])
def test_gmm_gradients(m, k, n, gs, dtype, products, mosaic_calls):
  rng = np.random.default_rng(m * 3 + n)
  gs = np.asarray(gs, np.int32)
  x, w, dy = _inputs(rng, m, k, n, len(gs), dtype)
  f = lambda a, b: gmm_lib.gmm(a, b, jnp.asarray(gs), backend="mosaic", interpret=True)
  y, dx, dw = _value_and_vjp(f, x, w, dy)
  assert mosaic_calls == products
  _check_out(y, _ref_gmm(x, w, gs), gs, dtype)
  # dx = dy @ w^T per group, zero past the groups; dw = per-group x^T dy, zero if empty.
  _check_out(dx, _ref_gmm(dy, np.swapaxes(np.asarray(w, np.float64), 1, 2), gs), gs, dtype)
  dw64 = np.asarray(dw, np.float64)
  assert np.all(np.isfinite(dw64))
  assert np.all(dw64[gs == 0] == 0), "empty groups must get a zero weight gradient"
  if gs.sum():
    assert _rel(dw, _ref_tgmm(x, dy, gs)) < TOL[dtype]
  assert y.dtype == dx.dtype == dw.dtype == dtype


def test_forward_through_gmm_lib_runs_mosaic(mosaic_calls):
  # Forward only, so it runs on every jax version.
  rng = np.random.default_rng(2)
  gs = np.array([30, 0, 90], np.int32)
  x, w, _ = _inputs(rng, 150, 128, 256, 3, jnp.bfloat16)
  y = gmm_lib.gmm(x, w, jnp.asarray(gs), backend="mosaic", interpret=True)
  assert mosaic_calls == ["gmm"]
  _check_out(y, _ref_gmm(x, w, gs), gs, jnp.bfloat16)


# --- clear errors and fallbacks ---------------------------------------------------

def test_float32_is_refused():
  x = jnp.ones((64, 128), jnp.float32)
  w = jnp.ones((2, 128, 128), jnp.float32)
  with pytest.raises(ValueError, match="bfloat16"):
    gmm_mosaic.gmm(x, w, jnp.array([32, 32], jnp.int32), tiles=T, interpret=True)


def test_k_not_multiple_of_tk_is_refused():
  x = jnp.ones((64, 96), jnp.bfloat16)
  w = jnp.ones((2, 96, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match="tk=64"):
    gmm_mosaic.gmm(x, w, jnp.array([32, 32], jnp.int32), tiles=T, interpret=True)


def test_n_not_multiple_of_two_tn_is_refused():
  x = jnp.ones((64, 128), jnp.bfloat16)
  w = jnp.ones((2, 128, 192), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"2\*tn=128"):
    gmm_mosaic.gmm(x, w, jnp.array([32, 32], jnp.int32), tiles=T, interpret=True)


def test_mismatched_operands_are_refused():
  x = jnp.ones((64, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match="one dtype"):
    gmm_mosaic.gmm(x, jnp.ones((2, 128, 128), jnp.float16), jnp.array([32, 32], jnp.int32),
                   tiles=T, interpret=True)
  with pytest.raises(ValueError, match="contracts over 64"):
    gmm_mosaic.gmm(x, jnp.ones((2, 64, 128), jnp.bfloat16), jnp.array([32, 32], jnp.int32),
                   tiles=T, interpret=True)


def test_unknown_backend_lists_the_backends():
  x = jnp.ones((8, 64), jnp.bfloat16)
  w = jnp.ones((2, 64, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"backend='nope'.*'triton'.*'mosaic'"):
    gmm_lib.gmm(x, w, jnp.array([4, 4], jnp.int32), backend="nope", interpret=True)


def test_float32_falls_back_to_triton(mosaic_calls):
  rng = np.random.default_rng(4)
  gs = np.array([50, 0, 40], np.int32)  # tail of 10 rows
  x, w, dy = _inputs(rng, 100, 128, 128, 3, jnp.float32)
  f = lambda a, b: gmm_lib.gmm(a, b, jnp.asarray(gs), backend="mosaic", interpret=True)
  y, dx, dw = _value_and_vjp(f, x, w, dy)
  assert not mosaic_calls, "float32 must not reach gmm_mosaic"
  _check_out(y, _ref_gmm(x, w, gs), gs, jnp.float32)
  _check_out(dx, _ref_gmm(dy, np.swapaxes(np.asarray(w, np.float64), 1, 2), gs), gs,
             jnp.float32)
  assert _rel(dw, _ref_tgmm(x, dy, gs)) < 1e-5


# --- float32 as three bfloat16 products (backend "mosaic_bf16x3") ---------------

def test_split_bf16_pieces_sum_to_the_float32_value():
  rng = np.random.default_rng(12)
  a = (rng.standard_normal(4096) * np.exp(rng.uniform(-20, 20, 4096))).astype(np.float32)
  hi, lo = gmm_lib.split_bf16(jnp.asarray(a))
  assert hi.dtype == lo.dtype == jnp.bfloat16
  # hi is a rounded to bfloat16 (nearest even, as XLA's own conversion)
  np.testing.assert_array_equal(np.asarray(hi, np.float32),
                                np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float32))
  rest = np.abs(a.astype(np.float64) - np.asarray(hi, np.float64) - np.asarray(lo, np.float64))
  assert np.all(rest <= 2.0 ** -16 * np.abs(a)), float(np.max(rest / np.abs(a)))
  assert np.any(np.asarray(lo, np.float32) != 0)


def test_bf16x3_float32_forward_through_the_registry(mosaic_calls):
  # Forward only (no transposed operand), so it runs on every jax version.
  rng = np.random.default_rng(14)
  gs = np.array([30, 0, 90], np.int32)
  x, w, _ = _inputs(rng, 130, 192, 256, 3, jnp.float32)
  y = jax.jit(lambda a, b: op.grouped_matmul(a, b, jnp.asarray(gs),
                                              impl="pallas_mosaic_bf16x3_interpret"))(x, w)
  assert mosaic_calls == ["gmm"] and y.dtype == jnp.float32
  assert _rel(y, _ref_gmm(x, w, gs)) < 3e-5
  assert np.all(np.asarray(y)[gs.sum():] == 0)


@needs_transpose
def test_bf16x3_float32_gradients_match_float64(mosaic_calls):
  rng = np.random.default_rng(13)
  gs = np.array([70, 0, 50, 30], np.int32)                   # an empty group, a tail
  x, w, dy = _inputs(rng, 200, 128, 128, 4, jnp.float32)
  f = lambda a, b: gmm_lib.gmm(a, b, jnp.asarray(gs), backend="mosaic_bf16x3",
                               interpret=True)
  y, dx, dw = _value_and_vjp(f, x, w, dy)
  assert mosaic_calls == ["gmm", "gmm_t", "tgmm", "tgmm", "tgmm"]   # none on Triton
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32
  ref_dx = _ref_gmm(dy, np.swapaxes(np.asarray(w, np.float64), 1, 2), gs)
  errors = [_rel(y, _ref_gmm(x, w, gs)), _rel(dx, ref_dx), _rel(dw, _ref_tgmm(x, dy, gs))]
  # Control: bfloat16 operands alone are about 100x less accurate.
  bf = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)
  control = _rel(_ref_gmm(bf(x), bf(w), gs), _ref_gmm(x, w, gs))
  assert control > 1e-3, control
  assert max(errors) < 3e-5, errors
  assert np.all(np.asarray(y)[gs.sum():] == 0)
  assert np.all(np.asarray(dw)[gs == 0] == 0)


# --- registry ------------------------------------------------------------------

def test_registry_mosaic_impls_on_cpu(mosaic_calls):
  assert {"pallas_mosaic", "pallas_mosaic_interpret", "pallas_mosaic_bf16x3",
          "pallas_mosaic_bf16x3_interpret"} <= set(registry.known())
  rng = np.random.default_rng(6)
  gs = np.array([60, 0, 41], np.int32)
  x, w, _ = _inputs(rng, 120, 128, 128, 3, jnp.bfloat16)
  assert registry.resolve("auto", x.dtype).name == "ragged_dot"  # never an interpreter
  for impl in ("pallas_mosaic", "pallas_mosaic_bf16x3"):
    with pytest.raises(ValueError, match=f"use '{impl}_interpret'"):
      op.grouped_matmul(x, w, jnp.asarray(gs), impl=impl)
  assert not mosaic_calls
  y = op.grouped_matmul(x, w, jnp.asarray(gs), impl="pallas_mosaic_interpret")
  assert mosaic_calls == ["gmm"]
  assert y.dtype == jnp.bfloat16
  _check_out(y, _ref_gmm(x, w, gs), gs, jnp.bfloat16)


# --- property ------------------------------------------------------------------

@hypothesis.settings(max_examples=6, deadline=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(
    m=st.integers(1, 300), k=st.sampled_from([64, 128]), n=st.sampled_from([128, 256]),
    sizes=st.lists(st.integers(0, 120), min_size=1, max_size=6),
    window=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16))
def test_property_gmm_matches_reference(m, k, n, sizes, window, seed):
  gs = np.asarray(sizes, np.int32)
  # Trim the group sizes so that they fit in M (the remainder is the zero tail).
  gs = np.minimum(gs, np.maximum(m - (np.cumsum(gs) - gs), 0)).astype(np.int32)
  rng = np.random.default_rng(seed)
  x, w, _ = _inputs(rng, m, k, n, len(gs), jnp.bfloat16)
  tiles = Tiles(tm=64, tn=64, stages=2, window=window)
  ref = _ref_gmm(x, w, gs)
  y = gmm_mosaic.gmm(x, w, jnp.asarray(gs), tiles=tiles, interpret=True)
  _check_out(y, ref, gs, jnp.bfloat16)
  if TRANSPOSE_OK:  # the same product with w stored [E, N, K]
    yt = gmm_mosaic.gmm(x, jnp.swapaxes(w, 1, 2), jnp.asarray(gs), transpose_rhs=True,
                        tiles=tiles, interpret=True)
    _check_out(yt, ref, gs, jnp.bfloat16)


TGMM_CASES = [  # (id, M, K, N, group sizes, tiles)
    ("empty_and_tail", 200, 128, 256, [50, 0, 77, 30], tgmm_mosaic.Tiles(tn=64, stages=2)),
    ("one_group", 256, 128, 128, [256], tgmm_mosaic.Tiles(tn=64, stages=2)),
    ("edges_mid_block", 130, 256, 256, [0, 100, 0], tgmm_mosaic.Tiles(tn=64, stages=3)),
    ("small_groups", 192, 128, 128, [10, 20, 5], tgmm_mosaic.Tiles(tn=64, stages=2)),
    ("no_rows", 64, 128, 128, [0, 0], tgmm_mosaic.Tiles(tn=64, stages=2)),
    # group 1's step from its first row (70) would read past M = 128: it steps on
    # the 64-row grid instead, masking rows 64..69 of group 0.
    ("grid_fallback", 128, 128, 128, [70, 58], tgmm_mosaic.Tiles(tn=64, stages=2)),
    # 4 dw row blocks in windows of 2 sweeping 4 column blocks, snaking.
    ("windows", 150, 512, 512, [40, 60, 1, 30],
     tgmm_mosaic.Tiles(tn=64, stages=2, window=2, window_from=1)),
    # One ring across each CTA's items (2 CTAs in the interpreter, 10 items each):
    # 0, 1 or 3 steps per item, not multiples of the ring depth, so slots and
    # barrier phases carry over item boundaries at every offset.
    ("ring_across_items", 192, 256, 256, [10, 20, 0, 5, 130],
     tgmm_mosaic.Tiles(tn=64, stages=3)),
    # one 128-column epilogue chunk a warpgroup (the default at tn = 128)
    ("one_chunk", 200, 128, 256, [50, 0, 77, 30],
     tgmm_mosaic.Tiles(tn=128, epi_n=128, stages=2)),
    # groups processed by step count, largest first, not in group order
    ("size_order", 200, 128, 256, [10, 0, 120, 40], tgmm_mosaic.Tiles(tn=64, stages=2)),
]


@needs_transpose
@pytest.mark.parametrize("m, k, n, gs, tiles", [c[1:] for c in TGMM_CASES],
                         ids=[c[0] for c in TGMM_CASES])
def test_tgmm_matches_reference(m, k, n, gs, tiles):
  rng = np.random.default_rng(m + n)
  gs = np.asarray(gs, np.int32)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
  dw = np.asarray(tgmm_mosaic.tgmm(x, dy, jnp.asarray(gs), tiles=tiles, interpret=True),
                  np.float64)
  assert np.all(np.isfinite(dw)), "unwritten (NaN) dw tiles"
  assert np.all(dw[gs == 0] == 0), "empty groups must get zero weight gradients"
  ref = _ref_tgmm(x, dy, gs)
  if gs.sum():
    assert _rel(dw, ref) < 1e-2


def test_item_plan_orders_groups_by_steps():
  gs = jnp.array([10, 0, 300, 64, 130], jnp.int32)
  plan = np.asarray(tgmm_mosaic.item_plan(gs, 504, 512, tgmm_mosaic.Tiles()))
  assert list(plan[:, 0]) == [2, 4, 3, 0, 1]   # 5, 3, 2, 1 and 0 steps
  assert list(plan[:, 4]) == [5, 3, 2, 1, 0]
  # Each group keeps its own step_plan row, only the order differs.
  np.testing.assert_array_equal(
      plan[:, 1:], np.asarray(tgmm_mosaic.step_plan(gs, 504, 512, 64))[plan[:, 0]])


def test_tgmm_refuses_steps_of_part_of_a_wgmma_tile():
  # The neighbour-row mask needs whole 64-row wgmma tiles; without this refusal
  # Mosaic fails deep in layout inference (seen on an H200).
  x = jnp.ones((64, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match="tr=32 is not a multiple of wgmma rows=64"):
    tgmm_mosaic.tgmm(x, x, jnp.array([64]), tiles=tgmm_mosaic.Tiles(tn=64, tr=32),
                     interpret=True)


def test_tgmm_refuses_what_it_cannot_take():
  x = jnp.ones((64, 96), jnp.bfloat16)
  with pytest.raises(ValueError, match="tko=128"):
    tgmm_mosaic.tgmm(x, jnp.ones((64, 128), jnp.bfloat16), jnp.array([64]), interpret=True)
  with pytest.raises(ValueError, match="bfloat16"):
    tgmm_mosaic.tgmm(x.astype(jnp.float32), jnp.ones((64, 128)), jnp.array([64]),
                     interpret=True)


@pytest.mark.skipif(TRANSPOSE_OK, reason="only jax < 0.11 lacks the transposed operand")
def test_old_interpreter_refuses_transposed_operands_instead_of_hanging():
  x = jnp.ones((64, 128), jnp.bfloat16)
  w = jnp.ones((2, 128, 128), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="jax >= 0.11"):
    gmm_mosaic.gmm(x, w, jnp.array([30, 34]), transpose_rhs=True, interpret=True)
  with pytest.raises(NotImplementedError, match="jax >= 0.11"):
    tgmm_mosaic.tgmm(x, x, jnp.array([30, 34]), interpret=True)


def test_gradients_on_any_jax_route_what_the_interpreter_can_run(mosaic_calls):
  # On jax < 0.11 the transposed products fall back to Triton; on newer jax all
  # three run on Mosaic. Either way the result matches the reference.
  rng = np.random.default_rng(11)
  gs = np.array([40, 0, 60, 28], np.int32)
  x, w, dy = _inputs(rng, 128, 128, 128, 4, jnp.bfloat16)
  f = lambda a, b: gmm_lib.gmm(a, b, jnp.asarray(gs), backend="mosaic", interpret=True)
  y, dx, dw = _value_and_vjp(f, x, w, dy)
  _check_out(y, _ref_gmm(x, w, gs), gs, jnp.bfloat16)
  _check_out(dx, _ref_gmm(dy, np.swapaxes(np.asarray(w, np.float64), 1, 2), gs), gs,
             jnp.bfloat16)
  assert _rel(dw, _ref_tgmm(x, dy, gs)) < 1e-2
  assert mosaic_calls == (["gmm", "gmm_t", "tgmm"] if TRANSPOSE_OK else ["gmm"])


# --- lowering for CUDA ---------------------------------------------------------
# The interpreter does not run Mosaic GPU's layout inference, which rejects, for
# example, a TMA copy whose first row it cannot prove to be a multiple of 8. So
# each kernel configuration is also lowered for CUDA here, on the CPU host (no GPU
# needed), which runs Mosaic GPU's compilation of the kernel.
LOWER_CASES = [  # (id, kernel, M, K, N, E, tiles or None, transposed)
    ("gmm", "gmm", 1000, 256, 256, 4, None, False),          # M % 8 != 0: padded
    ("gmm_t", "gmm", 1024, 256, 512, 4, None, True),
    ("gmm_tn64_ring3", "gmm", 1024, 4096, 128, 8, Tiles(tn=64, stages=3), False),
    ("gmm_tm64", "gmm", 200, 128, 256, 4, Tiles(tm=64), False),
    ("tgmm", "tgmm", 1000, 256, 256, 4, None, False),
    ("tgmm_tn64", "tgmm", 1024, 256, 128, 4, None, False),   # N % 256 != 0: tn = epi_n = 64
    ("gmm_split_m", "gmm", 1000, 256, 256, 4, Tiles(split="m"), False),
    # N % 256 != 0 and 256+ rows a group: the default is tm=256 split by rows
    ("gmm_default_tn64", "gmm", 4096, 512, 384, 8, None, False),
    ("gmm_split_m_t", "gmm", 1024, 256, 512, 4, Tiles(split="m"), True),
    ("gmm_split_m_tm256", "gmm", 1024, 4096, 128, 8, Tiles(tm=256, tn=64, split="m"), False),
    # K >= 4096 and 256-column CTAs: the default is a 3-deep ring
    ("gmm_default_ring3", "gmm", 1024, 4096, 256, 8, None, False),
]


@pytest.mark.parametrize("kernel, m, k, n, e, tiles, transposed",
                         [c[1:] for c in LOWER_CASES], ids=[c[0] for c in LOWER_CASES])
def test_kernels_lower_for_cuda(kernel, m, k, n, e, tiles, transposed):
  bf16 = jnp.bfloat16
  x = jax.ShapeDtypeStruct((m, k), bf16)
  gs = jax.ShapeDtypeStruct((e,), jnp.int32)
  if kernel == "tgmm":
    fn = lambda a, b, g: tgmm_mosaic.tgmm(a, b, g, tiles=tiles, num_sms=132)
    args = (x, jax.ShapeDtypeStruct((m, n), bf16), gs)
  else:
    fn = lambda a, b, g: gmm_mosaic.gmm(a, b, g, tiles=tiles, transpose_rhs=transposed,
                                        num_sms=132)
    args = (x, jax.ShapeDtypeStruct((e, n, k) if transposed else (e, k, n), bf16), gs)
  lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


def test_bf16x3_float32_lowers_for_cuda():
  f32 = jnp.float32
  args = (jax.ShapeDtypeStruct((1024, 256), f32), jax.ShapeDtypeStruct((4, 256, 256), f32),
          jax.ShapeDtypeStruct((1024, 256), f32))
  gs = jnp.array([300, 0, 500, 224], jnp.int32)

  def fwd_bwd(x, w, dy):
    y, vjp = jax.vjp(lambda a, b: gmm_lib.gmm(a, b, gs, backend="mosaic_bf16x3"), x, w)
    return (y, *vjp(dy))

  text = jax.jit(fwd_bwd).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("mosaic_gpu") >= 5, "gmm, transposed gmm and three tgmm on Mosaic"
