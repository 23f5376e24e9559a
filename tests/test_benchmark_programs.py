"""Benchmark programs stay runnable (tiny shapes on CPU; no timing is asserted)."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_moe_layer_benchmark_smoke():
  out = subprocess.run(
      [sys.executable, "-m", "experiments.benchmark_moe_layer", "--preset=smoke",
       "--impls=auto,reference,pallas_triton_interpret", "--iters=1", "--breakdown"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.splitlines()
  assert "router logits precision float32" in lines[0], lines[0]  # the default
  assert any("dense-equivalent" in l for l in lines)
  assert any("moe layer [ragged_dot]" in l for l in lines)
  assert any("moe layer [reference]" in l for l in lines)
  assert any("moe layer [pallas_triton_interpret, fused dispatch]" in l for l in lines)
  assert any("experts only [ragged_dot]" in l for l in lines)


def _compiled_dots(fn, *args):
  return len(re.findall(r"\bdot\(", jax.jit(fn).lower(*args).compile().as_text()))


def test_dense_baseline_runs_all_nine_products():
  # Timing jax.grad(sum(mlp)) let XLA drop the last forward matmul, whose output
  # only the discarded loss needed: the baseline then did 8 of its 9 products.
  from experiments import benchmark_moe_layer as bench  # pylint: disable=g-import-not-at-top
  shape = bench.PRESETS["smoke"][0]
  step, args = bench.dense_step(shape, jnp.float32)
  assert _compiled_dots(step, *args) == 9
  ws, x, _ = args
  old_style = jax.grad(lambda ws, x: jnp.sum((jax.nn.silu(x @ ws[0]) * (x @ ws[1])) @ ws[2]),
                       argnums=(0, 1))
  assert _compiled_dots(old_style, ws, x) == 8   # control: the counter sees the drop


def test_moe_layer_trace_summary(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "experiments.benchmark_moe_layer", "--preset=smoke",
       "--impls=auto", "--fused_dispatch=off", "--iters=1", "--skip_dense",
       "--router_precision=bfloat16", f"--trace_dir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  assert "router logits precision bfloat16" in out.stdout.splitlines()[0], out.stdout[:500]
  assert "device time per step" in out.stdout, out.stdout[-2000:]
  summary = subprocess.run(
      [sys.executable, "-m", "experiments.trace_summary", str(tmp_path), "--steps=3"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert summary.returncode == 0, summary.stderr[-2000:]
  # The layer's jitted step shows up as an XLA program with a positive time.
  rows = [l.split() for l in summary.stdout.splitlines() if l.strip().startswith(tuple("0123456789"))]
  assert rows and float(rows[0][0]) > 0


def test_gmm_benchmark_smoke():
  # Kernels in interpret mode on CPU; tiny-mosaic sits on the Mosaic tile grid.
  out = subprocess.run(
      [sys.executable, "-m", "experiments.benchmark_gmm", "--interpret",
       "--shapes=tiny,tiny-mosaic", "--impls=pallas_mosaic,pallas_triton,ragged_dot",
       "--modes=fwd,fwdbwd,tgmm", "--dists=balanced", "--fused=false", "--iters=1", "--reps=1"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  assert "FAILED" not in out.stdout, out.stdout[-3000:]
  rows = [l.split() for l in out.stdout.splitlines() if l.startswith("tiny")]
  seen = {(r[0], r[2], r[3]) for r in rows}
  for shape in ("tiny", "tiny-mosaic"):
    for impl in ("pallas_mosaic", "pallas_triton"):
      for mode in ("fwd", "fwdbwd", "tgmm"):
        assert (shape, impl, mode) in seen, (shape, impl, mode, out.stdout[-3000:])
    assert (shape, "ragged_dot", "fwdbwd") in seen


def test_tile_variant_names():
  from experiments import tile_variants as tv  # pylint: disable=g-import-not-at-top
  from moe_kernels import gmm_mosaic  # pylint: disable=g-import-not-at-top
  base = gmm_mosaic.Tiles(tm=256, tn=64, stages=3)
  parse = lambda name: tv.variant_tiles(name, gmm_mosaic.Tiles, tv.GMM_FIELDS,
                                        tv.GMM_REQUIRED, base)
  # Named fields alone change the kernel's default tiles for the shape.
  assert parse("pallas_mosaic@split=m/delay_release=1") == gmm_mosaic.Tiles(
      tm=256, tn=64, stages=3, split="m", delay_release=1)
  # Positional fields start from the class defaults; named ones may follow.
  assert parse("pallas_mosaic@128/128/64/4/8/1/split=m") == gmm_mosaic.Tiles(
      tm=128, tn=128, tk=64, stages=4, window=8, overlap=True, split="m")
  with pytest.raises(ValueError, match="fields from"):
    parse("pallas_mosaic@bogus=1")
  with pytest.raises(ValueError, match="tm/tn/tk/stages/window"):
    parse("pallas_mosaic@split=m/128")
  with pytest.raises(ValueError, match="tm/tn/tk/stages/window"):
    parse("pallas_mosaic@128/128")


def test_gmm_benchmark_refuses_bad_impls_before_compute():
  # The checks live in tile_variants: benchmark_gmm's absl flags clash with
  # benchmark_moe_layer's in one process, so its own refusal runs in a subprocess.
  from experiments import tile_variants as tv  # pylint: disable=g-import-not-at-top
  check = tv.check_impls
  check(["tgmm_mosaic", "tgmm_mosaic@pipeline=per_item"], ["tgmm"], "first")
  check(["pallas_mosaic", "tgmm_mosaic@stages=2", "pallas_mosaic@split=m"],
        ["fwd", "dx", "tgmm"], "first")
  with pytest.raises(ValueError, match="tm/tn/tk/stages/window"):
    check(["pallas_mosaic@split=m/128"], ["fwd"], "dense")
  with pytest.raises(ValueError, match="'pallas_mosiac' is not one of"):
    check(["pallas_mosiac"], ["fwd"], "dense")
  with pytest.raises(ValueError, match="'fwd_bwd' is not one of"):
    check(["pallas_mosaic"], ["fwd_bwd"], "dense")
  with pytest.raises(ValueError, match="tko/tn/tr/stages"):
    check(["tgmm_mosaic@128/64"], ["tgmm"], "dense")
  with pytest.raises(ValueError, match="'ragged_dot' has no kernel in --modes=tgmm"):
    check(["pallas_mosaic", "ragged_dot"], ["tgmm"], "dense")
  # --baseline=first compares each mode's rows with the first impl that has that
  # mode; a mode none has is refused (ninth session: with no such impl the tgmm
  # rows were silently timed against dense instead).
  impls = ["pallas_mosaic@split=m", "tgmm_mosaic", "tgmm_mosaic@stages=2"]
  assert tv.first_in_mode(impls, "fwd") == "pallas_mosaic@split=m"
  assert tv.first_in_mode(impls, "tgmm") == "tgmm_mosaic"
  with pytest.raises(ValueError, match="none of --impls has a kernel in mode 'tgmm'"):
    check(["pallas_mosaic@split=m", "ragged_dot"], ["fwd", "tgmm"], "first")
  check(["pallas_mosaic@split=m", "ragged_dot"], ["fwd", "tgmm"], "dense")
  # The program refuses before its device checks (--check) run anything.
  out = subprocess.run(
      [sys.executable, "-m", "experiments.benchmark_gmm", "--interpret", "--check",
       "--shapes=tiny-mosaic", "--impls=pallas_mosiac", "--modes=fwd"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode != 0
  assert "'pallas_mosiac' is not one of" in out.stderr, out.stderr[-2000:]
  assert '"kind": "check"' not in out.stdout, out.stdout[-2000:]


def test_gmm_benchmark_tile_variants_smoke():
  from moe_kernels import gmm_mosaic  # pylint: disable=g-import-not-at-top
  impls = ["pallas_mosaic@64/64/64/2/2/0/2", "pallas_mosaic@tm=128/split=m"]
  modes = "fwd"
  if gmm_mosaic.interpreter_reads_transposed():  # tgmm and dx read transposed operands
    impls += ["tgmm_mosaic@128/64/64/2", "tgmm_mosaic@pipeline=per_item/order=index"]
    modes += ",tgmm,dx"
  out = subprocess.run(
      [sys.executable, "-m", "experiments.benchmark_gmm", "--interpret",
       "--shapes=tiny-mosaic", f"--impls={','.join(impls)}", f"--modes={modes}",
       "--dists=skewed", "--fused=false", "--iters=1", "--reps=1", "--baseline=first"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  assert "FAILED" not in out.stdout, out.stdout[-3000:]
  firsts = f"{impls[0]} in fwd" + (f", {impls[2]} in tgmm, {impls[0]} in dx"
                                    if len(impls) > 2 else "")
  assert f"ratio: the first impl's time / the impl's, timed alternately ({firsts})" \
      in out.stdout, out.stdout[-3000:]
  seen = {(r[2], r[3]) for r in (l.split() for l in out.stdout.splitlines())
          if r and r[0] == "tiny-mosaic"}
  for impl in impls[:2]:
    assert (impl, "fwd") in seen and (impl, "tgmm") not in seen, seen
  if len(impls) > 2:
    assert (impls[0], "dx") in seen and (impls[1], "dx") in seen, seen
    for impl in impls[2:]:
      assert (impl, "tgmm") in seen and (impl, "fwd") not in seen, seen


def _mosaic_reads_transposed():
  from moe_kernels import gmm_mosaic  # pylint: disable=g-import-not-at-top
  return gmm_mosaic.interpreter_reads_transposed()


def test_ptxas_report_compiles_each_variant(tmp_path):
  # On CPU the kernels run in the interpreter (no ptxas): this checks the variant
  # names, the child processes and the dump folders, not ptxas's own lines.
  impls = ["pallas_mosaic@tm=64/tn=64/stages=2", "pallas_mosaic@tm=128/tn=64/stages=2/split=m"]
  out = subprocess.run(
      [sys.executable, "-m", "experiments.ptxas_report", "--interpret", "--shape=tiny-mosaic",
       "--rows=200", "--dist=skewed", f"--impls={','.join(impls)}", f"--out={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  for impl in impls:
    assert f"== {impl} (tiny-mosaic, fwd): rc 0" in out.stdout, out.stdout
  assert len(list(tmp_path.glob("*/stdout_stderr.txt"))) == 2


@pytest.mark.skipif(not _mosaic_reads_transposed(),
                    reason="dx and tgmm read transposed operands: jax >= 0.11's interpreter")
@pytest.mark.parametrize("mode, impl", [("dx", "pallas_mosaic@tm=64/tn=64/stages=2"),
                                        ("tgmm", "tgmm_mosaic@tn=64/epi_n=64/stages=2")])
def test_ptxas_report_runs_the_transposed_modes(tmp_path, mode, impl):
  out = subprocess.run(
      [sys.executable, "-m", "experiments.ptxas_report", "--interpret", "--shape=tiny-mosaic",
       "--rows=200", "--dist=skewed", f"--mode={mode}", f"--impls={impl}", f"--out={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"== {impl} (tiny-mosaic, {mode}): rc 0" in out.stdout, out.stdout


def test_gmm_autotune_writes_the_table(tmp_path):
  # Triton kernels in interpret mode; one gmm candidate, so it must win both gmm keys.
  table_out = tmp_path / "table.py"
  out = subprocess.run(
      [sys.executable, "-m", "experiments.benchmark_gmm", "--interpret", "--autotune",
       "--shapes=tiny", "--tune_ops=gmm,tgmm", "--candidates=64/64/32/4/2", "--iters=1",
       f"--table_out={table_out}"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  ns = {}
  exec(table_out.read_text(), ns)  # pylint: disable=exec-used
  table = ns["TABLE"]
  assert table["gmm:bfloat16:r64:k64:n96"][:5] == (64, 64, 32, 4, 2)   # forward
  assert table["gmm:bfloat16:r64:k96:n64"][:5] == (64, 64, 32, 4, 2)   # input gradient
  assert "tgmm:bfloat16:r64:k64:n96" in table
