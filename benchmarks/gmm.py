r"""Grouped matmul implementations against a dense matmul of equal FLOPs, timed in one run.

  python -m benchmarks.gmm                                    # table of fwd / fwd+bwd
  python -m benchmarks.gmm --impls=pallas_mosaic,pallas_mosaic@split=m --modes=fwd,dx \
      --baseline=first                                        # A/B of a kernel variant

For every shape (M, K, N, E) and group-size distribution (balanced, skewed) it
prints each implementation's median time, TF/s and ratio = baseline time / its
time. The baseline is "dense", jnp.dot of x[M, K] @ w[K, N] (same FLOPs), or with
``--baseline=first`` the first of --impls that has the mode; either is timed in
alternating samples with each implementation. fwd+bwd is y, dx and dw (three
matmuls' worth of FLOPs, against three dense forwards). With --fused it also
times the fused dispatch gather and combine kernels against their unfused XLA
versions on random top-2 routing. Device correctness: ``pytest -m gpu
tests/test_gpu_kernels.py``; tile autotuning: ``python -m tools.autotune_gmm``.
"""
from __future__ import annotations

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from benchmarks import gmm_impls
from benchmarks import rows
from benchmarks import timing
from benchmarks.flag_checks import require_choices
from benchmarks.gmm_shapes import DEFAULT_SHAPES, DISTS, SHAPES, group_sizes, make_inputs
from benchmarks.impl_names import FORWARD_ONLY_CONTROLS, check_impls, first_in_mode
from benchmarks.routed_rows import gather_and_combine, random_top2_rows

_SHAPES = flags.DEFINE_list("shapes", list(DEFAULT_SHAPES), f"names from {sorted(SHAPES)}")
_DISTS = flags.DEFINE_list("dists", list(DISTS), "group-size distributions")
_IMPLS = flags.DEFINE_list(
    "impls", ["pallas_mosaic", "pallas_triton", "ragged_dot"],
    "implementations (pallas_mosaic needs Hopper or --interpret); "
    "pallas_mosaic@tm/tn/tk/stages/window or pallas_mosaic@field=value[/...] times Mosaic "
    "tile variants (modes fwd and dx); tgmm_mosaic (default tiles) and "
    "tgmm_mosaic@tko/tn/tr/stages[/window[/window_from]] or tgmm_mosaic@field=value[/...] "
    "weight-gradient variants (mode tgmm)")
_MODES = flags.DEFINE_list("modes", ["fwd", "fwdbwd"],
                           "fwd, fwdbwd, tgmm (the weight-gradient kernel alone) and/or "
                           "dx (the input-gradient product alone, Mosaic kernels)")
_BASELINE = flags.DEFINE_enum(
    "baseline", "dense", ["dense", "first"],
    "what the ratio column divides: the dense matmul of equal FLOPs, or the first of "
    "--impls that has the mode (an A/B of variants; ratio > 1 is faster than it)")
_ITERS = flags.DEFINE_integer("iters", 20, "calls per timing sample")
_REPS = flags.DEFINE_integer("reps", 5, "timing samples (median taken)")
_JSON_OUT = flags.DEFINE_string("json_out", "", "write all rows as JSON here")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"],
                           "input dtype")
_RAGGED_MAX_E = flags.DEFINE_integer("ragged_max_e", 64, "skip ragged_dot above this E")
_FUSED = flags.DEFINE_bool("fused", True, "also time the fused gather / combine kernels")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Pallas interpret mode (CPU smoke test)")

require_choices(_SHAPES, SHAPES)
require_choices(_DISTS, DISTS)


def _timing(impl=None) -> dict:
  if impl == "ragged_dot":  # padded by XLA to E dense matmuls: fewer, shorter samples
    return dict(iters=min(3, _ITERS.value), reps=min(3, _REPS.value))
  return dict(iters=_ITERS.value, reps=_REPS.value)


def _flops(m, k, n, mode) -> float:
  return 2.0 * m * k * n * (3 if mode == "fwdbwd" else 1)


def dense_forward(dtype):
  # float32 inputs: the dense baseline at HIGHEST (true float32, as the Triton
  # kernels' float32 dots), not XLA's default, which may round to TF32.
  precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
  return jax.jit(lambda a, b: jnp.dot(a, b, precision=precision,
                                      preferred_element_type=jnp.float32).astype(a.dtype))


def _run_once(call):
  """Runs (compiles) a call before it is timed; returns it."""
  fn, args = call
  jax.block_until_ready(fn(*args))
  return call


