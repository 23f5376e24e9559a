r"""Measures tile candidates of the Triton grouped-matmul kernels and writes the tuning table.

  python -m tools.autotune_gmm --shapes=fine-768,dsv3

For each shape and op (the forward gmm, the input-gradient gmm on w transposed,
and the weight-gradient tgmm) every candidate is timed; the fastest goes into the
table (``kernels/tuning_table.json`` by default, which ``moe_kernels.tuning``
reads), merged with the entries already there. An entry is replaced only by a
candidate at least 3% faster than it, so timing noise does not re-pick tiles.
The table is rewritten after every shape, so a cut-off run keeps what it measured.
"""
from __future__ import annotations

import pathlib
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from benchmarks import timing
from benchmarks.flag_checks import require_choices
from benchmarks.gmm_shapes import DEFAULT_SHAPES, DISTS, SHAPES, group_sizes, make_inputs
from moe_kernels import gmm_triton
from moe_kernels import tuning

OPS = ("gmm", "tgmm")
GMM_CANDIDATES = [
    tuning.Config(128, 256, 64, 8, 4, 8), tuning.Config(128, 256, 64, 8, 4, 4),
    tuning.Config(128, 256, 64, 8, 4, 16), tuning.Config(128, 256, 64, 8, 4, 32),
    tuning.Config(128, 256, 64, 8, 3, 16), tuning.Config(256, 128, 64, 8, 4, 8),
    tuning.Config(128, 256, 32, 8, 6, 8), tuning.Config(128, 256, 32, 8, 8, 8),
]
DECODE_CANDIDATES = [
    tuning.Config(64, 128, 64, 4, 4), tuning.Config(64, 128, 128, 4, 4),
    tuning.Config(64, 64, 128, 4, 5), tuning.Config(16, 128, 128, 4, 4),
    tuning.Config(32, 64, 256, 4, 4), tuning.Config(16, 64, 256, 4, 5),
]
TGMM_CANDIDATES = [
    tuning.Config(64, 256, 128, 8, 3), tuning.Config(64, 256, 128, 8, 4),
    tuning.Config(32, 256, 128, 8, 4), tuning.Config(64, 256, 64, 8, 4),
    tuning.Config(128, 256, 64, 8, 3), tuning.Config(64, 128, 256, 8, 3),
]
DECODE_TGMM_CANDIDATES = [
    tuning.Config(32, 128, 128, 4, 3), tuning.Config(16, 128, 128, 4, 3),
    tuning.Config(16, 64, 128, 4, 3), tuning.Config(32, 64, 64, 4, 3),
]
CLEAR_WIN = 0.97  # a new entry must take at most this fraction of the incumbent's time

_SHAPES = flags.DEFINE_list("shapes", list(DEFAULT_SHAPES), f"names from {sorted(SHAPES)}")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"],
                           "input dtype")
_DIST = flags.DEFINE_enum("dist", "balanced", list(DISTS), "group sizes measured on")
_OPS = flags.DEFINE_list("ops", list(OPS), "ops measured: gmm (forward and input "
                         "gradient) and/or tgmm (weight gradient)")
_CANDIDATES = flags.DEFINE_list(
    "candidates", [], "candidates instead of the built-in ones, for every op measured: "
    "tm/tn/tk/num_warps/num_stages[/group_m], comma-separated (tgmm ignores group_m)")
_TABLE = flags.DEFINE_string(
    "table", str(pathlib.Path(tuning.__file__).with_name(tuning.TABLE_FILE)),
    "the table file read, merged into and rewritten")
_ITERS = flags.DEFINE_integer("iters", 20, "calls per timing sample")
_REPS = flags.DEFINE_integer("reps", 5, "timing samples (median taken)")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Pallas interpret mode (CPU smoke test)")

require_choices(_SHAPES, SHAPES)
require_choices(_OPS, OPS)


def parse_candidate(text: str) -> tuning.Config:
  values = text.split("/")
  if not 5 <= len(values) <= 6 or not all(v.isdigit() for v in values):
    raise ValueError(f"--candidates: {text!r} is not tm/tn/tk/num_warps/num_stages[/group_m]")
  return tuning.Config(*map(int, values))


