"""The benchmark programs stay runnable (tiny shapes on CPU; no timing is asserted)."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args, timeout=600):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _table_rows(stdout, shape):
  """(impl, mode) -> ratio of the table's rows for ``shape``."""
  rows = [line.split() for line in stdout.splitlines() if line.startswith(shape + " ")]
  return {(r[2], r[3]): float(r[6]) for r in rows if len(r) == 7}


def test_gmm_table_smoke():
  # Triton kernels in interpret mode, ragged_dot, and the fused gather / combine rows.
  out = _run("benchmarks.gmm", "--interpret", "--shapes=tiny", "--impls=pallas_triton,ragged_dot",
             "--modes=fwdbwd,tgmm", "--dists=balanced", "--iters=1", "--reps=1")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "FAILED" not in out.stdout, out.stdout[-3000:]
  seen = _table_rows(out.stdout, "tiny")
  expected = [("dense", "fwdbwd"), ("dense", "tgmm"), ("pallas_triton", "fwdbwd"),
              ("pallas_triton", "tgmm"), ("ragged_dot", "fwdbwd"), ("gather_unfused", "fwdbwd"),
              ("gather_fused", "fwdbwd"), ("combine_unfused", "fwdbwd"),
              ("combine_fused", "fwdbwd")]
  assert sorted(seen) == sorted(expected), out.stdout[-3000:]
  assert all(ratio > 0 for ratio in seen.values())


def test_gmm_ab_of_tile_variants_smoke():
  # The Mosaic interpreter of jax < 0.11 takes many seconds a call and cannot run
  # the transposed products (dx, tgmm): there, one variant against the Triton kernel.
  from moe_kernels import gmm_mosaic  # pylint: disable=g-import-not-at-top
  impls = ["pallas_triton", "pallas_mosaic@tm=128/split=m"]
  modes = ["fwd"]
  if gmm_mosaic.interpreter_reads_transposed():
    impls += ["pallas_mosaic@64/64/64/2/2", "tgmm_mosaic@stages=2/window=8"]
    modes += ["dx", "tgmm"]
  out = _run("benchmarks.gmm", "--interpret", "--shapes=tiny-mosaic", f"--impls={','.join(impls)}",
             f"--modes={','.join(modes)}", "--dists=skewed", "--fused=false", "--iters=1",
             "--reps=1", "--baseline=first")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "FAILED" not in out.stdout, out.stdout[-3000:]
  firsts = {"fwd": impls[0], "dx": impls[1], "tgmm": impls[0]}
  named = ", ".join(f"{firsts[m]} in {m}" for m in modes)
  assert f"ratio: the first impl's time / the impl's, timed alternately ({named})" \
      in out.stdout, out.stdout[-3000:]
  seen = _table_rows(out.stdout, "tiny-mosaic")
  expected = {(impl, "fwd") for impl in impls if not impl.startswith("tgmm")}
  if len(modes) > 1:
    expected |= {(impls[1], "dx"), (impls[2], "dx"), (impls[0], "tgmm"), (impls[3], "tgmm")}
  assert set(seen) == expected | {("dense", m) for m in modes}, seen
  for mode in modes:
    assert seen[(firsts[mode], mode)] == 1.0   # the baseline's own row


@pytest.mark.parametrize("flag, message", [
    ("--impls=pallas_mosiac", "'pallas_mosiac' is not one of"),
    ("--shapes=tiny,tiny-mosiac", "'tiny-mosiac' is not one of"),
])
def test_gmm_refuses_bad_names_before_device_work(flag, message):
  out = _run("benchmarks.gmm", "--interpret", "--shapes=tiny", "--impls=pallas_triton", flag)
  assert out.returncode != 0
  assert message in out.stderr, out.stderr[-2000:]
  assert '"kind": "bench"' not in out.stdout, out.stdout[-2000:]


def test_gmm_torch_refuses_bad_shapes_and_missing_torch():
  out = _run("benchmarks.gmm_torch", "--shapes=tiny-mosiac")
  assert out.returncode != 0
  assert "'tiny-mosiac' is not one of" in out.stderr, out.stderr[-2000:]
  out = _run("benchmarks.gmm_torch", "--shapes=tiny")
  try:
    import torch  # pylint: disable=g-import-not-at-top
    has_cuda = torch.cuda.is_available()
  except ImportError:
    has_cuda = False
  if not has_cuda:
    assert out.returncode != 0
    assert "needs torch with a CUDA device" in out.stderr, out.stderr[-2000:]


