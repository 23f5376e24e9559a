r"""Benchmark grouped matmul implementations against a dense matmul of equal FLOPs.

  python -m experiments.benchmark_gmm                 # table of fwd / fwd+bwd
  python -m experiments.benchmark_gmm --check         # correctness on the device first
  python -m experiments.benchmark_gmm --autotune      # measure tile candidates, write the table
  python -m experiments.benchmark_gmm --torch         # torch._grouped_mm on the same shapes

For every shape (M, K, N, E) and group-size distribution (balanced, skewed) it
prints each implementation's median time, TF/s and ratio = dense time / its
time, where "dense" is jnp.dot of x[M, K] @ w[K, N] (same FLOPs) timed in the
same run (``--baseline=first``: the first of --impls, timed alternately with each,
for an A/B of kernel variants). fwd+bwd is y, dx and dw (three matmuls' worth of FLOPs). Shapes, inputs
and timing live in ``gmm_common``, the autotuner in ``gmm_autotune``, the torch
comparison in ``gmm_torch`` and tile-variant names in ``tile_variants``.
"""
from __future__ import annotations

import importlib.util
import json
import pathlib
import statistics
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _import_kernels():
  """moe_kernels, installed or straight from kernels/ in a plain checkout."""
  try:
    import moe_kernels  # pylint: disable=g-import-not-at-top
    return moe_kernels
  except ImportError:
    spec = importlib.util.spec_from_file_location(
        "moe_kernels", _ROOT / "kernels" / "__init__.py",
        submodule_search_locations=[str(_ROOT / "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["moe_kernels"] = mod
    spec.loader.exec_module(mod)
    return mod


_import_kernels()
from moe_kernels import fused  # noqa: E402  pylint: disable=g-import-not-at-top
from moe_kernels import gmm as gmm_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from moe_kernels import gmm_mosaic  # noqa: E402  pylint: disable=g-import-not-at-top
from moe_kernels import tgmm_mosaic  # noqa: E402  pylint: disable=g-import-not-at-top
from experiments import gmm_autotune  # noqa: E402  pylint: disable=g-import-not-at-top
from experiments import gmm_common  # noqa: E402  pylint: disable=g-import-not-at-top
from experiments import gmm_torch  # noqa: E402  pylint: disable=g-import-not-at-top
from experiments.gmm_common import (  # noqa: E402  pylint: disable=g-import-not-at-top
    SHAPES, group_sizes, make_inputs, rel_err)
from experiments.tile_variants import (  # noqa: E402  pylint: disable=g-import-not-at-top
    check_impls, first_in_mode, has_kernel, parse_variant)

_SHAPES = flags.DEFINE_list("shapes", ["llama-ish", "fine-768", "fine-1408", "dsv3", "decode"],
                            f"names from {sorted(SHAPES)}")
_DISTS = flags.DEFINE_list("dists", ["balanced", "skewed"], "group-size distributions")
_IMPLS = flags.DEFINE_list("impls", ["pallas_mosaic", "pallas_triton", "ragged_dot"],
                           "implementations (pallas_mosaic needs Hopper or --interpret); "
                           "pallas_mosaic@tm/tn/tk/stages/window[/overlap[/light_max[/group_aligned]]] "
                           "times Mosaic tile variants (forward only); "
                           "tgmm_mosaic@tko/tn/tr/stages[/window[/window_from[/group_aligned]]] times "
                           "weight-gradient tile variants (mode tgmm)")
_MODES = flags.DEFINE_list("modes", ["fwd", "fwdbwd"],
                           "fwd, fwdbwd, tgmm (the weight-gradient kernel alone) and/or "
                           "dx (the input-gradient product alone, Mosaic kernels)")
_BASELINE = flags.DEFINE_enum(
    "baseline", "dense", ["dense", "first"],
    "what the ratio column divides: the dense matmul of equal FLOPs, or the first of "
    "--impls that has the mode (an A/B of variants: each timed alternately with it; "
    "ratio > 1 is faster than it)")
_ITERS = flags.DEFINE_integer("iters", 20, "calls per timing sample")
_REPS = flags.DEFINE_integer("reps", 5, "timing samples (median taken)")
_CHECK = flags.DEFINE_bool("check", False, "check correctness before timing")
_AUTOTUNE = flags.DEFINE_bool("autotune", False, "measure tile candidates, write the table")
_TABLE_OUT = flags.DEFINE_string("table_out", str(_ROOT / "kernels" / "tuning_table.py"),
                                 "where --autotune writes the table")
_JSON_OUT = flags.DEFINE_string("json_out", "", "write all rows as JSON here")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "input dtype")
_RAGGED_MAX_E = flags.DEFINE_integer("ragged_max_e", 64, "skip ragged_dot above this E")
_CANDIDATES = flags.DEFINE_list("candidates", [], "override gmm candidates: tm/tn/tk/warps/stages")
_TUNE_DIST = flags.DEFINE_string("tune_dist", "balanced", "group sizes --autotune measures on")
_TUNE_OPS = flags.DEFINE_list("tune_ops", ["gmm", "tgmm"], "ops --autotune measures")
_TORCH = flags.DEFINE_bool("torch", False, "time torch._grouped_mm instead (no JAX work)")
_FUSED = flags.DEFINE_bool("fused", True, "also time the fused gather / combine variants")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Pallas interpret mode (CPU smoke test)")


def bench(fn, *args, iters=None, reps=None, warm=True) -> float:
  """gmm_common.bench with the --iters and --reps defaults."""
  return gmm_common.bench(fn, *args, iters=iters or _ITERS.value, reps=reps or _REPS.value,
                          warm=warm)


def bench_pair(base, base_args, fn, args, iters=None, reps=None):
  """Alternates samples of `base` and `fn` so clock drift hits both alike.

  Returns (median base seconds, median fn seconds, median of per-pair ratios).
  """
  iters = iters or _ITERS.value
  jax.block_until_ready(base(*base_args))
  jax.block_until_ready(fn(*args))
  tb, tf, ratios = [], [], []
  for _ in range(reps or _REPS.value):
    b = bench(base, *base_args, iters=max(1, min(iters, _ITERS.value)), reps=1, warm=False)
    f = bench(fn, *args, iters=iters, reps=1, warm=False)
    tb.append(b)
    tf.append(f)
    ratios.append(b / f)
  return statistics.median(tb), statistics.median(tf), statistics.median(ratios)


def _ragged(x, w, gs):
  y = jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32)
  return y.astype(x.dtype)


def pallas_dense(x, w, tm=128, tn=256, tk=64):
  """Control: a plain Pallas (Triton) matmul with BlockSpecs, no groups."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  m, k = x.shape
  n = w.shape[1]

  def kernel(x_ref, w_ref, o_ref):
    def body(i, acc):
      ks = pl.ds(pl.multiple_of(i * tk, tk), tk)
      return acc + jnp.dot(x_ref[:, ks], w_ref[ks, :], preferred_element_type=jnp.float32)
    acc = jax.lax.fori_loop(0, k // tk, body, jnp.zeros((tm, tn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)

  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
      grid=(m // tm, n // tn),
      in_specs=[pl.BlockSpec((tm, k), lambda i, j: (i, 0)),
                pl.BlockSpec((k, tn), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
      compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=4))(x, w)


def impl_fn(name):
  if name == "pallas_dense":  # controls, forward only
    return lambda x, w, gs: pallas_dense(x, w[0], tn=256 if w.shape[2] % 256 == 0 else 128)
  if name == "pallas_e1":
    return lambda x, w, gs: gmm_lib.gmm(x, w[:1], jnp.sum(gs, keepdims=True),
                                        interpret=_INTERPRET.value)
  if name == "pallas_triton":
    return lambda x, w, gs: gmm_lib.gmm(x, w, gs, interpret=_INTERPRET.value)
  if name in ("pallas_mosaic", "pallas_mosaic_bf16x3"):
    backend = name.removeprefix("pallas_")
    return lambda x, w, gs: gmm_lib.gmm(x, w, gs, backend=backend, interpret=_INTERPRET.value)
  if name.startswith("pallas_mosaic@"):
    return mosaic_variant(name)
  if name == "ragged_dot":
    return _ragged
  raise ValueError(name)


def _mosaic_tiles(name, m, k, n, e):
  """A ``pallas_mosaic@...`` variant's tiles for the product [m, k] x [e, k, n]."""
  return parse_variant(name, gmm_mosaic.default_tiles(m, k, n, e))


def mosaic_variant(name):
  """``pallas_mosaic@tm/tn/tk/stages/window[/overlap[/light_max[/group_aligned]]]
  [/field=value...]`` or ``pallas_mosaic@field=value[/...]`` (changes to the default
  tiles): modes fwd and dx (the input-gradient product)."""
  def run(x, w, gs):
    tiles = _mosaic_tiles(name, x.shape[0], x.shape[1], w.shape[2], w.shape[0])
    return gmm_mosaic.gmm(x, w, gs, tiles=tiles, interpret=_INTERPRET.value)
  return run


def dx_fn(name):
  """The input-gradient product alone, dy[M, N] @ w[g]^T with w[E, K, N] (mode dx),
  with the Mosaic kernel's default tiles or a ``pallas_mosaic@...`` variant's (the
  impls ``tile_variants.has_kernel`` gives a dx mode)."""
  def run(dy, w, gs):
    tiles = None
    if "@" in name:
      tiles = _mosaic_tiles(name, dy.shape[0], dy.shape[1], w.shape[1], w.shape[0])
    return gmm_mosaic.gmm(dy, w, gs, tiles=tiles, transpose_rhs=True,
                          interpret=_INTERPRET.value)
  return run


def tgmm_variant(name):
  """``tgmm_mosaic@tko/tn/tr/stages[/window[/window_from[/group_aligned]]][/field=value...]``
  or ``tgmm_mosaic@field=value[/...]`` (changes to the default tiles): mode tgmm only."""
  def run(x, dy, gs):
    tiles = parse_variant(name, tgmm_mosaic.default_tiles(x.shape[1], dy.shape[1]))
    return tgmm_mosaic.tgmm(x, dy, gs, tiles=tiles, interpret=_INTERPRET.value)
  return run


def tgmm_fn(name):
  """The weight-gradient kernel alone (mode "tgmm"); same FLOPs as the forward.
  ``tgmm_mosaic`` is the Mosaic kernel with its default tiles (the baseline of an
  A/B of ``tgmm_mosaic@...`` variants)."""
  if name == "tgmm_mosaic":
    return lambda x, dy, gs: tgmm_mosaic.tgmm(x, dy, gs, interpret=_INTERPRET.value)
  if name.startswith("tgmm_mosaic@"):
    return tgmm_variant(name)
  backend = {"pallas_triton": "triton", "pallas_mosaic": "mosaic",
             "pallas_mosaic_bf16x3": "mosaic_bf16x3"}[name]
  return lambda x, dy, gs: gmm_lib.tgmm_call(x, dy, gs, x.dtype, num_rows=x.shape[0],
                                             backend=backend, interpret=_INTERPRET.value)


def fwdbwd(f):
  def run(x, w, gs, dy):
    y, vjp = jax.vjp(lambda a, b: f(a, b, gs), x, w)
    dx, dw = vjp(dy)
    return y, dx, dw
  return run


def check(log):
  """Device correctness: kernels vs lax.ragged_dot (f32 accumulation) on the same inputs."""
  cases = [(1000, 256, 384, 8, "skewed"), (300, 200, 136, 5, "balanced"),
           (4096, 512, 768, 16, "skewed"), (2000, 1024, 512, 3, "skewed")]
  for dtype in (jnp.bfloat16, jnp.float32):
    for (m, k, n, e, dist) in cases:
      gs_np = group_sizes(m - 37, e, dist)  # leave a zero tail
      gs_np[1] = 0
      gs_np[0] += (m - 37) - gs_np.sum()
      gs = jnp.asarray(gs_np)
      x, w, dy = make_inputs(m, k, n, e, dtype, seed=m)
      hi = lambda a: a.astype(jnp.float32)
      ref = fwdbwd(lambda a, b, g: jax.lax.ragged_dot(
          a, b, g, precision=jax.lax.Precision.HIGHEST))
      ry, rdx, rdw = jax.jit(ref)(hi(x), hi(w), gs, hi(dy))
      valid = (np.arange(m) < gs_np.sum())[:, None]
      ry = np.where(valid, np.asarray(ry), 0)
      rdx = np.where(valid, np.asarray(rdx), 0)
      pallas = [i for i in _IMPLS.value if i.startswith("pallas_") and "@" not in i]
      for impl in pallas or ["pallas_triton"]:
        y, dx, dw = jax.jit(fwdbwd(impl_fn(impl)))(x, w, gs, dy)
        errs = [rel_err(y, ry), rel_err(dx, rdx), rel_err(dw, rdw)]
        tail_zero = bool(np.all(np.asarray(y, np.float32)[m - 37:] == 0))
        finite = all(bool(np.all(np.isfinite(np.asarray(a, np.float32)))) for a in (y, dx, dw))
        tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
        ok = finite and tail_zero and max(errs) < tol
        row = dict(kind="check", impl=impl, dtype=jnp.dtype(dtype).name, shape=(m, k, n, e),
                   dist=dist, err_y=errs[0], err_dx=errs[1], err_dw=errs[2],
                   tail_zero=tail_zero, ok=ok)
        log.append(row)
        print(json.dumps(row), flush=True)
      if dtype == jnp.bfloat16:
        check_variants(log, x, w, gs, dy, ry, rdx, rdw, (m, k, n, e), dist)


def check_variants(log, x, w, gs, dy, ry, rdx, rdw, shape, dist):
  """Mosaic tile variants (16-bit only) against the same references: y and dx for
  ``pallas_mosaic@...``, dw for ``tgmm_mosaic`` and ``tgmm_mosaic@...``. A variant
  the shape does not fit (off the tile grid) is skipped."""
  m = x.shape[0]
  tail = m - int(np.sum(np.asarray(gs)))
  for impl in [i for i in _IMPLS.value if "@" in i or i == "tgmm_mosaic"]:
    try:
      if impl.startswith("pallas_mosaic@"):
        outs = jax.jit(lambda a, b, g, d: (mosaic_variant(impl)(a, b, g),
                                           dx_fn(impl)(d, b, g)))(x, w, gs, dy)
        refs = (ry, rdx)
      else:
        outs = (jax.jit(tgmm_fn(impl))(x, dy, gs),)
        refs = (rdw,)
    except ValueError as exc:
      print(f"check {impl} {shape}: not run ({exc})"[:300], flush=True)
      continue
    errs = [rel_err(a, r) for a, r in zip(outs, refs)]
    finite = all(bool(np.all(np.isfinite(np.asarray(a, np.float32)))) for a in outs)
    tail_zero = all(bool(np.all(np.asarray(a, np.float32)[m - tail:] == 0))
                    for a in outs if a.ndim == 2)
    ok = finite and tail_zero and max(errs) < 1e-2
    row = dict(kind="check", impl=impl, dtype=jnp.dtype(x.dtype).name, shape=shape,
               dist=dist, errs=errs, tail_zero=tail_zero, ok=ok)
    log.append(row)
    print(json.dumps(row), flush=True)


def check_fused(log):
  """Fused variants vs the unfused composition (gather / scatter in XLA + checked gmm)."""
  for dtype in (jnp.bfloat16, jnp.float32):
    m, k, n, e, topk = 2048, 256, 384, 8, 2
    tokens = m // topk
    row_token, row_slot, gs, s = dispatch_plan(tokens, topk, e, seed=1)
    gs = gs.at[e - 1].set(0)  # a zero tail: the last expert's rows are "dropped"
    x, w, dy = make_inputs(m, k, n, e, dtype, seed=7)
    xt = x[:tokens]
    inv = jnp.argsort(row_slot)
    pairs = {
        "gather": (lambda a, b: fused.gmm_gather(a, row_token, b, gs, row_slot=row_slot,
                                                 interpret=_INTERPRET.value),
                   lambda a, b: gmm_lib.gmm(a[row_token], b, gs, interpret=_INTERPRET.value), xt),
        "combine": (lambda a, b: fused.gmm_combine(a, b, gs, row_slot, s,
                                                   interpret=_INTERPRET.value),
                    lambda a, b: (gmm_lib.gmm(a, b, gs, jnp.float32, interpret=_INTERPRET.value)
                                  * s[:, None]).astype(a.dtype)[inv], x),
    }
    for name, (fused_fn, ref_fn, lhs) in pairs.items():
      outs = []
      for fn in (fused_fn, ref_fn):
        y, vjp = jax.vjp(fn, lhs, w)
        outs.append((y, *vjp(dy)))
      errs = [rel_err(a, b) for a, b in zip(*outs)]
      finite = all(bool(np.all(np.isfinite(np.asarray(a, np.float32)))) for a in outs[0])
      tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
      row = dict(kind="check", dtype=jnp.dtype(dtype).name, shape=(m, k, n, e), dist=name,
                 err_y=errs[0], err_dx=errs[1], err_dw=errs[2], ok=finite and max(errs) < tol)
      log.append(row)
      print(json.dumps(row), flush=True)


def mode_fn(impl, mode):
  """The function that times ``impl`` in ``mode``, or None where the impl has no
  such kernel (``tile_variants.has_kernel``)."""
  if not has_kernel(impl, mode):
    return None
  if mode == "tgmm":
    return tgmm_fn(impl)
  if mode == "dx":
    return dx_fn(impl)
  if mode == "fwd":
    return impl_fn(impl)
  return fwdbwd(impl_fn(impl))


def timed_call(impl, mode, x, w, dy, gs):
  """(jitted function, its arguments) that time ``impl`` in ``mode``; None where
  the impl has no such kernel."""
  fn = mode_fn(impl, mode)
  if fn is None:
    return None
  args = {"tgmm": (x, dy, gs), "dx": (dy, w, gs), "fwd": (x, w, gs), "fwdbwd": (x, w, gs, dy)}
  return jax.jit(fn), args[mode]


def run_bench(log):
  dtype = jnp.dtype(_DTYPE.value)
  for sname in _SHAPES.value:
    m, k, n, e = SHAPES[sname]
    x, w, dy = make_inputs(m, k, n, e, dtype)
    wd = w[0]
    # float32 inputs: the dense baseline at HIGHEST (true float32, as the Triton
    # kernels' float32 dots), not XLA's default, which may round to TF32.
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    dense_f = jax.jit(lambda a, b: jnp.dot(a, b, precision=precision,
                                           preferred_element_type=jnp.float32).astype(a.dtype))
    flops = 2.0 * m * k * n
    # fwd+bwd is three matmuls of these FLOPs: the dense baseline is 3x the dense
    # forward (XLA's own vjp of a bf16 dot with f32 output upcasts dy and is slower).
    t_fwd = bench(dense_f, x, wd)
    t_dense = {"fwd": t_fwd, "fwdbwd": 3 * t_fwd, "tgmm": t_fwd, "dx": t_fwd}
    for mode in _MODES.value:
      t = t_dense[mode]
      f = flops * (3 if mode == "fwdbwd" else 1)
      row = dict(kind="bench", shape=sname, mkne=(m, k, n, e), dist="-", impl="dense",
                 mode=mode, ms=t * 1e3, tflops=f / t / 1e12, ratio=1.0)
      log.append(row)
      print(json.dumps(row), flush=True)
    for dist in _DISTS.value:
      gs = jnp.asarray(group_sizes(m, e, dist))
      firsts = {}  # mode -> the first impl's call (--baseline=first)
      for impl in _IMPLS.value:
        if impl == "ragged_dot" and e > _RAGGED_MAX_E.value:
          continue  # XLA pads ragged_dot to E dense matmuls: minutes per shape
        slow = dict(iters=3, reps=3) if impl == "ragged_dot" else {}
        for mode in _MODES.value:
          if impl in ("pallas_dense", "pallas_e1") and dist != "balanced":
            continue
          call = timed_call(impl, mode, x, w, dy, gs)
          if call is None:
            continue
          base = (dense_f, (x, wd))
          if _BASELINE.value == "first":
            first = first_in_mode(_IMPLS.value, mode)
            if mode not in firsts:
              firsts[mode] = timed_call(first, mode, x, w, dy, gs)
            base = call if impl == first else firsts[mode]
          try:
            _, t, ratio = bench_pair(*base, *call, **slow)
            if mode == "fwdbwd" and base[0] is dense_f:
              ratio *= 3
          except Exception as exc:  # pylint: disable=broad-except
            print(f"FAILED {sname} {dist} {impl} {mode}: {exc!r}"[:2000], flush=True)
            continue
          f = flops * (3 if mode == "fwdbwd" else 1)
          row = dict(kind="bench", shape=sname, mkne=(m, k, n, e), dist=dist, impl=impl,
                     mode=mode, ms=t * 1e3, tflops=f / t / 1e12, ratio=ratio)
          log.append(row)
          print(json.dumps(row), flush=True)
    if _FUSED.value and e < m:
      run_fused(log, sname, x, w, dy, e, dense_f, wd)


def dispatch_plan(tokens, topk, e, seed=0):
  """Random top-k routing, sorted by expert: row token, row slot, group sizes, weights."""
  rng = np.random.default_rng(seed)
  expert = np.stack([rng.permutation(e)[:topk] for _ in range(min(tokens, 4096))])
  expert = np.resize(expert, (tokens, topk))
  order = np.argsort(expert.reshape(-1), kind="stable")
  gs = np.bincount(expert.reshape(-1), minlength=e).astype(np.int32)
  weight = rng.random(tokens * topk).astype(np.float32)
  return (jnp.asarray(order // topk, jnp.int32), jnp.asarray(order, jnp.int32),
          jnp.asarray(gs), jnp.asarray(weight))


def run_fused(log, sname, x, w, dy, e, dense_f, wd):
  """Fused gather / combine against the unfused XLA gather / scatter + gmm."""
  topk = 2
  m = x.shape[0]
  tokens = m // topk
  row_token, row_slot, gs, s = dispatch_plan(tokens, topk, e)
  xt = x[:tokens]
  inv = jnp.argsort(row_slot)
  variants = {
      "gather_unfused": lambda a, b: gmm_lib.gmm(a[row_token], b, gs),
      "gather_fused": lambda a, b: fused.gmm_gather(a, row_token, b, gs, row_slot=row_slot),
      "combine_unfused": lambda a, b: (gmm_lib.gmm(a, b, gs).astype(jnp.float32)
                                       * s[:, None]).astype(a.dtype)[inv],
      "combine_fused": lambda a, b: fused.gmm_combine(a, b, gs, row_slot, s),
  }
  flops = 2.0 * m * x.shape[1] * w.shape[2]
  # The combine follows the down projection: hidden width in, model width out,
  # so it runs on the transposed problem (K and N swapped; same FLOPs).
  w_down = jnp.swapaxes(w, 1, 2)
  for name, fn in variants.items():
    if name.startswith("gather"):
      lhs, rhs, cot = xt, w, dy
    else:
      lhs, rhs, cot = dy, w_down, x
    for mode in _MODES.value:
      if mode == "fwd":
        f = jax.jit(fn)
        args = (lhs, rhs)
      else:
        f = jax.jit(lambda a, b, g, fn=fn: jax.vjp(fn, a, b)[1](g))
        args = (lhs, rhs, cot)
      try:
        _, t, ratio = bench_pair(dense_f, (x, wd), f, args)
      except Exception as exc:  # pylint: disable=broad-except
        print(f"FAILED {sname} {name} {mode}: {exc!r}"[:2000], flush=True)
        continue
      mult = 3 if mode == "fwdbwd" else 1
      row = dict(kind="bench", shape=sname, mkne=(m, lhs.shape[1], rhs.shape[2], e),
                 dist="top2", impl=name, mode=mode, ms=t * 1e3,
                 tflops=mult * flops / t / 1e12, ratio=ratio * mult)
      log.append(row)
      print(json.dumps(row), flush=True)


def print_table(log):
  rows = [r for r in log if r["kind"] == "bench"]
  device = "torch" if _TORCH.value else jax.devices()[0].device_kind
  print(f"\ndevice: {device}  jax {jax.__version__}  dtype {_DTYPE.value}")
  if _BASELINE.value == "first" and not _TORCH.value:
    firsts = {m: first_in_mode(_IMPLS.value, m) for m in _MODES.value}
    named = ", ".join(f"{f} in {m}" for m, f in firsts.items())
    print(f"ratio: the first impl's time / the impl's, timed alternately ({named})")
  print(f"{'shape':10s} {'dist':8s} {'impl':14s} {'mode':6s} {'ms':>9s} {'TF/s':>7s} {'ratio':>6s}")
  for r in rows:
    print(f"{r['shape']:10s} {r['dist']:8s} {r['impl']:14s} {r['mode']:6s} "
          f"{r['ms']:9.3f} {r['tflops']:7.1f} {r['ratio']:6.2f}")
  checks = [r for r in log if r["kind"] == "check"]
  if checks:
    print(f"checks: {sum(r['ok'] for r in checks)}/{len(checks)} ok")
    for r in checks:
      if not r["ok"]:
        print(f"FAILED check: {r.get('impl', r['dist'])} {r['dtype']} {r['shape']}")


def main(argv):
  del argv
  log = []
  if not (_TORCH.value or _AUTOTUNE.value):
    try:
      check_impls(_IMPLS.value, _MODES.value, _BASELINE.value)
    except ValueError as exc:
      raise app.UsageError(str(exc)) from exc
  if _CHECK.value:
    check(log)
    check_fused(log)
  if _TORCH.value:
    gmm_torch.run_torch(log, _SHAPES.value, _DISTS.value)
  elif _AUTOTUNE.value:
    gmm_autotune.autotune(log, shapes=_SHAPES.value, dtype=_DTYPE.value,
                          tune_dist=_TUNE_DIST.value, tune_ops=_TUNE_OPS.value,
                          candidates=_CANDIDATES.value, table_out=_TABLE_OUT.value,
                          iters=_ITERS.value, interpret=_INTERPRET.value)
  else:
    run_bench(log)
  if _JSON_OUT.value:
    pathlib.Path(_JSON_OUT.value).write_text(json.dumps(log, indent=1))
  print_table(log)


if __name__ == "__main__":
  app.run(main)