def _check_candidates(values) -> bool:
  for value in values:
    try:
      parse_candidate(value)
    except ValueError as exc:
      raise flags.ValidationError(str(exc)) from exc
  return True


flags.register_validator(_CANDIDATES, _check_candidates)


def _gmm(config, transpose_rhs=False):
  return jax.jit(lambda x, w, gs: gmm_triton.gmm(
      x, w, gs, transpose_rhs=transpose_rhs, tiles=config.tiles, num_warps=config.num_warps,
      num_stages=config.num_stages, group_m=config.group_m, interpret=_INTERPRET.value))


def _tgmm(config):
  return jax.jit(lambda x, dy, gs: gmm_triton.tgmm(
      x, dy, gs, tiles=config.tiles, num_warps=config.num_warps,
      num_stages=config.num_stages, interpret=_INTERPRET.value))


def jobs_for_shape(m, k, n, e, dtype):
  """table key -> (candidates, candidate -> jitted kernel, its arguments)."""
  x, w, dy = make_inputs(m, k, n, e, dtype)
  gs = jnp.asarray(group_sizes(m, e, _DIST.value))
  decode = tuning.rows_class(m, e) < 64
  gmm_candidates = DECODE_CANDIDATES if decode else GMM_CANDIDATES
  tgmm_candidates = DECODE_TGMM_CANDIDATES if decode else TGMM_CANDIDATES
  if _CANDIDATES.value:
    gmm_candidates = tgmm_candidates = [parse_candidate(c) for c in _CANDIDATES.value]
  jobs = {}
  if "gmm" in _OPS.value:
    jobs[tuning.key("gmm", m, k, n, e, dtype)] = (gmm_candidates, _gmm, (x, w, gs))
    jobs[tuning.key("gmm", m, n, k, e, dtype)] = (
        gmm_candidates, lambda c: _gmm(c, transpose_rhs=True), (dy, jnp.swapaxes(w, 1, 2), gs))
  if "tgmm" in _OPS.value:
    jobs[tuning.key("tgmm", m, k, n, e, dtype)] = (tgmm_candidates, _tgmm, (x, dy, gs))
  return jobs


def best_candidate(key, candidates, make, args, incumbent):
  """The candidate to keep for ``key``: the fastest, if it clearly beats ``incumbent``."""
  if incumbent is not None and incumbent not in candidates:
    candidates = [incumbent, *candidates]
  best, t_best, t_incumbent = None, None, None
  for config in candidates:
    try:
      t = timing.median_seconds(make(config), *args, iters=_ITERS.value, reps=_REPS.value)
    except Exception as exc:  # pylint: disable=broad-except
      print(f"autotune {key} {config.as_tuple()}: failed {type(exc).__name__}", flush=True)
      continue
    print(f"autotune {key} {config.as_tuple()} {t * 1e3:.3f} ms", flush=True)
    if config == incumbent:
      t_incumbent = t
    if t_best is None or t < t_best:
      best, t_best = config, t
  if best is None or (t_incumbent is not None and t_best >= CLEAR_WIN * t_incumbent):
    return incumbent
  return best


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  path = pathlib.Path(_TABLE.value)
  table = tuning.read_table(path) if path.exists() else {}
  for sname in _SHAPES.value:
    for key, (candidates, make, args) in jobs_for_shape(*SHAPES[sname], dtype).items():
      incumbent = tuning.Config(*table[key]) if key in table else None
      chosen = best_candidate(key, candidates, make, args, incumbent)
      if chosen is not None:
        table[key] = chosen.as_tuple()
    path.write_text(tuning.format_table(
        table, device=jax.devices()[0].device_kind, jax_version=jax.__version__,
        date=time.strftime("%Y-%m-%d", time.gmtime())))
    print(f"wrote {len(table)} entries to {path}", flush=True)


if __name__ == "__main__":
  app.run(main)