def test_impl_names_are_checked():
  from benchmarks.impl_names import check_impls, first_in_mode  # pylint: disable=g-import-not-at-top
  check_impls(["tgmm_mosaic", "tgmm_mosaic@window=8"], ["tgmm"], "first")
  check_impls(["pallas_mosaic", "tgmm_mosaic@stages=2", "pallas_mosaic@split=m"],
              ["fwd", "dx", "tgmm"], "first")
  with pytest.raises(ValueError, match="tm/tn/tk/stages/window"):
    check_impls(["pallas_mosaic@split=m/128"], ["fwd"], "dense")
  with pytest.raises(ValueError, match="'pallas_mosiac' is not one of"):
    check_impls(["pallas_mosiac"], ["fwd"], "dense")
  with pytest.raises(ValueError, match="'fwd_bwd' is not one of"):
    check_impls(["pallas_mosaic"], ["fwd_bwd"], "dense")
  with pytest.raises(ValueError, match=re.escape("tko/tn/tr/stages[/window[/window_from]]")):
    check_impls(["tgmm_mosaic@128/64"], ["tgmm"], "dense")
  with pytest.raises(ValueError, match="'ragged_dot' has no kernel in --modes=tgmm"):
    check_impls(["pallas_mosaic", "ragged_dot"], ["tgmm"], "dense")
  # --baseline=first compares each mode's rows with the first impl that has that
  # mode; a mode none has is refused rather than timed against dense.
  impls = ["pallas_mosaic@split=m", "tgmm_mosaic", "tgmm_mosaic@stages=2"]
  assert first_in_mode(impls, "fwd") == "pallas_mosaic@split=m"
  assert first_in_mode(impls, "tgmm") == "tgmm_mosaic"
  with pytest.raises(ValueError, match="none of --impls has a kernel in mode 'tgmm'"):
    check_impls(["pallas_mosaic@split=m", "ragged_dot"], ["fwd", "tgmm"], "first")
  check_impls(["pallas_mosaic@split=m", "ragged_dot"], ["fwd", "tgmm"], "dense")


def test_tile_variant_names():
  from benchmarks import tile_variants as tv  # pylint: disable=g-import-not-at-top
  from moe_kernels import gmm_mosaic, tgmm_mosaic  # pylint: disable=g-import-not-at-top
  base = gmm_mosaic.Tiles(tm=256, tn=64, stages=3)
  # Named fields alone change the kernel's default tiles for the shape.
  assert tv.parse_variant("pallas_mosaic@split=m/window=8", base) == gmm_mosaic.Tiles(
      tm=256, tn=64, stages=3, split="m", window=8)
  # Positional fields start from the class defaults; named ones may follow.
  assert tv.parse_variant("pallas_mosaic@128/128/64/4/8/split=m", base) == gmm_mosaic.Tiles(
      tm=128, tn=128, tk=64, stages=4, window=8, split="m")
  assert tv.parse_variant("tgmm_mosaic@128/64/64/2/8/1") == tgmm_mosaic.Tiles(
      tko=128, tn=64, tr=64, stages=2, window=8, window_from=1)
  with pytest.raises(ValueError, match="fields from"):
    tv.parse_variant("pallas_mosaic@bogus=1", base)
  with pytest.raises(ValueError, match="tm/tn/tk/stages/window"):
    tv.parse_variant("pallas_mosaic@split=m/128", base)
  with pytest.raises(ValueError, match="tm/tn/tk/stages/window"):
    tv.parse_variant("pallas_mosaic@128/128", base)
  with pytest.raises(ValueError, match="is not a variant"):
    tv.parse_variant("pallas_triton@tm=64")


def _compiled_dots(fn, *args):
  return len(re.findall(r"\bdot\(", jax.jit(fn).lower(*args).compile().as_text()))


def test_forward_backward_keeps_every_product():
  # Timing jax.grad(sum(mlp)) let XLA drop the last forward matmul, whose output
  # only the discarded loss needed: a SwiGLU baseline then did 8 of its 9 products.
  from benchmarks import timing  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (64, 32))
  ws = (jax.random.normal(keys[1], (32, 48)), jax.random.normal(keys[2], (32, 48)),
        jax.random.normal(keys[3], (48, 32)))
  swiglu = lambda ws, x: (jax.nn.silu(x @ ws[0]) * (x @ ws[1])) @ ws[2]
  dy = timing.random_cotangent((64, 32), jnp.float32)
  assert _compiled_dots(timing.forward_backward(swiglu), ws, x, dy) == 9
  old_style = jax.grad(lambda ws, x: jnp.sum(swiglu(ws, x)), argnums=(0, 1))
  assert _compiled_dots(old_style, ws, x) == 8   # control: the counter sees the drop