def run_shape(log, sname, dtype):
  m, k, n, e = SHAPES[sname]
  x, w, dy = make_inputs(m, k, n, e, dtype)
  dense = (dense_forward(dtype), (x, w[0]))
  # fwd+bwd is three products of the forward's FLOPs: its dense baseline is three
  # dense forwards (XLA's own vjp of a bf16 dot with f32 output upcasts dy and is slower).
  t_dense = timing.median_seconds(dense[0], *dense[1], **_timing())
  for mode in _MODES.value:
    t = t_dense * (3 if mode == "fwdbwd" else 1)
    rows.emit(log, kind="bench", shape=sname, mkne=(m, k, n, e), dist="-", impl="dense",
              mode=mode, ms=t * 1e3, tflops=_flops(m, k, n, mode) / t / 1e12, ratio=1.0)
  for dist in _DISTS.value:
    gs = jnp.asarray(group_sizes(m, e, dist))
    first_calls = {}  # mode -> the first impl's call, run once (--baseline=first)
    for impl in _IMPLS.value:
      if impl == "ragged_dot" and e > _RAGGED_MAX_E.value:
        continue
      if impl in FORWARD_ONLY_CONTROLS and dist != "balanced":
        continue
      for mode in _MODES.value:
        call = gmm_impls.mode_call(impl, mode, x, w, dy, gs, _INTERPRET.value)
        if call is None:
          continue
        try:
          base, scale = dense, 3 if mode == "fwdbwd" else 1
          if _BASELINE.value == "first":
            first = first_in_mode(_IMPLS.value, mode)
            if mode not in first_calls:
              first_calls[mode] = _run_once(gmm_impls.mode_call(
                  first, mode, x, w, dy, gs, _INTERPRET.value))
            if impl == first:
              call = first_calls[mode]
            base, scale = first_calls[mode], 1
          if call is not base:
            _run_once(call)
          pair = timing.paired(*base, *call, warm=False, **_timing(impl))
        except Exception as exc:  # pylint: disable=broad-except
          rows.failed(f"{sname} {dist} {impl} {mode}", exc)
          continue
        rows.emit(log, kind="bench", shape=sname, mkne=(m, k, n, e), dist=dist, impl=impl,
                  mode=mode, ms=pair.seconds * 1e3,
                  tflops=_flops(m, k, n, mode) / pair.seconds / 1e12, ratio=pair.ratio * scale)
  if _FUSED.value and e < m:
    run_fused(log, sname, x, w, dy, dense)


def run_fused(log, sname, x, w, dy, dense):
  """Fused gather / combine against dense, next to the unfused XLA versions."""
  m, k = x.shape
  e, _, n = w.shape
  routed = random_top2_rows(m // 2, e)
  tokens = routed.num_tokens
  # The combine follows the down projection: hidden width in, model width out,
  # so it runs on the transposed problem (K and N swapped; same FLOPs).
  operands = {"gather": (x[:tokens], w, dy), "combine": (dy, jnp.swapaxes(w, 1, 2), x)}
  for name, fn in gather_and_combine(routed, _INTERPRET.value).items():
    lhs, rhs, cotangent = operands[name.split("_")[0]]
    for mode in _MODES.value:
      if mode == "fwd":
        call = (jax.jit(fn), (lhs, rhs))
      elif mode == "fwdbwd":
        call = (jax.jit(timing.forward_backward(fn)), (lhs, rhs, cotangent))
      else:
        continue
      scale = 3 if mode == "fwdbwd" else 1
      try:
        pair = timing.paired(*dense, *_run_once(call), warm=False, **_timing())
      except Exception as exc:  # pylint: disable=broad-except
        rows.failed(f"{sname} {name} {mode}", exc)
        continue
      rows.emit(log, kind="bench", shape=sname, mkne=(m, lhs.shape[1], rhs.shape[2], e),
                dist="top2", impl=name, mode=mode, ms=pair.seconds * 1e3,
                tflops=_flops(m, k, n, mode) / pair.seconds / 1e12, ratio=pair.ratio * scale)


def main(argv):
  del argv
  try:
    check_impls(_IMPLS.value, _MODES.value, _BASELINE.value)
  except ValueError as exc:
    raise app.UsageError(str(exc)) from exc
  log = []
  dtype = jnp.dtype(_DTYPE.value)
  for sname in _SHAPES.value:
    run_shape(log, sname, dtype)
  rows.write_json(log, _JSON_OUT.value)
  header = [f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}  dtype {dtype.name}"]
  if _BASELINE.value == "first":
    named = ", ".join(f"{first_in_mode(_IMPLS.value, m)} in {m}" for m in _MODES.value)
    header.append(f"ratio: the first impl's time / the impl's, timed alternately ({named})")
  rows.print_table(log, header)


if __name__ == "__main__":
  app.run(main)
