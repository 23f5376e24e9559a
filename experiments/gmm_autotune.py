"""Autotuning of the Triton grouped-matmul kernels' tiles (``benchmark_gmm --autotune``).

Each candidate is timed per shape and op; a table entry is replaced only by a
candidate at least 3% faster, so noise does not re-pick tiles.
"""
from __future__ import annotations

import pathlib
import time

import jax
import jax.numpy as jnp

from experiments.gmm_common import SHAPES, bench, group_sizes, make_inputs
from moe_kernels import gmm_triton
from moe_kernels import tuning

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


def load_table(path):
  try:
    ns = {}
    exec(pathlib.Path(path).read_text(), ns)  # pylint: disable=exec-used
    return dict(ns.get("TABLE", {}))
  except FileNotFoundError:
    return {}


def autotune(log, *, shapes, dtype, tune_dist, tune_ops, candidates, table_out, iters,
             interpret):
  """Times tile candidates of the Triton kernels per shape and op and merges the
  winners into the table at ``table_out`` (rewritten after every shape)."""
  dtype = jnp.dtype(dtype)
  table = load_table(table_out)  # merge: entries not re-measured stay
  for sname in shapes:
    m, k, n, e = SHAPES[sname]
    x, w, dy = make_inputs(m, k, n, e, dtype)
    gs = jnp.asarray(group_sizes(m, e, tune_dist))
    wt = jnp.swapaxes(w, 1, 2)
    decode = tuning.rows_class(m, e) < 64
    gmm_c = DECODE_CANDIDATES if decode else GMM_CANDIDATES
    if candidates:
      gmm_c = [tuning.Config(*map(int, c.split("/"))) for c in candidates]
    tgmm_c = DECODE_TGMM_CANDIDATES if decode else TGMM_CANDIDATES
    jobs = {
        tuning.key("gmm", m, k, n, e, dtype): (gmm_c, lambda c: jax.jit(
            lambda a, b, g: gmm_triton.gmm(a, b, g, tiles=c.tiles, num_warps=c.num_warps,
                                           num_stages=c.num_stages,
                                           interpret=interpret)), (x, w, gs)),
        tuning.key("gmm", m, n, k, e, dtype): (gmm_c, lambda c: jax.jit(
            lambda a, b, g: gmm_triton.gmm(a, b, g, transpose_rhs=True, tiles=c.tiles,
                                           num_warps=c.num_warps,
                                           num_stages=c.num_stages,
                                           interpret=interpret)), (dy, wt, gs)),
        tuning.key("tgmm", m, k, n, e, dtype): (tgmm_c, lambda c: jax.jit(
            lambda a, b, g: gmm_triton.tgmm(a, b, g, tiles=c.tiles, num_warps=c.num_warps,
                                            num_stages=c.num_stages,
                                            interpret=interpret)), (x, dy, gs)),
    }
    for key, (cands, make, args) in jobs.items():
      if key.split(":")[0] not in tune_ops:
        continue
      best = None
      incumbent = tuning.Config(*table[key]) if key in table else None
      if incumbent is not None and incumbent not in cands:
        cands = [incumbent, *cands]
      t_incumbent = None
      for c in cands:
        try:
          t = bench(make(c), *args, iters=iters, reps=5)
        except Exception as exc:  # pylint: disable=broad-except
          print(f"autotune {key} {c}: failed {type(exc).__name__}", flush=True)
          continue
        log.append(dict(kind="autotune", key=key, config=c.as_tuple(), ms=t * 1e3))
        print(f"autotune {key} {c.as_tuple()} {t * 1e3:.3f} ms", flush=True)
        if c == incumbent:
          t_incumbent = t
        if best is None or t < best[0]:
          best = (t, c)
      # Timing noise is a few percent: replace a table entry only for a clear win.
      if best is not None and (t_incumbent is None or best[0] < 0.97 * t_incumbent):
        table[key] = best[1].as_tuple()
    write_table(table, table_out)  # after every shape, so a cut-off run keeps what it measured


def write_table(table, path):
  lines = ['"""Measured tile table; regenerate with `python -m experiments.benchmark_gmm --autotune`."""',
           f"# device: {jax.devices()[0].device_kind}; jax {jax.__version__}; "
           f"{time.strftime('%Y-%m-%d', time.gmtime())}",
           "# key: \"op:dtype:r<rows per group class>:k<K>:n<N>\" -> (tm, tn, tk, num_warps, num_stages[, group_m])",
           "TABLE = {"]
  lines += [f"    {k!r}: {v!r}," for k, v in sorted(table.items())]
  lines.append("}")
  pathlib.Path(path).write_text("\n".join(lines) + "\n")
  print(f"wrote {len(table)} entries to {path}", flush=True)
