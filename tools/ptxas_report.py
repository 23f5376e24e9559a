r"""What ptxas says about Mosaic GPU kernel variants: registers, spills, warnings.

Compiles each named variant (``pallas_mosaic``, ``pallas_mosaic@field=value/...``,
``tgmm_mosaic`` or ``tgmm_mosaic@...``, as in ``benchmarks.gmm``) once at one shape, in a
subprocess with Mosaic GPU's ptxas dump on, and prints the lines that matter for
speed: register use, spills, and warnings such as wgmma serialization (ptxas
makes each wgmma wait for the previous one when it cannot prove the accumulator
registers safe, which costs the overlap the kernels are built on).

    python -m tools.ptxas_report --shape=dsv3 \
        --impls=pallas_mosaic,pallas_mosaic@split=m,pallas_mosaic@split=m/stages=3

Needs a Hopper GPU (with --interpret it runs on CPU, without ptxas: a check of
the names and the child processes). Full dumps go under --out (default
$OUT/ptxas or /tmp/ptxas). ``tools/ncu_profile.sh`` profiles one variant through
this program's --child mode.
"""
from __future__ import annotations

import functools
import os
import pathlib
import re
import subprocess
import sys

from absl import app
from absl import flags

from benchmarks import tile_variants
from benchmarks.gmm_shapes import DISTS, SHAPES
from benchmarks.impl_names import MOSAIC_MODES, check_mosaic_impl

_SHAPE = flags.DEFINE_enum("shape", "dsv3", list(SHAPES), "a shape of benchmarks.gmm_shapes")
_IMPLS = flags.DEFINE_list("impls", ["pallas_mosaic"],
                           "kernel variants, named as in benchmarks.gmm")
_MODE = flags.DEFINE_enum("mode", "fwd", list(MOSAIC_MODES),
                          "fwd, dx (pallas_mosaic names) or tgmm (tgmm_mosaic names)")
_ROWS = flags.DEFINE_integer("rows", 0, "M to run at (0: the shape's own; default tiles "
                             "depend on rows per group)")
_OUT = flags.DEFINE_string("out", "", "dump folder (default $OUT/ptxas or /tmp/ptxas)")
_DIST = flags.DEFINE_enum("dist", "balanced", list(DISTS),
                          "group sizes of the compiled call (gmm_shapes.group_sizes)")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Pallas interpret mode (CPU smoke test)")
_CHILD = flags.DEFINE_string("child", "", "internal: compile this one impl and exit")

INTERESTING = re.compile(r"warning|wgmma|spill|registers|serializ|stack frame", re.I)


def _compile(impl: str, shape: str, mode: str, rows: int, interpret: bool,
             dist: str = "balanced") -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from moe_kernels import gmm_mosaic  # pylint: disable=g-import-not-at-top
  from moe_kernels import tgmm_mosaic  # pylint: disable=g-import-not-at-top
  from benchmarks.gmm_shapes import group_sizes, make_inputs  # pylint: disable=g-import-not-at-top
  shape_m, k, n, e = SHAPES[shape]
  m = rows or shape_m
  # Random inputs, as the benchmarks use (a profile of ones runs at other clocks).
  x, w, dy = make_inputs(m, k, n, e, jnp.bfloat16)
  gs = jnp.asarray(group_sizes(m, e, dist))
  if mode == "tgmm":
    tiles = tgmm_mosaic.default_tiles(k, n)
    if "@" in impl:
      tiles = tile_variants.parse_variant(impl, tiles)
    fn = functools.partial(tgmm_mosaic.tgmm, tiles=tiles, interpret=interpret)
    args = (x, dy, gs)
  else:  # fwd: x[M, K] @ w[g]; dx: dy[M, N] @ w[g]^T with w[E, K, N]
    kk, nn = (n, k) if mode == "dx" else (k, n)
    tiles = gmm_mosaic.default_tiles(m, kk, nn, e)
    if "@" in impl:
      tiles = tile_variants.parse_variant(impl, tiles)
    fn = functools.partial(gmm_mosaic.gmm, tiles=tiles, transpose_rhs=mode == "dx",
                           interpret=interpret)
    args = (dy if mode == "dx" else x, w, gs)
  # Free the input this mode does not read (at dsv3 an unused w is 7.5 GB, which
  # ncu would save and restore between its replay passes).
  del x, w, dy
  jax.block_until_ready(jax.jit(fn)(*args))


def main(argv):
  del argv
  if _CHILD.value:
    _compile(_CHILD.value, _SHAPE.value, _MODE.value, _ROWS.value, _INTERPRET.value,
             _DIST.value)
    return
  for impl in _IMPLS.value:
    try:
      check_mosaic_impl(impl, _MODE.value)
    except ValueError as exc:
      raise app.UsageError(str(exc)) from exc
  out = pathlib.Path(_OUT.value or os.path.join(os.environ.get("OUT", "/tmp"), "ptxas"))
  for impl in _IMPLS.value:
    folder = out / re.sub(r"[^A-Za-z0-9_.-]", "_", impl)
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_TO=str(folder))
    proc = subprocess.run(
        [sys.executable, "-m", "tools.ptxas_report", f"--child={impl}",
         f"--shape={_SHAPE.value}", f"--mode={_MODE.value}", f"--rows={_ROWS.value}",
         f"--interpret={_INTERPRET.value}", f"--dist={_DIST.value}"],
        env=env, capture_output=True, text=True, check=False)
    (folder / "stdout_stderr.txt").write_text(proc.stdout + proc.stderr)
    lines = []
    for dumped in sorted(folder.glob("*")):
      # Mosaic dumps every stage (MLIR, PTX, ...); keep ptxas's report and the
      # resource summary, drop the rest (large, and not what this report is for).
      if dumped.suffix in (".ptxas",) or dumped.name.endswith(".resources.txt"):
        lines += dumped.read_text(errors="replace").splitlines()
      elif dumped.name != "stdout_stderr.txt":
        dumped.unlink()
    hits = [ln.strip() for ln in lines if INTERESTING.search(ln)]
    print(f"== {impl} ({_SHAPE.value}, {_MODE.value}): rc {proc.returncode}, "
          f"{len(hits)} lines of note")
    if proc.returncode:
      errors = [ln for ln in proc.stderr.splitlines() if "Error" in ln] or ["?"]
      print("  failed: " + errors[-1][:300])
    for ln in hits[:40]:
      print("  " + ln[:200])


if __name__ == "__main__":
  app.run(main)
