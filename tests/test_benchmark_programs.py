"""Benchmark programs stay runnable (tiny shapes on CPU; no timing is asserted)."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_moe_layer_benchmark_smoke():
  out = subprocess.run(
      [sys.executable, "-m", "experiments.benchmark_moe_layer", "--preset=smoke",
       "--impls=auto,reference,pallas_triton_interpret", "--iters=1", "--breakdown"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.splitlines()
  assert any("dense-equivalent" in l for l in lines)
  assert any("moe layer [ragged_dot]" in l for l in lines)
  assert any("moe layer [reference]" in l for l in lines)
  assert any("moe layer [pallas_triton_interpret, fused dispatch]" in l for l in lines)
  assert any("experts only [ragged_dot]" in l for l in lines)
