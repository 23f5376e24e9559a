"""Tests for moe_jax.training.metric_logging and moe_jax.training.plots."""

import json
import struct

import numpy as np
import pytest

from moe_jax.training import metric_logging
from moe_jax.training import plots


def _read_lines(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def _read_tb_scalars(tb_dir):
  """{tag: [(step, value)]} from TFRecord-framed event files (no TF needed)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars = {}
  for path in sorted(tb_dir.glob("events.out.tfevents.*")):
    raw = path.read_bytes()
    pos = 0
    while pos < len(raw):
      (length,) = struct.unpack("<Q", raw[pos:pos + 8])
      event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length])
      pos += 12 + length + 4  # length, its crc, payload, payload crc.
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_log_writes_jsonl_and_tensorboard(tmp_path):
  with metric_logging.MetricLogger(tmp_path, 100, 1024) as logger:
    logger.log(1, {"loss": np.float32(2.5), "lr": 1e-3,
                   "moe/layer_1/expert_load": np.array([0.25, 0.75])})
    logger.log_scalars(2, {"loss": 2.0, "tokens": np.int64(7)})
  records = _read_lines(tmp_path / "metrics.jsonl")
  assert records[1].pop("perf/tokens_per_sec") > 0  # From the 2nd log on.
  assert records == [
      {"step": 1, "loss": 2.5, "lr": 1e-3,
       "moe/layer_1/expert_load": [0.25, 0.75]},
      {"step": 2, "loss": 2.0, "tokens": 7}]
  events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert events and all(p.stat().st_size > 0 for p in events)
  scalars = _read_tb_scalars(tmp_path / "tensorboard")
  assert scalars["loss"] == [(1, 2.5), (2, 2.0)]
  assert scalars["moe/layer_1/expert_load/1"] == [(1, 0.75)]


def test_log_returns_rate_from_timer(tmp_path):
  now = [0.0]
  with metric_logging.MetricLogger(tmp_path, 100, 512,
                                   is_chief=False) as logger:
    logger.timer = metric_logging.StepTimer(100, 512, clock=lambda: now[0])
    assert logger.log(10, {"loss": 1.0}) == (None, None)  # Baseline.
    now[0] = 5.0
    rate = logger.log(20, {"loss": 1.0})
    assert rate.tokens_per_sec == pytest.approx(512 * 10 / 5.0)
    assert rate.eta_seconds == pytest.approx(80 * 0.5)
    now[0] = 65.0  # A slow eval, logged at the same step, is not counted.
    assert logger.log(20, {"eval/loss": 1.0}) == (None, None)
    now[0] = 70.0
    assert logger.log(30, {"loss": 1.0}).tokens_per_sec == pytest.approx(1024)


def test_log_accepts_jax_arrays(tmp_path):
  jnp = pytest.importorskip("jax.numpy")
  with metric_logging.MetricLogger(tmp_path, 10, 1) as logger:
    logger.log(3, {"loss": jnp.float32(1.5), "load": jnp.array([0.5, 0.5])})
  assert _read_lines(tmp_path / "metrics.jsonl") == [
      {"step": 3, "loss": 1.5, "load": [0.5, 0.5]}]


def test_log_rejects_matrices(tmp_path):
  with metric_logging.MetricLogger(tmp_path, 10, 1) as logger:
    with pytest.raises(ValueError, match="'m'"):
      logger.log(1, {"m": np.zeros((2, 2))})


def test_append_and_truncate_after(tmp_path):
  with metric_logging.MetricLogger(tmp_path, 10, 1) as logger:
    for step in range(1, 6):
      logger.log(step, {"loss": float(step)})
  before = (tmp_path / "metrics.jsonl").read_text().splitlines()
  # A resumed run from step 3: earlier lines kept byte-for-byte.
  with metric_logging.MetricLogger(tmp_path, 10, 1) as logger:
    logger.truncate_after(3)
    logger.log(4, {"loss": 40.0})
  after = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert after[:3] == before[:3]
  assert [r["step"] for r in map(json.loads, after)] == [1, 2, 3, 4]
  assert json.loads(after[-1])["loss"] == 40.0
  assert not list(tmp_path.glob("*.tmp"))


def test_truncate_drops_torn_last_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
  logger = metric_logging.MetricLogger(tmp_path, 10, 1)
  logger.truncate_after(5)
  logger.close()
  assert _read_lines(path) == [{"step": 1, "loss": 1.0}]


def test_non_chief_writes_nothing(tmp_path):
  with metric_logging.MetricLogger(tmp_path / "w", 10, 1,
                                   is_chief=False) as logger:
    logger.log(1, {"loss": 1.0})
    logger.truncate_after(0)
  assert not (tmp_path / "w").exists()


def test_format_progress():
  line = metric_logging.format_progress(120, 600, 2.31454, 41_234.0, 192.0)
  assert line == "step   120/600 | loss 2.3145 | 41.2k tok/s | ETA 3m12s"
  line = metric_logging.format_progress(1, 600, 5.0, None, None,
                                        extra={"bpb": 1.23456, "lr": 3e-4})
  assert line == ("step     1/600 | loss 5.0000 | -- tok/s | ETA -- | "
                  "bpb 1.235 | lr 0.0003")
  assert "ETA 1h01m" in metric_logging.format_progress(
      1, 10, 1.0, 2.5e6, 3700.0)
  assert "2.5M tok/s" in metric_logging.format_progress(
      1, 10, 1.0, 2.5e6, 3700.0)


def test_format_progress_shows_mfu_or_else_tflops():
  line = metric_logging.format_progress(120, 600, 2.31454, 41_234.0, 192.0,
                                        model_tflops=306.6, mfu=0.31)
  assert line == "step   120/600 | loss 2.3145 | 41.2k tok/s | MFU 31% | ETA 3m12s"
  assert "| MFU 4.2% |" in metric_logging.format_progress(1, 10, 1.0, 1.0, 1.0,
                                                          model_tflops=1.0, mfu=0.0421)
  line = metric_logging.format_progress(1, 10, 1.0, 1.0, 1.0, model_tflops=12.34)
  assert "| 12.3 TFLOP/s |" in line and "MFU" not in line


def test_log_adds_the_rate_metrics_next_to_tokens_per_sec(tmp_path):
  now = [0.0]
  with metric_logging.MetricLogger(
      tmp_path, 100, 512, rate_metrics=lambda tps: {"perf/model_tflops_per_sec": tps / 1e3}
  ) as logger:
    logger.timer = metric_logging.StepTimer(100, 512, clock=lambda: now[0])
    logger.log(10, {"loss": 1.0})
    now[0] = 5.0
    logger.log(20, {"loss": 1.0})
  first, second = _read_lines(tmp_path / "metrics.jsonl")
  assert "perf/model_tflops_per_sec" not in first    # no rate yet
  assert second["perf/tokens_per_sec"] == pytest.approx(1024.0)
  assert second["perf/model_tflops_per_sec"] == pytest.approx(1.024)


def test_step_timer_uses_latest_interval():
  now = [0.0]
  timer = metric_logging.StepTimer(100, 1000, clock=lambda: now[0])
  assert timer.update(1) == (None, None)  # Baseline after compiling step.
  now[0] = 30.0  # Includes nothing from before the baseline.
  assert timer.update(11) == pytest.approx((1000 * 10 / 30.0, 89 * 3.0))
  now[0] = 40.0
  assert timer.update(21) == pytest.approx((1000.0, 79 * 1.0))


# -------------------------------------------------------------------- plots


def test_plot_expert_load(tmp_path):
  with metric_logging.MetricLogger(tmp_path, 10, 1) as logger:
    rng = np.random.default_rng(0)
    for step in range(0, 50, 10):
      logger.log(step, {
          "loss": 1.0,
          "moe/layer_1/expert_load": rng.dirichlet(np.ones(4)),
          "moe/layer_3/expert_load": rng.dirichlet(np.ones(8)),
      })
  out = plots.plot_expert_load(tmp_path / "metrics.jsonl",
                               tmp_path / "load.png")
  assert out == str(tmp_path / "load.png")
  png = (tmp_path / "load.png").read_bytes()
  assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_plot_expert_load_without_moe_metrics(tmp_path):
  with metric_logging.MetricLogger(tmp_path, 10, 1) as logger:
    logger.log(1, {"loss": 1.0})
  with pytest.raises(ValueError, match="expert_load"):
    plots.plot_expert_load(tmp_path / "metrics.jsonl", tmp_path / "x.png")
  assert not (tmp_path / "x.png").exists()