def test_median_and_paired_timing_run_each_function():
  from benchmarks import timing  # pylint: disable=g-import-not-at-top
  calls = {"base": 0, "fn": 0}

  def counted(name):
    def fn():
      calls[name] += 1
      return jnp.zeros(())
    return fn
  assert timing.median_seconds(counted("fn"), iters=3, reps=2) >= 0
  assert calls["fn"] == 1 + 3 * 2   # one warm-up call, then the samples
  pair = timing.paired(counted("base"), (), counted("fn"), (), iters=2, reps=3)
  assert calls == {"base": 1 + 2 * 3, "fn": 7 + 1 + 2 * 3}
  assert pair.ratio > 0 and pair.seconds > 0 and pair.base_seconds > 0


def test_top2_rows_come_from_the_dropless_plan():
  from benchmarks.routed_rows import random_top2_rows  # pylint: disable=g-import-not-at-top
  rows = random_top2_rows(num_tokens=50, num_experts=6, seed=3)
  token, slot = np.asarray(rows.row_token), np.asarray(rows.row_slot)
  gs = np.asarray(rows.group_sizes)
  assert gs.sum() == 100 and sorted(slot) == list(range(100))
  assert np.all(slot // 2 == token)
  expert_of_row = np.repeat(np.arange(6), gs)
  # Each token's two rows lie in two different experts' groups.
  for t in range(50):
    assert len(set(expert_of_row[token == t])) == 2
  assert np.all((np.asarray(rows.row_weight) >= 0) & (np.asarray(rows.row_weight) < 1))


def test_moe_layer_benchmark_smoke():
  out = _run("benchmarks.moe_layer", "--preset=smoke",
             "--impls=auto,reference,pallas_triton_interpret", "--iters=1", "--breakdown",
             timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.splitlines()
  assert "router logits precision float32" in lines[0], lines[0]  # the default
  assert any("dense-equivalent" in l for l in lines)
  assert any("moe layer [ragged_dot]" in l for l in lines)
  assert any("moe layer [reference]" in l for l in lines)
  assert any("moe layer [pallas_triton_interpret, fused dispatch]" in l for l in lines)
  assert any("experts only [ragged_dot]" in l for l in lines)


def test_moe_layer_benchmark_trace(tmp_path):
  out = _run("benchmarks.moe_layer", "--preset=smoke", "--impls=auto", "--dispatch=dropless",
             "--iters=1", "--skip_dense", "--router_precision=bfloat16",
             f"--trace_dir={tmp_path}", timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "router logits precision bfloat16" in out.stdout.splitlines()[0], out.stdout[:500]
  assert "device time per step" in out.stdout, out.stdout[-2000:]


def test_embedding_benchmark_smoke():
  out = _run("benchmarks.embedding", "--preset=smoke", "--iters=1", "--reps=1", timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = {(r[0], r[1], r[2]): float(r[-1]) for r in map(str.split, out.stdout.splitlines())
          if len(r) == 6 and r[0].isdigit()}
  expected = {(vocab, method, mode) for vocab, auto in (("256", "matmul"), ("2048", "segment_sum"))
              for method in ("matmul", "segment_sum", f"auto={auto}") for mode in ("bwd", "fwdbwd")}
  assert set(rows) == expected, out.stdout[-3000:]
  assert all(ratio > 0 for ratio in rows.values())


def test_train_step_benchmark_smoke():
  out = _run("benchmarks.train_step", "--smoke", timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.splitlines()
  assert "(peak unknown: no MFU)" in lines[0] and "median of 3 steps" in lines[0], lines[0]
  assert "dense equivalent: moe_every=0, ffn_kind=swiglu, d_ff=96" in lines[1], lines[1]
  rows = {l.split()[0]: l.split() for l in lines if l.split()[:1] in (["moe"], ["dense"])}
  assert sorted(rows) == ["dense", "moe"], out.stdout
  for row in rows.values():   # GFLOP/tok, tokens/s, step ms, TFLOP/s, MFU, mem GiB, compile s
    assert len(row) == 8 and row[5] == "--", row
    assert all(float(v) > 0 for v in row[1:5] + row[6:]), row
  ratio = float(lines[-1].removeprefix("ratio moe/dense tokens/s: "))
  assert ratio == pytest.approx(float(rows["moe"][2]) / float(rows["dense"][2]), rel=1e-2)
