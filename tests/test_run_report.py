"""What a run reports: model FLOPs, TFLOP/s and MFU, peak memory, profiles of chosen steps."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from moe_jax import flops, profiling
from moe_jax.config_fields import ConfigError
from moe_jax.training import loop
from moe_jax.training.config import experiment_config
from test_training import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_profiled_run_reports_flops_mfu_memory_and_its_top_kernels(tmp_path, capsys,
                                                                    monkeypatch):
  # CPU has no peak in the table and no memory stats: give it both.
  monkeypatch.setitem(flops.PEAK_BF16_TFLOPS, jax.devices()[0].device_kind, 0.5)
  monkeypatch.setattr(profiling, "peak_memory_bytes", lambda devices: 3 * 2**29)
  config = tiny_config(steps=4)
  config.train.final_eval_batches, config.train.checkpoint_every = 1, 1000
  loop.train_and_evaluate(config, str(tmp_path), profile_steps=(2, 3))
  out = capsys.readouterr().out
  count = flops.model_flops_per_token(experiment_config(config).model, config.data.seq_len,
                                      batch_size=config.data.batch_size)
  assert count.describe() in out and f"{jax.devices()[0].device_kind}: peak 0.5 bf16" in out
  assert "profile of steps 2:3 in " in out and "device time per step" in out, out
  assert profiling.find_traces(str(tmp_path / "profile"))
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  steps = [r for r in records if "loss" in r]
  assert all(r["perf/peak_memory_gib"] == 1.5 for r in steps)
  for r in steps[1:]:   # every interval after the first has a rate
    tflops = r["perf/tokens_per_sec"] * count.total / 1e12
    assert r["perf/model_tflops_per_sec"] == pytest.approx(tflops)
    assert r["perf/mfu"] == pytest.approx(tflops / (0.5 * jax.device_count()))
  progress = [l for l in out.splitlines() if l.startswith("step ")]
  assert len(progress) == 4 and all("| MFU " in l for l in progress[1:]), progress


@pytest.mark.parametrize("steps", [(3, 3), (2, 5), (5, 6)])
def test_profile_steps_outside_the_run_are_refused_before_anything_runs(tmp_path, steps):
  with pytest.raises(ConfigError, match=r"profile_steps=\d+:\d+; allowed: A:B with 0 <= A < B "
                     r"<= train.num_steps \(4\)"):
    loop.train_and_evaluate(tiny_config(steps=4), str(tmp_path / "run"), profile_steps=steps)
  assert not (tmp_path / "run").exists()


def test_parse_steps():
  assert profiling.parse_steps("0:3") == (0, 3)
  for bad in ("3", "a:b", "1:2:3", "3:3", "-1:2"):
    with pytest.raises(ValueError):
      profiling.parse_steps(bad)


def test_a_malformed_flag_stops_train_at_flag_parsing(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "experiments.train", f"--workdir={tmp_path / 'run'}",
       "--profile_steps=5:2"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "--profile_steps" in out.stderr and "0 <= A < B" in out.stderr, out.stderr[-2000:]
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("steps, last, expected", [
    ((1, 3), 5, "profile of steps 1:3"),
    ((1, 9), 3, "profile of steps 1:4"),     # the run ends inside the range
])
def test_step_profiler_traces_only_its_steps(tmp_path, steps, last, expected):
  said = []
  profiler = profiling.StepProfiler(steps, str(tmp_path), said.append)
  step_fn = jax.jit(lambda a: jnp.tanh(a @ a.T))
  a = jnp.ones((64, 64))
  try:
    for step in range(last + 1):
      profiler.before_step(step)
      a = step_fn(a)
      profiler.after_step(step, a)
  finally:
    profiler.close()
  assert len(said) == 1 and said[0].startswith(expected), said
  assert len(profiling.find_traces(str(tmp_path))) == 1


def test_peak_memory_is_the_largest_device_peak():
  class Device:
    def __init__(self, stats):
      self.stats = stats

    def memory_stats(self):
      return self.stats
  assert profiling.peak_memory_bytes([Device(None)]) is None
  assert profiling.peak_memory_bytes([Device({"peak_bytes_in_use": 5}), Device(None),
                                      Device({"peak_bytes_in_use": 7})]) == 7
