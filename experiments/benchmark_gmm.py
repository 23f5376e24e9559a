r"""Benchmark grouped matmul implementations against a dense matmul of equal FLOPs.

  python -m experiments.benchmark_gmm                 # table of fwd / fwd+bwd
  python -m experiments.benchmark_gmm --check         # correctness on the device first
  python -m experiments.benchmark_gmm --autotune      # measure tile candidates, write the table

For every shape (M, K, N, E) and group-size distribution (balanced, skewed) it
prints each implementation's median time, TF/s and ratio = dense time / its
time, where "dense" is jnp.dot of x[M, K] @ w[K, N] (same FLOPs) timed in the
same run. fwd+bwd is y, dx and dw (three matmuls' worth of FLOPs).
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import statistics
import sys
import time

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
from moe_kernels import gmm as gmm_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from moe_kernels import gmm_triton  # noqa: E402  pylint: disable=g-import-not-at-top
from moe_kernels import tuning  # noqa: E402  pylint: disable=g-import-not-at-top

SHAPES = {
    "llama-ish": (32768, 4096, 3584, 8),
    "fine-768": (65536, 2048, 768, 64),
    "fine-1408": (65536, 2048, 1408, 64),
    "dsv3": (131072, 7168, 2048, 256),
    "decode": (256, 4096, 1024, 64),
    "tiny": (200, 64, 96, 4),  # CPU smoke test with --interpret
}

_SHAPES = flags.DEFINE_list("shapes", [s for s in SHAPES if s != "tiny"], "names from SHAPES")
_DISTS = flags.DEFINE_list("dists", ["balanced", "skewed"], "group-size distributions")
_IMPLS = flags.DEFINE_list("impls", ["pallas_triton", "ragged_dot"], "implementations")
_MODES = flags.DEFINE_list("modes", ["fwd", "fwdbwd"], "fwd and/or fwdbwd")
_ITERS = flags.DEFINE_integer("iters", 20, "calls per timing sample")
_REPS = flags.DEFINE_integer("reps", 5, "timing samples (median taken)")
_CHECK = flags.DEFINE_bool("check", False, "check correctness before timing")
_AUTOTUNE = flags.DEFINE_bool("autotune", False, "measure tile candidates, write the table")
_TABLE_OUT = flags.DEFINE_string("table_out", str(_ROOT / "kernels" / "tuning_table.py"),
                                 "where --autotune writes the table")
_JSON_OUT = flags.DEFINE_string("json_out", "", "write all rows as JSON here")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "input dtype")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Pallas interpret mode (CPU smoke test)")


def group_sizes(m: int, e: int, dist: str, seed: int = 0) -> np.ndarray:
  if dist == "balanced":
    sizes = np.full(e, m // e)
    sizes[: m - sizes.sum()] += 1
    return sizes.astype(np.int32)
  rng = np.random.default_rng(seed)
  # Dirichlet(0.3): a few hot experts, some nearly empty (as routers early in training).
  p = rng.dirichlet(np.full(e, 0.3))
  sizes = np.floor(p * m).astype(np.int64)
  sizes[np.argmax(sizes)] += m - sizes.sum()
  return sizes.astype(np.int32)


def bench(fn, *args) -> float:
  """Median seconds per call; calls queued back to back, one sync per sample."""
  out = fn(*args)
  jax.block_until_ready(out)
  samples = []
  for _ in range(_REPS.value):
    t0 = time.perf_counter()
    for _ in range(_ITERS.value):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / _ITERS.value)
  return statistics.median(samples)


def _ragged(x, w, gs):
  y = jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32)
  return y.astype(x.dtype)


def impl_fn(name):
  if name == "pallas_triton":
    return lambda x, w, gs: gmm_lib.gmm(x, w, gs, interpret=_INTERPRET.value)
  if name == "ragged_dot":
    return _ragged
  raise ValueError(name)


def fwdbwd(f):
  def run(x, w, gs, dy):
    y, vjp = jax.vjp(lambda a, b: f(a, b, gs), x, w)
    dx, dw = vjp(dy)
    return y, dx, dw
  return run


def make_inputs(m, k, n, e, dtype, seed=0):
  kx, kw, kd = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(kx, (m, k), dtype)
  w = (jax.random.normal(kw, (e, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
  dy = jax.random.normal(kd, (m, n), dtype)
  return x, w, dy


def rel_err(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(log):
  """Device correctness: kernels vs lax.ragged_dot (f32 accumulation) on the same inputs."""
  cases = [(1000, 256, 384, 8, "skewed"), (300, 200, 136, 5, "balanced"),
           (4096, 512, 768, 16, "skewed")]
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
      y, dx, dw = jax.jit(fwdbwd(impl_fn("pallas_triton")))(x, w, gs, dy)
      errs = [rel_err(y, ry), rel_err(dx, rdx), rel_err(dw, rdw)]
      tail_zero = bool(np.all(np.asarray(y, np.float32)[m - 37:] == 0))
      finite = all(bool(np.all(np.isfinite(np.asarray(a, np.float32)))) for a in (y, dx, dw))
      tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
      ok = finite and tail_zero and max(errs) < tol
      row = dict(kind="check", dtype=jnp.dtype(dtype).name, shape=(m, k, n, e), dist=dist,
                 err_y=errs[0], err_dx=errs[1], err_dw=errs[2], tail_zero=tail_zero, ok=ok)
      log.append(row)
      print(json.dumps(row), flush=True)


def run_bench(log):
  dtype = jnp.dtype(_DTYPE.value)
  for sname in _SHAPES.value:
    m, k, n, e = SHAPES[sname]
    x, w, dy = make_inputs(m, k, n, e, dtype)
    wd = w[0]
    dense_f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype))
    dense_fb = jax.jit(fwdbwd(lambda a, b, g: dense_f(a, b)))
    flops = 2.0 * m * k * n
    t_dense = {"fwd": bench(dense_f, x, wd)}
    if "fwdbwd" in _MODES.value:
      t_dense["fwdbwd"] = bench(dense_fb, x, wd, None, dy)
    for mode, t in t_dense.items():
      f = flops * (3 if mode == "fwdbwd" else 1)
      row = dict(kind="bench", shape=sname, mkne=(m, k, n, e), dist="-", impl="dense",
                 mode=mode, ms=t * 1e3, tflops=f / t / 1e12, ratio=1.0)
      log.append(row)
      print(json.dumps(row), flush=True)
    for dist in _DISTS.value:
      gs = jnp.asarray(group_sizes(m, e, dist))
      for impl in _IMPLS.value:
        for mode in _MODES.value:
          fn = impl_fn(impl)
          try:
            if mode == "fwd":
              t = bench(jax.jit(fn), x, w, gs)
            else:
              t = bench(jax.jit(fwdbwd(fn)), x, w, gs, dy)
          except Exception as exc:  # pylint: disable=broad-except
            print(f"FAILED {sname} {dist} {impl} {mode}: {exc!r}"[:2000], flush=True)
            continue
          f = flops * (3 if mode == "fwdbwd" else 1)
          row = dict(kind="bench", shape=sname, mkne=(m, k, n, e), dist=dist, impl=impl,
                     mode=mode, ms=t * 1e3, tflops=f / t / 1e12, ratio=t_dense[mode] / t)
          log.append(row)
          print(json.dumps(row), flush=True)


GMM_CANDIDATES = [
    tuning.Config(128, 256, 64, 8, 3), tuning.Config(128, 128, 64, 4, 4),
    tuning.Config(128, 128, 64, 8, 3), tuning.Config(64, 128, 64, 4, 4),
    tuning.Config(128, 256, 32, 8, 4), tuning.Config(64, 256, 64, 8, 3),
]
TGMM_CANDIDATES = [
    tuning.Config(64, 128, 128, 8, 3), tuning.Config(64, 256, 128, 8, 3),
    tuning.Config(32, 128, 128, 4, 4), tuning.Config(64, 128, 128, 4, 4),
    tuning.Config(128, 128, 128, 8, 3), tuning.Config(64, 128, 64, 4, 4),
]


def autotune(log):
  dtype = jnp.dtype(_DTYPE.value)
  table = {}
  for sname in _SHAPES.value:
    m, k, n, e = SHAPES[sname]
    x, w, dy = make_inputs(m, k, n, e, dtype)
    gs = jnp.asarray(group_sizes(m, e, "balanced"))
    wt = jnp.swapaxes(w, 1, 2)
    jobs = {
        tuning.key("gmm", m, k, n, e, dtype): (GMM_CANDIDATES, lambda c: jax.jit(
            lambda a, b, g: gmm_triton.gmm(a, b, g, tiles=c.tiles, num_warps=c.num_warps,
                                           num_stages=c.num_stages)), (x, w, gs)),
        tuning.key("gmm", m, n, k, e, dtype): (GMM_CANDIDATES, lambda c: jax.jit(
            lambda a, b, g: gmm_triton.gmm(a, b, g, transpose_rhs=True, tiles=c.tiles,
                                           num_warps=c.num_warps,
                                           num_stages=c.num_stages)), (dy, wt, gs)),
        tuning.key("tgmm", m, k, n, e, dtype): (TGMM_CANDIDATES, lambda c: jax.jit(
            lambda a, b, g: gmm_triton.tgmm(a, b, g, tiles=c.tiles, num_warps=c.num_warps,
                                            num_stages=c.num_stages)), (x, dy, gs)),
    }
    for key, (cands, make, args) in jobs.items():
      best = None
      for c in cands:
        try:
          t = bench(make(c), *args)
        except Exception as exc:  # pylint: disable=broad-except
          print(f"autotune {key} {c}: failed {type(exc).__name__}", flush=True)
          continue
        log.append(dict(kind="autotune", key=key, config=c.as_tuple(), ms=t * 1e3))
        print(f"autotune {key} {c.as_tuple()} {t * 1e3:.3f} ms", flush=True)
        if best is None or t < best[0]:
          best = (t, c)
      if best is not None:
        table[key] = best[1].as_tuple()
  lines = ['"""Measured tile table; regenerate with `python -m experiments.benchmark_gmm --autotune`."""',
           f"# device: {jax.devices()[0].device_kind}; jax {jax.__version__}; "
           f"{time.strftime('%Y-%m-%d', time.gmtime())}",
           "# key: \"op:dtype:r<rows per group class>:k<K>:n<N>\" -> (tm, tn, tk, num_warps, num_stages)",
           "TABLE = {"]
  lines += [f"    {k!r}: {v!r}," for k, v in sorted(table.items())]
  lines.append("}")
  pathlib.Path(_TABLE_OUT.value).write_text("\n".join(lines) + "\n")
  print(f"wrote {len(table)} entries to {_TABLE_OUT.value}")


def print_table(log):
  rows = [r for r in log if r["kind"] == "bench"]
  print(f"\ndevice: {jax.devices()[0].device_kind}  jax {jax.__version__}  dtype {_DTYPE.value}")
  print(f"{'shape':10s} {'dist':8s} {'impl':14s} {'mode':6s} {'ms':>9s} {'TF/s':>7s} {'ratio':>6s}")
  for r in rows:
    print(f"{r['shape']:10s} {r['dist']:8s} {r['impl']:14s} {r['mode']:6s} "
          f"{r['ms']:9.3f} {r['tflops']:7.1f} {r['ratio']:6.2f}")
  checks = [r for r in log if r["kind"] == "check"]
  if checks:
    print(f"checks: {sum(r['ok'] for r in checks)}/{len(checks)} ok")


def main(argv):
  del argv
  log = []
  if _CHECK.value:
    check(log)
  if _AUTOTUNE.value:
    autotune(log)
  else:
    run_bench(log)
  if _JSON_OUT.value:
    pathlib.Path(_JSON_OUT.value).write_text(json.dumps(log, indent=1))
  print_table(log)


if __name__ == "__main__":
  app.run(main)
