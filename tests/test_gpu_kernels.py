"""The Pallas kernels on a GPU against float64 references: the device's own compiler
and hardware, which the interpret-mode tests on CPU do not reach.

  python -m pytest -m gpu tests/test_gpu_kernels.py
  python -m pytest -m gpu tests/test_gpu_kernels.py --tile-variants=pallas_mosaic@split=m

Random inputs at sizes off the tile grids, an empty group, and rows past the
groups (whose outputs must be exactly zero). Skipped where jax's default backend
is not a GPU; kernels a GPU cannot run (Mosaic before Hopper) or a variant a
shape does not fit are skipped by name.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import gmm_impls
from benchmarks.gmm_shapes import group_sizes
from benchmarks.routed_rows import gather_and_combine, random_top2_rows
from kernel_refs import random_inputs, ref_gmm, ref_tgmm, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (jax default backend)"),
]

# (M, K, N, E, group-size distribution); the groups cover all but TAIL rows.
CASES = [(1000, 256, 384, 8, "skewed"), (300, 200, 136, 5, "balanced"),
         (4096, 512, 768, 16, "skewed"), (2000, 1024, 512, 3, "skewed")]
TAIL = 37
IMPLS = ["pallas_triton", "pallas_mosaic", "pallas_mosaic_bf16x3"]
VARIANTS = ["pallas_mosaic@split=m", "pallas_mosaic@stages=2/window=8",
            "tgmm_mosaic", "tgmm_mosaic@stages=2", "tgmm_mosaic@window=2/window_from=1"]
TOLERANCE = {"bfloat16": 1e-2, "float32": 1e-5}


def pytest_generate_tests(metafunc):
  if "variant" in metafunc.fixturenames:
    extra = [v for v in metafunc.config.getoption("--tile-variants").split(",") if v]
    metafunc.parametrize("variant", VARIANTS + [v for v in extra if v not in VARIANTS])


def _needs_hopper(impl):
  if "mosaic" in impl:
    capability = float(getattr(jax.devices()[0], "compute_capability", 0) or 0)
    if capability < 9.0:
      pytest.skip(f"{impl} needs Hopper (sm_90) or newer; this GPU is sm_{capability}")


@functools.lru_cache(maxsize=None)
def _case(case, dtype_name):
  """Inputs and float64 references of one case: x, w, dy, gs and y, dx, dw."""
  m, k, n, e, dist = case
  sizes = group_sizes(m - TAIL, e, dist)
  sizes[0] += sizes[1]
  sizes[1] = 0
  x, w, dy = random_inputs(np.random.default_rng(m), m, k, n, e, jnp.dtype(dtype_name))
  refs = {"y": ref_gmm(x, w, sizes),
          "dx": ref_gmm(dy, np.swapaxes(np.asarray(w, np.float64), 1, 2), sizes),
          "dw": ref_tgmm(x, dy, sizes)}
  return (x, w, dy, jnp.asarray(sizes)), refs


def _check(outs: dict, refs: dict, tol: float):
  """Each output finite and within ``tol`` of its reference; for y and dx, rows
  past the groups exactly zero."""
  for name, out in outs.items():
    out = np.asarray(out, np.float32)
    assert np.all(np.isfinite(out)), name
    if name in ("y", "dx"):
      assert np.all(out[out.shape[0] - TAIL:] == 0), f"{name}: rows past the groups not zero"
    assert rel_err(out, refs[name]) < tol, (name, rel_err(out, refs[name]))


def _run_or_skip(fn, *args):
  try:
    return fn(*args)
  except ValueError as exc:
    if "moe_kernels." in str(exc):  # the kernel refuses these tiles or this shape
      pytest.skip(str(exc)[:300])
    raise


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("impl", IMPLS)
def test_forward_and_gradients(impl, dtype, case):
  _needs_hopper(impl)
  (x, w, dy, gs), refs = _case(case, dtype)
  y, dx, dw = jax.jit(gmm_impls.forward_and_gradients(impl))(x, w, gs, dy)
  _check({"y": y, "dx": dx, "dw": dw}, refs, TOLERANCE[dtype])


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_tile_variant(variant, case):
  """A Mosaic tile variant (bfloat16): y and dx for ``pallas_mosaic@...``, dw for
  ``tgmm_mosaic`` and ``tgmm_mosaic@...``."""
  _needs_hopper(variant)
  (x, w, dy, gs), refs = _case(case, "bfloat16")
  if variant.startswith("tgmm_mosaic"):
    outs = {"dw": _run_or_skip(jax.jit(gmm_impls.weight_gradient(variant)), x, dy, gs)}
  else:
    outs = {"y": _run_or_skip(jax.jit(gmm_impls.forward(variant)), x, w, gs),
            "dx": _run_or_skip(jax.jit(gmm_impls.input_gradient(variant)), dy, w, gs)}
  _check(outs, refs, TOLERANCE["bfloat16"])


def _fused_refs(name, rows, lhs, w, cotangent):
  """float64 (output, d lhs, d w) of a fused kernel (``routed_rows.gather_and_combine``)."""
  gs = np.asarray(rows.group_sizes)
  token = np.asarray(rows.row_token)
  slot = np.asarray(rows.row_slot)
  weight = np.asarray(rows.row_weight, np.float64)[:, None]
  lhs, w, cotangent = (np.asarray(a, np.float64) for a in (lhs, w, cotangent))
  w_t = np.swapaxes(w, 1, 2)
  if name == "gather":  # out[r] = lhs[token[r]] @ w[g(r)]
    d_lhs = np.zeros_like(lhs)
    np.add.at(d_lhs, token, ref_gmm(cotangent, w_t, gs))
    return ref_gmm(lhs[token], w, gs), d_lhs, ref_tgmm(lhs[token], cotangent, gs)
  out = np.zeros((len(slot), w.shape[2]))  # out[slot[r]] = weight[r] * (lhs[r] @ w[g(r)])
  out[slot] = weight * ref_gmm(lhs, w, gs)
  per_row = weight * cotangent[slot]
  return out, ref_gmm(per_row, w_t, gs), ref_tgmm(lhs, per_row, gs)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("fused", ["gather", "combine"])
def test_fused_dispatch_kernels(fused, dtype):
  """Fused gather / combine on random top-2 routing from the library's dropless
  plan, the last expert's rows past the groups (as if dropped)."""
  m, k, n, e = 2048, 256, 384, 8
  rows = random_top2_rows(m // 2, e, seed=1)
  dropped = slice(m - int(rows.group_sizes[-1]), m)
  rows = dataclasses.replace(rows, group_sizes=rows.group_sizes.at[-1].set(0))
  x, w, dy = random_inputs(np.random.default_rng(7), m, k, n, e, jnp.dtype(dtype))
  lhs, rhs, cotangent = {"gather": (x[:m // 2], w, dy),
                         "combine": (dy, jnp.swapaxes(w, 1, 2), x)}[fused]
  fn = gather_and_combine(rows)[f"{fused}_fused"]
  y, vjp = jax.vjp(fn, lhs, rhs)
  outs = (y, *vjp(cotangent))
  refs = _fused_refs(fused, rows, lhs, rhs, cotangent)
  for name, out, ref in zip(("y", "d lhs", "d w"), outs, refs):
    out = np.asarray(out, np.float32)
    assert np.all(np.isfinite(out)), name
    assert rel_err(out, ref) < TOLERANCE[dtype], (name, rel_err(out, ref))
  # The dropped rows' outputs are exactly zero: in row order (gather) or at their slots.
  dropped_out = dropped if fused == "gather" else np.asarray(rows.row_slot)[dropped]
  assert np.all(np.asarray(y, np.float32)[dropped_out] == 0)
